"""The runtime: every profile's pool under one supervisor, and the calls the facades make.

`Runtime.run` owns a `Supervisor` whose children are the `ProfilePool` actors, one per profile,
started when the profile is first used (the default profile at once, so it pre-warms). A pool that
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

from hermes_actors._client import ExecResult
from hermes_actors._config import Profiles, SandboxConfig
from hermes_actors._errors import ConfigError, RuntimeStopped
from hermes_actors.drivers._base import SandboxDriver, SandboxSpec
from hermes_actors.runtime._pool import Lease, PoolSettings, PoolStatus, ProfilePool, SandboxStatus
from hermes_actors.runtime._supervisor import ChildSpec, Restart, Supervisor
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
from hermes_actors.runtime._trio_util import collapse_exception_groups

__all__ = ["Checkpoint", "Lease", "PoolStatus", "Runtime", "RuntimeStatus", "SandboxStatus"]

#: Pool crashes tolerated within `POOL_RESTART_PERIOD_S` before the runtime gives up.
POOL_MAX_RESTARTS = 3
POOL_RESTART_PERIOD_S = 60.0
#: How long a pool may take to terminate its sandboxes at shutdown.
POOL_SHUTDOWN_S = 30.0


@attrs.frozen(kw_only=True)
class RuntimeStatus:
    """A snapshot of every started pool."""

    pools: tuple[PoolStatus, ...]


def sandbox_spec(config: SandboxConfig) -> SandboxSpec:
    """What a driver needs to start a sandbox of this profile."""
    return SandboxSpec(
        profile=config.name,
        image=config.image,
        cpu=config.cpu,
        memory_mib=config.memory,
        gpu=config.gpu,
        env=dict(config.env_vars),
        secrets=tuple(config.secrets),
        network=config.network,
        max_lifetime_s=config.max_lifetime,
        idle_timeout_s=config.idle_timeout,
        workspace_base=config.workspace_base,
        isolation=config.isolation,
        slots=config.slots_per_sandbox,
        tags=dict(config.tags),
        app_name=config.app_name,
    )


def pool_settings(config: SandboxConfig) -> PoolSettings:
    return PoolSettings(
        backend=config.backend,
        spec=sandbox_spec(config),
        min_sandboxes=config.min_sandboxes,
        max_sandboxes=config.max_sandboxes,
        acquire_timeout_s=config.acquire_timeout_s,
        max_starting=config.max_starting,
        max_output_bytes=config.max_output_bytes,
        max_checkpoints=config.max_checkpoints,
        max_checkpoint_bytes=config.max_checkpoint_bytes,
    )


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
        """Start the supervisor and the default profile's pool, report started, run until cancelled.

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
                try:
                    await self._pool(self.profiles.default_profile)
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

    def _driver(self, config: SandboxConfig) -> SandboxDriver:
        backend = config.backend
        if backend not in self._drivers:
            driver: SandboxDriver
            if backend == "local":
                from hermes_actors.drivers._local import LocalDriver

                driver = LocalDriver()
            elif backend == "modal":
                from hermes_actors.drivers._modal import ModalDriver

                # Modal's limits are per account, so one driver throttles every modal profile:
                # at the strictest profile's rate, with each profile's starting cap added up
                # (each pool also enforces its own).
                modal_profiles = [
                    profile
                    for profile in self.profiles.profiles.values()
                    if profile.backend == "modal"
                ] or [config]
                driver = ModalDriver(
                    run_id=self.run_id,
                    creates_per_second=min(p.creates_per_second for p in modal_profiles),
                    max_starting=sum(p.max_starting for p in modal_profiles),
                    reap_on_start=any(p.reap_orphans for p in modal_profiles),
                    reap_min_age_s=max(p.reap_min_age_s for p in modal_profiles),
                )
            else:  # pragma: no cover - the config rejects other backends
                raise ConfigError(f"unknown backend {backend!r}")
            self._drivers[backend] = driver
            self._owned_drivers.append(driver)
        return self._drivers[backend]

    async def _run_pool(
        self, config: SandboxConfig, *, task_status: trio.TaskStatus[ProfilePool]
    ) -> None:
        pool = ProfilePool(pool_settings(config), self._driver(config))
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
                        restart=Restart.PERMANENT,
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
    ) -> Lease:
        """Hold a slot of `profile` (default profile when None) until `release`.

        Raises `ConfigError` for an unknown profile, `AcquireTimeout`, the start error when the
        profile's sandboxes cannot start, and `RuntimeStopped` when the runtime is not running.
        """
        pool = await self._pool(profile)
        return await pool.acquire(trajectory_id, timeout_s=timeout_s)

    async def release(self, lease: Lease, *, reset: bool = True) -> None:
        """Give a slot back (reset first unless `reset=False`). Idempotent."""
        if self._supervisor is None:
            return
        pool = await self._pool(lease.profile)
        await pool.release(lease, reset=reset)

    async def exec(self, lease: Lease, **options: Any) -> ExecResult:
        """Run a command in the leased slot; see `SandboxActor.exec` for the options.

        A slot's requests run in the order they are submitted: `on_submitted` (for `exec`,
        `read_file`, `write_file`) says when this one is, so the next can be sent at once.
        """
        return await lease.sandbox.exec(lease.index, **options)

    async def read_file(
        self,
        lease: Lease,
        path: str,
        *,
        max_bytes: int | None = None,
        on_submitted: Callable[[], None] | None = None,
    ) -> bytes:
        args: dict[str, Any] = {"path": path}
        if max_bytes is not None:
            args["max_bytes"] = max_bytes
        result = await lease.sandbox.file_op(
            lease.index, "read_file", args, on_submitted=on_submitted
        )
        data: bytes = result["data"]
        return data

    async def write_file(
        self,
        lease: Lease,
        path: str,
        data: bytes,
        *,
        on_submitted: Callable[[], None] | None = None,
    ) -> int:
        result = await lease.sandbox.file_op(
            lease.index, "write_file", {"path": path, "data": data}, on_submitted=on_submitted
        )
        return int(result["size"])

    async def list_files(
        self, lease: Lease, path: str = ".", *, recursive: bool = False
    ) -> list[dict[str, Any]]:
        result = await lease.sandbox.file_op(
            lease.index, "list_files", {"path": path, "recursive": recursive}
        )
        entries: list[dict[str, Any]] = result["entries"]
        return entries

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
                await pool.acquire(lease.trajectory_id, timeout_s=timeout_s, near=lease.sandbox)
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
        """Terminate sandboxes that other (crashed) runs left in the modal profiles' apps.

        Found by tag; this run's sandboxes are spared. Local sandboxes never outlive their run
        (bubblewrap dies with its parent, the agent with its stream), so there is nothing to
        reap locally. Returns how many were terminated.
        """
        from hermes_actors.drivers._modal import ModalDriver

        modal_profiles = [p for p in self.profiles.profiles.values() if p.backend == "modal"]
        if not modal_profiles:
            return 0
        driver = self._driver(modal_profiles[0])
        if not isinstance(driver, ModalDriver):  # a test's stand-in
            return 0
        reaped = 0
        for app_name in sorted({p.app_name for p in modal_profiles}):
            reaped += len(await driver.reap(app_name))
        return reaped

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
