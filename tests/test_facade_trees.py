"""Checkpoint, fork, restore, upload and download through ToolBackend on the local backend."""

from __future__ import annotations

import io
import os
import shutil
import signal
import tarfile
import typing
from pathlib import Path
from typing import Any

import pytest
import trio

from agent_harness import processes_with_env
from hermes_actors import (
    CheckpointLimitExceeded,
    CheckpointLost,
    SandboxConfig,
    Slot,
    ToolBackend,
    TransferFailed,
)
from hermes_actors._values import TreeOperation
from hermes_actors.runtime._sandbox import SandboxActor
from proc_support import eventually

BWRAP = shutil.which("bwrap") is not None and os.getuid() == 0


def config(**changes: Any) -> SandboxConfig:
    settings: dict[str, Any] = {
        "backend": "local",
        "isolation": "none",
        "slots_per_sandbox": 4,
        "min_sandboxes": 1,
        "max_sandboxes": 3,
        "acquire_timeout_s": 20.0,
    }
    settings.update(changes)
    return SandboxConfig(**settings)


ISOLATIONS = ["none", pytest.param("bwrap", marks=pytest.mark.skipif(not BWRAP, reason="no bwrap"))]


async def sh(backend: ToolBackend, slot: Slot, command: str) -> str:
    [result] = await backend.execute_batch([(slot, "bash", {"command": command})])
    assert result.success, result
    return result.output


TREE = (
    "mkdir -p repo/src empty && printf 'def f(): return 1\\n' > repo/src/m.py "
    "&& ln -s src/m.py repo/link && head -c 20000 /dev/urandom > repo/blob && printf x > .env"
)
SNAPSHOT = "find . -printf '%y %m %p %l\\n' | sort; md5sum repo/blob repo/src/m.py; cat .env"


def held(backend: ToolBackend) -> int:
    return sum(pool.slots_held for pool in backend.status().pools)


@pytest.mark.parametrize("isolation", ISOLATIONS)
async def test_forks_are_independent_of_each_other_and_of_the_source(isolation: str) -> None:
    """Forks start equal to the source, land in its sandbox, and then diverge independently."""
    async with ToolBackend(config(isolation=isolation)) as backend:
        source = await backend.acquire("t")
        await sh(backend, source, TREE)
        before = await sh(backend, source, SNAPSHOT)
        forks = await backend.fork(source, 3)
        assert {fork.sandbox_id for fork in forks} == {source.sandbox_id}
        assert len({fork.slot_id for fork in forks} | {source.slot_id}) == 4
        for fork in forks:
            assert await sh(backend, fork, SNAPSHOT) == before
        await sh(backend, forks[0], "printf 'def f(): return 2\\n' > repo/src/m.py; rm repo/blob")
        await sh(backend, forks[1], "rm -rf ./* .env")
        assert await sh(backend, source, SNAPSHOT) == before
        assert await sh(backend, forks[2], SNAPSHOT) == before
        assert await sh(backend, forks[1], "ls -A | wc -l") == "0\n"
        for slot in [source, *forks]:
            await backend.release(slot)
        assert held(backend) == 0


async def test_forks_spill_into_other_sandboxes_of_the_pool() -> None:
    """When the source's sandbox is full, forks land in other sandboxes with the same files."""
    async with ToolBackend(config(slots_per_sandbox=2)) as backend:
        source = await backend.acquire("t")
        await sh(backend, source, TREE)
        before = await sh(backend, source, SNAPSHOT)
        forks = await backend.fork(source, 3)
        sandboxes = [fork.sandbox_id for fork in forks]
        assert sandboxes.count(source.sandbox_id) == 1
        assert len(set(sandboxes)) == 2  # one more sandbox holds the other two
        for fork in forks:
            assert await sh(backend, fork, SNAPSHOT) == before


