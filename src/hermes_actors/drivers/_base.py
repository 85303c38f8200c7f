"""The driver seam: how a sandbox is started, and nothing else.

A driver turns a `SandboxSpec` into a running sandbox whose agent bootstrap (`python3 -c
BOOTSTRAP`, see `hermes_actors._agent`) is connected to a bidirectional byte stream. The layers
above speak the agent protocol over that stream and never learn how the sandbox was made.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import attrs
import trio


@attrs.frozen(kw_only=True)
class SandboxSpec:
    """Everything a driver needs to start one sandbox of a profile."""

    profile: str
    image: str = "python:3.11"
    cpu: float = 1.0
    memory_mib: int = 2048
    gpu: str | None = None
    env: Mapping[str, str] = attrs.field(factory=dict)
    secrets: tuple[str, ...] = ()
    network: bool = False
    #: Seconds a sandbox may live at most (the provider kills it then).
    max_lifetime_s: float = 3600.0
    #: Seconds with no activity after which the provider may reclaim the sandbox.
    idle_timeout_s: float = 120.0
    #: Where slot workspaces live inside the sandbox (local/none: a host temp dir is used).
    workspace_base: str = "/data"
    #: `bwrap`, `none` or `auto`; only the local driver reads it.
    isolation: str = "auto"
    slots: int = 10
    #: The provider app sandboxes belong to (Modal: `App.lookup(app_name)`).
    app_name: str = "hermes-actors"
    #: Provider tags (the modal driver adds its own: app, profile, run id, created-at).
    tags: Mapping[str, str] = attrs.field(factory=dict)
    #: Seconds without any frame from the host after which the agent kills everything and exits.
    agent_ttl_s: float = 60.0
    #: Seconds a driver may keep retrying a failed create (its waits included) before it
    #: reports the failure. The pool sets it inside its acquire deadline, so a create that keeps
    #: failing reaches the waiting callers as its cause, not as an acquire timeout.
    create_retry_budget_s: float = 30.0


class SandboxHandle(Protocol):
    """One running sandbox, as the driver started it."""

    #: Whether commands run isolated from the host (own namespaces, or a provider container).
    isolated: bool
    #: Whether commands can reach the network (an unisolated sandbox always can).
    network: bool

    @property
    def sandbox_id(self) -> str:
        """A unique, human-readable id (`local-3f2a`, Modal's `sb-...`)."""
        ...

    @property
    def stream(self) -> trio.abc.HalfCloseableStream:
        """Bytes to and from the agent bootstrap's stdin/stdout."""
        ...

    @property
    def agent_config(self) -> Mapping[str, object]:
        """Settings the agent needs from the driver: `workspace_root`, `slot_uid_base`, ..."""
        ...

    def is_alive(self) -> bool:
        """False once the sandbox is known to have exited."""
        ...

    async def wait_exited(self) -> int | None:
        """Wait until the sandbox has exited; return its exit status when known."""
        ...

    async def terminate(self) -> None:
        """Stop the sandbox and everything in it, and free what it held. Idempotent.

        Bounded in time; escalates from graceful to forceful internally.
        """
        ...


class SandboxDriver(Protocol):
    """Starts sandboxes. One driver instance serves all sandboxes of a backend."""

    name: str

    async def create(self, spec: SandboxSpec) -> SandboxHandle:
        """Start one sandbox and return its handle, with the bootstrap already running.

        If cancelled or failing after the provider accepted the sandbox, the driver terminates
        it before raising: a failed create never leaves a sandbox behind.
        Raises `SandboxStartFailed` or `BackendUnavailable`.
        """
        ...

    async def aclose(self) -> None:
        """Release driver-wide resources (not the sandboxes, which their owners terminate)."""
        ...
