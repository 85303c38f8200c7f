"""The runtime: every profile's pool under one supervisor, and the calls the facades make.

`Runtime.run` owns a `Supervisor` whose children are the `ProfilePool` actors, one per profile,
started at once for the default profile and every profile with `min_sandboxes` (so they are warm
when `run` reports started), and for the others when they are first used. A pool that
crashes is restarted by the supervisor with fresh state (its sandboxes went down with it); too
many crashes in a short period escalate out of `run`. Commands go straight to the sandbox actor
a lease names: handles are the addresses, so the pool is not on the hot path of `exec`.
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import trio

from hermes_actors._config import Profiles, SandboxConfig
from hermes_actors._errors import ConfigError, RuntimeStopped
from hermes_actors._output import OutputSink
from hermes_actors._status import BackendStatus, PoolStatus
from hermes_actors._trio import collapse_exception_groups
from hermes_actors._values import Operation
from hermes_actors.drivers._base import SandboxDriver
from hermes_actors.drivers._registry import DRIVERS, make_driver
from hermes_actors.runtime._pool import Lease, ProfilePool
from hermes_actors.runtime._publish import publish_status
from hermes_actors.runtime._supervisor import ChildSpec, Supervisor
from hermes_actors.runtime._trees import (
    Checkpoint,
    DownloadTarget,
    UploadSource,
    download,
    drop_checkpoint,
    fork_into,
    restore,
    take_checkpoint,
    upload,
)

__all__ = ["Checkpoint", "Lease", "Runtime", "RuntimeStatus"]

#: Pool crashes tolerated within `POOL_RESTART_PERIOD_S` before the runtime gives up.
POOL_MAX_RESTARTS = 3
POOL_RESTART_PERIOD_S = 60.0
#: How long a pool may take to terminate its sandboxes at shutdown.
POOL_SHUTDOWN_S = 30.0


@attrs.frozen(kw_only=True)
class RuntimeStatus:
    """A snapshot of every started pool."""

    pools: tuple[PoolStatus, ...]


class Runtime:
    """All pools of all profiles, under one supervisor; runs inside a trio nursery.

    `drivers` maps a backend name to the driver for it (tests pass fakes); missing backends get
    their real driver when first used.
    """

    def __init__(
        self,
        profiles: Profiles,
        *,
        drivers: Mapping[str, SandboxDriver] | None = None,
        run_id: str | None = None,
    ) -> None:
        self.profiles = profiles
        self.run_id = run_id or secrets.token_hex(6)
        self._drivers: dict[str, SandboxDriver] = dict(drivers or {})
        self._owned_drivers: list[SandboxDriver] = []
        self._supervisor: Supervisor | None = None
        self._pool_lock = trio.Lock()
        self._stopped = False

    # -- lifecycle ------------------------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[Runtime] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Start the supervisor and the pools to warm, report started, run until cancelled.

        The pools started at once are the default profile's and every profile's with
        `min_sandboxes` (their sandboxes start warming then).

        On cancellation the pools stop in reverse start order and every sandbox is terminated
        (bounded). Raises `SupervisorEscalation` if pools keep crashing.
        """
        supervisor = Supervisor(
            "hermes-actors", max_restarts=POOL_MAX_RESTARTS, period_s=POOL_RESTART_PERIOD_S
        )
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(supervisor.run)
                self._supervisor = supervisor
                await nursery.start(self._publish_status)
                try:
                    for name in self.profiles.names:
                        config = self.profiles.profiles[name]
                        if name == self.profiles.default_profile or config.min_sandboxes > 0:
                            await self._pool(name)
                except RuntimeStopped:
                    # The supervisor stopped under us because we are being cancelled: let the
                    # cancellation, not its side effect, be what the caller sees.
                    await trio.lowlevel.checkpoint_if_cancelled()
                    raise
                task_status.started(self)
                await trio.sleep_forever()
        finally:
            self._stopped = True
            self._supervisor = None
            with trio.move_on_after(5, shield=True):
                for driver in self._owned_drivers:
                    await driver.aclose()

    async def _publish_status(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Answer `hermes-actors status` from other processes while this runtime runs."""
        await publish_status(
            lambda: self.published_status().as_dict(),
            run_id=self.run_id,
            profiles=self.profiles.names,
            task_status=task_status,
        )

    def _driver(self, config: SandboxConfig) -> SandboxDriver:
        backend = config.backend
        if backend not in self._drivers:
            if backend not in DRIVERS:  # pragma: no cover - the config rejects other backends
                raise ConfigError(f"unknown backend {backend!r}")
            same_backend = [p for p in self.profiles.profiles.values() if p.backend == backend]
            driver = make_driver(backend, same_backend or [config], self.run_id)
            self._drivers[backend] = driver
            self._owned_drivers.append(driver)
        return self._drivers[backend]

    async def _run_pool(
        self, config: SandboxConfig, *, task_status: trio.TaskStatus[ProfilePool]
    ) -> None:
        pool = ProfilePool(config, self._driver(config))
        await pool.run(task_status=task_status)

    async def _pool(self, profile: str | None) -> ProfilePool:
        name = profile or self.profiles.default_profile
        config = self.profiles.profiles.get(name)
        if config is None:
            known = ", ".join(sorted(self.profiles.profiles))
            raise ConfigError(f"unknown profile {name!r}; known profiles: {known}")
        supervisor = self._supervisor
        if supervisor is None:
            raise RuntimeStopped("the runtime is not running: start it first")
        async with self._pool_lock:
            if not any(c.name == name and c.alive for c in supervisor.which_children()):
                await supervisor.start_child(
                    ChildSpec(
                        name=name,
                        start=functools.partial(self._run_pool, config),
                        shutdown_s=POOL_SHUTDOWN_S,
                    )
                )
            pool: ProfilePool = supervisor.child_handle(name)
            return pool

    # -- what the facades call ------------------------------------------------------------------

    async def start_pool(self, profile: str) -> None:
        """Start `profile`'s pool now (it pre-warms its `min_sandboxes`) if it is not running."""
        await self._pool(profile)

    async def acquire(
        self,
        profile: str | None = None,
        trajectory_id: str | None = None,
        *,
        timeout_s: float | None = None,
        image: str | None = None,
    ) -> Lease:
        """Hold a slot of `profile` (default profile when None) until `release`.

        With `image`, the slot's sandbox runs that image instead of the profile's (the pool
        keeps sandboxes per image, all within the profile's `max_sandboxes`).

        Raises `ConfigError` for an unknown profile, `AcquireTimeout`, the start error when the
        profile's sandboxes cannot start, and `RuntimeStopped` when the runtime is not running.
        """
        pool = await self._pool(profile)
        return await pool.acquire(trajectory_id, timeout_s=timeout_s, image=image)

    async def release(self, lease: Lease, *, reset: bool = True) -> None:
        """Give a slot back (reset first unless `reset=False`). Idempotent."""
        if self._supervisor is None:
            return
        pool = await self._pool(lease.profile)
        await pool.release(lease, reset=reset)

    async def call(
        self,
        lease: Lease,
        operation: Operation,
        *,
        on_submitted: Callable[[], None] | None = None,
        on_output: OutputSink | None = None,
    ) -> Any:
        """Do `operation` in the leased slot and return its result value.

        Goes straight to the lease's sandbox actor (see `SandboxActor.call`): a slot's calls run
        in the order they are submitted, and `on_submitted` says when this one is; `on_output`
        gets a command's output while it runs.
        """
        return await lease.sandbox.call(
            lease.index, operation, on_submitted=on_submitted, on_output=on_output
        )

    # -- workspace trees: checkpoints, forks, directory transfer (see runtime._trees) -----------

    async def checkpoint(self, lease: Lease) -> Checkpoint:
        """Store the slot's workspace as a checkpoint of its pool (bounded; see `_trees`)."""
        pool = await self._pool(lease.profile)
        checkpoint = await take_checkpoint(pool.checkpoints, lease)
        pool.checkpoints_changed()
        return checkpoint

    async def release_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Free a checkpoint's storage. Idempotent."""
        if self._supervisor is None:
            return
        pool = await self._pool(checkpoint.profile)
        await drop_checkpoint(pool.checkpoints, checkpoint)
        pool.checkpoints_changed()

    async def restore(self, lease: Lease, checkpoint: Checkpoint) -> None:
        """Make the slot's workspace the checkpoint's; the slot's processes are killed first."""
        pool = await self._pool(checkpoint.profile)
        await restore(pool.checkpoints, lease, checkpoint)

    async def fork(
        self, lease: Lease, count: int, *, timeout_s: float | None = None
    ) -> list[Lease]:
        """`count` new slots holding copies of the slot's workspace; the source is unchanged.

        The new slots come from the source's sandbox while it has free ones (an in-sandbox
        copy), else from other sandboxes of the pool (a stream through the host). Raises what
        `acquire` raises; on any failure or cancellation no new slot stays held.
        """
        if count < 0:
            raise ValueError(f"fork count must be >= 0, got {count}")
        pool = await self._pool(lease.profile)
        leases: list[Lease] = []

        async def acquire_one() -> None:
            leases.append(
                await pool.acquire(
                    lease.trajectory_id, timeout_s=timeout_s, near=lease.sandbox, image=lease.image
                )
            )

        done = False
        try:
            with collapse_exception_groups():
                async with trio.open_nursery() as nursery:
                    for _ in range(count):
                        nursery.start_soon(acquire_one)
                with collapse_exception_groups():
                    await fork_into(lease, list(leases))
            done = True
            return leases
        finally:
            if not done:
                with trio.move_on_after(POOL_SHUTDOWN_S, shield=True):
                    for held in leases:
                        await pool.release(held, reset=True)

    async def upload(self, lease: Lease, source: UploadSource, dest: str = ".") -> None:
        """Put a directory tree into the slot (see `runtime._trees.upload`)."""
        await upload(lease, source, dest)

    async def download(self, lease: Lease, path: str, dest: DownloadTarget) -> None:
        """Copy a directory tree out of the slot (see `runtime._trees.download`)."""
        await download(lease, path, dest)

    async def reap_orphans(self) -> int:
        """Terminate what other (crashed) runs left in this runtime's backends; how many.

        Each backend's driver entry says how (Modal: by tag, sparing this run's sandboxes);
        local sandboxes never outlive their run, so there is nothing to reap locally.
        """
        reaped = 0
        for backend, entry in DRIVERS.items():
            profiles = [p for p in self.profiles.profiles.values() if p.backend == backend]
            if entry.reap is not None and profiles:
                reaped += await entry.reap(self._driver(profiles[0]), profiles)
        return reaped

    def published_status(self) -> BackendStatus:
        """The status `hermes-actors status` shows from another process (sync: reads state).

        The runtime does not know which caller holds what, so `slots_held_by_caller` counts
        every slot held in its pools.
        """
        pools = self.status().pools
        return BackendStatus(
            running=not self._stopped,
            profiles=self.profiles.names,
            default_profile=self.profiles.default_profile,
            slots_held_by_caller=sum(pool.slots_held for pool in pools),
            pools=pools,
        )

    def status(self) -> RuntimeStatus:
        """A snapshot of every started pool (sync: it only reads state)."""
        supervisor = self._supervisor
        if supervisor is None:
            return RuntimeStatus(pools=())
        pools = []
        for child in supervisor.which_children():
            if child.alive:
                pool: ProfilePool = supervisor.child_handle(child.name)
                pools.append(pool.statistics())
        return RuntimeStatus(pools=tuple(pools))
