"""The trio-native backend: `async with BackendCore(profiles) as core:` and its calls.

The core is what `ToolBackend` does, for callers in one trio run. Entering it opens a nursery
in the caller's task and starts the runtime there (every profile with `min_sandboxes` warming);
leaving it, or `aclose()`, terminates every sandbox: that is the one way it stops (a
`ToolBackend` on a portal thread, and SIGTERM/SIGHUP, go through the same `aclose`). Every
method is a trio coroutine to be awaited in that run; none knows about threads or asyncio
(`ToolBackend` and `PortalHost` carry calls here from elsewhere).

A trainer acquires a `Slot` per trajectory, sends tool calls for many slots at once with
`execute_batch`, and releases the slots when the trajectories end. The tools are the rows of
`facades._tools.TOOLS` (`bash`, `terminal`, `read_file`, `write_file`); artifacts can be read,
listed and archived; workspaces checkpointed, restored, forked, uploaded and downloaded.

Invariants kept here: a slot handed to a caller is released exactly once (by the caller, by
`aclose`, or given back when the caller was cancelled before taking it); `execute_batch`
returns one result per request, in request order, and never raises for a bad request or a
failed sandbox (those are error results; infrastructure failures carry `infra_error` and
`retryable`); no internal exception group reaches a caller.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import enum
import functools
import hashlib
import io
import logging
import math
import mimetypes
import stat
import tarfile
import time
import zipfile
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import PurePosixPath
from typing import Any, Self

import attrs
import trio

from hermes_actors._config import Profiles, SandboxConfig
from hermes_actors._errors import (
    AgentError,
    HermesError,
    InfrastructureError,
    RuntimeStopped,
    SandboxLost,
)
from hermes_actors._output import OutputChunk, OutputSink
from hermes_actors._progress import show_warmup
from hermes_actors._status import BackendStatus
from hermes_actors._trio import collapse_exception_groups
from hermes_actors._values import (
    Command,
    CommandResult,
    FileContent,
    ListFiles,
    Listing,
    ReadFile,
)
from hermes_actors.drivers._base import SandboxDriver
from hermes_actors.facades._signals import serve_signals
from hermes_actors.facades._tools import (
    TOOLS,
    BadRequest,
    ExecutionResult,
    ToolContext,
    error_result,
    parse_arguments,
)
from hermes_actors.runtime._runtime import Checkpoint, Lease, Runtime
from hermes_actors.runtime._trees import DownloadTarget, UploadSource

__all__ = [
    "ARCHIVE_FORMATS",
    "DEFAULT_ARCHIVE_MAX_BYTES",
    "ArtifactTooLarge",
    "BackendCore",
    "Slot",
    "SlotState",
]

logger = logging.getLogger("hermes_actors.backend")

#: Default bound of `archive_artifacts`, in bytes of compressed archive.
DEFAULT_ARCHIVE_MAX_BYTES = 64 * 1024 * 1024
#: How long a release cut short by the caller's cancellation may take to finish on its own.
RELEASE_GRACE_S = 30.0
#: Archive formats `archive_artifacts` writes (the names the original's executor accepts).
ARCHIVE_FORMATS = ("tar.gz", "tgz", "tar", "zip")


class ArtifactTooLarge(HermesError, ValueError):
    """An artifact (or archive) is larger than the bound the caller set or the agent allows."""

    def __init__(self, path: str, max_bytes: int, *, what: str = "archive") -> None:
        if what == "archive":
            message = (
                f"the archive of {path!r} is larger than {max_bytes} bytes; archive a smaller "
                "directory or raise max_bytes"
            )
        else:
            message = (
                f"the file {path!r} is larger than the {max_bytes} bytes one read returns; "
                "read it in parts (max_bytes) or archive it with archive_artifacts"
            )
        super().__init__(message)
        self.path = path
        self.max_bytes = max_bytes


class SlotState(enum.Enum):
    """Where a slot is in its life, as the original Hermes `Slot.state` reported it."""

    AVAILABLE = "available"
    ACQUIRED = "acquired"
    EXECUTING = "executing"
    RELEASING = "releasing"
    ERROR = "error"


@attrs.frozen
class Slot:
    """One trajectory's place in a sandbox: its own workspace, one command at a time.

    Returned by `acquire`; valid until it is released. `slot_id` is unique across
    profiles and sandboxes. Besides ours, it has the fields the original Hermes executor
    reads: `alloc_id` (the sandbox), `container_addr` (`<backend>://<sandbox_id>`),
    `workspace_dir` (the workspace's path inside the sandbox), `state` and `metadata` (a dict
    the caller may use). `isolated` and `network` say what the slot's sandbox enforces.
    """

    slot_id: str
    profile: str
    sandbox_id: str
    trajectory_id: str | None
    lease: Lease = attrs.field(repr=False, eq=False)
    workspace_dir: str = ""
    container_addr: str = ""
    isolated: bool = False
    network: bool = True
    metadata: dict[str, Any] = attrs.field(factory=dict, eq=False, repr=False)
    # The holding backend's view of its slots: `state` asks it, so it is never stale.
    _state_in: Callable[[Slot], SlotState] = attrs.field(
        eq=False, repr=False, kw_only=True, alias="state_in"
    )

    @property
    def alloc_id(self) -> str:
        """The original's name for the sandbox hosting the slot."""
        return self.sandbox_id

    @property
    def state(self) -> SlotState:
        """`ACQUIRED` while the backend holds it for a caller, `EXECUTING` while a tool call on
        it runs, `ERROR` once its sandbox was seen lost (release it, acquire another),
        `RELEASING` while it is being given back, `AVAILABLE` once it is."""
        return self._state_in(self)


