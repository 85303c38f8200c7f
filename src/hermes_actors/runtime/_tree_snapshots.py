"""Forks across sandboxes through provider directory snapshots (Modal), where drivers offer them.

The tree code (`_trees.fork_into`) calls `fork_by_snapshot` for the targets outside the source's
sandbox; when every sandbox involved has a handle with `DirectorySnapshots`, the fork is:

* at the source, once per fork: the slot's shell state (one agent request) and a snapshot of
  its workspace directory (one provider call);
* in each target sandbox, whatever the tree's size and however many of its slots are targets:
  the snapshot mounted (one provider call), copied into every target slot there by one agent
  request (`fork_in`: the same copy, ownership change and shell state as an in-sandbox fork),
  and unmounted (one provider call).

So three provider calls per target sandbox, and the tree never passes through the host. The
snapshot expires by itself at the provider (`SNAPSHOT_TTL_S` of the modal driver). Otherwise
(a driver without snapshots, such as the local one) `fork_by_snapshot` does nothing and says so.
"""

from __future__ import annotations

import logging
import posixpath
import secrets
from collections.abc import Sequence
from typing import Protocol

import trio

from hermes_actors._agent import MOUNTS_DIR
from hermes_actors._errors import HermesError, TransferFailed
from hermes_actors._trio import collapse_exception_groups
from hermes_actors._values import ForkIn, GetShellState, ShellState
from hermes_actors.drivers._base import DirectorySnapshots
from hermes_actors.runtime._sandbox import SandboxActor

logger = logging.getLogger("hermes_actors.trees")

#: Bound on unmounting a snapshot on the way out (also when the fork was cancelled).
UNMOUNT_LIMIT_S = 30.0


class _Slot(Protocol):
    @property
    def sandbox(self) -> SandboxActor: ...
    @property
    def index(self) -> int: ...


def snapshots_of(sandbox: SandboxActor) -> DirectorySnapshots | None:
    """The sandbox's handle if it can snapshot and mount directories (Modal), else None."""
    handle = sandbox.handle
    return handle if isinstance(handle, DirectorySnapshots) else None


async def fork_by_snapshot(source: _Slot, targets: Sequence[_Slot]) -> bool:
    """Copy the source slot's workspace and shell state into `targets` (slots of other
    sandboxes) through one directory snapshot; False, doing nothing, when a sandbox involved
    cannot snapshot or mount directories.

    Raises `TransferFailed` when a snapshot, mount or copy fails (targets may then hold partial
    copies: the caller releases them with reset). Cancellation unmounts what was mounted.
    """
    source_snapshots = snapshots_of(source.sandbox)
    if source_snapshots is None or any(snapshots_of(t.sandbox) is None for t in targets):
        return False
    shell = await source.sandbox.call(source.index, GetShellState())
    directory = posixpath.basename(source.sandbox.workspace_dir(source.index))
    snapshot = await source_snapshots.snapshot_directory(directory)
    by_sandbox: dict[SandboxActor, list[int]] = {}
    for target in targets:
        by_sandbox.setdefault(target.sandbox, []).append(target.index)
    with collapse_exception_groups():
        async with trio.open_nursery() as nursery:
            for sandbox, slots in by_sandbox.items():
                nursery.start_soon(copy_snapshot_into, sandbox, slots, snapshot, shell)
    return True


async def copy_snapshot_into(
    sandbox: SandboxActor, slots: list[int], snapshot: object, shell: ShellState | None
) -> None:
    """Make the workspace of each slot of `slots` (in `sandbox`) the tree of `snapshot`, their
    shells start from `shell`: mount, one agent request (`ForkIn`), unmount. Raises
    `TransferFailed` (the provider refused) or the agent's error; unmounts on the way out."""
    snapshots = snapshots_of(sandbox)
    if snapshots is None:
        raise TransferFailed(f"sandbox {sandbox.sandbox_id} cannot mount directory snapshots")
    name = "fork_" + secrets.token_hex(8)
    path = posixpath.join(MOUNTS_DIR, name)
    mounted: bool | None = False  # None: perhaps (the mount call was cut short)
    try:
        try:
            await snapshots.mount_snapshot(path, snapshot)
        except HermesError:
            raise  # the provider refused it: nothing is mounted
        except BaseException:
            mounted = None  # cancelled: the provider may have mounted it all the same
            raise
        mounted = True
        await sandbox.call(slots[0], ForkIn(mount=name, targets=slots[1:], shell=shell))
    finally:
        if mounted is not False:
            with trio.move_on_after(UNMOUNT_LIMIT_S, shield=True):
                await _unmount(snapshots, path, surely_mounted=mounted is True)


async def _unmount(snapshots: DirectorySnapshots, path: str, *, surely_mounted: bool) -> None:
    """Unmount, retried once: a mount left behind stays until its sandbox stops."""
    for attempt in (1, 2):
        try:
            await snapshots.unmount_snapshot(path)
            return
        except HermesError as exc:
            if not surely_mounted:
                logger.debug("%s (the cancelled mount had not happened)", exc)
                return
            if attempt == 2:
                logger.warning("%s; the snapshot stays mounted until its sandbox stops", exc)
            else:
                logger.info("%s; retrying once", exc)
