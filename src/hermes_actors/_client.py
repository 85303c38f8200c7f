"""SandboxClient: many concurrent requests to one in-sandbox agent over one byte stream.

The client owns the stream a driver handed over. `run` (started with `nursery.start`) sends the
agent bootstrap, waits for the agent's ready frame, then reads replies and matches them to their
requests by id, while a writer task coalesces every frame queued since its last write into one
`send_all` (so a batch of commands for one sandbox costs one write) and a heartbeat keeps the
agent's dead-man switch from firing while the host is alive.

Invariants:
* Every request gets exactly one outcome: its reply, or `SandboxLost` when the stream breaks, the
  agent dies or stops answering, or the client is closed. No caller ever hangs on a dead agent.
* `cancel(request)` (sync) queues the agent's `cancel` for a request; the owner of a request
  decides when (the sandbox actor: when its caller gave up). The request still gets its final
  answer (a command killed reports `cancelled`).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import outcome
import trio

from hermes_actors._agent import FrameDecoder, FrameError, bootstrap_payload, encode_frame
from hermes_actors._errors import AgentError, SandboxLost, SandboxStartFailed
from hermes_actors._output import OutputChunk, OutputSink, OutputTally
from hermes_actors._values import (
    Command,
    CommandResult,
    ListFiles,
    Operation,
    ReadFile,
    ResetSlot,
    WriteFile,
)
from hermes_actors.drivers._base import SandboxHandle

logger = logging.getLogger("hermes_actors.client")

#: The shell's "command not found": the agent's `python3` is not in the image.
EXIT_NO_PYTHON = 127
NO_PYTHON_MESSAGE = (
    "the sandbox image has no python3, which the hermes-actors agent needs (any python3 >= 3.8, "
    "standard library only): on Modal set `add_python: '3.11'` in the profile so Modal adds one "
    "to the image, or use an image that has python3"
)
#: How long a cancelled command may take to report its death before its caller moves on.
CANCEL_GRACE_S = 5.0


class Request:
    """One submitted request: resolved once by the reader with the agent's answer."""

    __slots__ = ("cancellable", "event", "on_output", "on_resolved", "request_id", "result")

    def __init__(
        self, request_id: int, cancellable: bool, on_output: OutputSink | None = None
    ) -> None:
        self.request_id = request_id
        #: Whether the agent can cancel it: a command, or anything waiting in a serial queue.
        self.cancellable = cancellable
        #: Gets a streamed command's output as it arrives (see `OutputTally`).
        self.on_output = None if on_output is None else OutputTally(on_output)
        self.event = trio.Event()
        self.result: outcome.Outcome[dict[str, Any]] | None = None
        #: Called (sync, once) with the answer as it arrives, instead of a task awaiting it.
        self.on_resolved: Callable[[outcome.Outcome[dict[str, Any]]], None] | None = None

    def resolve(self, result: outcome.Outcome[dict[str, Any]]) -> None:
        if self.result is None:
            self.result = result
            self.event.set()
            if self.on_resolved is not None:
                self.on_resolved(result)

    async def wait(self) -> dict[str, Any]:
        await self.event.wait()
        assert self.result is not None
        return self.result.unwrap()


