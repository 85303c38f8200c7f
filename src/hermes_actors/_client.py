"""SandboxClient: many concurrent requests to one in-sandbox agent over one byte stream.

The client owns the stream a driver handed over. `run` (started with `nursery.start`) sends the
agent bootstrap, waits for the agent's ready frame, then reads replies and matches them to their
requests by id, while a writer task coalesces every frame queued since its last write into one
`send_all` (so a batch of commands for one sandbox costs one write) and a heartbeat keeps the
agent's dead-man switch from firing while the host is alive.

Invariants:
* Every request gets exactly one outcome: its reply, or `SandboxLost` when the stream breaks, the
  agent dies or stops answering, or the client is closed. No caller ever hangs on a dead agent.
* A caller cancelled during `exec` has its command killed: the client queues a `cancel` for it
  (sync, so it cannot be lost to the cancellation) and waits, bounded and shielded, for the
  command's final reply, so the slot is quiet before the next command runs there.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from collections.abc import Mapping
from typing import Any

import attrs
import outcome
import trio

from hermes_actors._agent import FrameDecoder, FrameError, bootstrap_payload, encode_frame
from hermes_actors._errors import AgentError, SandboxLost
from hermes_actors.drivers._base import SandboxHandle

logger = logging.getLogger("hermes_actors.client")

#: How long a cancelled exec may take to report its killed command before the caller moves on.
CANCEL_GRACE_S = 5.0


@attrs.frozen(kw_only=True)
class ExecResult:
    """What one command did; a timeout or cancel is a result (`timed_out`, `cancelled`)."""

    exit_code: int
    signal: int | None
    timed_out: bool
    cancelled: bool
    duration_s: float
    stdout: bytes
    stderr: bytes
    stdout_dropped: int
    stderr_dropped: int
    #: The slot's persistent shell ended during this call (``exit``, ``exec``, killed), or
    #: since the previous one, and was replaced (last known cwd and exported env restored).
    shell_restarted: bool = False

    @classmethod
    def from_reply(cls, result: Mapping[str, Any]) -> ExecResult:
        return cls(
            exit_code=int(result["exit_code"]),
            signal=result.get("signal"),
            timed_out=bool(result.get("timed_out", False)),
            cancelled=bool(result.get("cancelled", False)),
            duration_s=float(result.get("duration_s", 0.0)),
            stdout=result.get("stdout", b""),
            stderr=result.get("stderr", b""),
            stdout_dropped=int(result.get("stdout_dropped", 0)),
            stderr_dropped=int(result.get("stderr_dropped", 0)),
            shell_restarted=bool(result.get("shell_restarted", False)),
        )


class Request:
    """One submitted request: resolved once by the reader with the agent's answer."""

    __slots__ = ("cancellable", "event", "request_id", "result")

    def __init__(self, request_id: int, cancellable: bool) -> None:
        self.request_id = request_id
        #: Whether the agent can cancel it: a command, or anything waiting in a serial queue.
        self.cancellable = cancellable
        self.event = trio.Event()
        self.result: outcome.Outcome[dict[str, Any]] | None = None

    def resolve(self, result: outcome.Outcome[dict[str, Any]]) -> None:
        if self.result is None:
            self.result = result
            self.event.set()

    async def wait(self) -> dict[str, Any]:
        await self.event.wait()
        assert self.result is not None
        return self.result.unwrap()


def exec_args(
    slot: int,
    *,
    command: str | None = None,
    argv: list[str] | None = None,
    cwd: str = ".",
    env: Mapping[str, str] | None = None,
    stdin: bytes | None = None,
    timeout_s: float | None = None,
    max_output_bytes: int | None = None,
    serial: bool = False,
    shell: str | None = None,
    merge_stderr: bool = False,
) -> dict[str, Any]:
    """The agent's `exec` arguments: exactly one of a shell `command` or an `argv`.

    `serial` queues the command behind the slot's earlier serial requests in the agent.
    `shell` is ``"persistent"`` (the `command` runs in the slot's long-lived shell: cwd,
    variables, functions and aliases persist between calls) or ``"fresh"`` (its own
    ``bash -c``; the agent's default). `merge_stderr` sends stderr into stdout, in the order
    the two were written (`stderr` comes back empty).
    """
    if (command is None) == (argv is None):
        raise ValueError("exec needs exactly one of command= or argv=")
    args: dict[str, Any] = {"slot": slot, "cwd": cwd, "env": dict(env or {})}
    if command is not None:
        args["command"] = command
    else:
        args["argv"] = list(argv or ())
    if stdin is not None:
        args["stdin"] = stdin
    if timeout_s is not None and math.isfinite(timeout_s):
        args["timeout_s"] = float(timeout_s)
    if max_output_bytes is not None:
        args["max_output_bytes"] = max_output_bytes
    if serial:
        args["serial"] = True
    if shell is not None:
        args["shell"] = shell
    if merge_stderr:
        args["merge_stderr"] = True
    return args


