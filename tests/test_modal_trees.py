"""Forks across Modal sandboxes through directory snapshots, driven through the emulator.

The real `modal` client talks to `ModalEmulator`; its call log shows which provider calls a
fork made, and into which sandbox (by task id).
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import pytest
import trio
from grpclib import Status

from hermes_actors import CheckpointLost, SandboxConfig, Slot, ToolBackend, TransferFailed
from hermes_actors.drivers._modal import SNAPSHOT_TTL_S
from hermes_actors.runtime._trees import DURABLE_SNAPSHOT_TTL_S
from hermes_actors.testing.modal_emulator import ModalEmulator

APP = "hermes-tree-tests"
#: Provider calls a fork makes (stdout reads and the liveness long poll are not the fork's).
FORK_CALLS = (
    "TaskSnapshotDirectory",
    "TaskMountDirectory",
    "TaskUnmountDirectory",
    "TaskExecStdinWrite",
    "SandboxCreateV2",
    "TaskExecStart",
)
TREE = (
    "mkdir -p repo/src empty && printf 'def f(): return 1\\n' > repo/src/m.py "
    "&& ln -s src/m.py repo/link && head -c 20000 /dev/urandom > repo/blob && printf x > .env "
    "&& mkdir -p deep/a && cd deep/a && export ANSWER=42"
)
#: In a subshell: the slot's shell keeps its working directory.
SNAPSHOT = (
    "(cd ~ && find . -printf '%y %m %p %l\\n' | sort; md5sum repo/blob repo/src/m.py; cat .env)"
)


def backend(**changes: Any) -> ToolBackend:
    settings: dict[str, Any] = {
        "name": "trees",
        "backend": "modal",
        "app_name": APP,
        "cpu": 0.5,
        "memory": 256,
        "min_sandboxes": 1,
        "max_sandboxes": 4,
        "slots_per_sandbox": 1,
        "acquire_timeout_s": 20.0,
        **changes,
    }
    return ToolBackend(SandboxConfig(**settings))


async def sh(tools: ToolBackend, slot: Slot, command: str) -> str:
    [result] = await tools.execute_batch([(slot, "bash", {"command": command})])
    assert result.success, result
    return result.output


def fork_calls(emulator: ModalEmulator, since: int) -> list[Any]:
    return [call for call in emulator.calls()[since:] if call.method in FORK_CALLS]


def held(tools: ToolBackend) -> int:
    return sum(pool.slots_held for pool in tools.status().pools)


@pytest.mark.parametrize("slots_per_sandbox", [1, 2])
async def test_cross_sandbox_forks_are_independent_and_cost_three_calls_per_target(
    modal_emulator: ModalEmulator, slots_per_sandbox: int
) -> None:
    """Forks into other sandboxes get the source's files and shell state through one snapshot,
    with at most three provider calls per target sandbox, then diverge independently."""
    async with backend(slots_per_sandbox=slots_per_sandbox) as tools:
        source = await tools.acquire("t")
        await sh(tools, source, TREE)
        before = await sh(tools, source, SNAPSHOT)
        # The source's sandbox is full: the forks need new sandboxes (made before counting).
        fillers = [await tools.acquire(f"fill{n}") for n in range(slots_per_sandbox - 1)]
        warm = [await tools.acquire(f"warm{n}") for n in range(2 * slots_per_sandbox)]
        for slot in warm:
            await tools.release(slot)
        since = len(modal_emulator.calls())
        forks = await tools.fork(source, 2 * slots_per_sandbox)
        calls = fork_calls(modal_emulator, since)
        targets = {fork.sandbox_id for fork in forks}
        assert source.sandbox_id not in targets
        assert len(targets) == 2
        methods = Counter(call.method for call in calls)
        assert methods["TaskSnapshotDirectory"] == 1
        assert methods["TaskMountDirectory"] == methods["TaskUnmountDirectory"] == 2
        assert methods["SandboxCreateV2"] == 0
        task_of = {state.sandbox_id: state.task_id for state in modal_emulator.sandboxes()}
        for target in targets:
            per_target = [c for c in calls if c.fields.get("task_id") == task_of[target]]
            assert len(per_target) <= 3, per_target
        for fork in forks:
            assert await sh(tools, fork, SNAPSHOT) == before
            state = await sh(tools, fork, 'basename "$PWD"; echo "$ANSWER"; whoami')
            assert state == f"a\n42\nslot{fork.lease.index}\n"
        await sh(tools, forks[0], "(cd ~ && printf 'def f(): return 2\\n' > repo/src/m.py)")
        await sh(tools, forks[1], "(cd ~ && rm -rf ./* .env)")
        assert await sh(tools, source, SNAPSHOT) == before
        for fork in forks[2:]:
            assert await sh(tools, fork, SNAPSHOT) == before
        assert await sh(tools, forks[1], "(cd ~ && ls -A | wc -l)") == "0\n"
        assert all(state.mounts == () for state in modal_emulator.sandboxes())
        for slot in [source, *fillers, *forks]:
            await tools.release(slot)
        assert held(tools) == 0
    [snapshot] = modal_emulator.calls("TaskSnapshotDirectory")
    assert snapshot.fields["ttl_seconds"] == SNAPSHOT_TTL_S


async def test_a_fork_within_the_sandbox_makes_no_control_plane_call(
    modal_emulator: ModalEmulator,
) -> None:
    """A fork into free slots of the source's own sandbox makes no call but to its agent."""
    async with backend(slots_per_sandbox=4, max_sandboxes=1) as tools:
        source = await tools.acquire("t")
        await sh(tools, source, TREE)
        before = await sh(tools, source, SNAPSHOT)
        since = len(modal_emulator.calls())
        forks = await tools.fork(source, 3)
        # The fork's request; the client's heartbeat (every 20 s) may write in the window too.
        methods = {call.method for call in fork_calls(modal_emulator, since)}
        assert methods == {"TaskExecStdinWrite"}
        for fork in forks:
            assert fork.sandbox_id == source.sandbox_id
            assert await sh(tools, fork, SNAPSHOT) == before


