"""A scriptable fake driver: test trainers and tools offline, on trio's virtual clock.

Public test support (beside `hermes_actors.testing.modal_emulator`): pass it as a backend's
driver, `ToolBackend(config, drivers={"local": FakeDriver(nursery)})`, and your code runs
against the real client, actors and pools with no process or network, in virtual time.
Without a nursery (`FakeDriver()`), the fake agents are system tasks of the trio run that
creates the sandboxes: a backend that runs on its portal thread (called from asyncio, sync
code, or trio without `async with`) can use it too, in real time.

Each fake sandbox runs a fake agent: a trio task in this process that speaks the real agent
protocol (the real codec, the real client on the other side) over an in-memory stream. Commands
are interpreted, not run: `sleep N` sleeps N virtual seconds, `echo X` prints, `exit N` exits,
anything else runs the driver's `script` hook. So the client, sandbox actors, pools and runtime
are exercised for real, with exact virtual times.

Knobs: `create_latency_s`, `reset_latency_s`, `terminate_latency_s` (how long `terminate`
takes, e.g. a provider's round trip), `fail_next_creates` (errors raised by the next creates),
`kill(id)` (the sandbox dies as if the provider killed it). Counters: `created`,
`terminated`, `alive`, `execs`, `resets`, `max_alive`; per sandbox `pings` and the
`agent_settings` the host started its agent with.
"""

from __future__ import annotations

import itertools
import json
import logging
import shlex
from collections.abc import Awaitable, Callable
from typing import Any

import trio
import trio.testing

from hermes_actors._agent import FrameDecoder, encode_frame
from hermes_actors._config import SandboxConfig
from hermes_actors.testing._in_process import (
    READY,
    InProcessHandle,
    command_result,
    split_bootstrap,
)

Script = Callable[[str], Awaitable[tuple[int, bytes]]]

logger = logging.getLogger("hermes_actors.testing.fake_driver")


class FakeSandbox(InProcessHandle):
    workspace_root = "/fake"

    def __init__(self, driver: FakeDriver, sandbox_id: str, spec: SandboxConfig) -> None:
        super().__init__(sandbox_id, spec)
        self.driver = driver
        host_side, agent_side = trio.testing.memory_stream_pair()
        self._stream = host_side
        self._agent_stream = agent_side
        self.files: dict[int, dict[str, bytes]] = {}
        self.running: dict[int, trio.CancelScope] = {}
        self.slot_of: dict[int, int] = {}
        self._cancel_scope = trio.CancelScope()
        self._send_lock = trio.Lock()
        self.serial_queues: dict[int, list[dict[str, Any]]] = {}
        self.cancelled_early: set[int] = set()
        #: The settings the host started the agent with (its bootstrap config: `ttl_s`, ...).
        self.agent_settings: dict[str, Any] = {}
        #: Heartbeat pings received from the host.
        self.pings = 0

    async def terminate(self) -> None:
        if self.is_alive():
            self.driver.terminated += 1
        self._die(137)
        if self.driver.terminate_latency_s:
            await trio.sleep(self.driver.terminate_latency_s)

    def _die(self, status: int) -> None:
        if not self._mark_exited(status):
            return
        self._cancel_scope.cancel()
        # The host sees the stream end, as it would when a real sandbox vanishes.
        self._agent_stream.send_stream.close()
        self._agent_stream.receive_stream.close()
        self.driver.alive.discard(self)

    # -- the fake agent ---------------------------------------------------------------------

    async def serve(self) -> None:
        decoder = FrameDecoder()
        stream = self._agent_stream
        with self._cancel_scope:
            async with trio.open_nursery() as nursery:
                bootstrap = b""
                # The real bootstrap payload: u32 + source, u32 + config (kept), then frames.
                while (parts := split_bootstrap(bootstrap)) is None:
                    data = await stream.receive_some()
                    if not data:
                        return
                    bootstrap += data
                config, rest = parts
                self.agent_settings = json.loads(config)
                decoder.feed(rest)
                await self._send(READY)
                while True:
                    while True:
                        complete, message = decoder.next_frame()
                        if not complete:
                            break
                        args = message.get("args") or {}
                        if args.get("serial"):
                            self._enqueue_serial(nursery, message)
                        else:
                            nursery.start_soon(self._handle, message)
                    data = await stream.receive_some()
                    if not data:
                        self._die(0)
                        return
                    decoder.feed(bytes(data))

    def _enqueue_serial(self, nursery: trio.Nursery, message: dict[str, Any]) -> None:
        """Like the real agent: serial requests of a slot run one at a time, in order."""
        slot = message["args"]["slot"]
        queue = self.serial_queues.setdefault(slot, [])
        queue.append(message)
        if len(queue) == 1:
            nursery.start_soon(self._run_serial_queue, slot)

    async def _run_serial_queue(self, slot: int) -> None:
        queue = self.serial_queues[slot]
        while queue:
            await self._handle(queue[0])
            if queue:
                queue.pop(0)
        del self.serial_queues[slot]

    def _drop_queued(self, slot: int, target: int | None = None) -> list[int]:
        """Queued (not yet running) serial requests of `slot`, removed; their ids returned."""
        queue = self.serial_queues.get(slot, [])
        dropped = [m for m in queue[1:] if target is None or m["id"] == target]
        for message in dropped:
            queue.remove(message)
        return [m["id"] for m in dropped]

    async def _send(self, message: dict[str, Any]) -> None:
        try:
            async with self._send_lock:
                await self._agent_stream.send_all(encode_frame(message))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._die(1)

    async def _handle(self, message: dict[str, Any]) -> None:
        request_id, op, args = message["id"], message["op"], message.get("args", {})
        try:
            result = await self._op(request_id, op, args)
        except KeyError as exc:
            await self._send(
                {"id": request_id, "ok": False, "error": {"code": "not_found", "message": str(exc)}}
            )
            return
        await self._send({"id": request_id, "ok": True, "result": result})

    async def _op(self, request_id: int, op: str, args: dict[str, Any]) -> dict[str, Any]:
        if op == "exec":
            return await self._exec(request_id, args)
        if op == "cancel":
            for slot in list(self.serial_queues):
                if self._drop_queued(slot, args["target"]):
                    await self._send_cancelled(args["target"])
                    return {"found": True}
            scope = self.running.get(args["target"])
            if scope is not None:
                scope.cancel()
            else:
                # Received but not started yet (its task is spawned, not run): it starts
                # cancelled, as the real agent's would.
                self.cancelled_early.add(args["target"])
            return {"found": scope is not None}
        if op == "reset_slot":
            await trio.sleep(self.driver.reset_latency_s)
            self.driver.resets += 1
            slot = args["slot"]
            for dropped in self._drop_queued(slot):
                await self._send_cancelled(dropped)
            for rid, scope in list(self.running.items()):
                if self.slot_of.get(rid) == slot:
                    scope.cancel()
            self.files.pop(slot, None)
            return {"killed": 0}
        if op == "write_file":
            self.files.setdefault(args["slot"], {})[args["path"]] = args["data"]
            return {"size": len(args["data"])}
        if op == "read_file":
            data = self.files.get(args["slot"], {})[args["path"]]
            limit = args.get("max_bytes")
            head = data if limit is None else data[:limit]
            return {"data": head, "size": len(data), "truncated": len(head) < len(data)}
        if op == "list_files":
            names = sorted(self.files.get(args["slot"], {}))
            return {
                "entries": [{"path": n, "type": "file", "size": 0} for n in names],
                "truncated": False,
            }
        if op == "ping":
            self.pings += 1
            return {}
        if op == "shutdown":
            return {}
        if op == "end_shell":  # this fake runs every command fresh: there is no shell to end
            return {"ended": False}
        raise KeyError(op)

    async def _send_cancelled(self, request_id: int) -> None:
        result = {"exit_code": -9, "signal": None, "timed_out": False, "cancelled": True}
        await self._send({"id": request_id, "ok": True, "result": {**result, "stdout": b""}})

    async def _exec(self, request_id: int, args: dict[str, Any]) -> dict[str, Any]:
        self.driver.execs += 1
        command = args.get("command") or shlex.join(args.get("argv") or [])
        started = trio.current_time()
        scope = trio.CancelScope()
        if request_id in self.cancelled_early:
            self.cancelled_early.discard(request_id)
            scope.cancel()
        if args.get("timeout_s") is not None:
            scope.deadline = started + args["timeout_s"]
        self.running[request_id] = scope
        self.slot_of[request_id] = args["slot"]
        exit_code, output = 0, b""
        with scope:
            exit_code, output = await self.driver.run_command(command)
        del self.running[request_id]
        return command_result(scope, started, exit_code, output)