@pytest.mark.parametrize("isolation", ISOLATIONS)
async def test_restore_undoes_destructive_commands_in_any_slot(isolation: str) -> None:
    """After rm -rf, a broken file and a new one, restore brings back the checkpoint exactly."""
    async with ToolBackend(config(isolation=isolation, slots_per_sandbox=1)) as backend:
        slot = await backend.acquire("t")
        await sh(backend, slot, TREE)
        before = await sh(backend, slot, SNAPSHOT)
        checkpoint = await backend.checkpoint(slot)
        assert checkpoint.size_bytes >= 20000
        await sh(backend, slot, "rm -rf ./* .env; echo broken > junk")
        await backend.restore(slot, checkpoint)
        assert await sh(backend, slot, SNAPSHOT) == before
        # Another sandbox's slot (slots_per_sandbox=1) gets it through the host.
        other = await backend.acquire("u")
        assert other.sandbox_id != slot.sandbox_id
        await sh(backend, other, "echo stale > stale")
        await backend.restore(other, checkpoint)
        assert await sh(backend, other, SNAPSHOT) == before
        await backend.release_checkpoint(checkpoint)
        await backend.release_checkpoint(checkpoint)  # idempotent
        with pytest.raises(CheckpointLost):
            await backend.restore(slot, checkpoint)


async def test_a_killed_sandbox_keeps_whole_checkpoints_and_loses_overlay_changes() -> None:
    """A sandbox killed -9 still hands over the checkpoints it stored whole (moved out as it
    ends); one it kept as overlay changes on a lower layer is lost with it: restore names the
    sandbox and its fate and leaves the slot as it was; the pool replaces the sandbox."""
    async with ToolBackend(config(slots_per_sandbox=1, max_sandboxes=2)) as backend:
        doomed = await backend.acquire("t")
        await sh(backend, doomed, TREE)
        before = await sh(backend, doomed, SNAPSHOT)
        whole = await backend.checkpoint(doomed)
        await backend.restore(doomed, whole)  # an overlay on the checkpoint's tree
        changes = await backend.checkpoint(doomed)
        other = await backend.acquire("u")
        await sh(backend, other, "echo mine > mine")
        pid = doomed.lease.sandbox.handle.pid  # type: ignore[union-attr]
        os.killpg(pid, signal.SIGKILL)
        await wait_gone(backend, doomed.sandbox_id)
        if not changes.flat:  # where the agent may mount
            with pytest.raises(CheckpointLost) as lost:
                await backend.restore(other, changes)
            assert f"stored only in sandbox {doomed.sandbox_id}, which" in str(lost.value)
            assert "lost" in str(lost.value)
            assert await sh(backend, other, "cat mine") == "mine\n"
        await backend.restore(other, whole)
        assert await sh(backend, other, SNAPSHOT) == before
        await backend.release(other)
        await backend.release(doomed)


async def test_checkpoints_are_bounded_by_count_and_bytes() -> None:
    """Past max_checkpoints or max_checkpoint_bytes a checkpoint fails clearly; releasing frees."""
    async with ToolBackend(config(max_checkpoints=2, max_checkpoint_bytes=70_000)) as backend:
        slot = await backend.acquire("t")
        await sh(backend, slot, "head -c 20000 /dev/urandom > a")
        first = await backend.checkpoint(slot)
        second = await backend.checkpoint(slot)
        with pytest.raises(CheckpointLimitExceeded, match="count"):
            await backend.checkpoint(slot)
        await backend.release_checkpoint(first)
        await sh(backend, slot, "head -c 40000 /dev/urandom > b")
        with pytest.raises(CheckpointLimitExceeded, match="bytes"):
            await backend.checkpoint(slot)  # 60 kB on top of 20 kB > 70 kB: refused, dropped
        await backend.release_checkpoint(second)
        third = await backend.checkpoint(slot)
        assert third.size_bytes == 60000
        pools = backend.status().pools
        assert pools[0].sandboxes  # still up


async def test_checkpoint_storage_goes_with_release_and_with_the_backend(tmp_path: Path) -> None:
    """Released checkpoints leave no files; the rest vanish with the sandbox when it stops."""
    async with ToolBackend(config()) as backend:
        slot = await backend.acquire("t")
        await sh(backend, slot, TREE)
        kept = await backend.checkpoint(slot)
        dropped = await backend.checkpoint(slot)
        await backend.release_checkpoint(dropped)
        root = Path((await sh(backend, slot, "cd .. && pwd")).strip())
        stored = sorted(p.name for p in (root / ".hermes-checkpoints").iterdir())
        assert stored == [kept.checkpoint_id]
    assert not await trio.Path(root).exists()