class SandboxClient:
    """Talks the agent protocol to one sandbox. Create, then `await nursery.start(client.run)`."""

    def __init__(
        self,
        handle: SandboxHandle,
        *,
        ttl_s: float = 60.0,
        env: Mapping[str, str] | None = None,
        max_output_bytes: int = 1_000_000,
        start_timeout_s: float = 60.0,
    ) -> None:
        self.handle = handle
        self.sandbox_id = handle.sandbox_id
        self._ttl_s = ttl_s
        self._env = dict(env or {})
        self._max_output_bytes = max_output_bytes
        self._start_timeout_s = start_timeout_s
        self._ids = itertools.count(1)
        self._pending: dict[int, Request] = {}
        self._outbox: list[bytes] = []
        self._outbox_ready = trio.Event()
        self._lost: SandboxLost | None = None
        self._closed = trio.Event()
        self.agent_info: dict[str, Any] = {}
        self.requests_sent = 0
        self.writes = 0

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def lost(self) -> SandboxLost | None:
        """Why the client stopped working, or None while it works."""
        return self._lost

    async def run(
        self, *, task_status: trio.TaskStatus[SandboxClient] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Bootstrap the agent, report started once it is ready, then serve until the stream ends.

        Returns (never raises for a broken sandbox) when the agent is gone; every pending request
        has failed with `SandboxLost` by then. Raises `SandboxLost` instead of starting if the
        agent never becomes ready. Cancelling it closes the client.
        """
        config = {
            **self.handle.agent_config,
            "ttl_s": self._ttl_s,
            "env": {**self.handle.agent_config.get("env", {}), **self._env},  # type: ignore[dict-item]
            "max_output_bytes": self._max_output_bytes,
        }
        decoder = FrameDecoder()
        stream = self.handle.stream
        try:
            async with trio.open_nursery() as nursery:
                with trio.move_on_after(self._start_timeout_s) as start_scope:
                    await stream.send_all(bootstrap_payload(config))
                    ready = await self._read_ready(decoder)
                if start_scope.cancelled_caught:
                    raise SandboxLost(self.sandbox_id, "agent did not start in time")
                self.agent_info = ready
                nursery.start_soon(self._writer, name=f"client-writer:{self.sandbox_id}")
                nursery.start_soon(self._heartbeat, name=f"client-heartbeat:{self.sandbox_id}")
                task_status.started(self)
                await self._reader(decoder)
                nursery.cancel_scope.cancel(reason="agent stream ended")
        except SandboxLost as exc:
            self._fail_all(exc)
            raise
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            lost = SandboxLost(self.sandbox_id, f"stream broke: {exc!r}")
            self._fail_all(lost)
            raise lost from exc
        finally:
            self._fail_all(SandboxLost(self.sandbox_id, "client closed"))
            self._closed.set()

    async def _read_ready(self, decoder: FrameDecoder) -> dict[str, Any]:
        messages = await self._receive(decoder)
        while messages == []:
            messages = await self._receive(decoder)
        if messages is None:
            note = await self._exit_note()
            raise SandboxLost(self.sandbox_id, f"agent exited during start ({note})")
        first, rest = messages[0], messages[1:]
        result = first.get("result") or {}
        if first.get("id") != 0 or not first.get("ok") or not result.get("ready"):
            raise SandboxLost(self.sandbox_id, f"unexpected first frame from agent: {first!r}")
        self._dispatch(rest)
        return dict(result)

    async def _receive(self, decoder: FrameDecoder) -> list[dict[str, Any]] | None:
        """The messages completed by the next chunk of the stream; None at its end."""
        try:
            data = await self.handle.stream.receive_some(1 << 20)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return None
        if not data:
            return None
        decoder.feed(bytes(data))
        messages: list[dict[str, Any]] = []
        while True:
            try:
                complete, message = decoder.next_frame()
            except FrameError as exc:
                if decoder.broken:
                    raise SandboxLost(self.sandbox_id, f"agent stream corrupt: {exc}") from None
                logger.warning("sandbox %s: undecodable frame from agent: %s", self.sandbox_id, exc)
                continue
            if not complete:
                return messages
            messages.append(message)

    async def _exit_note(self) -> str:
        with trio.move_on_after(1.0):
            status = await self.handle.wait_exited()
            return f"exit status {status}"
        return "stream closed"

    def _dispatch(self, messages: list[dict[str, Any]]) -> None:
        for message in messages:
            request_id = message.get("id")
            pending = self._pending.pop(request_id, None) if isinstance(request_id, int) else None
            if pending is None:
                if request_id == 0:
                    logger.warning("sandbox %s: agent reported: %r", self.sandbox_id, message)
                continue
            if message.get("ok"):
                pending.resolve(outcome.Value(message.get("result") or {}))
            else:
                error = message.get("error") or {}
                code, text = str(error.get("code", "error")), str(error.get("message", ""))
                pending.resolve(outcome.Error(AgentError(code, text)))

    async def _reader(self, decoder: FrameDecoder) -> None:
        while (messages := await self._receive(decoder)) is not None:
            self._dispatch(messages)
        self._lost = SandboxLost(self.sandbox_id, f"agent went away ({await self._exit_note()})")
        self._fail_all(self._lost)

    async def _writer(self) -> None:
        stream = self.handle.stream
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready = trio.Event()
            data = b"".join(self._outbox)
            self._outbox.clear()
            try:
                await stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self._lost = SandboxLost(self.sandbox_id, f"cannot write to agent: {exc!r}")
                self._fail_all(self._lost)
                return
            self.writes += 1

    async def _heartbeat(self) -> None:
        # The agent exits when nothing arrives within its ttl; ping at a third of it, and treat
        # an agent that does not answer within the ttl as lost.
        interval = self._ttl_s / 3
        while True:
            await trio.sleep(interval)
            with trio.move_on_after(self._ttl_s):
                try:
                    await self.call("ping", {})
                except (AgentError, SandboxLost):
                    return
                continue
            self._lost = SandboxLost(self.sandbox_id, "agent stopped answering")
            self._fail_all(self._lost)
            return

    def _fail_all(self, error: SandboxLost) -> None:
        if self._lost is None:
            self._lost = error
        pending, self._pending = self._pending, {}
        for cell in pending.values():
            cell.resolve(outcome.Error(self._lost))

    def _send_nowait(self, message: dict[str, Any]) -> None:
        self._outbox.append(encode_frame(message))
        self._outbox_ready.set()

    # -- requests --------------------------------------------------------------------------

    def submit(self, op: str, args: Mapping[str, Any]) -> Request:
        """Queue one request for the agent now (sync: requests go out in submission order).

        Raises `SandboxLost` when the sandbox is already gone. Await the answer with `wait`.
        """
        if self._lost is not None:
            raise SandboxLost(self._lost.sandbox_id, self._lost.reason)
        request = Request(next(self._ids), cancellable=op == "exec" or bool(args.get("serial")))
        self._pending[request.request_id] = request
        self._send_nowait({"id": request.request_id, "op": op, "args": dict(args)})
        self.requests_sent += 1
        return request

    async def wait(self, request: Request) -> dict[str, Any]:
        """Wait for a submitted request's result.

        Raises `AgentError` when the agent refused it, `SandboxLost` when the sandbox went away.
        If the caller is cancelled while an `exec` (or a queued serial request) is pending, the
        agent is told to cancel it, and this waits (shielded, bounded by `CANCEL_GRACE_S`) for
        its final answer, so the command is dead when `Cancelled` propagates. Other operations
        finish in the agent regardless; their answer is dropped.
        """
        try:
            return await request.wait()
        except trio.Cancelled:
            if request.cancellable and not request.event.is_set() and self._lost is None:
                self._send_nowait(
                    {"id": next(self._ids), "op": "cancel", "args": {"target": request.request_id}}
                )
                with trio.move_on_after(CANCEL_GRACE_S, shield=True):
                    await request.event.wait()
            raise
        finally:
            self._pending.pop(request.request_id, None)

    async def call(self, op: str, args: Mapping[str, Any]) -> dict[str, Any]:
        """Send one request and wait for its result (see `submit` and `wait`)."""
        return await self.wait(self.submit(op, args))

    async def exec(self, slot: int, **options: Any) -> ExecResult:
        """Run one command in `slot`'s workspace and return what it did (see `exec_args`).

        A timeout kills the command's whole process tree and returns the partial output with
        `timed_out` set and exit code 124. If the caller is cancelled, the command is killed the
        same way before this returns (bounded by `CANCEL_GRACE_S`), then `Cancelled` propagates.
        """
        return ExecResult.from_reply(await self.call("exec", exec_args(slot, **options)))

    async def read_file(self, slot: int, path: str, *, max_bytes: int | None = None) -> bytes:
        args: dict[str, Any] = {"slot": slot, "path": path}
        if max_bytes is not None:
            args["max_bytes"] = max_bytes
        result = await self.call("read_file", args)
        data: bytes = result["data"]
        return data

    async def write_file(self, slot: int, path: str, data: bytes, *, mode: int = 0o644) -> int:
        result = await self.call(
            "write_file", {"slot": slot, "path": path, "data": data, "mode": mode}
        )
        return int(result["size"])

    async def list_files(
        self, slot: int, path: str = ".", *, recursive: bool = False, max_entries: int = 10000
    ) -> list[dict[str, Any]]:
        result = await self.call(
            "list_files",
            {"slot": slot, "path": path, "recursive": recursive, "max_entries": max_entries},
        )
        entries: list[dict[str, Any]] = result["entries"]
        return entries

    async def reset_slot(self, slot: int) -> int:
        """Kill everything `slot` started and wipe its workspace; returns processes killed."""
        result = await self.call("reset_slot", {"slot": slot})
        return int(result.get("killed", 0))

    async def ping(self) -> dict[str, Any]:
        return await self.call("ping", {})

    async def shutdown(self) -> None:
        """Ask the agent to kill everything and exit; waits for its answer or its death."""
        with contextlib.suppress(SandboxLost, AgentError):
            await self.call("shutdown", {})