async def _serve_as_system_task(sandbox: FakeSandbox) -> None:
    # An error escaping a system task would crash the whole run: the sandbox dies instead, as
    # a real one whose agent crashed (the host sees its stream end).
    try:
        await sandbox.serve()
    except Exception:
        logger.exception("fake agent of %s crashed", sandbox.sandbox_id)
        sandbox._die(1)


class FakeDriver:
    """Starts fake sandboxes whose agents are tasks of `nursery`, or without one system tasks
    of the run that creates them (see the module docstring).

    `script(command)` answers commands the fake does not interpret itself (`sleep`, `echo`,
    `exit`) with `(exit_code, stdout)`.
    """

    name = "fake"

    def __init__(
        self, nursery: trio.Nursery | None = None, *, script: Script | None = None
    ) -> None:
        self._nursery = nursery
        self._script = script
        self._ids = itertools.count(1)
        self.create_latency_s = 0.0
        self.reset_latency_s = 0.0
        self.terminate_latency_s = 0.0
        self.fail_next_creates: list[BaseException] = []
        self.created = 0
        self.terminated = 0
        self.execs = 0
        self.resets = 0
        self.alive: set[FakeSandbox] = set()
        self.max_alive = 0
        self.specs: list[SandboxConfig] = []
        self.by_id: dict[str, FakeSandbox] = {}

    async def create(self, spec: SandboxConfig) -> FakeSandbox:
        self.specs.append(spec)
        await trio.sleep(self.create_latency_s)
        if self.fail_next_creates:
            raise self.fail_next_creates.pop(0)
        sandbox = FakeSandbox(self, f"fake-{spec.name}-{next(self._ids)}", spec)
        self.created += 1
        self.alive.add(sandbox)
        self.max_alive = max(self.max_alive, len(self.alive))
        self.by_id[sandbox.sandbox_id] = sandbox
        if self._nursery is not None:
            self._nursery.start_soon(sandbox.serve)
        else:
            trio.lowlevel.spawn_system_task(_serve_as_system_task, sandbox)
        return sandbox

    def kill(self, sandbox_id: str) -> None:
        """The provider kills the sandbox: its agent vanishes and its stream ends."""
        sandbox = self.by_id[sandbox_id]
        sandbox._die(137)

    async def run_command(self, command: str) -> tuple[int, bytes]:
        words = shlex.split(command)
        if words and words[0] == "sleep":
            await trio.sleep(float(words[1]))
            return 0, b""
        if words and words[0] == "echo":
            return 0, (" ".join(words[1:]) + "\n").encode()
        if words and words[0] == "exit":
            return int(words[1]), b""
        if self._script is not None:
            return await self._script(command)
        return 127, f"fake: {command}: command not found\n".encode()

    async def aclose(self) -> None:
        pass
