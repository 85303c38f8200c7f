"""The sandbox actor: owns one driver sandbox and the agent client talking to it.

Messages (`SandboxMessage`): `Exec`, `FileOp`, `ResetSlot` from the facades and the pool; the
actor replies through each message's `Reply`. Long work never runs in the mailbox loop: each
request becomes a child task, and each slot's requests run one at a time, in arrival order, under
that slot's lock (trio locks are FIFO-fair).

Invariants:
* A request whose caller gives up (its `cancel_scope` is cancelled) has its command killed before
  the slot's next request starts: the client kills the command's tree and waits for it.
* When the sandbox dies (agent exit, broken stream) or the actor is stopped, every pending and
  later request fails with `SandboxLost` (never a hang), the sandbox is terminated (bounded), and
  the owner learns why through `died` / the `on_exit` callback.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar, assert_never

import attrs
import trio

from hermes_actors._client import ExecResult, SandboxClient
from hermes_actors._errors import AgentError, SandboxLost
from hermes_actors.drivers._base import SandboxDriver, SandboxHandle, SandboxSpec
from hermes_actors.runtime._trio_util import (
    Reply,
    bounded_cleanup,
    close_mailbox,
    collapse_exception_groups,
)

logger = logging.getLogger("hermes_actors.sandbox")

#: How long terminating a sandbox may take before the actor moves on.
TERMINATE_LIMIT_S = 15.0
MAILBOX_SIZE = 4096
_T = TypeVar("_T")


@attrs.frozen(kw_only=True)
class Exec:
    """Run one command in a slot."""

    slot: int
    command: str | None = None
    argv: list[str] | None = None
    cwd: str = "."
    env: Mapping[str, str] | None = None
    stdin: bytes | None = None
    timeout_s: float | None = None
    max_output_bytes: int | None = None
    reply: Reply[ExecResult]
    cancel_scope: trio.CancelScope


@attrs.frozen(kw_only=True)
class FileOp:
    """A file operation of the agent (`read_file`, `write_file`, `list_files`) in a slot."""

    slot: int
    op: str
    args: Mapping[str, Any]
    reply: Reply[dict[str, Any]]
    cancel_scope: trio.CancelScope


@attrs.frozen(kw_only=True)
class ResetSlot:
    """Kill everything a slot started and wipe its workspace."""

    slot: int
    reply: Reply[int]


SandboxMessage = Exec | FileOp | ResetSlot


async def _file_op(message: FileOp, client: SandboxClient) -> dict[str, Any]:
    return await client.call(message.op, {"slot": message.slot, **message.args})


def _replies_of(message: SandboxMessage) -> list[Reply[Any]]:
    return [message.reply]


class SandboxActor:
    """One sandbox. Start with `await nursery.start(actor.run)`; address it by the actor object."""

    def __init__(
        self,
        *,
        driver: SandboxDriver,
        spec: SandboxSpec,
        on_ready: Callable[[SandboxActor], None] | None = None,
        env: Mapping[str, str] | None = None,
        max_output_bytes: int = 1_000_000,
    ) -> None:
        self._driver = driver
        self.spec = spec
        self._on_ready = on_ready
        self._env = dict(env or {})
        self._max_output_bytes = max_output_bytes
        self._send, self._receive = trio.open_memory_channel[SandboxMessage](MAILBOX_SIZE)
        self._slot_locks = [trio.Lock() for _ in range(spec.slots)]
        self.handle: SandboxHandle | None = None
        self.client: SandboxClient | None = None
        self.sandbox_id = f"{spec.profile}-starting"
        self.started_at = 0.0
        self.died: SandboxLost | None = None
        self.commands_run = 0
        self.command_failures = 0

    # -- the caller side: send a message, await its reply --------------------------------------

    async def exec(self, slot: int, **options: Any) -> ExecResult:
        """Run a command in `slot` (see `SandboxClient.exec` for the options).

        Cancellation kills the command (its tree) before the slot serves anything else.
        Raises `SandboxLost` if the sandbox is or becomes dead.
        """
        scope = trio.CancelScope()
        reply: Reply[ExecResult] = Reply()
        await self._request(Exec(slot=slot, reply=reply, cancel_scope=scope, **options), scope)
        return await self._await_reply(reply, scope)

    async def file_op(self, slot: int, op: str, args: Mapping[str, Any]) -> dict[str, Any]:
        scope = trio.CancelScope()
        reply: Reply[dict[str, Any]] = Reply()
        await self._request(
            FileOp(slot=slot, op=op, args=args, reply=reply, cancel_scope=scope), scope
        )
        return await self._await_reply(reply, scope)

    async def reset_slot(self, slot: int) -> int:
        """Kill the slot's processes and wipe its workspace; returns how many were killed."""
        reply: Reply[int] = Reply()
        await self._request(ResetSlot(slot=slot, reply=reply), None)
        return await reply.wait()

    async def _request(self, message: SandboxMessage, scope: trio.CancelScope | None) -> None:
        if self.died is not None:
            raise self.died
        try:
            await self._send.send(message)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise self.died or SandboxLost(self.sandbox_id, "sandbox stopped") from None

    async def _await_reply(self, reply: Reply[_T], scope: trio.CancelScope) -> _T:
        try:
            return await reply.wait()
        except BaseException:
            # The caller gave up (or failed): the command it asked for must not run on.
            scope.cancel(reason="caller gave up")
            raise

    # -- the actor ----------------------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[SandboxActor] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Start the sandbox, report started once its agent is ready, then serve the mailbox.

        Returns when the sandbox died (see `died`) or the actor was cancelled; raises the
        driver's error if the sandbox never started. In every case the sandbox is terminated.
        """
        reason: BaseException | None = None
        try:
            with collapse_exception_groups():
                await self._serve(task_status)
        except BaseException as exc:
            reason = exc
            raise
        finally:
            if self.died is None:
                if isinstance(reason, SandboxLost):
                    self.died = reason
                else:
                    self.died = SandboxLost(self.sandbox_id, "sandbox stopped")
            # A fresh error per reply: one exception object raised in many tasks would get
            # their tracebacks mixed up.
            died = self.died
            close_mailbox(
                self._receive, _replies_of, lambda: SandboxLost(died.sandbox_id, died.reason)
            )
            if self.handle is not None:
                await bounded_cleanup(TERMINATE_LIMIT_S, self.handle.terminate)

    async def _serve(self, task_status: trio.TaskStatus[SandboxActor]) -> None:
        self.handle = await self._driver.create(self.spec)
        self.sandbox_id = self.handle.sandbox_id
        self.started_at = trio.current_time()
        async with trio.open_nursery() as nursery:
            self.client = SandboxClient(
                self.handle,
                ttl_s=self.spec.agent_ttl_s,
                env=self._env,
                max_output_bytes=self._max_output_bytes,
            )
            await nursery.start(self._run_client, nursery.cancel_scope)
            task_status.started(self)
            if self._on_ready is not None:
                self._on_ready(self)
            async for message in self._receive:
                self._dispatch(nursery, message)

    async def _run_client(
        self, actor_scope: trio.CancelScope, *, task_status: trio.TaskStatus[SandboxClient]
    ) -> None:
        assert self.client is not None
        try:
            await self.client.run(task_status=task_status)
            self.died = self.client.lost or SandboxLost(self.sandbox_id, "agent exited")
        except SandboxLost as exc:
            self.died = exc
            raise
        finally:
            # Whatever ended the client ends the actor: a sandbox without its agent is dead.
            actor_scope.cancel(reason="sandbox agent gone")

    def _dispatch(self, nursery: trio.Nursery, message: SandboxMessage) -> None:
        slot = message.slot
        match message:
            case Exec():
                work: Callable[[SandboxClient], Awaitable[Any]] = functools.partial(
                    self._run_exec, message
                )
                scope = message.cancel_scope
            case FileOp():
                work = functools.partial(_file_op, message)
                scope = message.cancel_scope
            case ResetSlot():
                work = functools.partial(SandboxClient.reset_slot, slot=slot)
                scope = trio.CancelScope()  # a reset always completes
            case _:
                assert_never(message)
        name = f"{type(message).__name__}:{self.sandbox_id}/{slot}"
        nursery.start_soon(self._serve_request, slot, message.reply, scope, work, name=name)

    async def _serve_request(
        self,
        slot: int,
        reply: Reply[Any],
        scope: trio.CancelScope,
        work: Callable[[SandboxClient], Awaitable[Any]],
    ) -> None:
        """Run one request under its slot's lock and resolve its reply."""
        if not 0 <= slot < len(self._slot_locks):
            reply.fail(
                AgentError("bad_request", f"slot {slot} does not exist in {self.sandbox_id}")
            )
            return
        assert self.client is not None
        with scope:
            async with self._slot_locks[slot]:
                try:
                    result = await work(self.client)
                except (AgentError, SandboxLost) as exc:
                    reply.fail(exc)
                    return
                reply.set(result)

    async def _run_exec(self, message: Exec, client: SandboxClient) -> ExecResult:
        try:
            result = await client.exec(
                message.slot,
                command=message.command,
                argv=message.argv,
                cwd=message.cwd,
                env=message.env,
                stdin=message.stdin,
                timeout_s=message.timeout_s,
                max_output_bytes=message.max_output_bytes,
            )
        except (AgentError, SandboxLost):
            self.command_failures += 1
            raise
        self.commands_run += 1
        if result.exit_code != 0:
            self.command_failures += 1
        return result

    # -- inspection -----------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self.died is None and self.client is not None

    def slot_busy(self, slot: int) -> bool:
        return self._slot_locks[slot].locked()
