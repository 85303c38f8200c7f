"""Checkpoints, forks, restores and directory transfer of leased slots: the host side.

The agent does the work on trees (the tree section of `hermes_actors._agent`); this module
decides where it happens and keeps the books:

* A fork into slots of the source's own sandbox is one `fork` op there, no provider call: the
  agent freezes the source's tree as a layer and mounts an overlay on it per workspace where it
  may mount, and copies otherwise (reflinks where the filesystem has them, hard links kept).
* A fork into another sandbox goes through a provider directory snapshot where the drivers
  offer one (Modal, `_tree_snapshots`: three provider calls per target sandbox). Otherwise,
  and for a restore into another sandbox, a tar streams from the source's agent through the
  host into the target's: one chunk in flight, so memory stays bounded whatever its size.
* Checkpoints are stored in the sandbox they were taken in and counted per pool by a
  `CheckpointLedger` (count and bytes bounded, a clear error past either, whatever stores
  them). A local sandbox (the driver's `KeepsTrees`) moves the tree of each whole checkpoint
  it stores into a directory of the ledger's when it ends, however it ends. Before the pool
  stops a sandbox on purpose (idle timeout, rotation before its maximum lifetime, room for
  another image) it gives each other checkpoint stored there a copy the pool owns
  (`preserve_checkpoints`): a provider directory snapshot where the drivers offer them
  (Modal: one call per checkpoint, kept `DURABLE_SNAPSHOT_TTL_S` at most), else a tar file
  in the ledger's directory. A restore then works from that copy. Copies go when the
  checkpoint is released (`drop_checkpoint`) or the pool stops (`CheckpointLedger.aclose`).
  A checkpoint without a copy is lost with its sandbox when that sandbox crashes or its
  provider ends it first: `CheckpointLost` says so.
* A restore into another sandbox goes through a provider snapshot of the checkpoint where the
  drivers offer them (made once, then kept as the checkpoint's copy: three provider calls the
  first time, two after), otherwise its tar streams through the host.
* Upload and download move directory trees as tar streams, to and from a local directory or a
  file-like object, in chunks of `CHUNK_BYTES`.

A checkpoint holds files only: processes running in the slot are not captured.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import posixpath
import secrets
import shutil
import tarfile
import tempfile
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, Protocol

import attrs
import trio

from hermes_actors._agent import CHECKPOINTS_DIR
from hermes_actors._errors import (
    AgentError,
    CheckpointLimitExceeded,
    CheckpointLost,
    HermesError,
    SandboxLost,
    TransferFailed,
)
from hermes_actors._trio import collapse_exception_groups
from hermes_actors._values import (
    CheckpointTaken,
    DropCheckpoint,
    ForkSlot,
    RestoreCheckpoint,
    ShellState,
    StreamClose,
    StreamRead,
    StreamWrite,
    TakeCheckpoint,
    TarChunk,
    TarIn,
    TarOpened,
    TarOut,
)
from hermes_actors.drivers._base import DirectorySnapshots, KeepsTrees
from hermes_actors.drivers._local_reap import CHECKPOINT_COPIES_PREFIX, write_host_record
from hermes_actors.runtime._sandbox import SandboxActor
from hermes_actors.runtime._tree_snapshots import (
    copy_snapshot_into,
    fork_by_snapshot,
    snapshots_of,
)

logger = logging.getLogger("hermes_actors.trees")

#: Bytes per tar chunk between host and agent (one in flight per transfer).
CHUNK_BYTES = 4 * 1024 * 1024
#: How long closing a transfer's stream, or dropping a checkpoint, may take on the way out.
CLEANUP_LIMIT_S = 10.0
#: How long a provider snapshot of a checkpoint lives when nothing deletes it: the pool deletes
#: it when the checkpoint is released or the pool stops, so this bounds only what a host that
#: died leaves behind (Modal's longest sandbox lifetime).
DURABLE_SNAPSHOT_TTL_S = 24 * 3600

#: What an upload takes: a local directory, a tar as bytes, or a binary file-like object
#: holding a tar stream. What a download writes to: a local directory (extracted there) or a
#: binary file-like object (the tar stream).
UploadSource = str | os.PathLike[str] | bytes | IO[bytes]
DownloadTarget = str | os.PathLike[str] | IO[bytes]


class _Leased(Protocol):
    """What the tree ops need of a lease (the runtime's `Lease` has it)."""

    @property
    def sandbox(self) -> SandboxActor: ...
    @property
    def index(self) -> int: ...
    @property
    def profile(self) -> str: ...
    @property
    def sandbox_id(self) -> str: ...


@attrs.frozen(kw_only=True)
class Checkpoint:
    """A slot's workspace and its persistent shell's state at one moment.

    The files are stored in the sandbox the checkpoint was taken in (`sandbox_id`), and copied
    out before the pool stops that sandbox; `size_bytes` and `entries` describe them. `shell`
    is the shell's last known working directory and exported environment (None when the slot
    had no shell yet). Running processes are not captured. Valid until released
    (`release_checkpoint`) or the backend stops, unless its sandbox crashes or its provider
    ends it before the pool copied it out (`CheckpointLost` then).
    """

    checkpoint_id: str
    profile: str
    sandbox_id: str
    size_bytes: int
    entries: int
    shell: ShellState | None = attrs.field(default=None, repr=False)
    sandbox: SandboxActor = attrs.field(repr=False, eq=False)
    #: Whether the stored tree is whole (else an overlay layer only its agent shows whole).
    flat: bool = attrs.field(default=True, repr=False)

    @property
    def tree_path(self) -> str:
        """Where its tree is in its sandbox, relative to the agent's workspace root."""
        return posixpath.join(CHECKPOINTS_DIR, self.checkpoint_id, "w", "tree")


@attrs.frozen
class SnapshotCopy:
    """A checkpoint's copy as a provider directory snapshot, and who can delete it."""

    image: object
    owner: DirectorySnapshots


@attrs.frozen
class TarCopy:
    """A checkpoint's copy as a tar file on the host (in the ledger's directory)."""

    path: Path


@attrs.frozen
class TreeCopy:
    """A checkpoint's tree itself, moved out of its local sandbox when that ended (the
    driver's `KeepsTrees`), in the ledger's directory."""

    path: Path


#: A copy of a checkpoint that outlives its sandbox, owned by the pool.
CheckpointCopy = SnapshotCopy | TarCopy | TreeCopy


@attrs.frozen(kw_only=True)
class _Removed:
    """What stored a checkpoint that was just released."""

    in_sandbox: bool
    copy: CheckpointCopy | None
    #: Where its sandbox was to move its tree when it ends (it may have done so already).
    kept: Path | None = None


@attrs.frozen(kw_only=True)
class CheckpointStats:
    """A pool's checkpoints: how many are held and the bytes they store."""

    count: int
    size_bytes: int


#: Lost checkpoints whose cause `CheckpointLedger` remembers until they are released.
_LOST_KEPT = 4096


class CheckpointLedger:
    """The checkpoints of one pool, bounded by count and by bytes, and the copies it keeps of
    them (see `preserve_checkpoints`). Sync but for `aclose`: pool-owned state."""

    def __init__(
        self, profile: str, *, max_count: int, max_bytes: int, root_dir: str | None = None
    ) -> None:
        self.profile = profile
        self.max_count = max_count
        self.max_bytes = max_bytes
        self._held: dict[str, Checkpoint] = {}
        self._reserved = 0
        #: Why checkpoints went with their sandbox, by id, until their holder releases them
        #: (at most `_LOST_KEPT`, oldest forgotten first): `restore` says so.
        self._lost: dict[str, str] = {}
        #: Copies of held checkpoints that outlive their sandboxes, by id.
        self._copies: dict[str, CheckpointCopy] = {}
        #: Held checkpoints whose sandbox ended: only their copy is left.
        self._away: set[str] = set()
        #: Held checkpoints whose tree their (local) sandbox moves here when it ends.
        self._kept: dict[str, Path] = {}
        #: Where tar copies go (`root_dir`, or the temporary directory); made on first use.
        self._root_dir = root_dir
        self._directory: Path | None = None

    def reserve(self) -> None:
        """Make room for one more checkpoint, or raise `CheckpointLimitExceeded`."""
        if len(self._held) + self._reserved >= self.max_count:
            raise CheckpointLimitExceeded(self.profile, "count", self.max_count)
        if self.size_bytes() >= self.max_bytes:
            raise CheckpointLimitExceeded(self.profile, "bytes", self.max_bytes)
        self._reserved += 1

    def unreserve(self) -> None:
        self._reserved -= 1

    def commit(self, checkpoint: Checkpoint) -> bool:
        """Hold a reserved checkpoint; False (not held) if it takes the pool past `max_bytes`."""
        self._reserved -= 1
        if self.size_bytes() + checkpoint.size_bytes > self.max_bytes:
            return False
        self._held[checkpoint.checkpoint_id] = checkpoint
        return True

    def holds(self, checkpoint: Checkpoint) -> bool:
        return self._held.get(checkpoint.checkpoint_id) is checkpoint

    def remove(self, checkpoint: Checkpoint) -> _Removed | None:
        """Forget a checkpoint; None if it was not held (released before, or lost), else what
        stores it (the caller frees that)."""
        if not self.holds(checkpoint):
            self._lost.pop(checkpoint.checkpoint_id, None)
            return None
        key = checkpoint.checkpoint_id
        del self._held[key]
        in_sandbox = key not in self._away
        self._away.discard(key)
        return _Removed(
            in_sandbox=in_sandbox,
            copy=self._copies.pop(key, None),
            kept=self._kept.pop(key, None),
        )

    def in_sandbox(self, sandbox: SandboxActor) -> bool:
        """Whether `sandbox` stores a held checkpoint that has no copy outside it."""
        return any(self._uncopied(sandbox))

    def to_preserve(self, sandbox: SandboxActor) -> list[Checkpoint]:
        """The held checkpoints stored in `sandbox` that have no copy outside it yet."""
        return list(self._uncopied(sandbox))

    def _uncopied(self, sandbox: SandboxActor) -> Iterator[Checkpoint]:
        for key, checkpoint in self._held.items():
            if checkpoint.sandbox is sandbox and key not in self._copies and key not in self._kept:
                yield checkpoint

    def keep_path(self, checkpoint: Checkpoint) -> Path:
        """Where the tree of `checkpoint` goes if its sandbox keeps it when it ends."""
        return self._made_directory() / f"{checkpoint.checkpoint_id}.tree"

    def note_kept(self, checkpoint: Checkpoint, path: Path) -> None:
        """The sandbox of the held `checkpoint` moves its tree to `path` when it ends."""
        if self.holds(checkpoint):
            self._kept[checkpoint.checkpoint_id] = path

    def stored_in_sandbox(self, checkpoint: Checkpoint) -> bool:
        """Whether the held `checkpoint` is still in its sandbox as far as the pool knows."""
        return self.holds(checkpoint) and checkpoint.checkpoint_id not in self._away

    def copy_of(self, checkpoint: Checkpoint) -> CheckpointCopy | None:
        return self._copies.get(checkpoint.checkpoint_id) if self.holds(checkpoint) else None

    def add_copy(self, checkpoint: Checkpoint, copy: CheckpointCopy) -> bool:
        """Keep `copy` for the held `checkpoint`; False (the caller frees it) if the checkpoint
        is no longer held or has a copy already."""
        key = checkpoint.checkpoint_id
        if not self.holds(checkpoint) or key in self._copies:
            return False
        self._copies[key] = copy
        return True

    def forget_sandbox(self, sandbox: SandboxActor, why: str) -> int:
        """Its sandbox ended (`why`, a sentence's end: "was lost (...)"): its checkpoints
        without a copy are gone with it. Returns how many."""
        gone = []
        for key, checkpoint in self._held.items():
            if checkpoint.sandbox is not sandbox:
                continue
            kept = self._kept.pop(key, None)
            if key not in self._copies and kept is not None and kept.is_dir():
                self._copies[key] = TreeCopy(path=kept)
            if key in self._copies:
                self._away.add(key)
            else:
                gone.append(key)
        for key in gone:
            del self._held[key]
            self._lost[key] = f"it was stored only in sandbox {sandbox.sandbox_id}, which {why}"
        while len(self._lost) > _LOST_KEPT:
            del self._lost[next(iter(self._lost))]
        return len(gone)

    def new_tar_path(self, checkpoint: Checkpoint) -> Path:
        """Where a tar copy of `checkpoint` goes (the ledger's directory, made on first use)."""
        return self._made_directory() / f"{checkpoint.checkpoint_id}.tar"

    def _made_directory(self) -> Path:
        if self._directory is None:
            prefix = f"{CHECKPOINT_COPIES_PREFIX}{self.profile}-"
            directory = Path(tempfile.mkdtemp(prefix=prefix, dir=self._root_dir))
            # `hermes-actors reap` removes it once this process is gone (killed, say).
            write_host_record(directory)
            self._directory = directory
        return self._directory

    @property
    def directory(self) -> Path | None:
        """The directory of tar copies, once made (it goes with `aclose`)."""
        return self._directory

    def copies(self) -> list[CheckpointCopy]:
        return list(self._copies.values())

    async def aclose(self) -> None:
        """Free every copy and the ledger's directory; the ledger holds nothing after it.

        Bounded by `CLEANUP_LIMIT_S` and shielded: what is left then is logged (provider
        snapshots still expire at their ttl)."""
        copies = list(self._copies.values())
        self._held.clear()
        self._copies.clear()
        self._away.clear()
        self._kept.clear()
        directory, self._directory = self._directory, None
        with trio.move_on_after(CLEANUP_LIMIT_S, shield=True) as scope:
            for copy in copies:
                if isinstance(copy, SnapshotCopy):
                    await free_copy(copy)
            if directory is not None:
                await trio.to_thread.run_sync(
                    functools.partial(shutil.rmtree, directory, ignore_errors=True)
                )
        if scope.cancelled_caught:
            logger.warning(
                "freeing the checkpoint copies of profile %r took over %g s; left: %s",
                self.profile,
                CLEANUP_LIMIT_S,
                directory,
            )

    def why_unusable(self, checkpoint: Checkpoint) -> str:
        """Why a checkpoint that is not held cannot be used (for `CheckpointLost`)."""
        lost = self._lost.get(checkpoint.checkpoint_id)
        if lost is not None:
            return lost
        return "it was released (release_checkpoint), or lost with its sandbox long ago"

    def size_bytes(self) -> int:
        return sum(c.size_bytes for c in self._held.values())

    def statistics(self) -> CheckpointStats:
        return CheckpointStats(count=len(self._held), size_bytes=self.size_bytes())


# -- checkpoints ---------------------------------------------------------------------------------


async def take_checkpoint(ledger: CheckpointLedger, lease: _Leased) -> Checkpoint:
    """Copy the slot's workspace into a new checkpoint in its sandbox.

    Raises `CheckpointLimitExceeded` when the pool holds its limit (count, or bytes: a copy
    that would pass the byte limit is dropped again). Cancellation leaves no checkpoint behind.
    """
    ledger.reserve()
    checkpoint_id = "ck-" + secrets.token_hex(8)
    reserved = True
    held = False
    try:
        taken: CheckpointTaken = await lease.sandbox.call(
            lease.index, TakeCheckpoint(checkpoint=checkpoint_id)
        )
        checkpoint = Checkpoint(
            checkpoint_id=checkpoint_id,
            profile=lease.profile,
            sandbox_id=lease.sandbox_id,
            size_bytes=taken.size_bytes,
            entries=taken.entries,
            shell=taken.shell,
            sandbox=lease.sandbox,
            flat=taken.flat,
        )
        reserved = False
        held = ledger.commit(checkpoint)
        if not held:
            raise CheckpointLimitExceeded(ledger.profile, "bytes", ledger.max_bytes)
        handle = lease.sandbox.handle
        if checkpoint.flat and isinstance(handle, KeepsTrees):
            # Moved out when its sandbox ends, even by a crash: no copy now, no copy later.
            kept = ledger.keep_path(checkpoint)
            handle.keep_on_exit(checkpoint.tree_path, os.fspath(kept))
            ledger.note_kept(checkpoint, kept)
        return checkpoint
    except BaseException:
        if reserved:
            ledger.unreserve()
        if not held:  # whatever the agent stored (or is storing) goes
            with trio.move_on_after(CLEANUP_LIMIT_S, shield=True):
                await _drop_stored(lease.sandbox, checkpoint_id)
        raise


async def _drop_stored(sandbox: SandboxActor, checkpoint_id: str) -> None:
    with contextlib.suppress(HermesError):
        await sandbox.call(0, DropCheckpoint(checkpoint=checkpoint_id))


async def drop_checkpoint(ledger: CheckpointLedger, checkpoint: Checkpoint) -> None:
    """Release a checkpoint and free its storage, its copy included. Idempotent; a lost one is
    just forgotten."""
    removed = ledger.remove(checkpoint)
    if removed is None:
        return
    handle = checkpoint.sandbox.handle
    if removed.kept is not None and isinstance(handle, KeepsTrees):
        handle.forget_kept(checkpoint.tree_path)
    with trio.move_on_after(CLEANUP_LIMIT_S, shield=True):
        if removed.in_sandbox and checkpoint.sandbox.alive:
            await _drop_stored(checkpoint.sandbox, checkpoint.checkpoint_id)
        if removed.copy is not None:
            await free_copy(removed.copy)
        if removed.kept is not None:  # its sandbox may have ended and moved it already
            await free_copy(TreeCopy(path=removed.kept))


async def free_copy(copy: CheckpointCopy) -> None:
    """Delete a checkpoint's copy (a provider snapshot, or a tar file). Errors are logged: a
    snapshot left behind expires at its ttl."""
    if isinstance(copy, SnapshotCopy):
        try:
            await copy.owner.delete_snapshot(copy.image)
        except HermesError as exc:
            logger.warning("could not delete the copy of a checkpoint: %s", exc)
        return
    if isinstance(copy, TreeCopy):
        await trio.to_thread.run_sync(functools.partial(shutil.rmtree, copy.path, True))
        return
    await trio.Path(copy.path).unlink(missing_ok=True)


async def restore(ledger: CheckpointLedger, lease: _Leased, checkpoint: Checkpoint) -> None:
    """Make the slot's workspace the checkpoint's (its processes are killed first).

    From the checkpoint's own sandbox when it is the slot's; otherwise from the checkpoint's
    copy (a provider snapshot, made now if the drivers offer them, or the tar file kept after
    its sandbox ended), else streamed from its sandbox through the host.
    Raises `CheckpointLost` when the checkpoint was released or its sandbox ended before the
    pool copied it out; the slot is then left as it was, unless the sandbox storing the
    checkpoint ended while its tree was streamed into another sandbox's slot (that slot then
    holds part of it).
    """
    if not ledger.holds(checkpoint):
        raise CheckpointLost(checkpoint.checkpoint_id, ledger.why_unusable(checkpoint))
    stored = ledger.stored_in_sandbox(checkpoint) and checkpoint.sandbox.alive
    if stored and checkpoint.sandbox is lease.sandbox:
        restore = RestoreCheckpoint(checkpoint=checkpoint.checkpoint_id, shell=checkpoint.shell)
        await lease.sandbox.call(lease.index, restore)
        return
    copy = ledger.copy_of(checkpoint)
    if copy is None and stored and checkpoint.flat and snapshots_of(lease.sandbox) is not None:
        copy = await _copy_out(ledger, checkpoint, snapshots_only=True)
    if copy is not None:
        await _restore_copy(copy, lease, checkpoint)
        return
    if not stored:
        raise _lost_with_sandbox(checkpoint, checkpoint.sandbox.died)
    try:
        await stream_between(
            checkpoint.sandbox,
            0,
            TarOut(checkpoint=checkpoint.checkpoint_id),
            [lease],
            shell=checkpoint.shell,
            # Only once the checkpoint's tree is there to read: a lost one leaves the slot be.
            prepare=lambda: lease.sandbox.reset_slot(lease.index),
        )
    except SandboxLost as exc:
        if exc.sandbox_id != checkpoint.sandbox_id:
            raise
        raise _lost_with_sandbox(checkpoint, exc) from exc


async def preserve_checkpoints(ledger: CheckpointLedger, sandbox: SandboxActor) -> int:
    """Give every held checkpoint stored in `sandbox` a copy that outlives it (those taken
    meanwhile too); returns how many copies were made.

    A provider snapshot where the drivers offer them (one call each; the checkpoint's tree
    never passes through the host), else a tar of it streamed into a file of the ledger's.
    Raises what a copy raised (`SandboxLost`, `TransferFailed`, ...): the checkpoints not
    copied yet stay without a copy.
    """
    made = 0
    while batch := ledger.to_preserve(sandbox):
        for checkpoint in batch:
            await _copy_out(ledger, checkpoint)
            made += 1
    return made


async def _copy_out(
    ledger: CheckpointLedger, checkpoint: Checkpoint, *, snapshots_only: bool = False
) -> CheckpointCopy | None:
    """Copy `checkpoint` out of its sandbox and keep the copy in the ledger; returns the copy
    the ledger keeps (None: released meanwhile). With `snapshots_only`, None too where no
    snapshot can be made."""
    sandbox = checkpoint.sandbox
    snapshots = snapshots_of(sandbox)
    copy: CheckpointCopy
    if snapshots is not None and checkpoint.flat:
        image = await snapshots.snapshot_directory(
            checkpoint.tree_path, ttl_s=DURABLE_SNAPSHOT_TTL_S
        )
        copy = SnapshotCopy(image=image, owner=snapshots)
    elif snapshots_only:
        return None
    else:
        copy = TarCopy(path=await _tar_to_file(ledger, checkpoint))
    if not ledger.add_copy(checkpoint, copy):
        with trio.move_on_after(CLEANUP_LIMIT_S, shield=True):
            await free_copy(copy)
    return ledger.copy_of(checkpoint)


async def _tar_to_file(ledger: CheckpointLedger, checkpoint: Checkpoint) -> Path:
    """Stream a tar of `checkpoint` from its sandbox into a new file of the ledger's; the file
    is made only once the sandbox has the tar open (and removed if it does not complete)."""
    tar = TarOut(checkpoint=checkpoint.checkpoint_id)
    async with _tar_out(checkpoint.sandbox, 0, tar) as (read, _):
        path = ledger.new_tar_path(checkpoint)
        try:
            async with await trio.open_file(path, "wb") as file:
                while True:
                    data, eof = await read()
                    await file.write(data)
                    if eof:
                        return path
        except BaseException:
            with trio.CancelScope(shield=True):
                await trio.Path(path).unlink(missing_ok=True)
            raise


async def _restore_copy(copy: CheckpointCopy, lease: _Leased, checkpoint: Checkpoint) -> None:
    if isinstance(copy, SnapshotCopy):
        # Mounted, copied into the slot (its processes evicted, its shell from the checkpoint's
        # state), unmounted: no tree through the host.
        await copy_snapshot_into(lease.sandbox, [lease.index], copy.image, checkpoint.shell)
        return
    if isinstance(copy, TreeCopy):
        if not await trio.Path(copy.path).is_dir():
            raise CheckpointLost(
                checkpoint.checkpoint_id, f"its tree {copy.path} was removed from this machine"
            )
        await lease.sandbox.reset_slot(lease.index)
        sink = _TarSink(lease.sandbox, lease.index, ".", checkpoint.shell)
        writer = _LookAhead(sink)
        try:
            directory = copy.path
            await _pump_from_thread(lambda send: _pack_directory(directory, send), writer.feed)
            await writer.finish()
        finally:
            await sink.abort()
        return
    try:
        file = await trio.open_file(copy.path, "rb")
    except FileNotFoundError:
        raise CheckpointLost(
            checkpoint.checkpoint_id, f"its copy {copy.path} was removed from this machine"
        ) from None
    async with file:
        await lease.sandbox.reset_slot(lease.index)
        sink = _TarSink(lease.sandbox, lease.index, ".", checkpoint.shell)
        writer = _LookAhead(sink)
        try:
            while chunk := await file.read(CHUNK_BYTES):
                await writer.feed(chunk)
            await writer.finish()
        finally:
            await sink.abort()


def _lost_with_sandbox(checkpoint: Checkpoint, died: SandboxLost | None) -> CheckpointLost:
    why = f"was lost ({died.reason})" if died is not None else "stopped"
    return CheckpointLost(
        checkpoint.checkpoint_id,
        f"it was stored only in sandbox {checkpoint.sandbox_id}, which {why}",
    )


# -- forks ---------------------------------------------------------------------------------------


async def fork_into(source: _Leased, targets: list[_Leased]) -> None:
    """Give every target slot a copy of the source slot's workspace and shell state.

    Targets in the source's sandbox get one in-sandbox copy each (one `fork` op, no provider
    call); the others share one tar of the source, streamed through the host to all of them
    (one request per target for a tree that fits a chunk). Targets are expected fresh (just
    acquired); on failure some may hold a partial copy, so the caller releases them with reset.
    """
    local = [t.index for t in targets if t.sandbox is source.sandbox]
    remote = [t for t in targets if t.sandbox is not source.sandbox]
    async with trio.open_nursery() as nursery:  # the caller collapses the group
        if local:
            nursery.start_soon(source.sandbox.call, source.index, ForkSlot(targets=local))
        if remote:
            nursery.start_soon(_fork_across, source, remote)


async def _fork_across(source: _Leased, remote: list[_Leased]) -> None:
    """Targets in other sandboxes: through one provider directory snapshot where the drivers
    offer it (`_tree_snapshots`), else one tar streamed through the host to all of them."""
    if await fork_by_snapshot(source, remote):
        return
    await stream_between(
        source.sandbox, source.index, TarOut(path="."), remote, shell_of_source=True
    )


class _Target(Protocol):
    @property
    def sandbox(self) -> SandboxActor: ...
    @property
    def index(self) -> int: ...


async def stream_between(
    source: SandboxActor,
    source_slot: int,
    tar: TarOut,
    targets: Sequence[_Target],
    *,
    shell: ShellState | None = None,
    shell_of_source: bool = False,
    prepare: Callable[[], Awaitable[object]] | None = None,
) -> int:
    """Stream the tree `tar` names in `source` into every target slot's workspace; returns its
    bytes.

    Each chunk is written to all targets before the next is read (memory: one chunk). The
    targets' shells get `shell` (or the source slot's state, with `shell_of_source`).
    `prepare` runs once the source's tar is open, before any target is written to.
    """
    moved = 0
    async with _tar_out(source, source_slot, tar) as (read, source_shell):
        if prepare is not None:
            await prepare()
        state = source_shell if shell_of_source else shell
        sinks = [_TarSink(target.sandbox, target.index, ".", state) for target in targets]
        try:
            while True:
                data, eof = await read()
                moved += len(data)
                with collapse_exception_groups():
                    async with trio.open_nursery() as nursery:
                        for sink in sinks:
                            nursery.start_soon(sink.send, data, eof)
                if eof:
                    return moved
        finally:
            for sink in sinks:
                await sink.abort()


# -- tar streams -----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _tar_out(sandbox: SandboxActor, slot: int, tar: TarOut) -> Any:
    """`(read, shell)`: `read()` gives `(chunk, eof)` of a tar made in the sandbox; `shell` is
    the slot's shell state. The stream is closed on the way out if not read to its end."""
    tag = secrets.token_hex(8)
    try:
        opened: TarOpened = await sandbox.call(slot, attrs.evolve(tar, tag=tag))
    except BaseException:
        # The agent may have opened it without our hearing its id: close it by our tag.
        await _abort_stream(sandbox, slot, tag)
        raise
    stream = opened.stream
    done = False

    async def read() -> tuple[bytes, bool]:
        nonlocal done
        if done:
            return b"", True
        try:
            chunk: TarChunk = await sandbox.call(
                slot, StreamRead(stream=stream, max_bytes=CHUNK_BYTES)
            )
        except AgentError as exc:
            done = True
            raise TransferFailed(
                f"reading the tree from {sandbox.sandbox_id} failed: {exc.detail}"
            ) from exc
        done = chunk.eof
        return chunk.data, done

    try:
        yield read, opened.shell
    finally:
        if not done:
            with (
                trio.move_on_after(CLEANUP_LIMIT_S, shield=True),
                contextlib.suppress(HermesError),
            ):
                await sandbox.call(slot, StreamClose(stream=stream))


async def _abort_stream(sandbox: SandboxActor, slot: int, tag: str) -> None:
    """Close the stream opened with `tag`, if it was (bounded, shielded; errors ignored)."""
    with (
        trio.move_on_after(CLEANUP_LIMIT_S, shield=True),
        contextlib.suppress(HermesError),
    ):
        await sandbox.call(slot, StreamClose(tag=tag))


class _TarSink:
    """`tar x` into one slot, fed chunk by chunk: the first chunk opens it (`tar_in`), the last
    one (`last`) finishes it and gets tar's outcome; a tree of one chunk is one request."""

    def __init__(
        self, sandbox: SandboxActor, slot: int, dest: str, shell: ShellState | None
    ) -> None:
        self.sandbox = sandbox
        self.slot = slot
        self.dest = dest
        self.shell = shell
        self.stream: int | None = None
        self.done = False
        #: Set while the agent may hold a stream whose id we never heard (see `abort`).
        self.tag: str | None = None

    async def send(self, data: bytes, last: bool) -> None:
        try:
            if self.stream is None:
                self.tag = secrets.token_hex(8)
                tar_in = TarIn(path=self.dest, data=data, last=last, shell=self.shell, tag=self.tag)
                self.stream = await self.sandbox.call(self.slot, tar_in)
                self.tag = None
            else:
                write = StreamWrite(stream=self.stream, data=data, last=last)
                await self.sandbox.call(self.slot, write)
        except AgentError as exc:
            self.done = True  # the agent closed the stream with its error
            self.tag = None
            raise TransferFailed(
                f"unpacking the tree in {self.sandbox.sandbox_id} failed: {exc.detail}"
            ) from exc
        self.done = last

    async def abort(self) -> None:
        """Close a stream left unfinished (bounded, shielded)."""
        if self.tag is not None:  # the opening request was given up: its stream goes by tag
            tag, self.tag = self.tag, None
            await _abort_stream(self.sandbox, self.slot, tag)
            return
        if self.stream is not None and not self.done:
            self.done = True
            with (
                trio.move_on_after(CLEANUP_LIMIT_S, shield=True),
                contextlib.suppress(HermesError),
            ):
                await self.sandbox.call(self.slot, StreamClose(stream=self.stream))


class _LookAhead:
    """Feeds a `_TarSink` from a source of unknown length: holds one chunk back, so the last
    one goes out marked `last`."""

    def __init__(self, sink: _TarSink) -> None:
        self.sink = sink
        self.held: bytes | None = None

    async def feed(self, chunk: bytes) -> None:
        if self.held is not None:
            await self.sink.send(self.held, False)
        self.held = chunk

    async def finish(self) -> None:
        await self.sink.send(self.held or b"", True)


# -- upload and download -----------------------------------------------------------------------


class _ChannelWriter:
    """A file-like object for a worker thread: what tarfile writes goes to a trio channel."""

    def __init__(self, send: trio.MemorySendChannel[bytes]) -> None:
        self._send = send
        self._buffer = bytearray()

    def write(self, data: bytes) -> int:
        self._buffer += data
        if len(self._buffer) >= CHUNK_BYTES:
            self.flush()
        return len(data)

    def flush(self) -> None:
        if self._buffer:
            chunk, self._buffer = bytes(self._buffer), bytearray()
            trio.from_thread.run(self._send.send, chunk)


class _ChannelReader:
    """A file-like object for a worker thread: reads what a trio channel delivers."""

    def __init__(self, receive: trio.MemoryReceiveChannel[bytes]) -> None:
        self._receive = receive
        self._buffer = b""
        self._ended = False

    def read(self, size: int = -1) -> bytes:
        while not self._ended and (size < 0 or len(self._buffer) < size):
            try:
                self._buffer += trio.from_thread.run(self._receive.receive)
            except trio.EndOfChannel:
                self._ended = True
        if size < 0:
            data, self._buffer = self._buffer, b""
        else:
            data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data


def _pack_directory(directory: Path, send: trio.MemorySendChannel[bytes]) -> None:
    """In a worker thread: tar `directory` (symlinks as links) into the channel, in chunks."""
    writer = _ChannelWriter(send)
    with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as archive:  # type: ignore[call-overload]
        archive.add(str(directory), arcname=".", recursive=True)
    writer.flush()


def _unpack_into(directory: Path, receive: trio.MemoryReceiveChannel[bytes]) -> None:
    """In a worker thread: extract the tar arriving on the channel into `directory`.

    The `tar` filter refuses members that would land outside `directory` (absolute paths,
    `..`, links leading out) and strips set-id bits.
    """
    reader = _ChannelReader(receive)
    with tarfile.open(fileobj=reader, mode="r|") as archive:  # type: ignore[call-overload]
        archive.extractall(str(directory), filter="tar")
    reader.read()  # drain whatever follows the archive's end


async def upload(lease: _Leased, source: UploadSource, dest: str = ".") -> None:
    """Put a directory tree into the slot at `dest` (relative to its workspace; created).

    `source` is a local directory (tarred here, symlinks kept as links), a tar as bytes, or a
    binary file-like object holding a tar stream. Memory stays bounded by `CHUNK_BYTES`.
    Raises `TransferFailed` when tar in the sandbox refuses the stream.
    """
    if isinstance(source, str | os.PathLike) and not await trio.Path(source).is_dir():
        raise TransferFailed(f"upload source {os.fspath(source)!r} is not a directory")
    sink = _TarSink(lease.sandbox, lease.index, dest, None)
    writer = _LookAhead(sink)
    try:
        if isinstance(source, bytes | bytearray | memoryview):
            data = bytes(source)
            for start in range(0, len(data), CHUNK_BYTES):
                await writer.feed(data[start : start + CHUNK_BYTES])
        elif isinstance(source, str | os.PathLike):
            directory = Path(source)
            await _pump_from_thread(lambda send: _pack_directory(directory, send), writer.feed)
        else:
            reader = source
            while chunk := await trio.to_thread.run_sync(reader.read, CHUNK_BYTES):
                await writer.feed(chunk)
        await writer.finish()
    finally:
        await sink.abort()


async def _pump_from_thread(
    produce: Callable[[trio.MemorySendChannel[bytes]], None],
    write: Callable[[bytes], Any],
) -> None:
    send, receive = trio.open_memory_channel[bytes](1)
    with collapse_exception_groups():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_run_producer, produce, send)
            with receive:
                async for chunk in receive:
                    await write(chunk)


