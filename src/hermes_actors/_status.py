"""Status snapshots: frozen values with one documented field per figure (as trio's statistics).

`ToolBackend.status()` returns a `BackendStatus`; each started pool is a `PoolStatus` (also what
`ProfilePool.statistics()` returns), each of its sandboxes a `SandboxStatus`. They hold numbers
and names only, never configuration values such as environment variables. Renderers (the CLI,
`format_status`) take these values; `as_dict()` gives plain data for JSON.
"""

from __future__ import annotations

from typing import Any

import attrs

__all__ = ["BackendStatus", "PoolStatus", "SandboxStatus"]


@attrs.frozen(kw_only=True)
class SandboxStatus:
    """One sandbox of a pool."""

    #: The driver's id of the sandbox (`local-...`, Modal's `sb-...`).
    sandbox_id: str
    #: The image it runs (the profile's, or one an `acquire` named).
    image: str
    #: `starting`, `ready`, `draining` (rotating out: takes no new slot) or `stopping`.
    state: str
    #: Slots ready to be handed out.
    slots_free: int
    #: Slots held by callers.
    slots_held: int
    #: Seconds since the sandbox became ready (0 while starting).
    age_s: float
    #: Commands this sandbox has finished.
    commands_run: int
    #: Which of the profile's limits it enforces, and how (local sandboxes: rlimits or a
    #: cgroup, see docs/isolation.md); empty when its driver does not say.
    limits: str = ""


@attrs.frozen(kw_only=True)
class PoolStatus:
    """One profile's pool."""

    #: The profile's name.
    profile: str
    #: The backend its sandboxes run on (`local`, `modal`).
    backend: str
    #: Its sandboxes, starting ones included.
    sandboxes: tuple[SandboxStatus, ...]
    #: Slots ready to be handed out, over all its sandboxes.
    slots_free: int
    #: Slots held by callers, over all its sandboxes.
    slots_held: int
    #: Callers waiting in `acquire`.
    waiters: int
    #: Sandboxes being started.
    starting: int
    #: Commands finished since the pool started.
    commands_run: int
    #: Commands that exited non-zero, timed out or were lost.
    command_failures: int
    #: Infrastructure failures: start failures, and slots lost with their sandbox.
    infra_failures: int
    #: Sandboxes started (ready) since the pool started.
    sandboxes_started: int
    #: Sandboxes stopped on purpose (idle, rotated, shut down).
    sandboxes_stopped: int
    #: Sandboxes that died on their own (and were replaced).
    sandboxes_lost: int


@attrs.frozen(kw_only=True)
class BackendStatus:
    """A `ToolBackend`: its profiles and every started pool."""

    #: True while the runtime runs.
    running: bool
    #: The profile names, in definition order.
    profiles: tuple[str, ...]
    #: The profile used when a call names none.
    default_profile: str
    #: Slots this backend's callers hold.
    slots_held_by_caller: int
    #: Each started pool, in start order.
    pools: tuple[PoolStatus, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """Plain data (dicts, lists, scalars), for JSON."""
        return attrs.asdict(self)