class BackendCore:
    """Pools of sandboxes for many trajectories, run in the caller's trio run.

    `async with BackendCore(profiles) as core:` starts the runtime in a nursery of the
    caller's task and warms every profile's `min_sandboxes`; leaving the block terminates every
    sandbox (so does `aclose()`, after which a call starts the runtime again while the block is
    open). Cancelling a call cancels its work: a command is killed, an acquire that was
    cancelled holds no slot. Await the methods in the run that entered the core.
    """

    def __init__(
        self,
        profiles: Profiles,
        *,
        drivers: Mapping[str, SandboxDriver] | None = None,
        run_id: str | None = None,
        default_timeout_s: float | None = None,
    ) -> None:
        self.profiles = profiles
        self._drivers = drivers
        self._run_id = run_id
        self._default_timeout_s: float | None = None
        if default_timeout_s is not None:
            self.default_timeout_s = default_timeout_s
        # The trio run the core is entered in, and its nursery there.
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._exit_stack: contextlib.AsyncExitStack | None = None
        self._start_lock = trio.Lock()
        self._runtime: Runtime | None = None
        self._runtime_scope: trio.CancelScope | None = None
        self._runtime_done: trio.Event | None = None
        self._held: dict[str, Slot] = {}
        # Held slots whose sandbox was seen lost: there is nothing to give back for them.
        self._lost: set[str] = set()
        # Tool calls in progress per held slot, and the slots being given back (`Slot.state`).
        self._calls_running: collections.Counter[str] = collections.Counter()
        self._releasing: set[str] = set()

    def __repr__(self) -> str:
        state = "running" if self._runtime is not None else "stopped"
        return f"<BackendCore {state} profiles={list(self.profiles.names)}>"

    @property
    def default_timeout_s(self) -> float:
        """Seconds a `bash` call may run when neither the call nor the batch says.

        Defaults to the default profile's `execution_timeout_s`; settable.
        """
        if self._default_timeout_s is not None:
            return self._default_timeout_s
        return self.profiles.get_profile().execution_timeout_s

    @default_timeout_s.setter
    def default_timeout_s(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise ValueError(f"default_timeout_s must be a number > 0: {value!r}")
        self._default_timeout_s = float(value)

    @property
    def running(self) -> bool:
        """True while the runtime runs."""
        return self._runtime is not None

    @property
    def entered(self) -> bool:
        """True inside `async with` (the runtime may have been stopped with `aclose`)."""
        return self._token is not None

    @property
    def token(self) -> trio.lowlevel.TrioToken | None:
        """The token of the trio run the core is entered in (None when it is not entered)."""
        return self._token

    def in_home_run(self) -> bool:
        """True when called from the trio run (and thread) the core is entered in."""
        token = self._token
        if token is None:
            return False
        try:
            return trio.lowlevel.current_trio_token() is token
        except RuntimeError:  # not in a trio run at all
            return False

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._token is not None:
            raise RuntimeError(
                "this backend is already running; leave its `async with` (or stop() it) before "
                "entering it again"
            )
        self._token = trio.lowlevel.current_trio_token()
        stack = contextlib.AsyncExitStack()
        try:
            self._nursery = await stack.enter_async_context(trio.open_nursery())
            with collapse_exception_groups():
                await self._ensure_runtime()
            self._nursery.start_soon(serve_signals, self.aclose, name="hermes-actors-stop-signals")
        except BaseException:
            if self._nursery is not None:
                self._nursery.cancel_scope.cancel()
            with collapse_exception_groups():
                await stack.aclose()
            self._forget_home()
            raise
        self._exit_stack = stack
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        stack, self._exit_stack = self._exit_stack, None
        assert stack is not None
        try:
            with collapse_exception_groups():
                try:
                    await self.aclose()
                finally:
                    if self._nursery is not None:
                        self._nursery.cancel_scope.cancel()
                    await stack.__aexit__(*exc_info)  # type: ignore[arg-type]
        finally:
            self._forget_home()

    def _forget_home(self) -> None:
        self._token = None
        self._nursery = None

    async def aclose(self, *, purge: bool = False) -> None:
        """Terminate every sandbox and stop the runtime: the one way the core stops. Idempotent.

        Slots still held are gone afterwards. `purge` also terminates what other (crashed)
        runs left in the modal profiles' apps (local sandboxes never outlive their run).
        Inside `async with`, a later call starts the runtime again.
        """
        scope, done = self._runtime_scope, self._runtime_done
        if scope is None or done is None:
            return
        if purge and self._runtime is not None:
            await self._runtime.reap_orphans()
        scope.cancel(reason="backend stopped")
        await done.wait()
        self._runtime_scope = self._runtime_done = None
        self._runtime = None
        self._held.clear()
        self._lost.clear()

    async def start(self, profiles_to_start: Sequence[str] | None = None) -> None:
        """Start the runtime if it is stopped, and the pools of `profiles_to_start` now.

        Those pools pre-warm their `min_sandboxes`; other profiles without a minimum start on
        first use. Raises `ConfigError` (an unknown profile, before anything starts),
        `IsolationUnavailable`, `BackendUnavailable` when the pools cannot start.

        While sandboxes warm, a live display on stderr shows them per profile when stderr is a
        terminal (`$HERMES_ACTORS_PROGRESS=0` turns it off); otherwise only INFO records of
        the `hermes_actors.backend` logger say so. Nothing is written to stdout.
        """
        names = list(profiles_to_start or ())
        for name in names:
            self.profiles.get_profile(name)
        runtime = await self._ensure_runtime()
        for name in names:
            with collapse_exception_groups():
                await runtime.start_pool(name)

    async def _ensure_runtime(self) -> Runtime:
        if self._runtime is not None:
            return self._runtime
        async with self._start_lock:
            if self._runtime is not None:
                return self._runtime
            if self._nursery is None:
                raise RuntimeStopped(
                    "this backend is not running; enter it with `async with` first"
                )
            runtime = Runtime(self.profiles, drivers=self._drivers, run_id=self._run_id)
            scope = trio.CancelScope()
            done = trio.Event()

            async def serve(
                *, task_status: trio.TaskStatus[Runtime] = trio.TASK_STATUS_IGNORED
            ) -> None:
                # A crash of the running runtime ends the core's `async with` with that error.
                try:
                    with scope:
                        await runtime.run(task_status=task_status)
                finally:
                    if self._runtime is runtime:
                        self._runtime = None
                        self._held.clear()
                    done.set()

            try:
                with collapse_exception_groups():
                    await self._nursery.start(serve, name="hermes-actors-runtime")
            except RuntimeStopped:
                # A start cut short by the caller's cancellation can surface as "stopped":
                # report it as the cancellation it is.
                await trio.lowlevel.checkpoint_if_cancelled()
                raise
            self._runtime, self._runtime_scope, self._runtime_done = runtime, scope, done
            self._nursery.start_soon(
                show_warmup,
                lambda: runtime.status().pools if self._runtime is runtime else None,
                {name: config.min_sandboxes for name, config in self.profiles.profiles.items()},
                name="hermes-actors-warmup",
            )
            return runtime

    async def give_back(self, value: object) -> None:
        """A result its caller never took (it was cancelled in between): release its slots."""
        if isinstance(value, Slot):
            await self.release(value, reset_workspace=True)
        elif isinstance(value, list):  # a fork's slots
            for item in value:
                if isinstance(item, Slot):
                    await self.release(item, reset_workspace=True)

    # -- slots -----------------------------------------------------------------------------

    async def acquire(
        self, trajectory_id: str | None = None, profile: str | None = None, image: str | None = None
    ) -> Slot:
        """Wait for a free slot of `profile` (default profile when None) and hold it.

        `image` runs the slot in a sandbox of that image instead of the profile's (a task's
        own repository and toolchain): Modal, a registry image; local, a root filesystem
        directory used as `/` under bubblewrap. Each image has its own sandboxes, all within
        the profile's `max_sandboxes`.

        Raises `ConfigError` (unknown profile), `AcquireTimeout` (no slot within the profile's
        `acquire_timeout_s`), `SandboxStartFailed`, `IsolationUnavailable`, `RuntimeStopped`.
        Cancellation leaves no slot held.
        """
        runtime = await self._ensure_runtime()
        with collapse_exception_groups():
            lease = await runtime.acquire(profile, trajectory_id, image=image)
        return self._hold(lease)

    def _hold(self, lease: Lease) -> Slot:
        handle = lease.sandbox.handle
        backend = self.profiles.get_profile(lease.profile).backend
        slot = Slot(
            slot_id=lease.slot_id,
            profile=lease.profile,
            sandbox_id=lease.sandbox_id,
            trajectory_id=lease.trajectory_id,
            lease=lease,
            workspace_dir=lease.sandbox.workspace_dir(lease.index),
            container_addr=f"{backend}://{lease.sandbox_id}",
            # A sandbox that is not running yet cannot be trusted to isolate anything.
            isolated=handle is not None and handle.isolated,
            network=handle is None or handle.network,
            state_in=self._state_of,
        )
        self._held[slot.slot_id] = slot
        return slot

    def _state_of(self, slot: Slot) -> SlotState:
        if self._held.get(slot.slot_id) is not slot:
            releasing = slot.slot_id in self._releasing
            return SlotState.RELEASING if releasing else SlotState.AVAILABLE
        if slot.slot_id in self._lost:
            return SlotState.ERROR
        return SlotState.EXECUTING if self._calls_running[slot.slot_id] else SlotState.ACQUIRED

    async def release(self, slot: Slot, reset_workspace: bool = False) -> None:
        """Give a slot back; with `reset_workspace` its processes are killed and files wiped.

        Without it (the default, as in the original Hermes backend) the next trajectory given
        this slot finds its files, and anything it left running.

        Idempotent. Returns once the slot is free again. If the caller is cancelled, the
        release still completes in the background.
        """
        if self._held.get(slot.slot_id) is not slot:
            return
        del self._held[slot.slot_id]
        runtime = self._runtime
        if slot.slot_id in self._lost:
            # Its sandbox is gone and the pool drops it with its slots; releasing it could only
            # race the pool's noticing and hand the dead slot out again.
            self._lost.discard(slot.slot_id)
            return
        if runtime is None:
            return
        self._releasing.add(slot.slot_id)
        try:
            with collapse_exception_groups():
                await runtime.release(slot.lease, reset=reset_workspace)
        except InfrastructureError as exc:  # the sandbox is gone: so is the slot
            logger.info("release of %s: %s", slot.slot_id, exc)
        except BaseException:
            if self._nursery is not None:
                # Cut short by the caller: finish the (idempotent) release on our own.
                self._nursery.start_soon(self._finish_release, runtime, slot.lease, reset_workspace)
            else:
                self._releasing.discard(slot.slot_id)
            raise
        self._releasing.discard(slot.slot_id)

    async def _finish_release(self, runtime: Runtime, lease: Lease, reset: bool) -> None:
        try:
            with trio.move_on_after(RELEASE_GRACE_S), contextlib.suppress(HermesError):
                await runtime.release(lease, reset=reset)
        finally:
            self._releasing.discard(lease.slot_id)

    # -- tools -----------------------------------------------------------------------------

    async def execute_batch(
        self,
        requests: Sequence[tuple[Slot, str, Mapping[str, Any]]],
        timeout_s: float | None = None,
        *,
        on_output: Callable[[int, OutputChunk], None] | None = None,
    ) -> list[ExecutionResult]:
        """Run tool calls and return their results in request order.

        Calls for different slots run concurrently; calls for the same slot run one after the
        other, in request order. `timeout_s` bounds each `bash` call that gives no `timeout`
        (default: `default_timeout_s`). Never raises for a request: an unknown tool, bad
        arguments, a slot that is not held or a lost sandbox give an error result.
        Cancellation kills the commands still running.

        `on_output(index, chunk)` streams each `bash` call's output while it runs (`index` is
        the request's position): called in the runtime's trio thread (the caller's, under
        `async with`; else the portal thread), it must return quickly and never block. Chunks
        the runtime could not deliver in time are counted, never buffered without bound (see
        `OutputChunk.skipped`); the results are the same as without it.
        """
        batch = list(requests)
        results: list[ExecutionResult | None] = [None] * len(batch)
        queues: dict[str, list[int]] = {}
        for index, request in enumerate(batch):
            try:
                slot = self._check_request(request, timeout_s)
            except BadRequest as exc:
                slot_id = _slot_id_of(request)
                results[index] = error_result(slot_id, str(exc), _tool_of(request), 0.0)
                continue
            queues.setdefault(slot.slot_id, []).append(index)

        async def run_one(index: int, *, task_status: trio.TaskStatus[None]) -> None:
            slot, tool, args = batch[index]
            submitted = False

            def on_submitted() -> None:
                nonlocal submitted
                submitted = True
                task_status.started()

            sink = None if on_output is None else functools.partial(on_output, index)
            try:
                results[index] = await self._run_tool(
                    slot, tool, args, timeout_s, on_submitted, sink
                )
            finally:
                if not submitted:
                    task_status.started()

        async def run_queue(indexes: list[int]) -> None:
            # A slot's calls are submitted one after the other, each as soon as the previous
            # one is queued (not finished): the agent runs them in that order, and the whole
            # batch reaches each sandbox in one write.
            async with trio.open_nursery() as calls:
                for index in indexes:
                    await calls.start(run_one, index)

        if len(queues) == 1 and len(only := next(iter(queues.values()))) == 1:
            # One call (terminal_tool's case): it runs in this task, no nursery or task of its
            # own (they cost about as much as the rest of the host's path).
            slot, tool, args = batch[only[0]]
            sink = None if on_output is None else functools.partial(on_output, only[0])
            results[only[0]] = await self._run_tool(slot, tool, args, timeout_s, None, sink)
            return results  # type: ignore[return-value]
        with collapse_exception_groups():
            async with trio.open_nursery() as nursery:
                for slot_id, indexes in queues.items():
                    nursery.start_soon(run_queue, indexes, name=f"batch:{slot_id}")
        assert all(result is not None for result in results)
        return results  # type: ignore[return-value]

    def _check_request(self, request: object, timeout_s: float | None) -> Slot:
        if not isinstance(request, tuple | list) or len(request) != 3:
            raise BadRequest(f"a request is a (slot, tool, args) triple, got {request!r}")
        slot, tool, _ = request
        if not isinstance(slot, Slot):
            raise BadRequest(f"expected a Slot from acquire(), got {type(slot).__name__}")
        if self._held.get(slot.slot_id) is not slot:
            raise BadRequest(
                f"slot {slot.slot_id} is not held by this backend (released, lost, or from "
                "another backend); acquire a new one"
            )
        if not isinstance(tool, str) or tool not in TOOLS:
            raise BadRequest(f"unknown tool {tool!r}; available tools: {', '.join(TOOLS)}")
        if timeout_s is not None and not _is_positive_number(timeout_s):
            raise BadRequest(f"{tool}: 'timeout_s' must be a number > 0, got {timeout_s!r}")
        return slot

    async def _run_tool(
        self,
        slot: Slot,
        name: str,
        args: Mapping[str, Any],
        timeout_s: float | None,
        on_submitted: Callable[[], None] | None = None,
        on_output: OutputSink | None = None,
    ) -> ExecutionResult:
        """One call through its row of `TOOLS`: arguments, refusal, operation, rendering."""
        runtime = self._runtime
        started = time.monotonic()
        if runtime is None or self._held.get(slot.slot_id) is not slot:
            return error_result(
                slot.slot_id, f"slot {slot.slot_id} was released while the batch ran", name, 0.0
            )
        tool = TOOLS[name]
        try:
            arguments = parse_arguments(name, tool.arguments, args)
        except BadRequest as exc:
            return error_result(slot.slot_id, str(exc), name, 0.0)
        config = self.profiles.get_profile(slot.profile)
        context = ToolContext(
            slot_id=slot.slot_id,
            config=config,
            timeout_s=timeout_s or self._timeout_for(config),
            isolated=slot.isolated,
            network=slot.network,
            started=started,
        )
        refused = tool.refusal(name, arguments, context)
        if refused is not None:
            return refused
        operation = tool.operation(arguments, context)
        self._calls_running[slot.slot_id] += 1
        try:
            with collapse_exception_groups():
                result = await runtime.call(
                    slot.lease,
                    operation,
                    on_submitted=on_submitted,
                    on_output=on_output if isinstance(operation, Command) else None,
                )
        except InfrastructureError as exc:
            if isinstance(exc, SandboxLost):
                self._lost.add(slot.slot_id)
            return error_result(
                slot.slot_id,
                str(exc),
                name,
                time.monotonic() - started,
                infra_error=exc.kind,
                retryable=exc.retryable,
            )
        except (AgentError, HermesError) as exc:
            return error_result(slot.slot_id, str(exc), name, time.monotonic() - started)
        finally:
            self._calls_running[slot.slot_id] -= 1
            if self._calls_running[slot.slot_id] <= 0:
                del self._calls_running[slot.slot_id]
        return tool.render(arguments, result, context)

    def _timeout_for(self, config: SandboxConfig) -> float:
        if self._default_timeout_s is not None:
            return self._default_timeout_s
        return config.execution_timeout_s

    # -- artifacts -------------------------------------------------------------------------

    # The original Hermes executor parses these payloads; every field is always present, and a
    # failure is `success: False` with the reason in `error`, never an exception.

    async def read_artifact(
        self,
        slot: Slot,
        path: str,
        *,
        encoding: str = "text",
        max_bytes: int | None = None,
        include_sha256: bool = False,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """A file of the slot's workspace: `{success, content, error, encoding, truncated,
        bytes, file_size, path, mime, sha256}`.

        `encoding` is `text` (UTF-8, undecodable bytes replaced) or `base64`; `max_bytes`
        reads only the start (`truncated` says whether there was more; `file_size` is the
        whole size); `include_sha256` adds the whole file's SHA-256.
        """
        payload: dict[str, Any] = {
            "success": False,
            "content": "",
            "error": "",
            "encoding": encoding,
            "truncated": False,
            "bytes": 0,
            "file_size": None,
            "path": path,
            "mime": mimetypes.guess_type(path)[0] if isinstance(path, str) else None,
            "sha256": None,
        }

        async def read() -> dict[str, Any]:
            if encoding not in ("text", "base64"):
                raise ValueError(f"encoding must be 'text' or 'base64', got {encoding!r}")
            _check_bound("max_bytes", max_bytes, minimum=0)
            runtime = self._held_runtime(slot)
            content: FileContent = await runtime.call(
                slot.lease, ReadFile(path=path, max_bytes=max_bytes)
            )
            data = content.data
            if content.truncated and max_bytes is None:
                # The caller asked for the whole file: a cut one is not an answer.
                payload.update(truncated=True, bytes=len(data), file_size=content.size)
                raise ArtifactTooLarge(path, len(data), what="file")
            if include_sha256:
                payload["sha256"] = (
                    await self._sha256(runtime, slot, path)
                    if content.truncated
                    else hashlib.sha256(data).hexdigest()
                )
            payload.update(
                success=True,
                content=(
                    data.decode("utf-8", errors="replace")
                    if encoding == "text"
                    else base64.b64encode(data).decode("ascii")
                ),
                truncated=content.truncated,
                bytes=len(data),
                file_size=content.size,
            )
            return payload

        return await _artifact_payload(read, payload, timeout_s)

    async def _sha256(self, runtime: Runtime, slot: Slot, path: str) -> str | None:
        result: CommandResult = await runtime.call(
            slot.lease, Command(argv=("sha256sum", "--", path), timeout_s=self.default_timeout_s)
        )
        digest = result.stdout.split(b" ", 1)[0].decode("ascii", errors="replace")
        return digest if result.exit_code == 0 and len(digest) == 64 else None

    async def list_artifacts(
        self,
        slot: Slot,
        path: str = ".",
        *,
        recursive: bool = False,
        max_entries: int | None = None,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """Entries under `path` of the slot's workspace: `{success, entries, truncated, error}`,
        each entry `{path, is_dir, size, mtime}`, sorted, depth first when `recursive`.

        `truncated` says `max_entries` (or the agent's own bound) cut the listing short.
        """
        payload: dict[str, Any] = {"success": False, "entries": [], "truncated": False, "error": ""}

        async def listing() -> dict[str, Any]:
            if not isinstance(recursive, bool):
                raise ValueError(f"recursive must be a bool, got {recursive!r}")
            _check_bound("max_entries", max_entries, minimum=0)
            runtime = self._held_runtime(slot)
            found: Listing = await runtime.call(
                slot.lease, ListFiles(path=path, recursive=recursive, max_entries=max_entries)
            )
            payload.update(
                success=True,
                truncated=found.truncated,
                entries=[
                    {
                        "path": entry["path"],
                        "is_dir": entry["type"] == "dir",
                        "size": int(entry["size"]),
                        "mtime": float(entry.get("mtime", 0.0)),
                    }
                    for entry in found.entries
                ],
            )
            return payload

        return await _artifact_payload(listing, payload, timeout_s)

    async def archive_artifacts(
        self,
        slot: Slot,
        path: str = ".",
        *,
        archive_format: str = "tar.gz",
        max_bytes: int | None = None,
        max_entries: int | None = None,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """An archive of `path` (relative to the slot's workspace): `{success, content
        (base64), error, encoding, format, bytes, entry_count}`.

        `archive_format` is `tar.gz` (or `tgz`), `tar` or `zip`, as in the original backend; a
        zip is made on the host from the sandbox's tar, so the image needs no `zip` program. An
        archive longer than `max_bytes` (default `DEFAULT_ARCHIVE_MAX_BYTES`; for a zip, the tar
        it is made from too) or holding more than `max_entries` entries is an error.
        """
        payload: dict[str, Any] = {
            "success": False,
            "content": "",
            "error": "",
            "encoding": "base64",
            "format": archive_format,
            "bytes": 0,
            "entry_count": 0,
        }

        async def archive() -> dict[str, Any]:
            if archive_format not in ARCHIVE_FORMATS:
                raise ValueError(
                    f"archive_format must be one of {', '.join(ARCHIVE_FORMATS)}, got "
                    f"{archive_format!r}"
                )
            _check_bound("max_bytes", max_bytes, minimum=1)
            _check_bound("max_entries", max_entries, minimum=0)
            if not isinstance(path, str):
                raise ValueError(f"path must be a str, got {type(path).__name__}")
            parts = PurePosixPath(path).parts
            if PurePosixPath(path).is_absolute() or ".." in parts:
                raise AgentError("path_escape", f"{path!r} is not a path inside the workspace")
            limit = DEFAULT_ARCHIVE_MAX_BYTES if max_bytes is None else max_bytes
            gzipped = archive_format in ("tar.gz", "tgz")
            runtime = self._held_runtime(slot)
            result: CommandResult = await runtime.call(
                slot.lease,
                Command(
                    argv=("tar", "-czf" if gzipped else "-cf", "-", "--", path),
                    timeout_s=self.default_timeout_s if timeout_s is None else timeout_s,
                    max_output_bytes=limit,
                ),
            )
            if result.stdout_dropped:
                raise ArtifactTooLarge(path, limit)
            if result.exit_code != 0 or result.timed_out:
                detail = result.stderr.decode("utf-8", errors="replace").strip()
                raise AgentError(
                    "archive_failed",
                    f"could not archive {path!r}: {detail or f'tar exited {result.exit_code}'}",
                )
            entry_count = await trio.to_thread.run_sync(_tar_member_count, result.stdout)
            if max_entries is not None and entry_count > max_entries:
                raise ValueError(
                    f"{path!r} holds {entry_count} entries, more than max_entries={max_entries}"
                )
            archived = result.stdout
            if archive_format == "zip":
                archived = await trio.to_thread.run_sync(_zip_from_tar, archived)
                if len(archived) > limit:
                    raise ArtifactTooLarge(path, limit)
            payload.update(
                success=True,
                content=base64.b64encode(archived).decode("ascii"),
                bytes=len(archived),
                entry_count=entry_count,
            )
            return payload

        return await _artifact_payload(archive, payload, timeout_s)

    # -- workspace trees: checkpoints, forks, directory transfer ------------------------------

    async def checkpoint(self, slot: Slot) -> Checkpoint:
        """Store the slot's workspace as it is now; restore it later with `restore`.

        Running processes are not captured. The checkpoint lives in the slot's sandbox, is
        copied out before the pool stops that sandbox (idle, rotation), and counts against
        its pool's `max_checkpoints` and checkpoint bytes (`CheckpointLimitExceeded` past
        them) until `release_checkpoint` or the backend stops (docs/trees.md).
        """
        with collapse_exception_groups():
            return await self._held_runtime(slot).checkpoint(slot.lease)

    async def release_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Free a checkpoint's storage. Idempotent."""
        if self._runtime is not None:
            await self._runtime.release_checkpoint(checkpoint)

    async def restore(self, slot: Slot, checkpoint: Checkpoint) -> None:
        """Make the slot's workspace the checkpoint's again; its running processes are killed.

        Works for any slot of the checkpoint's profile (another sandbox's slot gets it from a
        provider snapshot on Modal, else streamed through the host). Raises `CheckpointLost`
        once the checkpoint was released, or when its sandbox crashed or its provider ended it
        before the pool copied it out (docs/trees.md).
        """
        with collapse_exception_groups():
            await self._held_runtime(slot).restore(slot.lease, checkpoint)

    async def fork(self, slot: Slot, n: int) -> list[Slot]:
        """`n` new held slots whose workspaces equal this slot's now; this one goes on unchanged.

        Forks land in the slot's own sandbox while it has free slots (a copy inside the
        sandbox, no provider call), else in other sandboxes of the profile. Release each like
        any slot. On failure or cancellation no new slot stays held.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be an int >= 0: {n!r}")
        with collapse_exception_groups():
            leases = await self._held_runtime(slot).fork(slot.lease, n)
        return [self._hold(lease) for lease in leases]

    async def upload(self, slot: Slot, source: UploadSource, dest: str = ".") -> None:
        """Put a directory tree into the slot at `dest` (relative to its workspace).

        `source`: a local directory, a tar as bytes, or a binary file-like object with a tar
        stream. Streamed in bounded chunks. Raises `TransferFailed`, `AgentError`.
        """
        with collapse_exception_groups():
            await self._held_runtime(slot).upload(slot.lease, source, dest)

    async def download(self, slot: Slot, path: str, dest: DownloadTarget) -> None:
        """Copy the slot's directory `path` out: into a local directory, or as a tar stream
        written to a binary file-like object. Streamed in bounded chunks."""
        with collapse_exception_groups():
            await self._held_runtime(slot).download(slot.lease, path, dest)

    def _held_runtime(self, slot: Slot) -> Runtime:
        runtime = self._runtime
        if runtime is None or self._held.get(slot.slot_id) is not slot:
            raise RuntimeStopped(
                f"slot {slot.slot_id} is not held by this backend (released, lost, or the backend "
                "stopped); acquire a new one"
            )
        return runtime

    # -- status ----------------------------------------------------------------------------

    def status(self) -> BackendStatus:
        """A frozen snapshot: the profiles, and per started pool its sandboxes, slots and counters.

        See `BackendStatus` for what each figure means. Sync: it only reads state.
        """
        runtime = self._runtime
        return BackendStatus(
            running=runtime is not None,
            profiles=self.profiles.names,
            default_profile=self.profiles.default_profile,
            slots_held_by_caller=len(self._held),
            pools=runtime.status().pools if runtime is not None else (),
        )


def _is_positive_number(value: object) -> bool:
    return (
        not isinstance(value, bool)
        and isinstance(value, int | float)
        and math.isfinite(value)
        and value > 0
    )


def _slot_id_of(request: object) -> str:
    if isinstance(request, tuple | list) and request and isinstance(request[0], Slot):
        return request[0].slot_id
    return ""


def _tool_of(request: object) -> str | None:
    if isinstance(request, tuple | list) and len(request) > 1 and isinstance(request[1], str):
        return request[1]
    return None


def _check_bound(name: str, value: object, *, minimum: int) -> None:
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int) or value < minimum
    ):
        raise ValueError(f"{name} must be an int >= {minimum} or None, got {value!r}")


async def _artifact_payload(
    work: Callable[[], Awaitable[dict[str, Any]]],
    payload: dict[str, Any],
    timeout_s: float | None,
) -> dict[str, Any]:
    """`work()`'s payload; a failure or a timeout is the payload with `error` set instead."""
    try:
        if timeout_s is not None and not _is_positive_number(timeout_s):
            raise ValueError(f"timeout_s must be a number > 0 or None, got {timeout_s!r}")
        with collapse_exception_groups(), trio.fail_after(timeout_s or math.inf):
            return await work()
    except trio.TooSlowError:
        error = f"timed out after {timeout_s:g} s"
    except (HermesError, ValueError) as exc:
        error = str(exc)
    return {**payload, "success": False, "error": error}


def _tar_member_count(archive: bytes) -> int:
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:*") as tar:
        return len(tar.getmembers())


def _zip_from_tar(archive: bytes) -> bytes:
    """The same entries as a zip: directories, files (with their modes) and symlinks."""
    out = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(archive), mode="r:") as tar,
        zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zipped,
    ):
        for member in tar:
            name = member.name + "/" if member.isdir() else member.name
            info = zipfile.ZipInfo(name, date_time=time.gmtime(max(member.mtime, 315532800))[:6])
            if member.isdir():
                info.external_attr = (stat.S_IFDIR | member.mode) << 16 | 0x10
                zipped.writestr(info, b"")
            elif member.issym():
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
                zipped.writestr(info, member.linkname)
            elif member.isfile():
                info.external_attr = (stat.S_IFREG | member.mode) << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                source = tar.extractfile(member)
                zipped.writestr(info, source.read() if source is not None else b"")
    return out.getvalue()
