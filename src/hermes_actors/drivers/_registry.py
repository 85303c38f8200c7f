"""Drivers by registry: a backend name (a profile's `backend`) to how its driver is made.

A runtime makes one driver per backend it uses, from the profiles of that backend, and closes
it when it stops. A row also says how that backend reaps what crashed runs left behind (only
Modal's sandboxes can outlive their run: local ones die with their host). Adding a backend is
one row here, plus its name in the config's `Backend`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence

import attrs

from hermes_actors._config import SandboxConfig
from hermes_actors.drivers._base import SandboxDriver

__all__ = ["DRIVERS", "DriverEntry", "make_driver"]


@attrs.frozen(kw_only=True)
class DriverEntry:
    """How to make one backend's driver, and how to reap its orphans (if it can have any)."""

    #: `make(profiles, run_id)`: the driver serving every profile of this backend.
    make: Callable[[Sequence[SandboxConfig], str], SandboxDriver]
    #: `reap(driver, profiles)`: terminate what other (crashed) runs left; returns how many.
    reap: Callable[[SandboxDriver, Sequence[SandboxConfig]], Awaitable[int]] | None = None


def _make_local(profiles: Sequence[SandboxConfig], run_id: str) -> SandboxDriver:
    from hermes_actors.drivers._local import LocalDriver

    return LocalDriver()


def _make_modal(profiles: Sequence[SandboxConfig], run_id: str) -> SandboxDriver:
    from hermes_actors.drivers._modal import ModalDriver

    # Modal's limits are per account, so one driver throttles every modal profile: at the
    # strictest profile's rate, with each profile's starting cap added up (each pool also
    # enforces its own).
    return ModalDriver(
        run_id=run_id,
        creates_per_second=min(p.creates_per_second for p in profiles),
        max_starting=sum(p.max_starting for p in profiles),
        reap_on_start=any(p.reap_orphans for p in profiles),
        reap_min_age_s=max(p.reap_min_age_s for p in profiles),
    )


async def _reap_modal(driver: SandboxDriver, profiles: Sequence[SandboxConfig]) -> int:
    from hermes_actors.drivers._modal import ModalDriver

    if not isinstance(driver, ModalDriver):  # a test's stand-in driver has nothing to reap
        return 0
    reaped = 0
    for app_name in sorted({p.app_name for p in profiles}):
        reaped += len(await driver.reap(app_name))
    return reaped


#: Backend name to its driver entry.
DRIVERS: Mapping[str, DriverEntry] = {
    "local": DriverEntry(make=_make_local),
    "modal": DriverEntry(make=_make_modal, reap=_reap_modal),
}


def make_driver(backend: str, profiles: Sequence[SandboxConfig], run_id: str) -> SandboxDriver:
    """The driver for `backend`, serving `profiles` (those of that backend)."""
    return DRIVERS[backend].make(profiles, run_id)
