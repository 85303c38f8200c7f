"""The sandbox actor: owns one driver sandbox and the agent client talking to it.

Messages: `Call` (an `Operation` value for one slot, and its `Reply`). The mailbox loop submits
each call to the agent at once (a sync queue write, so calls leave in mailbox order) and the
client hands the answer to the reply as it arrives. A call that finds the mailbox empty while
the loop waits on it is submitted by the caller's own task, through the same sync dispatch step
the loop would run next (nothing can come between, so the order is the same): on the one-call
path (an agent's `terminal` tool) that saves a task switch per command; under load calls queue
in the mailbox. Every slot operation is submitted as `serial`, so the agent runs a slot's calls
one at a time, in arrival order; a batch for many slots, or many calls for one slot, costs one
write to the agent and one provider round trip on Modal.

Cancellation is one protocol: a caller that gives up abandons its reply, and the actor (told so
by the reply, synchronously) sends the agent a `cancel` for that request. The caller then waits,
bounded, until the actor has its final answer, so a cancelled command is dead before the caller
moves on. No cancel scope or event travels inside a message.

Invariants:
* Every call gets exactly one outcome: its result, the agent's error, or `SandboxLost` when the
  sandbox is or becomes dead (never a hang). An error the actor knows at once (bad slot, dead
  sandbox at submit) reaches the caller at once.
* When the sandbox dies (agent exit, broken stream) or the actor is stopped, every pending and
  later call fails with `SandboxLost`, the sandbox is terminated (bounded), and the owner learns
  why through `died`.
"""

from __future__ import annotations

import contextlib
import logging
import posixpath
from collections.abc import Callable
from typing import Any, TypeVar

import attrs
import outcome
import trio

from hermes_actors._client import CANCEL_GRACE_S, SandboxClient
from hermes_actors._config import SandboxConfig
from hermes_actors._errors import AgentError, SandboxLost
from hermes_actors._output import OutputSink
from hermes_actors._trio import Reply, bounded_cleanup, close_mailbox, collapse_exception_groups
from hermes_actors._values import Command, CommandResult, Operation, ResetSlot
from hermes_actors.drivers._base import SandboxDriver, SandboxHandle

logger = logging.getLogger("hermes_actors.sandbox")

#: How long terminating a sandbox may take before the actor moves on.
TERMINATE_LIMIT_S = 15.0
MAILBOX_SIZE = 4096
_T = TypeVar("_T")


@attrs.frozen(kw_only=True)
class Call:
    """Do `operation` in slot `slot`; the answer goes to `reply`."""

    slot: int
    operation: Operation
    reply: Reply[Any]
    #: Gets a command's output while it runs (see `hermes_actors._output`); None: not streamed.
    output: OutputSink | None = None


