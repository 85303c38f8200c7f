"""The sandbox actor: owns one driver sandbox and the agent client talking to it.

Messages (`SandboxMessage`): `Exec`, `FileOp`, `ResetSlot` from the facades and the pool; the
actor replies through each message's `Reply`. The mailbox loop submits each request to the agent
at once (a sync queue write, so requests leave in mailbox order) and a child task awaits the
answer. Each slot's requests run one at a time, in arrival order: they are submitted as `serial`,
and the agent queues them per slot. So a batch for many slots, or many requests for one slot,
costs one write to the agent, and one provider round trip on Modal.

Invariants:
* A request whose caller gives up (its `cancel_scope` is cancelled) has its command killed before
  the caller moves on: the client cancels it in the agent (running or queued) and waits for it.
* When the sandbox dies (agent exit, broken stream) or the actor is stopped, every pending and
  later request fails with `SandboxLost` (never a hang), the sandbox is terminated (bounded), and
  the owner learns why through `died` / the `on_exit` callback.
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, assert_never

import attrs
import trio

from hermes_actors._client import CANCEL_GRACE_S, ExecResult, Request, SandboxClient, exec_args
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
    finished: trio.Event = attrs.field(factory=trio.Event)


@attrs.frozen(kw_only=True)
class FileOp:
    """A file operation of the agent (`read_file`, `write_file`, `list_files`) in a slot."""

    slot: int
    op: str
    args: Mapping[str, Any]
    reply: Reply[dict[str, Any]]
    cancel_scope: trio.CancelScope
    finished: trio.Event = attrs.field(factory=trio.Event)


@attrs.frozen(kw_only=True)
class ResetSlot:
    """Kill everything a slot started and wipe its workspace."""

    slot: int
    reply: Reply[int]


SandboxMessage = Exec | FileOp | ResetSlot


def _same(answer: dict[str, Any]) -> dict[str, Any]:
    return answer


def _killed_count(answer: dict[str, Any]) -> int:
    return int(answer.get("killed", 0))


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
        self.handle: SandboxHandle | None = None
        self.client: SandboxClient | None = None
        self.sandbox_id = f"{spec.profile}-starting"
        self.started_at = 0.0
        self.died: SandboxLost | None = None
        self.commands_run = 0
        self.command_failures = 0

    def workspace_dir(self, slot: int) -> str:
        """Slot `slot`'s workspace directory inside the sandbox (as its agent reported it)."""
        root = None if self.client is None else self.client.agent_info.get("workspace_root")
        if not isinstance(root, str):
            root = self.spec.workspace_base
        return posixpath.join(root, f"slot-{slot}")

    # -- the caller side: send a message, await its reply --------------------------------------

    async def exec(
        self, slot: int, *, on_submitted: Callable[[], None] | None = None, **options: Any
    ) -> ExecResult:
        """Run a command in `slot` (see `SandboxClient.exec` for the options).

        Requests of one slot run in the order they reach the mailbox; `on_submitted` is called
        once this one is there, so a caller can pipeline a slot's requests in order without
        waiting for each to finish. Cancellation kills the command (its whole tree, running or
        queued) before this raises `Cancelled` (bounded by `CANCEL_GRACE_S`).
        Raises `SandboxLost` if the sandbox is or becomes dead.
        """
        message = Exec(slot=slot, reply=Reply(), cancel_scope=trio.CancelScope(), **options)
        result: ExecResult = await self._request(message, on_submitted)
        return result

    async def file_op(
        self,
        slot: int,
        op: str,
        args: Mapping[str, Any],
        *,
        on_submitted: Callable[[], None] | None = None,
    ) -> dict[str, Any]:
        """Run an agent file operation (`read_file`, `write_file`, `list_files`) in `slot`."""
        message = FileOp(
            slot=slot, op=op, args=args, reply=Reply(), cancel_scope=trio.CancelScope()
        )
        result: dict[str, Any] = await self._request(message, on_submitted)
        return result

    async def reset_slot(self, slot: int) -> int:
        """Kill the slot's processes and wipe its workspace; returns how many were killed."""
        reply: Reply[int] = Reply()
        await self._send_message(ResetSlot(slot=slot, reply=reply))
        return await reply.wait()

    async def _send_message(self, message: SandboxMessage) -> None:
        if self.died is not None:
            raise SandboxLost(self.died.sandbox_id, self.died.reason)
        try:
            await self._send.send(message)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            died = self.died or SandboxLost(self.sandbox_id, "sandbox stopped")
            raise SandboxLost(died.sandbox_id, died.reason) from None

    async def _request(  # returns the reply's type
        self, message: Exec | FileOp, on_submitted: Callable[[], None] | None
    ) -> Any:
        await self._send_message(message)
        if on_submitted is not None:
            on_submitted()
        try:
            return await message.reply.wait()
        except BaseException:
            # The caller gave up (or failed): what it asked for must not run on. Wait, bounded
            # and shielded, until the actor has stopped it, so nothing runs behind its back.
            message.cancel_scope.cancel(reason="caller gave up")
            with trio.move_on_after(CANCEL_GRACE_S, shield=True):
                await message.finished.wait()
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
        if not 0 <= slot < self.spec.slots:
            error = AgentError("bad_request", f"slot {slot} does not exist in {self.sandbox_id}")
            message.reply.fail(error)
            return
        assert self.client is not None
        convert: Callable[[dict[str, Any]], Any]
        match message:
            case Exec():
                args = exec_args(
                    slot,
                    command=message.command,
                    argv=message.argv,
                    cwd=message.cwd,
                    env=message.env,
                    stdin=message.stdin,
                    timeout_s=message.timeout_s,
                    max_output_bytes=message.max_output_bytes,
                    serial=True,
                )
                request_args, op, convert = args, "exec", self._count_exec
                scope, finished = message.cancel_scope, message.finished
            case FileOp():
                request_args = {**message.args, "slot": slot, "serial": True}
                op, convert = message.op, _same
                scope, finished = message.cancel_scope, message.finished
            case ResetSlot():
                request_args, op = {"slot": slot}, "reset_slot"
                convert = _killed_count
                scope, finished = trio.CancelScope(), trio.Event()  # a reset always completes
            case _:
                assert_never(message)
        try:
            request = self.client.submit(op, request_args)
        except SandboxLost as exc:
            message.reply.fail(exc)
            if isinstance(message, Exec):
                self.command_failures += 1
            return
        name = f"{op}:{self.sandbox_id}/{slot}"
        nursery.start_soon(
            self._await_answer, request, message.reply, scope, finished, convert, name=name
        )

    async def _await_answer(
        self,
        request: Request,
        reply: Reply[Any],
        scope: trio.CancelScope,
        finished: trio.Event,
        convert: Callable[[dict[str, Any]], Any],
    ) -> None:
        """Await the agent's answer to one request and resolve its reply; then set `finished`."""
        assert self.client is not None
        try:
            with scope:
                try:
                    answer = await self.client.wait(request)
                except (AgentError, SandboxLost) as exc:
                    if request.cancellable and isinstance(exc, SandboxLost):
                        self.command_failures += 1
                    reply.fail(exc)
                    return
                reply.set(convert(answer))
        finally:
            # Cancelled because the sandbox died while this request was pending: the caller
            # must still hear why (no-op when the caller gave up or it was answered).
            if not reply.done:
                died = self.died or SandboxLost(self.sandbox_id, "sandbox stopped")
                reply.fail(SandboxLost(died.sandbox_id, died.reason))
            finished.set()

    def _count_exec(self, answer: dict[str, Any]) -> ExecResult:
        result = ExecResult.from_reply(answer)
        self.commands_run += 1
        if result.exit_code != 0:
            self.command_failures += 1
        return result

    # -- inspection -----------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """Started and not known to be dead (the client notices a dead agent first)."""
        return self.died is None and self.client is not None and self.client.lost is None