@pytest.mark.parametrize(
    "failing", ["TaskSnapshotDirectory", "TaskMountDirectory", "TaskUnmountDirectory"]
)
async def test_snapshot_faults_give_a_clear_error_and_leave_nothing(
    modal_emulator: ModalEmulator, failing: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A failing snapshot or mount fails the fork with TransferFailed naming the step and holds
    no slot; an unmount failing once is retried. No mount stays in any sandbox either way."""
    async with backend(min_sandboxes=3) as tools:
        source = await tools.acquire("t")
        await sh(tools, source, TREE)
        modal_emulator.fail_next_calls(failing, 1, Status.FAILED_PRECONDITION, "emulated outage")
        if failing == "TaskUnmountDirectory":
            with caplog.at_level(logging.INFO, logger="hermes_actors.trees"):
                forks = await tools.fork(source, 2)
            assert "unmounting the snapshot" in caplog.text
            assert len(modal_emulator.calls("TaskUnmountDirectory")) == 3
            assert len(forks) == 2
            for fork in forks:
                await tools.release(fork)
        else:
            with pytest.raises(TransferFailed) as caught:
                await tools.fork(source, 2)
            step = "snapshotting" if failing == "TaskSnapshotDirectory" else "mounting"
            assert step in str(caught.value)
            assert "emulated outage" in str(caught.value)
            assert "retry the fork" in str(caught.value)
        assert held(tools) == 1
        assert [state.mounts for state in modal_emulator.sandboxes() if state.mounts] == []
        # The fork works again once the provider does.
        forks = await tools.fork(source, 2)
        for fork in forks:
            assert await sh(tools, fork, "cat ~/.env") == "x"
            await tools.release(fork)
        await tools.release(source)
        assert held(tools) == 0


async def test_cancelled_cross_sandbox_fork_leaves_no_slot_or_mount(
    modal_emulator: ModalEmulator,
) -> None:
    """A fork across sandboxes cancelled at any stage holds no slot and leaves no mount."""
    async with backend(min_sandboxes=3) as tools:
        source = await tools.acquire("t")
        await sh(tools, source, "head -c 20000000 /dev/urandom > big")
        cancelled = 0
        # How far a fork gets before a deadline depends on the machine: sweep the deadline
        # from before the first acquire to past the copy, and check every cancelled case.
        for deadline in (0.0, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0):
            with trio.move_on_after(deadline) as scope:
                forks = await tools.fork(source, 2)
            if scope.cancelled_caught:
                cancelled += 1
                assert held(tools) == 1, f"cancelled after {deadline} s"
            else:
                assert held(tools) == 3
                for fork in forks:
                    await tools.release(fork, reset_workspace=True)
            mounts = [state.mounts for state in modal_emulator.sandboxes() if state.mounts]
            assert mounts == [], f"after {deadline} s"
        assert cancelled >= 2
        await tools.release(source)


async def test_a_checkpoint_restores_in_any_sandbox_through_one_snapshot_that_outlives_it(
    modal_emulator: ModalEmulator,
) -> None:
    """A checkpoint restores into its own slot with no provider call and into another sandbox's
    through one snapshot (three calls; two for the next restore, the snapshot kept); that
    snapshot outlives the provider ending the checkpoint's sandbox, and goes on release."""
    async with backend(max_lifetime=600.0) as tools:
        source = await tools.acquire("t")
        await sh(tools, source, TREE)
        before = await sh(tools, source, SNAPSHOT)
        checkpoint = await tools.checkpoint(source)
        await sh(tools, source, "(cd ~ && rm -rf ./* .env) && cd ~ && export ANSWER=0")
        since = len(modal_emulator.calls())
        await tools.restore(source, checkpoint)
        assert [c.method for c in fork_calls(modal_emulator, since)] == ["TaskExecStdinWrite"]
        assert await sh(tools, source, SNAPSHOT) == before
        other = await tools.acquire("u")  # one slot per sandbox: another sandbox
        assert other.sandbox_id != source.sandbox_id
        await sh(tools, other, "echo stale > stale")
        since = len(modal_emulator.calls())
        await tools.restore(other, checkpoint)
        provider = Counter(
            c.method for c in fork_calls(modal_emulator, since) if c.method != "TaskExecStdinWrite"
        )
        assert provider == {
            "TaskSnapshotDirectory": 1,
            "TaskMountDirectory": 1,
            "TaskUnmountDirectory": 1,
        }
        assert await sh(tools, other, SNAPSHOT) == before
        state = await sh(tools, other, 'basename "$PWD"; echo "$ANSWER"; whoami')
        assert state == f"a\n42\nslot{other.lease.index}\n"
        [kept] = modal_emulator.snapshot_images()
        modal_emulator.kill_sandbox(source.sandbox_id, "timeout")
        for _ in range(400):  # until the pool hears of the loss (20 s at most)
            if held(tools) == 1:
                break
            await trio.sleep(0.05)
        await sh(tools, other, "(cd ~ && rm -rf ./*)")
        since = len(modal_emulator.calls())
        await tools.restore(other, checkpoint)
        provider = Counter(
            c.method for c in fork_calls(modal_emulator, since) if c.method != "TaskExecStdinWrite"
        )
        assert provider == {"TaskMountDirectory": 1, "TaskUnmountDirectory": 1}
        assert await sh(tools, other, SNAPSHOT) == before
        await tools.release_checkpoint(checkpoint)
        [deleted] = modal_emulator.calls("ImageDelete")
        assert deleted.fields["image_id"] == kept
        assert modal_emulator.snapshot_images() == []
        with pytest.raises(CheckpointLost, match="released"):
            await tools.restore(other, checkpoint)
        await tools.release(other)
    [snapshot] = modal_emulator.calls("TaskSnapshotDirectory")
    assert snapshot.fields["ttl_seconds"] == DURABLE_SNAPSHOT_TTL_S


async def test_a_checkpoint_only_in_its_sandbox_is_lost_when_the_provider_ends_it(
    modal_emulator: ModalEmulator,
) -> None:
    """A checkpoint never copied out of its sandbox goes with it when the provider ends it:
    restore says so and what to do, and leaves the slot as it was."""
    async with backend(max_lifetime=600.0) as tools:
        source = await tools.acquire("t")
        await sh(tools, source, TREE)
        checkpoint = await tools.checkpoint(source)
        other = await tools.acquire("u")
        await sh(tools, other, "echo mine > mine")
        modal_emulator.kill_sandbox(source.sandbox_id, "timeout")
        for _ in range(400):  # until the pool hears of the loss (20 s at most)
            if held(tools) == 1:
                break
            await trio.sleep(0.05)
        with pytest.raises(CheckpointLost) as lost:
            await tools.restore(other, checkpoint)
        message = str(lost.value)
        assert f"stored only in sandbox {source.sandbox_id}, which was lost" in message
        assert "max_lifetime (600 s" in message
        assert message.endswith("take a new checkpoint")
        assert await sh(tools, other, "cat mine") == "mine\n"
        await tools.release_checkpoint(checkpoint)  # idempotent for a lost one
        with pytest.raises(CheckpointLost, match="released"):
            await tools.restore(other, checkpoint)
        await tools.release(other)
    assert modal_emulator.calls("TaskSnapshotDirectory") == []


async def test_checkpoints_are_snapshotted_before_an_idle_sandbox_stops_and_deleted_at_stop(
    modal_emulator: ModalEmulator,
) -> None:
    """Before the pool stops an idle Modal sandbox, each checkpoint there is snapshotted (one
    call each), or, one the agent keeps as overlay changes only (the emulator may mount),
    tarred to the host: restores work after it stopped; the copies still held are deleted
    when the backend stops."""
    async with backend(min_sandboxes=0, idle_timeout=1.0) as tools:
        source = await tools.acquire("t")
        await sh(tools, source, TREE)
        before = await sh(tools, source, SNAPSHOT)
        checkpoints = [await tools.checkpoint(source) for _ in range(2)]
        await tools.release(source)
        for _ in range(600):  # until the idle sandbox stopped (30 s at most)
            if not tools.status().pools[0].sandboxes:
                break
            await trio.sleep(0.05)
        assert not tools.status().pools[0].sandboxes
        flat = sum(checkpoint.flat for checkpoint in checkpoints)
        assert flat >= 1  # the first is the workspace itself
        assert len(modal_emulator.calls("TaskSnapshotDirectory")) == flat
        assert len(modal_emulator.snapshot_images()) == flat
        ledger = (await tools._core._runtime._pool("trees")).checkpoints  # type: ignore[union-attr]
        directory = ledger.directory
        tars = [] if directory is None else sorted(p.name for p in directory.glob("*.tar"))
        assert tars == sorted(f"{c.checkpoint_id}.tar" for c in checkpoints if not c.flat)
        other = await tools.acquire("u")
        for checkpoint in checkpoints:
            await sh(tools, other, "(cd ~ && rm -rf ./* .env)")
            await tools.restore(other, checkpoint)
            assert await sh(tools, other, SNAPSHOT) == before
        await tools.release(other)
    assert len(modal_emulator.calls("ImageDelete")) == flat
    assert modal_emulator.snapshot_images() == []
    assert directory is None or not directory.exists()