async def test_cancelled_fork_leaves_no_slot_held() -> None:
    """A fork cancelled at any stage gives back every slot it had taken."""
    async with ToolBackend(config()) as backend:
        source = await backend.acquire("t")
        await sh(backend, source, "head -c 30000000 /dev/urandom > big")
        cancelled = 0
        # How far a fork gets before a deadline depends on the machine: sweep the deadline
        # from before the first acquire to past the copy, and check every cancelled case.
        for deadline in (0.0, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3):
            with trio.move_on_after(deadline) as scope:
                forks = await backend.fork(source, 3)
            if scope.cancelled_caught:
                cancelled += 1
                assert held(backend) == 1, f"cancelled after {deadline} s"
            else:
                assert held(backend) == 4
                for fork in forks:
                    await backend.release(fork, reset_workspace=True)
        assert cancelled >= 2


def make_tree(root: Path) -> None:
    (root / "pkg" / "deep").mkdir(parents=True)
    (root / "empty_dir").mkdir()
    (root / "pkg" / "data.bin").write_bytes(bytes(range(256)) * 1000)
    (root / "pkg" / "deep" / "text.txt").write_text("hello\n")
    (root / "link_to_data").symlink_to("pkg/data.bin")
    (root / "dangling").symlink_to("nowhere")
    (root / "script.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "script.sh").chmod(0o755)


def describe(root: Path) -> list[tuple[str, str, str]]:
    found = []
    for path in sorted(root.rglob("*")):
        relative = str(path.relative_to(root))
        if path.is_symlink():
            found.append((relative, "link", os.readlink(path)))
        elif path.is_dir():
            found.append((relative, "dir", ""))
        else:
            found.append((relative, oct(path.stat().st_mode & 0o777), path.read_bytes().hex()))
    return found


@pytest.mark.parametrize("isolation", ISOLATIONS)
async def test_upload_and_download_round_trip_a_tree(isolation: str, tmp_path: Path) -> None:
    """Symlinks, dangling links, empty dirs, modes and binary files survive up and down."""
    source = tmp_path / "source"
    source.mkdir()
    make_tree(source)
    async with ToolBackend(config(isolation=isolation)) as backend:
        slot = await backend.acquire("t")
        await backend.upload(slot, source, "proj")
        assert await sh(backend, slot, "readlink proj/link_to_data; ./proj/script.sh") == (
            "pkg/data.bin\nhi\n"
        )
        await backend.download(slot, "proj", tmp_path / "back")
        assert describe(tmp_path / "back") == describe(source)
        # As tar streams: into a file-like object, and back from bytes.
        stream = io.BytesIO()
        await backend.download(slot, "proj", stream)
        with tarfile.open(fileobj=io.BytesIO(stream.getvalue())) as archive:
            assert "./pkg/deep/text.txt" in archive.getnames()
        await backend.upload(slot, stream.getvalue(), "copy")
        await backend.download(slot, "copy", tmp_path / "copy")
        assert describe(tmp_path / "copy") == describe(source)


async def test_transfer_errors_are_clear(tmp_path: Path) -> None:
    """A missing local source, a missing remote path and a non-tar stream fail clearly."""
    async with ToolBackend(config()) as backend:
        slot = await backend.acquire("t")
        with pytest.raises(TransferFailed, match="not a directory"):
            await backend.upload(slot, tmp_path / "missing", ".")
        with pytest.raises(Exception, match="does not exist"):
            await backend.download(slot, "nope", tmp_path / "out")
        with pytest.raises(TransferFailed, match="tar"):
            await backend.upload(slot, b"this is not a tar archive" * 100, ".")
        assert await sh(backend, slot, "echo still fine") == "still fine\n"


async def test_forks_and_restores_carry_the_shell_cwd_and_exports() -> None:
    """The slot's shell state (cwd, exported variables) reaches forks, in and across
    sandboxes, and comes back with a restore."""
    async with ToolBackend(config(slots_per_sandbox=2)) as backend:
        source = await backend.acquire("t")
        await sh(backend, source, "mkdir -p a/b && cd a/b && export FOO=bar")
        checkpoint = await backend.checkpoint(source)
        near, far = await backend.fork(source, 2)
        assert near.sandbox_id == source.sandbox_id != far.sandbox_id
        for slot in (near, far):
            assert await sh(backend, slot, 'basename "$PWD"; echo "$FOO"') == "b\nbar\n"
        await sh(backend, source, "cd / && export FOO=changed")
        await backend.restore(source, checkpoint)
        assert await sh(backend, source, 'basename "$PWD"; echo "$FOO"') == "b\nbar\n"


class StepCanceller:
    """Wraps the one way to an agent (`SandboxActor.call`) for tree operations: when armed
    with step k, cancels the caller's scope at the k-th step, a step being the moment before a
    tree request is sent or the moment its answer is back; cleanups after that run (shielded)
    unhindered."""

    def __init__(self, original: Any) -> None:
        self.original = original
        self.step = 0
        self.cancel_at = 0
        self.scope: trio.CancelScope | None = None

    def arm(self, cancel_at: int, scope: trio.CancelScope) -> None:
        self.step, self.cancel_at, self.scope = 0, cancel_at, scope

    def _tick(self) -> None:
        self.step += 1
        if self.step == self.cancel_at and self.scope is not None:
            self.scope.cancel(reason="cancellation sweep")

    async def __call__(self, sandbox: Any, slot: int, operation: Any, **options: Any) -> Any:
        if not isinstance(operation, typing.get_args(TreeOperation)):
            return await self.original(sandbox, slot, operation, **options)
        self._tick()
        answer = await self.original(sandbox, slot, operation, **options)
        self._tick()
        return answer


def tree_helpers(sandbox_ids: set[str]) -> list[int]:
    """Live helper processes (cp, tar, rm, chown) of these sandboxes."""
    found = []
    for sandbox_id in sandbox_ids:
        for pid in processes_with_env(f"HERMES_SANDBOX_ID={sandbox_id}"):
            try:
                with open(f"/proc/{pid}/comm", encoding="utf-8") as handle:
                    if handle.read().strip() in ("cp", "tar", "rm", "chown"):
                        found.append(pid)
            except OSError:
                continue
    return found


async def settle(done: Any, seconds: float = 5.0) -> None:
    """Wait until `done()` (what the agent removes or reaps in the background), at most
    `seconds`."""
    for _ in range(int(seconds / 0.02)):
        if done():
            return
        await trio.sleep(0.02)


def stored(root: Path, prefix: str = "") -> list[str]:
    directory = root / prefix if prefix else root
    return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []


SWEPT = ["checkpoint", "fork", "restore", "restore_across", "upload", "download", "drop"]


@pytest.mark.parametrize("operation", SWEPT)
async def test_a_tree_op_cancelled_at_any_step_leaves_nothing_behind(
    operation: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled before any agent request or after any answer, a tree op leaves no slot held,
    no checkpoint half-registered, no helper process and no stored tree behind."""
    steps = StepCanceller(SandboxActor.call)

    async def call(self: SandboxActor, slot: int, operation: Any, **options: Any) -> Any:
        return await steps(self, slot, operation, **options)

    monkeypatch.setattr(SandboxActor, "call", call)
    big = 9 * 1024 * 1024  # three tar chunks: transfers take several steps
    async with ToolBackend(config(slots_per_sandbox=2, max_sandboxes=2)) as backend:
        source = await backend.acquire("t")
        near = await backend.acquire("u")  # the source's sandbox is full now
        far = await backend.acquire("v")
        assert far.sandbox_id != source.sandbox_id == near.sandbox_id
        await sh(backend, source, TREE + f" && head -c {big} /dev/urandom > big")
        roots = {
            slot.sandbox_id: Path((await sh(backend, slot, "cd .. && pwd")).strip())
            for slot in (source, far)
        }
        kept = await backend.checkpoint(source)
        ledger = (await backend._core._runtime._pool(source.profile)).checkpoints  # type: ignore[union-attr]
        upload_tar = io.BytesIO()
        with tarfile.open(fileobj=upload_tar, mode="w") as archive:
            info = tarfile.TarInfo("up/data.bin")
            info.size = big
            archive.addfile(info, io.BytesIO(os.urandom(big)))

        async def run() -> Any:
            if operation == "checkpoint":
                return await backend.checkpoint(source)
            if operation == "fork":
                return await backend.fork(source, 1)
            if operation == "restore":
                return await backend.restore(near, kept)
            if operation == "restore_across":
                return await backend.restore(far, kept)
            if operation == "upload":
                return await backend.upload(source, upload_tar.getvalue(), "in")
            if operation == "download":
                return await backend.download(source, ".", io.BytesIO())
            assert operation == "drop"
            return await backend.release_checkpoint(victim)

        cancelled = 0
        for cancel_at in range(1, 60):
            victim = await backend.checkpoint(source) if operation == "drop" else None
            if operation == "fork":
                await backend.release(near, reset_workspace=True)  # a free slot to fork into
            with trio.CancelScope() as scope:
                steps.arm(cancel_at, scope)
                result = await run()
            reached = steps.step >= cancel_at
            steps.arm(0, scope)
            cancelled += scope.cancelled_caught
            if operation == "fork":
                near = result[0] if not scope.cancelled_caught else await backend.acquire("u")
            if operation == "checkpoint" and not scope.cancelled_caught:
                await backend.release_checkpoint(result)
            where = f"{operation} cancelled at step {cancel_at}"
            assert held(backend) == 3, where
            expected = {kept.checkpoint_id}
            assert {c.checkpoint_id for c in ledger._held.values()} == expected, where
            assert ledger._reserved == 0, where
            for root in roots.values():
                assert not [n for n in stored(root) if n.startswith(".hermes-stage-")], where
            local = stored(roots[source.sandbox_id], ".hermes-checkpoints")
            assert local == sorted(expected), where
            await settle(lambda: not tree_helpers(set(roots)))
            assert tree_helpers(set(roots)) == [], where
            if not reached:  # it ran to its end before the step: every step was swept
                break
        assert cancel_at > 1  # at least one step was swept
        if operation != "drop":  # (a drop is shielded: it completes whenever it is cancelled)
            assert cancelled >= 1
        await backend.release_checkpoint(kept)
        for slot in (source, near, far):
            await backend.release(slot, reset_workspace=True)
        for root in roots.values():
            assert stored(root, ".hermes-checkpoints") == []
            await settle(lambda: not stored(root, ".hermes-layers"))  # noqa: B023
            assert stored(root, ".hermes-layers") == []


@pytest.mark.parametrize("isolation", ISOLATIONS)
async def test_released_forks_leave_no_mount_and_no_layer(isolation: str) -> None:
    """Forks are copy-on-write mounts owned by their slot; resets leave no mount or layer."""
    async with ToolBackend(config(isolation=isolation, max_sandboxes=1)) as backend:
        source = await backend.acquire("t")
        await sh(backend, source, TREE)
        forks = await backend.fork(source, 3)
        count_mounts = "grep -c ' - overlay ' /proc/self/mountinfo || true"
        assert await sh(backend, source, count_mounts) == "4\n"
        for index, fork in enumerate(forks):
            await sh(backend, fork, f"printf {index} > repo/blob && touch mine")
        if isolation == "bwrap":  # each fork owns its files; no other slot reaches them
            mine = await sh(backend, forks[0], "stat -c %u repo/src/m.py; id -u")
            assert len(set(mine.split())) == 1
            others = " ".join(f"../slot-{slot.lease.index}/repo" for slot in (source, *forks[1:]))
            [peek] = await backend.execute_batch(
                [(forks[0], "bash", {"command": f"ls {others} 2>&1 | grep -c denied"})]
            )
            assert peek.output.strip() == "3"
        assert await sh(backend, source, "md5sum repo/blob; ls mine 2>&1 | wc -l") != ""
        directory = Path(source.lease.sandbox.handle._directory)  # type: ignore[union-attr]
        for slot in [*forks, source]:
            await backend.release(slot, reset_workspace=True)
        probe = await backend.acquire("probe")
        assert await sh(backend, probe, count_mounts) == "0\n"
        await settle(lambda: not stored(directory / "ws", ".hermes-layers"))
        assert stored(directory / "ws", ".hermes-layers") == []
        await backend.release(probe, reset_workspace=True)


async def wait_gone(backend: ToolBackend, sandbox_id: str) -> None:
    """Until the pool no longer lists `sandbox_id` (bounded)."""
    await eventually(
        lambda: all(
            s.sandbox_id != sandbox_id for pool in backend.status().pools for s in pool.sandboxes
        ),
        30.0,
        f"{sandbox_id} stopped",
    )


SHELL_STATE = 'basename "$PWD"; echo "$STAGE"'


def tars(directory: Path) -> list[str]:
    """The checkpoint copies in a pool's directory (beside its owner record)."""
    return sorted(p.name for p in directory.iterdir() if p.name != "owner.json")


async def test_a_checkpoint_outlives_its_sandbox_stopped_for_idleness() -> None:
    """When an idle sandbox stops, its checkpoints move into a directory of the pool's: a
    restore into another sandbox works from there, they still count against the bounds, and
    each is removed on release; the pool's directory goes with the backend."""
    settings = config(
        slots_per_sandbox=1, min_sandboxes=0, max_sandboxes=2, idle_timeout=0.5, max_checkpoints=1
    )
    async with ToolBackend(settings) as backend:
        slot = await backend.acquire("t")
        await sh(backend, slot, TREE + " && mkdir -p deep && cd deep && export STAGE=setup")
        before = await sh(backend, slot, f"(cd ~ && {SNAPSHOT})")
        checkpoint = await backend.checkpoint(slot)
        ledger = (await backend._core._runtime._pool(slot.profile)).checkpoints  # type: ignore[union-attr]
        await backend.release(slot)
        await wait_gone(backend, slot.sandbox_id)
        directory = ledger.directory
        assert directory is not None
        assert tars(directory) == [f"{checkpoint.checkpoint_id}.tree"]
        stats = ledger.statistics()
        assert (stats.count, stats.size_bytes) == (1, checkpoint.size_bytes)
        with pytest.raises(CheckpointLimitExceeded, match="count"):
            await backend.checkpoint(other := await backend.acquire("u"))
        await sh(backend, other, "echo stale > stale")
        await backend.restore(other, checkpoint)
        assert await sh(backend, other, f"(cd ~ && {SNAPSHOT})") == before
        assert await sh(backend, other, SHELL_STATE) == "deep\nsetup\n"
        await backend.release_checkpoint(checkpoint)
        assert tars(directory) == []
        with pytest.raises(CheckpointLost, match="released"):
            await backend.restore(other, checkpoint)
        again = await backend.checkpoint(other)  # room again
        await backend.release(other)
        await wait_gone(backend, other.sandbox_id)
        assert tars(directory) == [f"{again.checkpoint_id}.tree"]
    assert not directory.exists()  # with the backend, unreleased copies included


async def test_checkpoints_are_kept_or_copied_out_at_rotation_and_survive_a_kill() -> None:
    """A whole checkpoint is moved out of its sandbox when that ends; one kept as overlay
    changes is copied out at the rotation point, its slot still held: after a kill -9 of the
    sandbox both restore elsewhere, and both go on release."""
    settings = config(slots_per_sandbox=1, min_sandboxes=0, max_sandboxes=3, max_lifetime=3.0)
    async with ToolBackend(settings) as backend:
        slot = await backend.acquire("t")
        await sh(backend, slot, TREE)
        before = await sh(backend, slot, SNAPSHOT)
        whole = await backend.checkpoint(slot)
        await backend.restore(slot, whole)  # an overlay on the checkpoint's tree, where it mounts
        await sh(backend, slot, "echo b > b")
        changes = await backend.checkpoint(slot)
        ledger = (await backend._core._runtime._pool(slot.profile)).checkpoints  # type: ignore[union-attr]
        if not changes.flat:  # rotation at 2.7 s: copied out, the slot still held
            await eventually(lambda: ledger.copy_of(changes) is not None, 30.0, "the copy")
        assert ledger.copy_of(whole) is None  # moved out only when the sandbox ends
        assert held(backend) == 1
        pid = slot.lease.sandbox.handle.pid  # type: ignore[union-attr]
        os.killpg(pid, signal.SIGKILL)
        await wait_gone(backend, slot.sandbox_id)
        other = await backend.acquire("u")
        await backend.restore(other, whole)
        assert await sh(backend, other, SNAPSHOT) == before
        await backend.restore(other, changes)
        assert await sh(backend, other, "cat b; cat repo/src/m.py") == "b\ndef f(): return 1\n"
        assert ledger.directory is not None
        assert tars(ledger.directory) == sorted(
            [f"{whole.checkpoint_id}.tree", f"{changes.checkpoint_id}.tree"]
            if changes.flat
            else [f"{whole.checkpoint_id}.tree", f"{changes.checkpoint_id}.tar"]
        )
        for checkpoint in (whole, changes):
            await backend.release_checkpoint(checkpoint)
        assert tars(ledger.directory) == []
        await backend.release(other)
        await backend.release(slot)