class SandboxClient:
    """Talks the agent protocol to one sandbox. Create, then `await nursery.start(client.run)`."""

    def __init__(
        self,
        handle: SandboxHandle,
        *,
        ttl_s: float = 60.0,
        env: Mapping[str, str] | None = None,
        max_output_bytes: int | None = None,
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
        #: The agent's stdin when it is a pipe (local sandboxes): a request goes straight into
        #: it while nothing is queued or being written, saving a wake-up of the writer task.
        #: Other streams (Modal: one provider call per write) always go through the writer,
        #: which sends everything queued in one write.
        self._direct_fd = -1
        #: A frame went straight into the pipe since the reader or the writer last ran: the
        #: next ones wait for the writer, so a batch submitted in one go costs one write (and
        #: one wake-up of the agent), not one per request.
        self._direct_spent = False
        #: The agent's stdout when it is a pipe: read directly (see `_receive`).
        self._read_fd = -1
        self._writing = False
        self._lost: SandboxLost | None = None
        self._closed = trio.Event()
        self.agent_info: dict[str, Any] = {}
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
        }
        if self._max_output_bytes is not None:
            config["max_output_bytes"] = self._max_output_bytes
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
                fd_stream = getattr(trio.lowlevel, "FdStream", None)
                send_stream = getattr(stream, "send_stream", stream)
                if fd_stream is not None and isinstance(send_stream, fd_stream):
                    self._direct_fd = send_stream.fileno()
                receive_stream = getattr(stream, "receive_stream", stream)
                if fd_stream is not None and isinstance(receive_stream, fd_stream):
                    self._read_fd = receive_stream.fileno()
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
            self._direct_fd = self._read_fd = -1
            self._fail_all(SandboxLost(self.sandbox_id, "sandbox stopped"))
            self._closed.set()

    async def _read_ready(self, decoder: FrameDecoder) -> dict[str, Any]:
        messages = await self._receive(decoder)
        while messages == []:
            messages = await self._receive(decoder)
        if messages is None:
            note = await self._exit_note()
            if note == f"exit status {EXIT_NO_PYTHON}":
                raise SandboxStartFailed(NO_PYTHON_MESSAGE, retryable=False)
            raise SandboxLost(self.sandbox_id, f"agent exited during start ({note})")
        first, rest = messages[0], messages[1:]
        result = first.get("result") or {}
        if first.get("id") != 0 or not first.get("ok") or not result.get("ready"):
            raise SandboxLost(self.sandbox_id, f"unexpected first frame from agent: {first!r}")
        self._dispatch(rest)
        return dict(result)

    async def _receive(self, decoder: FrameDecoder) -> list[dict[str, Any]] | None:
        """The messages completed by the next chunk of the stream; None at its end."""
        data: bytes | bytearray
        try:
            if self._read_fd >= 0:
                # A pipe (local sandboxes): wait until readable, then one read. A stream's
                # `receive_some` reads first (EAGAIN when the answer is not there yet) and
                # yields once more after reading: a syscall and a loop turn per answer.
                await trio.lowlevel.wait_readable(self._read_fd)
                data = os.read(self._read_fd, 1 << 20)
            else:
                data = await self.handle.stream.receive_some(1 << 20)
        except BlockingIOError:  # woken without data: nothing completed yet
            return []
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return None
        if not data:
            return None
        self._direct_spent = False  # a later loop turn than the last direct write
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
            if "output" in message:  # a streamed command's output, before its reply
                streaming = self._pending.get(request_id) if isinstance(request_id, int) else None
                if streaming is not None and streaming.on_output is not None:
                    streaming.on_output.deliver(OutputChunk.from_wire(message))
                continue
            pending = self._pending.pop(request_id, None) if isinstance(request_id, int) else None
            if pending is None:
                if request_id == 0:
                    logger.warning("sandbox %s: agent reported: %r", self.sandbox_id, message)
                continue
            if message.get("ok"):
                if pending.on_output is not None:
                    pending.on_output.finish(message.get("result") or {})
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
            self._writing = True
            try:
                await stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self._lost = SandboxLost(self.sandbox_id, f"cannot write to agent: {exc!r}")
                self._fail_all(self._lost)
                return
            finally:
                self._writing = False
                self._direct_spent = False
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
        frame = encode_frame(message)
        if (
            self._direct_fd >= 0
            and not self._direct_spent
            and not self._writing
            and not self._outbox
            and self._lost is None
        ):
            self._direct_spent = True
            try:
                written = os.write(self._direct_fd, frame)
            except OSError:
                written = 0  # full, or broken: the writer finds out and reports it
            if written:
                self.writes += 1
            if written == len(frame):
                return
            frame = frame[written:]
        self._outbox.append(frame)
        self._outbox_ready.set()

    # -- requests --------------------------------------------------------------------------

    def submit(
        self, op: str, args: Mapping[str, Any], *, on_output: OutputSink | None = None
    ) -> Request:
        """Queue one request for the agent now (sync: requests go out in submission order).

        `on_output` (an `exec` only) gets the command's output while it runs: called from the
        reader (it must not block), never after the request's answer. Raises `SandboxLost` when
        the sandbox is already gone. Await the answer with `wait`.
        """
        if self._lost is not None:
            raise SandboxLost(self._lost.sandbox_id, self._lost.reason)
        wire = dict(args)
        if on_output is not None:
            if op != "exec":
                raise ValueError(f"only an exec streams its output, not {op!r}")
            wire["stream_output"] = True
        request = Request(
            next(self._ids),
            cancellable=op == "exec" or bool(args.get("serial")),
            on_output=on_output,
        )
        self._pending[request.request_id] = request
        self._send_nowait({"id": request.request_id, "op": op, "args": wire})
        return request

    def cancel(self, request: Request) -> None:
        """Ask the agent to cancel a pending request (sync; a no-op once it was answered).

        A command is killed (its whole tree) and answers `cancelled`; a request still queued
        behind its slot's earlier ones is dropped. Other operations finish regardless.
        """
        if request.cancellable and not request.event.is_set() and self._lost is None:
            self._send_nowait(
                {"id": next(self._ids), "op": "cancel", "args": {"target": request.request_id}}
            )

    async def wait(self, request: Request) -> dict[str, Any]:
        """Wait for a submitted request's result.

        Raises `AgentError` when the agent refused it, `SandboxLost` when the sandbox went away.
        Cancellation only stops waiting: call `cancel` to stop the request itself.
        """
        return await request.wait()

    async def call(self, op: str, args: Mapping[str, Any]) -> dict[str, Any]:
        """Send one request and wait for its result; a cancelled caller cancels it in the agent.

        The cancelled caller does not wait for the agent's answer (see `SandboxActor.call` for
        the caller that must).
        """
        request = self.submit(op, args)
        try:
            return await self.wait(request)
        except trio.Cancelled:
            self.cancel(request)
            raise

    async def perform(self, slot: int, operation: Operation) -> Any:
        """Do one operation value in `slot` and return its result value."""
        return operation.result_from_wire(await self.call(operation.op, operation.to_wire(slot)))

    async def exec(self, slot: int, **options: Any) -> CommandResult:
        """Run `Command(**options)` in `slot`; a timeout is a result (`timed_out`, exit 124)."""
        result: CommandResult = await self.perform(slot, Command(**options))
        return result

    async def read_file(self, slot: int, path: str, *, max_bytes: int | None = None) -> bytes:
        """The file's bytes (up to the agent's bound; see `ReadFile` for the whole answer)."""
        content = await self.perform(slot, ReadFile(path=path, max_bytes=max_bytes))
        data: bytes = content.data
        return data

    async def write_file(self, slot: int, path: str, data: bytes, *, mode: int = 0o644) -> int:
        written = await self.perform(slot, WriteFile(path=path, data=data, mode=mode))
        return int(written.size)

    async def list_files(
        self, slot: int, path: str = ".", *, recursive: bool = False, max_entries: int = 10000
    ) -> list[dict[str, Any]]:
        listing = await self.perform(
            slot, ListFiles(path=path, recursive=recursive, max_entries=max_entries)
        )
        return [dict(entry) for entry in listing.entries]

    async def reset_slot(self, slot: int, *, keep_shell: bool = False) -> int:
        """Kill everything `slot` started and wipe its workspace; returns processes killed.
        `keep_shell`: see `ResetSlot`."""
        reset = await self.perform(slot, ResetSlot(keep_shell=keep_shell))
        return int(reset.killed)

    async def ping(self) -> dict[str, Any]:
        return await self.call("ping", {})

    async def shutdown(self) -> None:
        """Ask the agent to kill everything and exit; waits for its answer or its death."""
        with contextlib.suppress(SandboxLost, AgentError):
            await self.call("shutdown", {})
