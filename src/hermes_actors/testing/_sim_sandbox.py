"""One simulated sandbox: an in-memory agent stream that answers the real agent protocol.

The host side (`SandboxClient`, unchanged) writes real frames to `stream`; the simulated agent
decodes them as they arrive (synchronously, in the writer's `send_all`: no reader task, which
keeps ten thousand sandboxes cheap) and answers with real frames. Commands take virtual time:
`sleep N` runs N seconds (stretched when more commands run at once than the sandbox has cores),
`exit N` fails with status N, anything else finishes at once with status 0. A slot's serial
requests run one at a time in arrival order, as in the real agent; `cancel` and `reset_slot`
stop a slot's running and queued commands. The sandbox dies (stream end, as when a provider
kills a container) on `terminate`, on a provider loss, or at its maximum lifetime.
"""

from __future__ import annotations

import collections
import shlex
from collections.abc import Callable, Mapping
from typing import Any

import trio

from hermes_actors._agent import FrameDecoder, encode_frame
from hermes_actors._config import SandboxConfig
from hermes_actors.testing._in_process import (
    READY,
    InProcessHandle,
    command_result,
    split_bootstrap,
)


class _HostStream(trio.abc.HalfCloseableStream):
    """The host's end of a simulated sandbox's agent stream."""

    def __init__(self, sandbox: SimulatedSandbox) -> None:
        self._sandbox = sandbox
        self._inbox = bytearray()
        self._readable = trio.Event()
        self._eof = False
        self._closed = False

    def deliver(self, data: bytes) -> None:
        self._inbox += data
        self._readable.set()

    def end(self) -> None:
        self._eof = True
        self._readable.set()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()
        if self._closed:
            raise trio.ClosedResourceError("the stream was closed")
        if not self._sandbox.alive:
            raise trio.BrokenResourceError(f"sandbox {self._sandbox.sandbox_id} is gone")
        self._sandbox.from_host(bytes(data))

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()
        # A real agent exits when its stdin ends.
        self._sandbox.die(0)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        while not self._inbox and not self._eof:
            if self._closed:
                raise trio.ClosedResourceError("the stream was closed")
            await self._readable.wait()
            self._readable = trio.Event()
        if self._closed:
            raise trio.ClosedResourceError("the stream was closed")
        size = len(self._inbox) if max_bytes is None else min(max_bytes, len(self._inbox))
        data = bytes(self._inbox[:size])
        del self._inbox[:size]
        return data

    async def aclose(self) -> None:
        self._closed = True
        self._readable.set()
        await trio.lowlevel.checkpoint()


