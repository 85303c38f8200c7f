"""A local emulator of Modal's gRPC API, for driving the real `modal` client in tests.

`ModalEmulator` serves Modal's control plane and the task command router on one 127.0.0.1
port from a thread of its own (with its own asyncio loop: the code under test runs trio, and the
modal client runs its own background asyncio loop). "Sandboxes" are local processes in a temp
directory (see `_emulator_sandbox` for what is and is not emulated).

Pointing the client at it: the `modal` client caches one client per process, so start one
emulator per test session and export `emulator.env` (server URL, dummy token) into
`os.environ` before the first modal call (`MODAL_CONFIG_PATH` before `import modal`).

Implemented flows (modal 1.6.4): `App.lookup(create_if_missing=True)`, `Image.from_registry`
(recorded, never pulled; tags in `failing_images` fail the way a registry pull failure does),
`Image.from_registry(..., add_python=)` (the published Python mount it looks up is served;
tags given to `add_image_without_python` have no python3 unless built with it: an exec of
`python3` there exits 127 as a missing program does), `Secret.from_name` (secrets defined on the
emulator; unknown names -> NOT_FOUND), `Secret.from_dict`
and `env=`, `Sandbox.create` (V2 by default; V1 with `gpu=`), `exec` with stdin/stdout/stderr,
`wait`/`poll` of execs and sandboxes, `terminate`, tags, `Sandbox.list`, `Sandbox.from_id`, the
sandbox entrypoint's stdio (V2 only). Every other RPC answers UNIMPLEMENTED with its name.

Fault injection (thread-safe): per-RPC latency, next-N create failures with a gRPC status, a
create rate limit (RESOURCE_EXHAUSTED above it), slow sandbox start, and provider-side kills.

Cleanup: `stop()` kills every sandbox's whole process tree, closes the server and every
connection it accepted, stops the loop, joins the thread and deletes the temp directory.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import shutil
import socket
import tempfile
import threading
import weakref
from collections.abc import Coroutine, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import grpclib.const
import grpclib.server
from grpclib import Status

from ._emulator_service import EmulatorCall, EmulatorService, KillReason, SandboxState

__all__ = ["EmulatorCall", "KillReason", "ModalEmulator", "SandboxState"]

_T = TypeVar("_T")
_STOP_TIMEOUT_SECS = 30.0


class _Servable:
    def __init__(self, mapping: dict[str, grpclib.const.Handler]) -> None:
        self._mapping = mapping

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        return self._mapping


class _TransportRecorder(asyncio.Protocol):
    """Delegates to grpclib's protocol and remembers the transport, so `stop()` can close it."""

    def __init__(
        self, inner: asyncio.Protocol, transports: weakref.WeakSet[asyncio.BaseTransport]
    ) -> None:
        self._inner = inner
        self._transports = transports

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transports.add(transport)
        connection = transport.get_extra_info("socket")
        if connection is not None:
            # grpclib only sets this when the socket's proto field says TCP, which an accepted
            # socket's does not; without it every reply's trailers wait ~40 ms for a delayed ACK.
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class _Server(grpclib.server.Server):
    """grpclib's server, plus a record of accepted transports (it does not close them itself)."""

    def __init__(self, handlers: list[_Servable]) -> None:
        super().__init__(handlers)
        self.transports: weakref.WeakSet[asyncio.BaseTransport] = weakref.WeakSet()

    def _protocol_factory(self) -> Any:  # grpclib private hook, pinned with modal's grpclib
        return _TransportRecorder(super()._protocol_factory(), self.transports)