async def _run_producer(
    produce: Callable[[trio.MemorySendChannel[bytes]], None], send: trio.MemorySendChannel[bytes]
) -> None:
    # A consumer that stopped first closed the channel: its error is the one that matters.
    async with send:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await trio.to_thread.run_sync(produce, send)


async def download(lease: _Leased, path: str, dest: DownloadTarget) -> None:
    """Copy the slot's directory `path` out as a tar stream.

    `dest` is a local directory (created; the tree is extracted into it, refusing members that
    would land outside it) or a binary file-like object (the tar stream is written to it).
    Memory stays bounded by `CHUNK_BYTES`. Raises `TransferFailed` when tar fails on a side.
    """
    async with _tar_out(lease.sandbox, lease.index, TarOut(path=path)) as (read_chunk, _):

        async def read() -> bytes:
            data: bytes = (await read_chunk())[0]  # b"" only at the end
            return data

        if isinstance(dest, str | os.PathLike):
            directory = Path(dest)
            await trio.Path(directory).mkdir(parents=True, exist_ok=True)
            send, receive = trio.open_memory_channel[bytes](1)
            failures: list[BaseException] = []

            async def run_consumer() -> None:
                with receive:
                    try:
                        await trio.to_thread.run_sync(_unpack_into, directory, receive)
                    except (tarfile.TarError, OSError) as exc:
                        failures.append(exc)

            with collapse_exception_groups():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(run_consumer)
                    async with send:
                        while chunk := await read():
                            try:
                                await send.send(chunk)
                            except trio.BrokenResourceError:
                                break  # extraction failed: its error is reported below
            if failures:
                raise TransferFailed(
                    f"extracting into {str(directory)!r} failed: {failures[0]}"
                ) from failures[0]
        else:
            writer = dest
            while chunk := await read():
                await trio.to_thread.run_sync(writer.write, chunk)
