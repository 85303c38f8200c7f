"""The driver seam: how a sandbox is started, and nothing else.

A driver turns a profile (`SandboxConfig`, the one value that says what a sandbox is) into a
running sandbox whose agent bootstrap (`python3 -c BOOTSTRAP`, see `hermes_actors._agent`) is
connected to a bidirectional byte stream. The layers
above speak the agent protocol over that stream and never learn how the sandbox was made.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import trio

from hermes_actors._config import SandboxConfig


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


@runtime_checkable
class DirectorySnapshots(Protocol):
    """A sandbox handle that can snapshot a directory into a provider image and mount such an
    image into another sandbox of the same provider (Modal). Optional: the runtime moves trees
    between sandboxes through their agents when a handle lacks it.

    Paths are relative to the agent's workspace root (`agent_config["workspace_root"]`). Each
    method is one provider call; failures raise `TransferFailed` saying what failed.
    """

    async def snapshot_directory(self, path: str, *, ttl_s: int = ...) -> object:
        """An image of the directory `path` as it is now; it expires by itself after `ttl_s`
        seconds (a driver's default: minutes, for a tree moved at once)."""
        ...

    async def delete_snapshot(self, snapshot: object) -> None:
        """Delete an image `snapshot_directory` made, before its ttl (also once the sandbox
        that made it has ended)."""
        ...

    async def mount_snapshot(self, path: str, snapshot: object) -> None:
        """Show the contents of `snapshot` (from `snapshot_directory`) at `path`."""
        ...

    async def unmount_snapshot(self, path: str) -> None:
        """Remove what `mount_snapshot` showed at `path`."""
        ...


@runtime_checkable
class KeepsTrees(Protocol):
    """A sandbox handle whose files are on this machine (local): it can keep a directory of
    the sandbox when the sandbox ends, whatever way it ends (a crash included), by moving it
    out before the rest of its files go. Optional: checkpoints of other sandboxes are lost
    when their sandbox crashes."""

    def keep_on_exit(self, path: str, into: str) -> None:
        """When the sandbox ends, move its directory `path` (relative to the agent's workspace
        root) to the host path `into` (same filesystem), if it is still there."""
        ...

    def forget_kept(self, path: str) -> None:
        """`path` goes with the sandbox after all."""
        ...


class SandboxDriver(Protocol):
    """Starts sandboxes. One driver instance serves all sandboxes of a backend."""

    name: str

    async def create(self, spec: SandboxConfig) -> SandboxHandle:
        """Start one sandbox and return its handle, with the bootstrap already running.

        If cancelled or failing after the provider accepted the sandbox, the driver terminates
        it before raising: a failed create never leaves a sandbox behind.
        Raises `SandboxStartFailed` or `BackendUnavailable`.
        """
        ...

    async def aclose(self) -> None:
        """Release driver-wide resources (not the sandboxes, which their owners terminate)."""
        ...
