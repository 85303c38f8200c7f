"""ToolBackend (alias ModalToolBackend): the trainer-facing facade, usable from any caller.

The work is done by a `BackendCore` (`facades._core`), a trio-native async context manager.
`ToolBackend` puts it where the caller can reach it; there are two places, and each call goes
to the one the core is in:

* trio, structured: `async with backend:` enters the core in the caller's task (a nursery of
  that trio run); calls made from that run go straight to the core.
* anything else (asyncio programs, trio code that did not use `async with`, sync code through
  `call_blocking`): a `PortalHost` enters the core on a portal thread with its own trio loop,
  on the first call (`start()` or lazily `acquire`/`execute_batch`); the same awaits work, and
  the caller's cancellation cancels the work in the portal.

Either way the core stops one way, its `aclose()` (which its `async with` exit calls): `stop()`,
`stop_sync()`, leaving `async with`, SIGTERM/SIGHUP (`facades._signals`) and interpreter exit
all end there.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, ClassVar, Concatenate, ParamSpec, Self, TypeVar

import sniffio
import trio

from hermes_actors._config import (
    Backend,
    Profiles,
    SandboxConfig,
    load_profiles,
    profiles_from_mapping,
)
from hermes_actors._errors import RuntimeStopped
from hermes_actors._status import BackendStatus, PoolStatus
from hermes_actors._trio import PortalHost
from hermes_actors.drivers._base import SandboxDriver
from hermes_actors.facades._core import ArtifactTooLarge, BackendCore, Slot, SlotState
from hermes_actors.facades._signals import (
    SIGNAL_PORTAL_STOP_S,
    install_signal_handlers,
    register_host,
)
from hermes_actors.facades._tools import ExecutionResult, ToolResult
from hermes_actors.runtime._runtime import Checkpoint
from hermes_actors.runtime._trees import DownloadTarget, UploadSource

__all__ = [
    "ArtifactTooLarge",
    "ExecutionResult",
    "ModalToolBackend",
    "Slot",
    "SlotState",
    "ToolBackend",
    "ToolResult",
]

logger = logging.getLogger("hermes_actors.backend")

T = TypeVar("T")
_P = ParamSpec("_P")


def _hosted(
    method: Callable[Concatenate[BackendCore, _P], Awaitable[T]],
) -> Callable[Concatenate[ToolBackend, _P], Awaitable[T]]:
    """The `ToolBackend` method that runs the core's `method` where the core is (`_call`): the
    same arguments, result and semantics (its docstring is the core's)."""

    async def hosted(self: ToolBackend, /, *args: _P.args, **kwargs: _P.kwargs) -> T:
        return await self._call(functools.partial(method, self._core, *args, **kwargs))

    functools.update_wrapper(hosted, method)  # name, docstring, and signature for help()
    hosted.__qualname__ = f"ToolBackend.{method.__name__}"
    return hosted


class ToolBackend:
    """Pools of sandboxes for many trajectories, behind a small tool-calling API.

    Every `async` method may be awaited from trio or asyncio (see the module docstring for
    where the work runs); sync code uses `call_blocking`. Cancelling the caller cancels the
    work (a command is killed, an acquire that was cancelled holds no slot). The methods'
    semantics are `BackendCore`'s.
    """

    #: The backend of profiles that name none, when `$TERMINAL_ENV` is unset.
    default_backend: ClassVar[Backend] = "local"

    def __init__(
        self,
        config: SandboxConfig | Profiles | None = None,
        *,
        drivers: Mapping[str, SandboxDriver] | None = None,
        run_id: str | None = None,
        default_timeout_s: float | None = None,
    ) -> None:
        if config is None:
            profiles = load_profiles(default_backend=self.default_backend)
        elif isinstance(config, Profiles):
            profiles = config
        else:
            profiles = profiles_from_mapping({config.name: config}, default_profile=config.name)
        self.profiles: Profiles = profiles
        # One profile given as a config: `get_status()` answers for that pool alone, as the
        # original's single-config backend did.
        self._single_profile = not isinstance(config, Profiles)
        self._core = BackendCore(
            profiles, drivers=drivers, run_id=run_id, default_timeout_s=default_timeout_s
        )
        # The portal host while the core runs (or may run) on a portal thread.
        self._host: PortalHost[BackendCore] | None = None
        self._host_lock = threading.Lock()

    @classmethod
    def with_profiles(
        cls,
        app_name: str | None = None,
        profiles: Profiles | Mapping[str, SandboxConfig | Mapping[str, Any]] | None = None,
        default_profile: str | None = None,
        profiles_file: str | os.PathLike[str] | None = None,
        *,
        drivers: Mapping[str, SandboxDriver] | None = None,
        run_id: str | None = None,
    ) -> Self:
        """A backend serving several profiles (`acquire(profile=...)` picks one).

        `profiles` is a `Profiles`, a mapping of names to configs (or plain mappings, read as
        strictly as YAML), or None to use `load_profiles(profiles_file)`. `app_name` gives every
        profile the app `f"{app_name}-{profile}"`. The first four arguments may be given by
        position, as the original's callers do. Raises `ConfigError` for bad profiles.
        """
        if profiles is None:
            resolved = load_profiles(
                profiles_file, default_profile=default_profile, default_backend=cls.default_backend
            )
        elif isinstance(profiles, Profiles):
            resolved = profiles
            if default_profile is not None:
                resolved = Profiles(
                    profiles=profiles.profiles,
                    default_profile=default_profile,
                    source=profiles.source,
                )
        else:
            resolved = profiles_from_mapping(
                profiles, default_profile=default_profile, default_backend=cls.default_backend
            )
        if app_name is not None:
            resolved = resolved.with_app_name(app_name)
        return cls(resolved, drivers=drivers, run_id=run_id)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<ToolBackend {state} profiles={list(self.profiles.names)}>"

    @property
    def default_timeout_s(self) -> float:
        """Seconds a `bash` call may run when neither the call nor the batch says.

        Defaults to the default profile's `execution_timeout_s`; settable.
        """
        return self._core.default_timeout_s

    @default_timeout_s.setter
    def default_timeout_s(self, value: float) -> None:
        self._core.default_timeout_s = value

    @property
    def running(self) -> bool:
        """True while the runtime runs (started explicitly or lazily)."""
        return self._core.running

    # -- where calls run -------------------------------------------------------------------

    async def _call(
        self,
        method: Callable[..., Awaitable[T]],
        /,
        *args: Any,
        give_back: Callable[[T], Awaitable[object]] | None = None,
        **kwargs: Any,
    ) -> T:
        """`await method(*args, **kwargs)` (a method of the core) where the core is."""
        if self._core.in_home_run():
            return await method(*args, **kwargs)
        if kwargs:
            method = functools.partial(method, **kwargs)
        return await self._portal_host().call(method, *args, on_abandoned=give_back)

    def _portal_host(self) -> PortalHost[BackendCore]:
        """The host of the core, started now if there is none (the core is entered on use)."""
        with self._host_lock:
            host = self._host
            if host is not None and host.running:
                return host
            if self._core.entered:
                raise RuntimeError(
                    "this ToolBackend runs inside a trio run (`async with backend:`); call it "
                    "from that run"
                )
            host = PortalHost(self._core, name=f"hermes-actors-portal-{id(self):x}")
            host.start()
            register_host(self)
            install_signal_handlers()
            self._host = host
            return host

    def call_blocking(self, method: Callable[..., Awaitable[T]], /, *args: Any, **kwargs: Any) -> T:
        """Run one of this backend's async methods from sync code and wait for its result.

        `backend.call_blocking(backend.acquire, "traj-1")`. The runtime runs on the portal
        thread (started on first use). Ctrl-C while waiting cancels the call (the command is
        killed, an acquired slot is given back) before `KeyboardInterrupt` propagates.

        In a trio program that entered the backend with `async with`, its worker threads
        (`trio.to_thread.run_sync`) may call this too: the call runs in that trio run.
        """

        async def run() -> T:
            return await method(*args, **kwargs)

        token = self._core.token
        if token is not None and self._host is None:
            try:
                return trio.from_thread.run(run, trio_token=token)
            except trio.RunFinishedError:
                raise RuntimeStopped(
                    "the trio run that entered this backend (`async with`) has ended; start "
                    "the backend again"
                ) from None
        # `method` routes itself once in the portal (the core is entered there on first use,
        # after the method's own checks: an unknown profile starts nothing).
        portal = self._portal_host().portal
        return portal.call_blocking(run, on_abandoned=self._core.give_back)

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        """From trio: enter the core in this task. Otherwise: `start()` it on a portal thread."""
        if not _in_trio():
            await self.start()
            return self
        with self._host_lock:
            if self._host is not None and self._host.running:
                raise RuntimeError(
                    "this ToolBackend is already running (on its portal thread); stop() it "
                    "before `async with`"
                )
            self._host = None
        await self._core.__aenter__()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._core.in_home_run():
            await self._core.__aexit__(*exc_info)
        else:
            await self.stop()

    async def start(self, profiles_to_start: Sequence[str] | None = None) -> None:
        """Start the pools (pre-warming `min_sandboxes` of each profile). Idempotent.

        Returns once the runtime runs; `profiles_to_start` start (and warm) now as well. See
        `BackendCore.start` for the errors and the warm-up display on a terminal. Cancellation
        stops what was started.
        """
        for name in profiles_to_start or ():
            self.profiles.get_profile(name)
        await self._call(self._core.start, profiles_to_start)

    async def stop(self, purge: bool = False) -> None:
        """Terminate every sandbox and stop the runtime (and the portal thread). Idempotent.

        Slots still held are gone afterwards. Every sandbox this backend started is terminated
        either way; `purge` also terminates what other (crashed) runs left in the modal profiles'
        apps (local sandboxes never outlive their run). A later call starts the backend again.
        """
        host = self._take_host()
        if host is None:
            if self._core.entered:
                await self._call(self._core.aclose, purge=purge)
            return
        if purge and host.is_open:
            with contextlib.suppress(RuntimeStopped):
                await host.portal.call(functools.partial(self._core.aclose, purge=True))
        await host.aclose()

    def stop_sync(self, purge: bool = False) -> None:
        """`stop()` for sync code: blocks until every sandbox is terminated."""
        host = self._take_host()
        if host is None:
            return
        if purge and host.is_open:
            with contextlib.suppress(RuntimeStopped):
                host.portal.call_blocking(functools.partial(self._core.aclose, purge=True))
        host.close()

    def stop_on_signal(self, limit_s: float) -> None:
        """A stop signal arrived: terminate every sandbox, blocking at most `limit_s` (then at
        most `SIGNAL_PORTAL_STOP_S` for the portal thread to stop)."""
        host = self._take_host()
        if host is not None:
            host.close(limit_s, stop_wait_s=SIGNAL_PORTAL_STOP_S)

    def _take_host(self) -> PortalHost[BackendCore] | None:
        with self._host_lock:
            host, self._host = self._host, None
            return host

    # -- slots -----------------------------------------------------------------------------

    async def acquire(
        self, trajectory_id: str | None = None, profile: str | None = None, image: str | None = None
    ) -> Slot:
        """Wait for a free slot of `profile` (default profile when None) and hold it.

        Starts the backend if needed. See `BackendCore.acquire` for `image`, the errors, and
        cancellation (which leaves no slot held).
        """
        self.profiles.get_profile(profile)  # unknown profile: fail before starting anything
        return await self._call(
            self._core.acquire, trajectory_id, profile, image, give_back=self._core.give_back
        )

    release = _hosted(BackendCore.release)

    # -- tools -----------------------------------------------------------------------------

    execute_batch = _hosted(BackendCore.execute_batch)

    # -- artifacts (payloads in the original Hermes executor's shape) ------------------------

    read_artifact = _hosted(BackendCore.read_artifact)
    list_artifacts = _hosted(BackendCore.list_artifacts)
    archive_artifacts = _hosted(BackendCore.archive_artifacts)

    # -- workspace trees: checkpoints, forks, directory transfer ------------------------------

    async def checkpoint(self, slot: Slot) -> Checkpoint:
        """Store the slot's workspace as it is now; see `BackendCore.checkpoint`."""
        return await self._call(self._core.checkpoint, slot)

    async def release_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Free a checkpoint's storage. Idempotent."""
        await self._call(self._core.release_checkpoint, checkpoint)

    async def restore(self, slot: Slot, checkpoint: Checkpoint) -> None:
        """Make the slot's workspace the checkpoint's again; see `BackendCore.restore`."""
        await self._call(self._core.restore, slot, checkpoint)

    async def fork(self, slot: Slot, n: int) -> list[Slot]:
        """`n` new held slots whose workspaces equal this slot's now; see `BackendCore.fork`."""
        return await self._call(self._core.fork, slot, n, give_back=self._core.give_back)

    async def upload(self, slot: Slot, source: UploadSource, dest: str = ".") -> None:
        """Put a directory tree into the slot at `dest`; see `BackendCore.upload`."""
        await self._call(self._core.upload, slot, source, dest)

    async def download(self, slot: Slot, path: str, dest: DownloadTarget) -> None:
        """Copy the slot's directory `path` out; see `BackendCore.download`."""
        await self._call(self._core.download, slot, path, dest)

    # -- status ----------------------------------------------------------------------------

    def status(self) -> BackendStatus:
        """A frozen snapshot: the profiles, and per started pool its sandboxes, slots and counters.

        See `BackendStatus` for what each figure means. Never blocks for long.
        """
        host = self._host
        if host is not None and host.portal.running:
            with contextlib.suppress(RuntimeStopped):
                return host.portal.call_sync(self._core.status)
        return self._core.status()

    def get_status(self) -> dict[str, Any]:
        """The status in the original Hermes backend's shape.

        Per pool: `{sandboxes, healthy_sandboxes, max_sandboxes, total_slots, available_slots,
        slots_per_sandbox}`. A backend made from one config answers with its pool's dict; one
        made by `with_profiles` with `{profiles, active_pools, default_profile, pools: {name:
        pool}}`. `status()` says more.
        """
        started = {pool.profile: pool for pool in self.status().pools}
        pools = {
            name: _original_pool_status(self.profiles.get_profile(name), pool)
            for name, pool in started.items()
        }
        if self._single_profile:
            name = self.profiles.default_profile
            return pools.get(name) or _original_pool_status(self.profiles.get_profile(name), None)
        return {
            "profiles": list(self.profiles.names),
            "active_pools": list(pools),
            "default_profile": self.profiles.default_profile,
            "pools": pools,
        }

    def list_profiles(self) -> dict[str, dict[str, Any]]:
        """Each profile's `{image, gpu, cpu, memory, slots_per_sandbox, max_sandboxes, active}`
        (the original's listing); `active` is whether its pool runs."""
        active = {pool.profile for pool in self.status().pools}
        return {
            name: {
                "image": config.image,
                "gpu": config.gpu,
                "cpu": config.cpu,
                "memory": config.memory,
                "slots_per_sandbox": config.slots_per_sandbox,
                "max_sandboxes": config.max_sandboxes,
                "active": name in active,
            }
            for name, config in self.profiles.profiles.items()
        }


class ModalToolBackend(ToolBackend):
    """The seed's name: a `ToolBackend` whose profiles run on Modal unless they say otherwise.

    Profiles that name no backend run on `$TERMINAL_ENV` when set, else `modal` (the original
    ran on Modal only); the pick is logged once with its reason.
    """

    default_backend: ClassVar[Backend] = "modal"


#: Sandbox states whose slots serve trajectories.
_HEALTHY_STATES = frozenset({"ready", "draining"})


def _original_pool_status(config: SandboxConfig, pool: PoolStatus | None) -> dict[str, Any]:
    sandboxes = () if pool is None else pool.sandboxes
    healthy = [sandbox for sandbox in sandboxes if sandbox.state in _HEALTHY_STATES]
    return {
        "sandboxes": len(sandboxes),
        "healthy_sandboxes": len(healthy),
        "max_sandboxes": config.max_sandboxes,
        "total_slots": sum(s.slots_free + s.slots_held for s in healthy),
        "available_slots": sum(s.slots_free for s in healthy),
        "slots_per_sandbox": config.slots_per_sandbox,
    }


def _in_trio() -> bool:
    try:
        return sniffio.current_async_library() == "trio"
    except sniffio.AsyncLibraryNotFoundError:
        return False