class SandboxActor:
    """One sandbox. Start with `await nursery.start(actor.run)`; address it by the actor object."""

    def __init__(
        self,
        *,
        driver: SandboxDriver,
        config: SandboxConfig,
        on_ready: Callable[[SandboxActor], None] | None = None,
    ) -> None:
        self._driver = driver
        self.config = config
        self._on_ready = on_ready
        self._send, self._receive = trio.open_memory_channel[Call](MAILBOX_SIZE)
        self.handle: SandboxHandle | None = None
        self.client: SandboxClient | None = None
        self.sandbox_id = f"{config.name}-starting"
        self.started_at = 0.0
        self.died: SandboxLost | None = None
        self.commands_run = 0
        self.command_failures = 0
        #: Calls sent to the agent and not answered yet, by request id: the ones the sandbox's
        #: loss leaves unanswered fail as the actor stops (see `run`).
        self._in_flight: dict[int, Call] = {}
        self._nursery: trio.Nursery | None = None
        #: True while the mailbox loop runs; `_undispatched`: calls in the mailbox (or handed
        #: to the loop) that it has not dispatched yet. A call that finds both at rest is
        #: dispatched by its caller's task (see `call`).
        self._serving = False
        self._undispatched = 0

    def workspace_dir(self, slot: int) -> str:
        """Slot `slot`'s workspace directory inside the sandbox (as its agent reported it)."""
        root = None if self.client is None else self.client.agent_info.get("workspace_root")
        if not isinstance(root, str):
            root = self.config.workspace_base
        return posixpath.join(root, f"slot-{slot}")

    # -- the caller side: send a message, await its reply --------------------------------------

    async def call(
        self,
        slot: int,
        operation: Operation,
        *,
        on_submitted: Callable[[], None] | None = None,
        on_output: OutputSink | None = None,
    ) -> Any:
        """Do `operation` in `slot` and return its result value (see `hermes_actors._values`).

        A slot's calls run in the order they reach the mailbox; `on_submitted` is called once
        this one is there, so a caller can pipeline a slot's calls without waiting for each.
        `on_output` (a `Command` only) gets its output while it runs, never after the result.
        Cancellation abandons the reply: the actor cancels the request in the agent (a command
        is killed, tree and all, running or queued), and this waits for that (bounded by
        `CANCEL_GRACE_S`) before `Cancelled` propagates. Raises `SandboxLost` if the sandbox is
        or becomes dead, `AgentError` when the agent refused the operation.
        """
        reply: Reply[Any] = Reply()
        if self.died is not None:
            raise self.died.again()
        if on_output is not None and not isinstance(operation, Command):
            raise TypeError(f"only a Command streams its output, not {type(operation).__name__}")
        call = Call(slot=slot, operation=operation, reply=reply, output=on_output)
        if self._serving and self._undispatched == 0:
            # The actor waits on an empty mailbox: run its (sync) dispatch step here, which is
            # what its loop would do next, in the same order, without waking it (see `run`).
            self._dispatch(call)
        else:
            self._undispatched += 1
            try:
                self._send.send_nowait(call)
            except trio.WouldBlock:
                try:
                    await self._send.send(call)
                except BaseException:
                    self._undispatched -= 1
                    raise
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                self._undispatched -= 1
                raise (
                    self.died or SandboxLost(self.sandbox_id, "sandbox stopped")
                ).again() from None
        if on_submitted is not None:
            on_submitted()
        try:
            return await reply.wait()
        except trio.Cancelled:
            # The reply is abandoned (the actor cancels the request in the agent): wait until
            # the agent's final answer reached the actor, so nothing runs behind our back.
            with trio.move_on_after(CANCEL_GRACE_S, shield=True):
                await reply.wait_closed()
            raise

    async def exec(self, slot: int, command: Command) -> CommandResult:
        """Run `command` in `slot` (see `call`)."""
        result: CommandResult = await self.call(slot, command)
        return result

    async def reset_slot(self, slot: int, *, keep_shell: bool = False) -> int:
        """Kill the slot's processes and wipe its workspace; returns how many were killed.
        `keep_shell`: see `ResetSlot`."""
        result = await self.call(slot, ResetSlot(keep_shell=keep_shell))
        return int(result.killed)

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
            in_flight, self._in_flight = self._in_flight, {}
            for call in in_flight.values():
                if isinstance(call.operation, Command):
                    self.command_failures += 1
                call.reply.fail(self.died.again())
                call.reply.close()
            close_mailbox(self._receive, lambda call: [call.reply], self.died.again)
            if self.handle is not None:
                await bounded_cleanup(TERMINATE_LIMIT_S, self.handle.terminate)

    async def _serve(self, task_status: trio.TaskStatus[SandboxActor]) -> None:
        self.handle = await self._driver.create(self.config)
        self.sandbox_id = self.handle.sandbox_id
        self.started_at = trio.current_time()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self.client = SandboxClient(
                self.handle,
                ttl_s=self.config.agent_ttl_s,
                env=self.config.env_vars,
                max_output_bytes=self.config.max_output_bytes,
            )
            await nursery.start(self._run_client, nursery.cancel_scope)
            task_status.started(self)
            if self._on_ready is not None:
                self._on_ready(self)
            self._serving = True
            try:
                async for call in self._receive:
                    self._undispatched -= 1
                    self._dispatch(call)
            finally:
                self._serving = False

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

    def _dispatch(self, call: Call) -> None:
        if call.reply.abandoned:
            call.reply.close()
            return
        slot, operation = call.slot, call.operation
        if not 0 <= slot < self.config.slots_per_sandbox:
            error = AgentError("bad_request", f"slot {slot} does not exist in {self.sandbox_id}")
            call.reply.fail(error)
            return
        assert self.client is not None
        args = operation.to_wire(slot)
        if not isinstance(operation, ResetSlot):  # a reset must not wait behind the slot's queue
            args["serial"] = True
        try:
            request = self.client.submit(operation.op, args, on_output=call.output)
        except SandboxLost as exc:
            call.reply.fail(exc.again())
            if isinstance(operation, Command):
                self.command_failures += 1
            return
        client = self.client
        call.reply.on_abandon(lambda: client.cancel(request))
        # The client resolves every request it took exactly once (the agent's answer, or
        # `SandboxLost` when it stops with the actor), so the answer is handed over as it
        # arrives: no task per request.
        self._in_flight[request.request_id] = call
        request.on_resolved = lambda answer: self._answer(request.request_id, call, answer)
        if request.result is not None:  # pragma: no cover - answers arrive in a later task
            self._answer(request.request_id, call, request.result)

    def _answer(self, request_id: int, call: Call, answer: outcome.Outcome[dict[str, Any]]) -> None:
        """Resolve the call's reply with the agent's answer to it.

        `SandboxLost` (the client stopped: the actor is stopping too) is left to `run`, which
        fails what is in flight once the actor knows why it died, before the pool hears of it.
        """
        reply = call.reply
        if isinstance(answer, outcome.Error) and isinstance(answer.error, SandboxLost):
            # As a task: when the actor is stopping, its callers hear of the loss as it stops,
            # not before (when the client is lost without the actor stopping, still promptly).
            if self._nursery is not None:
                with contextlib.suppress(RuntimeError):  # the nursery is closed: `run` fails it
                    self._nursery.start_soon(self._fail_lost, request_id, answer.error)
            return
        del self._in_flight[request_id]
        try:
            if not isinstance(answer, outcome.Value):
                assert isinstance(answer, outcome.Error)
                error = answer.error
                if isinstance(error, AgentError):
                    reply.fail(error)
                    return
                raise error
            result = call.operation.result_from_wire(answer.value)
            if isinstance(result, CommandResult):
                self.commands_run += 1
                if result.exit_code != 0:
                    self.command_failures += 1
            reply.set(result)
        except Exception as exc:  # a malformed answer fails its call, not the client
            reply.fail(exc)
        finally:
            reply.close()

    async def _fail_lost(self, request_id: int, error: SandboxLost) -> None:
        call = self._in_flight.pop(request_id, None)
        if call is None:
            return
        if isinstance(call.operation, Command):
            self.command_failures += 1
        call.reply.fail(error.again())
        call.reply.close()

    # -- inspection -----------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """Started and not known to be dead (the client notices a dead agent first)."""
        return self.died is None and self.client is not None and self.client.lost is None