class SimulatedSandbox(InProcessHandle):
    """A `SandboxHandle` whose agent is simulated; created by `SimulatedProvider.create`."""

    def __init__(
        self,
        *,
        sandbox_id: str,
        spec: SandboxConfig,
        reset_s: float,
        contention: bool,
        on_exit: Callable[[SimulatedSandbox], None],
    ) -> None:
        super().__init__(sandbox_id, spec)
        self.created_at = trio.current_time()
        self._reset_s = reset_s
        self._contention = contention
        self._on_exit = on_exit
        self._host = _HostStream(self)
        self._stream = self._host
        self._decoder = FrameDecoder()
        self._bootstrap = bytearray()
        self._bootstrapped = False
        self._queues: dict[int, collections.deque[dict[str, Any]]] = {}
        self._running: dict[int, trio.CancelScope] = {}
        self._files: dict[int, dict[str, bytes]] = {}
        self._nursery: trio.Nursery | None = None
        self.exit_reason: str | None = None
        self.commands = 0
        self.busy = 0  # commands running right now

    # -- SandboxHandle --------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self.is_alive()

    async def terminate(self) -> None:
        self.die(137, "terminated")
        await trio.lowlevel.checkpoint()

    # -- life and death -------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host the sandbox's commands until it dies (run in the provider's nursery)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await self._exited.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            self.die(137, "stopped with the provider")

    def die(self, status: int, reason: str = "exited") -> None:
        if not self._mark_exited(status):
            return
        self.exit_reason = reason
        self._host.end()
        self._on_exit(self)

    # -- the agent ------------------------------------------------------------------------------

    def from_host(self, data: bytes) -> None:
        if not self._bootstrapped:
            self._bootstrap += data
            parts = split_bootstrap(self._bootstrap)
            if parts is None:
                return
            _, rest = parts
            self._bootstrapped = True
            self._bootstrap = bytearray()
            self._send(READY)
            data = rest
        self._decoder.feed(data)
        while True:
            complete, message = self._decoder.next_frame()
            if not complete:
                return
            self._receive(message)

    def _send(self, message: dict[str, Any]) -> None:
        if self.alive:
            self._host.deliver(encode_frame(message))

    def _receive(self, message: dict[str, Any]) -> None:
        request_id, op = message["id"], message["op"]
        args: dict[str, Any] = message.get("args") or {}
        if op in ("ping", "shutdown"):
            self._send({"id": request_id, "ok": True, "result": {}})
            if op == "shutdown":
                self.die(0, "shut down")
        elif op == "cancel":
            self._send({"id": request_id, "ok": True, "result": {"found": self._cancel(args)}})
        elif op == "reset_slot":
            self._stop_slot(args["slot"])
            self._files.pop(args["slot"], None)
            self._start(self._answer_later, request_id, self._reset_s, {"killed": 0})
        elif args.get("serial"):
            slot = args["slot"]
            queue = self._queues.get(slot)
            if queue is None:
                queue = self._queues[slot] = collections.deque()
                self._start(self._run_queue, slot, queue)
            queue.append(message)
        else:
            self._start(self._run_one, message)

    def _start(self, function: Callable[..., Any], *args: Any) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(function, *args)

    def _cancel(self, args: Mapping[str, Any]) -> bool:
        target = args.get("target")
        for queue in self._queues.values():
            for queued in list(queue)[1:]:
                if queued["id"] == target:
                    queue.remove(queued)
                    self._send_cancelled(queued["id"])
                    return True
        scope = self._running.get(target) if isinstance(target, int) else None
        if scope is not None:
            scope.cancel()
        return scope is not None

    def _stop_slot(self, slot: int) -> None:
        queue = self._queues.get(slot)
        if queue:
            for queued in list(queue)[1:]:
                queue.remove(queued)
                self._send_cancelled(queued["id"])
            head = queue[0]["id"]
            scope = self._running.get(head)
            if scope is not None:
                scope.cancel()

    def _send_cancelled(self, request_id: int) -> None:
        result = {"exit_code": -9, "signal": 9, "timed_out": False, "cancelled": True}
        self._send({"id": request_id, "ok": True, "result": {**result, "stdout": b""}})

    async def _answer_later(self, request_id: int, delay: float, result: dict[str, Any]) -> None:
        await trio.sleep(delay)
        self._send({"id": request_id, "ok": True, "result": result})

    async def _run_queue(self, slot: int, queue: collections.deque[dict[str, Any]]) -> None:
        try:
            while queue:
                message = queue[0]
                await self._run_one(message)
                if queue and queue[0] is message:
                    queue.popleft()
        finally:
            if self._queues.get(slot) is queue:
                del self._queues[slot]

    async def _run_one(self, message: dict[str, Any]) -> None:
        request_id, op = message["id"], message["op"]
        args: dict[str, Any] = message.get("args") or {}
        if op == "exec":
            result = await self._exec(request_id, args)
        elif op == "write_file":
            data = bytes(args["data"])
            self._files.setdefault(args["slot"], {})[args["path"]] = data
            result = {"size": len(data)}
        elif op == "read_file":
            found = self._files.get(args["slot"], {}).get(args["path"])
            if found is None:
                error = {"code": "not_found", "message": f"no such file: {args['path']}"}
                self._send({"id": request_id, "ok": False, "error": error})
                return
            result = {"data": found, "size": len(found), "truncated": False}
        elif op == "list_files":
            names = sorted(self._files.get(args["slot"], {}))
            entries = [{"path": name, "type": "file", "size": 0} for name in names]
            result = {"entries": entries, "truncated": False}
        else:
            error = {"code": "bad_request", "message": f"the simulated agent has no op {op!r}"}
            self._send({"id": request_id, "ok": False, "error": error})
            return
        self._send({"id": request_id, "ok": True, "result": result})

    async def _exec(self, request_id: int, args: Mapping[str, Any]) -> dict[str, Any]:
        words = shlex.split(args.get("command") or shlex.join(args.get("argv") or []))
        duration, exit_code = 0.0, 0
        if len(words) == 2 and words[0] == "sleep":
            duration = float(words[1])
        elif len(words) == 2 and words[0] == "exit":
            exit_code = int(words[1])
        if self._contention and self.busy + 1 > self.spec.cpu:
            # More commands than cores: each gets its share (fixed at its start, a simplification).
            duration *= (self.busy + 1) / self.spec.cpu
        started = trio.current_time()
        scope = trio.CancelScope()
        timeout = args.get("timeout_s")
        if timeout is not None:
            scope.deadline = started + float(timeout)
        self._running[request_id] = scope
        self.busy += 1
        try:
            with scope:
                await trio.sleep(duration)
        finally:
            self.busy -= 1
            del self._running[request_id]
        self.commands += 1
        return command_result(scope, started, exit_code, b"")