class ModalEmulator:
    """A local Modal API server for the real `modal` client. See the module docstring.

    Use as a context manager, or call `start()` and `stop()`. Methods are thread-safe and must
    not be called from the emulator's own thread.
    """

    def __init__(
        self,
        *,
        secrets: Mapping[str, Mapping[str, str]] | None = None,
        failing_images: Iterable[str] = (),
    ) -> None:
        self._initial_secrets = dict(secrets or {})
        self._initial_failing_images = tuple(failing_images)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._service: EmulatorService | None = None
        self._server: _Server | None = None
        self._port = 0
        self._tmp: Path | None = None
        self._stopped: asyncio.Event | None = None
        self._main_task: asyncio.Task[Any] | None = None

    # -- lifecycle --

    def start(self) -> ModalEmulator:
        """Bind 127.0.0.1 on an ephemeral port and serve from a new thread; returns when serving."""
        if self._thread is not None:
            raise RuntimeError("ModalEmulator is already started")
        self._tmp = Path(tempfile.mkdtemp(prefix="modal-emulator-"))
        # Traversable, as a container's / is: slot users reach their own 0700 workspaces.
        self._tmp.chmod(0o711)
        self._service = EmulatorService(
            root=self._tmp,
            secrets=self._initial_secrets,
            failing_images=self._initial_failing_images,
        )
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="modal-emulator", daemon=True
        )
        self._thread.start()
        try:
            ready.result(timeout=_STOP_TIMEOUT_SECS)
        except BaseException:
            self._thread.join(timeout=_STOP_TIMEOUT_SECS)
            self._thread = None
            shutil.rmtree(self._tmp, ignore_errors=True)
            raise
        return self

    def stop(self) -> None:
        """Kill every sandbox, close the server and its connections, join the thread.

        Idempotent.
        """
        thread, loop, stopped = self._thread, self._loop, self._stopped
        if thread is None or loop is None or stopped is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(
                timeout=_STOP_TIMEOUT_SECS
            )
        finally:
            loop.call_soon_threadsafe(stopped.set)
            thread.join(timeout=_STOP_TIMEOUT_SECS)
            self._thread = self._loop = self._stopped = None
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> ModalEmulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self, ready: concurrent.futures.Future[None]) -> None:
        asyncio.run(self._serve(ready))

    async def _serve(self, ready: concurrent.futures.Future[None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._main_task = asyncio.current_task()
        self._stopped = asyncio.Event()
        try:
            service = self._require_service()
            self._server = _Server([_Servable(service.mapping())])
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.bind(("127.0.0.1", 0))
            self._port = listener.getsockname()[1]
            await self._server.start(sock=listener)
            service.router_url = self.url
        except BaseException as exc:
            ready.set_exception(exc)
            return
        ready.set_result(None)
        await self._stopped.wait()

    async def _shutdown(self) -> None:
        service, server = self._require_service(), self._server
        await service.finish_all()
        if server is not None:
            server.close()
            for transport in list(server.transports):
                transport.close()
            await server.wait_closed()
        # Timers and pumps of finished sandboxes, streams of closed connections.
        spared = {asyncio.current_task(), self._main_task}
        leftovers = [task for task in asyncio.all_tasks() if task not in spared]
        for task in leftovers:
            task.cancel()
        await asyncio.gather(*leftovers, return_exceptions=True)

    # -- addresses --

    @property
    def url(self) -> str:
        """`http://127.0.0.1:PORT`: the control plane and the command router share it."""
        if not self._port:
            raise RuntimeError("ModalEmulator is not started")
        return f"http://127.0.0.1:{self._port}"

    @property
    def env(self) -> dict[str, str]:
        """Environment variables that point a (fresh) modal client at this emulator."""
        return {
            "MODAL_SERVER_URL": self.url,
            "MODAL_TOKEN_ID": "ak-modal-emulator",
            "MODAL_TOKEN_SECRET": "as-modal-emulator",
            "MODAL_CONFIG_PATH": "/nonexistent",
        }

    # -- configuration and fault injection --

    def define_secret(self, name: str, env: Mapping[str, str]) -> str:
        """Define (or replace) a named secret for `Secret.from_name`; returns its id."""
        return self._require_service().define_secret(name, env)

    def add_failing_image(self, tag: str) -> None:
        """Make `Image.from_registry(tag)` fail as a registry pull failure does."""
        self._require_service().add_failing_image(tag)

    def add_image_without_python(self, tag: str) -> None:
        """Make sandboxes of registry image `tag` have no python3 (an exec of `python3` fails
        with 127, as a missing program does), unless the image was built with `add_python`.
        Cleared by `clear_faults`."""
        self._require_service().add_image_without_python(tag)

    def set_latency(self, seconds: float) -> None:
        """Delay the start of every RPC (both services) by `seconds`."""
        self._require_service().set_latency(seconds)

    def fail_next_creates(self, count: int, status: Status, message: str | None = None) -> None:
        """Make the next `count` sandbox creates fail with `status` (e.g. RESOURCE_EXHAUSTED)."""
        text = message or f"Emulated sandbox create failure ({status.name})"
        self._require_service().fail_next_creates(count, status, text)

    def fail_next_calls(
        self, method: str, count: int, status: Status, message: str | None = None
    ) -> None:
        """Make the next `count` calls of RPC `method` (either service, e.g.
        "TaskSnapshotDirectory") fail with `status`, logged with the field `injected_fault`."""
        text = message or f"Emulated {method} failure ({status.name})"
        self._require_service().fail_next_calls(method, count, status, text)

    def set_create_rate_limit(self, per_second: float | None) -> None:
        """Reject creates beyond `per_second` in any one-second window with RESOURCE_EXHAUSTED."""
        self._require_service().set_create_rate_limit(per_second)

    def set_slow_start(self, seconds: float) -> None:
        """Delay each new sandbox's start: V2 creates return later, V1 task ids appear later."""
        self._require_service().set_slow_start(seconds)

    def clear_faults(self) -> None:
        """Remove latency, pending create and call failures, the rate limit and slow start."""
        self._require_service().clear_faults()

    def kill_sandbox(self, sandbox_id: str, reason: KillReason = "terminated") -> None:
        """End a sandbox as the provider would: its lifetime ("timeout", returncode 124), idle
        timeout ("idle_timeout", 124), an operator or outage ("terminated", 137;
        "internal_failure")."""
        service = self._require_service()
        self._call(service.kill_sandbox(sandbox_id, reason))

    def reset(self) -> None:
        """Terminate and forget every sandbox and snapshot image; clear faults, the call log
        and counters."""
        service = self._require_service()
        self._call(service.finish_all())
        self._call(_forget(service))
        self._call(service.snapshots.clear())
        service.clear_faults()
        service.clear_log()

    # -- introspection --

    def calls(self, method: str | None = None) -> list[EmulatorCall]:
        """The call log (optionally of one method), oldest first."""
        return self._require_service().calls(method)

    def call_counts(self) -> dict[str, int]:
        """RPCs received, per method name (implemented or not)."""
        return self._require_service().call_counts()

    def internal_errors(self) -> list[str]:
        """Bugs hit inside handlers (each was answered with an explicit status)."""
        return self._require_service().internal_errors()

    def sandboxes(self) -> list[SandboxState]:
        """A snapshot of every sandbox created since the last reset."""
        service = self._require_service()
        return self._call(_states(service))

    def snapshot_images(self) -> list[str]:
        """Ids of the snapshot images (directory or filesystem) not yet expired."""
        service = self._require_service()
        return self._call(_snapshot_ids(service))

    def live_pids(self) -> list[int]:
        """Pids of every process of every sandbox that is still alive."""
        return sorted(pid for state in self.sandboxes() for pid in state.live_pids)

    # -- internals --

    def _require_service(self) -> EmulatorService:
        if self._service is None:
            raise RuntimeError("ModalEmulator is not started")
        return self._service

    def _call(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        loop = self._loop
        if loop is None:
            coroutine.close()
            raise RuntimeError("ModalEmulator is not started")
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout=_STOP_TIMEOUT_SECS)


async def _forget(service: EmulatorService) -> None:
    for sandbox in service.sandboxes.values():
        shutil.rmtree(sandbox.root, ignore_errors=True)
    service.forget_sandboxes()


async def _states(service: EmulatorService) -> list[SandboxState]:
    return service.sandbox_states()


async def _snapshot_ids(service: EmulatorService) -> list[str]:
    return service.snapshots.image_ids()
