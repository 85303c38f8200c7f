"""The profile pool on the virtual clock, with the fake driver: scaling, fairness, failures."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.lowlevel
import trio.testing

from hermes_actors._config import SandboxConfig
from hermes_actors._errors import (
    AcquireTimeout,
    AgentError,
    CheckpointLost,
    IsolationUnavailable,
    SandboxLost,
    SandboxStartFailed,
)
from hermes_actors._trio import Reply
from hermes_actors._values import Command, ListFiles, ReadFile, WriteFile
from hermes_actors.runtime import _pool as pool_module
from hermes_actors.runtime._pool import LOST_PRIORITY_S, Lease, ProfilePool, Release
from hermes_actors.runtime._trees import Checkpoint, CheckpointLedger, TarCopy, restore
from hermes_actors.testing.fake_driver import FakeDriver


@attrs.frozen
class Harness:
    pool: ProfilePool
    driver: FakeDriver
    nursery: trio.Nursery


@asynccontextmanager
async def running_pool(**config: object) -> AsyncIterator[Harness]:
    settings = SandboxConfig(**{"name": "test", "backend": "local", **config})  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        driver = FakeDriver(nursery)
        driver.create_latency_s = 1.0
        pool = ProfilePool(settings, driver)
        await nursery.start(pool.run)
        try:
            yield Harness(pool, driver, nursery)
        finally:
            nursery.cancel_scope.cancel()


async def test_prewarms_min_sandboxes(autojump_clock: trio.abc.Clock) -> None:
    """min_sandboxes start at once and are ready after one create latency."""
    async with running_pool(min_sandboxes=2, max_sandboxes=4, slots_per_sandbox=3) as h:
        await trio.sleep(1.0)
        await trio.testing.wait_all_tasks_blocked()
        stats = h.pool.statistics()
        assert [s.state for s in stats.sandboxes] == ["ready", "ready"]
        assert stats.slots_free == 6
        assert h.driver.created == 2


async def test_scales_up_under_load_and_bounds(autojump_clock: trio.abc.Clock) -> None:
    """Waiters beyond free slots start sandboxes up to max_sandboxes; the rest time out."""
    async with running_pool(
        min_sandboxes=1, max_sandboxes=3, slots_per_sandbox=2, max_starting=4
    ) as h:
        leases: list[Lease] = []

        async def take() -> None:
            leases.append(await h.pool.acquire(timeout_s=10))

        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for _ in range(6):
                nursery.start_soon(take)
        assert trio.current_time() - start == pytest.approx(1.0)
        assert len({lease.slot_id for lease in leases}) == 6
        assert h.driver.max_alive == 3
        with pytest.raises(AcquireTimeout) as timeout:
            await h.pool.acquire(timeout_s=5)
        assert trio.current_time() - start == pytest.approx(6.0)
        assert "raise max_sandboxes" in str(timeout.value)
        assert h.pool.statistics().waiters == 0


async def test_scales_down_after_idle_timeout(autojump_clock: trio.abc.Clock) -> None:
    """Sandboxes idle for idle_timeout stop, down to min_sandboxes, at the exact time."""
    async with running_pool(
        min_sandboxes=1, max_sandboxes=3, slots_per_sandbox=1, idle_timeout=120.0
    ) as h:
        await trio.sleep(1.0)
        leases = [await h.pool.acquire() for _ in range(3)]
        for lease in leases:
            await h.pool.release(lease)
        released_at = trio.current_time()
        assert len(h.pool.statistics().sandboxes) == 3
        await trio.sleep_until(released_at + 119.9)
        assert len(h.pool.statistics().sandboxes) == 3
        await trio.sleep_until(released_at + 120.1)
        assert len(h.pool.statistics().sandboxes) == 1
        assert h.driver.terminated == 2
        assert h.pool.statistics().sandboxes_stopped == 2


async def test_idle_sandboxes_stop_in_the_order_they_went_idle(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Each idle sandbox stops exactly idle_timeout after its own last release, oldest first."""
    async with running_pool(
        min_sandboxes=2, max_sandboxes=6, slots_per_sandbox=2, idle_timeout=60.0
    ) as h:
        leases = [await h.pool.acquire(timeout_s=10) for _ in range(12)]
        by_sandbox: dict[str, list[Lease]] = {}
        for lease in leases:
            by_sandbox.setdefault(lease.sandbox_id, []).append(lease)
        order = sorted(by_sandbox)
        # Sandbox k goes idle at 10 k seconds; one slot of it is released earlier (still busy).
        start = trio.current_time()
        for k, sandbox_id in enumerate(order):
            first, second = by_sandbox[sandbox_id]
            await h.pool.release(first)
            await trio.sleep_until(start + 10 * (k + 1))
            await h.pool.release(second)
        stats = h.pool.statistics()
        assert stats.slots_free == 12
        assert stats.slots_held == 0
        stopped: list[str] = []
        for k, sandbox_id in enumerate(order[:4]):
            await trio.sleep_until(start + 10 * (k + 1) + 60 - 0.1)
            alive = {s.sandbox_id for s in h.pool.statistics().sandboxes}
            assert sandbox_id in alive
            await trio.sleep_until(start + 10 * (k + 1) + 60 + 0.1)
            alive = {s.sandbox_id for s in h.pool.statistics().sandboxes}
            assert sandbox_id not in alive
            stopped.append(sandbox_id)
        await trio.sleep(600)
        stats = h.pool.statistics()
        assert sorted(s.sandbox_id for s in stats.sandboxes) == order[4:]
        assert stats.slots_free == 4
        # The kept sandboxes still serve, and a new burst scales up again.
        more = [await h.pool.acquire(timeout_s=10) for _ in range(6)]
        assert len({lease.slot_id for lease in more}) == 6
        assert h.pool.statistics().slots_free == 0
        assert h.pool.statistics().sandboxes_stopped == 4


async def test_acquire_is_fifo_fair(autojump_clock: trio.abc.Clock) -> None:
    """Waiters get slots in the order they asked."""
    async with running_pool(min_sandboxes=1, max_sandboxes=1, slots_per_sandbox=1) as h:
        first = await h.pool.acquire()
        order: list[int] = []

        async def wait_turn(number: int) -> None:
            lease = await h.pool.acquire()
            order.append(number)
            await trio.sleep(1)
            await h.pool.release(lease)

        async with trio.open_nursery() as nursery:
            for number in range(5):
                nursery.start_soon(wait_turn, number)
                await trio.sleep(0.01)
            await h.pool.release(first)
        assert order == [0, 1, 2, 3, 4]


async def test_release_resets_before_reuse(autojump_clock: trio.abc.Clock) -> None:
    """A released slot is reset (files gone) before the next holder gets it."""
    async with running_pool(min_sandboxes=1, max_sandboxes=1, slots_per_sandbox=1) as h:
        lease = await h.pool.acquire()
        await lease.sandbox.call(lease.index, WriteFile(path="a.txt", data=b"x"))
        await h.pool.release(lease)
        again = await h.pool.acquire()
        assert again.index == lease.index
        assert h.driver.resets == 1
        listing = await again.sandbox.call(again.index, ListFiles(path="."))
        assert listing.entries == ()


async def test_release_without_reset_keeps_files(autojump_clock: trio.abc.Clock) -> None:
    """release(reset=False) hands the slot on as it is."""
    async with running_pool(min_sandboxes=1, max_sandboxes=1, slots_per_sandbox=1) as h:
        lease = await h.pool.acquire()
        await lease.sandbox.call(lease.index, WriteFile(path="a.txt", data=b"x"))
        await h.pool.release(lease, reset=False)
        await h.pool.release(lease)  # idempotent: already released, nothing happens
        again = await h.pool.acquire()
        assert h.driver.resets == 0
        content = await again.sandbox.call(again.index, ReadFile(path="a.txt"))
        assert content.data == b"x"


async def test_cancelled_acquire_leaks_no_slot(autojump_clock: trio.abc.Clock) -> None:
    """An acquire cancelled while a sandbox starts or while queued leaves no waiter or slot."""
    async with running_pool(min_sandboxes=0, max_sandboxes=1, slots_per_sandbox=1) as h:
        with trio.move_on_after(0.5):
            await h.pool.acquire()
        await trio.sleep(1.0)
        stats = h.pool.statistics()
        assert (stats.slots_free, stats.slots_held, stats.waiters) == (1, 0, 0)
        holder = await h.pool.acquire()
        with trio.move_on_after(3):
            await h.pool.acquire()
        assert h.pool.statistics().waiters == 0
        await h.pool.release(holder)
        stats = h.pool.statistics()
        assert (stats.slots_free, stats.slots_held, stats.waiters) == (1, 0, 0)


async def test_cancel_between_grant_and_wakeup_gives_slot_back(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A caller cancelled after the pool granted its slot but before it woke gives it back."""
    async with running_pool(min_sandboxes=1, max_sandboxes=1, slots_per_sandbox=1) as h:
        holder = await h.pool.acquire()
        async with trio.open_nursery() as nursery:
            waiter_scope = trio.CancelScope()

            async def wait_for_slot() -> None:
                with waiter_scope:
                    await h.pool.acquire()
                    pytest.fail("the waiter should have been cancelled")

            nursery.start_soon(wait_for_slot)
            await trio.sleep(1)
            # The release is queued and the waiter cancelled in one step, so the pool's grant
            # and the waiter's cancellation race; either order must leave the slot free.
            h.pool._send.send_nowait(Release(lease=holder, reset=False, reply=Reply()))
            waiter_scope.cancel()
        await trio.sleep(1)  # the release ends the slot's shell in the agent first
        stats = h.pool.statistics()
        assert (stats.slots_free, stats.slots_held) == (1, 0)


async def test_sandbox_death_fails_held_slots_and_is_replaced(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A dead sandbox fails its in-flight commands with SandboxLost; the pool replaces it."""
    async with running_pool(min_sandboxes=1, max_sandboxes=2, slots_per_sandbox=2) as h:
        lease = await h.pool.acquire()
        other = await h.pool.acquire()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_kill_later, h.driver, lease.sandbox_id)
            with pytest.raises(SandboxLost) as lost:
                await lease.exec(Command(command="sleep 100"))
        assert lost.value.retryable
        with pytest.raises(SandboxLost):
            await other.exec(Command(command="echo hi"))
        await h.pool.release(lease)  # releasing a dead slot is harmless
        fresh = await h.pool.acquire(timeout_s=5)
        assert fresh.sandbox_id != lease.sandbox_id
        assert (await fresh.exec(Command(command="echo hi"))).stdout == b"hi\n"
        stats = h.pool.statistics()
        assert stats.sandboxes_lost == 1
        assert stats.infra_failures >= 2


async def _kill_later(driver: FakeDriver, sandbox_id: str) -> None:
    await trio.sleep(5)
    driver.kill(sandbox_id)


async def _queue_first_time_acquires(h: Harness, nursery: trio.Nursery, order: list[str]) -> None:
    """Two trajectories that ask for their first slot now, and note when they get it."""

    async def first_time(name: str) -> None:
        lease = await h.pool.acquire(name)
        order.append(name)
        await trio.sleep(10)
        await h.pool.release(lease)

    for name in ("first-1", "first-2"):
        nursery.start_soon(first_time, name)
        await trio.sleep(0.1)


@pytest.mark.parametrize(
    ("asks_after_s", "expected"),
    [
        (30.0, ["lost", "first-1", "first-2"]),
        # Past LOST_PRIORITY_S the loss is forgotten: the trajectory queues like any other.
        (LOST_PRIORITY_S + 1, ["first-1", "first-2", "lost"]),
    ],
)
async def test_a_trajectory_that_lost_its_slot_goes_before_first_time_acquires(
    autojump_clock: trio.abc.Clock, asks_after_s: float, expected: list[str]
) -> None:
    """After its sandbox is lost, a trajectory's next acquire is served before earlier ones."""
    async with running_pool(max_sandboxes=2, slots_per_sandbox=1) as h:
        lost = await h.pool.acquire("lost")
        await h.pool.acquire("kept")
        order: list[str] = []
        async with trio.open_nursery() as nursery:
            h.driver.kill(lost.sandbox_id)  # while its trajectory thinks
            await trio.sleep(asks_after_s)
            await _queue_first_time_acquires(h, nursery, order)
            asked = trio.current_time()
            again = await h.pool.acquire("lost")
            order.append("lost")
            if expected[0] == "lost":
                # The sandbox started for the first waiter goes to the lost trajectory.
                assert trio.current_time() == asked + 0.8
            assert again.sandbox_id != lost.sandbox_id
            await trio.sleep(10)
            await h.pool.release(again)
        assert order == expected


@pytest.mark.parametrize("releases", [True, False])
async def test_a_trajectory_that_saw_its_sandbox_die_goes_first(
    autojump_clock: trio.abc.Clock, releases: bool
) -> None:
    """A trajectory asking again before the pool hears of its sandbox's exit goes first,
    whether it released its dead slot (as the simulator's trainer) or not (as the facades)."""
    async with running_pool(max_sandboxes=2, slots_per_sandbox=1) as h:
        h.driver.terminate_latency_s = 5.0  # the exit reaches the pool 5 s after the death
        lost = await h.pool.acquire("lost")
        await h.pool.acquire("kept")
        order: list[str] = []
        async with trio.open_nursery() as nursery:
            await _queue_first_time_acquires(h, nursery, order)
            nursery.start_soon(_kill_later, h.driver, lost.sandbox_id)
            with pytest.raises(SandboxLost):
                await lost.exec(Command(command="sleep 100"))
            if releases:
                await h.pool.release(lost)
            assert h.pool.statistics().sandboxes_lost == 0  # not heard of yet
            again = await h.pool.acquire("lost")
            order.append("lost")
            await trio.sleep(10)
            await h.pool.release(again)
        assert order == ["lost", "first-1", "first-2"]
        stats = h.pool.statistics()
        assert (stats.sandboxes_lost, stats.infra_failures) == (1, 1)


async def test_rotates_before_max_lifetime(autojump_clock: trio.abc.Clock) -> None:
    """A sandbox near max_lifetime takes no new slots and stops once its slots are released."""
    async with running_pool(
        min_sandboxes=1, max_sandboxes=2, slots_per_sandbox=1, max_lifetime=100.0
    ) as h:
        lease = await h.pool.acquire()
        first_id = lease.sandbox_id
        await trio.sleep(95.0)  # past the rotation point (90 s after ready)
        stats = h.pool.statistics()
        states = {s.sandbox_id: s.state for s in stats.sandboxes}
        assert states[first_id] == "draining"
        assert (await lease.exec(Command(command="echo still"))).stdout == b"still\n"
        await h.pool.release(lease)
        await trio.sleep(2.0)
        ids = [s.sandbox_id for s in h.pool.statistics().sandboxes]
        assert first_id not in ids
        assert len(ids) == 1


def hold_checkpoint(pool: ProfilePool, lease: Lease) -> Checkpoint:
    """A checkpoint of `lease`'s sandbox, held by the pool (as `take_checkpoint` leaves one)."""
    checkpoint = Checkpoint(
        checkpoint_id="ck-1",
        profile="test",
        sandbox_id=lease.sandbox_id,
        size_bytes=1,
        entries=1,
        sandbox=lease.sandbox,
    )
    pool.checkpoints.reserve()
    assert pool.checkpoints.commit(checkpoint)
    pool.checkpoints_changed()
    return checkpoint


async def test_a_rotated_sandbox_stays_up_while_it_stores_a_checkpoint(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Past its rotation point a sandbox holding a checkpoint takes no slot but stays up until
    the checkpoint is released, then stops."""
    async with running_pool(
        min_sandboxes=1, max_sandboxes=2, slots_per_sandbox=1, max_lifetime=100.0
    ) as h:
        lease = await h.pool.acquire()
        first_id = lease.sandbox_id
        checkpoint = hold_checkpoint(h.pool, lease)
        await h.pool.release(lease)
        await trio.sleep(500.0)  # far past the rotation point (90 s after ready)
        states = {s.sandbox_id: s.state for s in h.pool.statistics().sandboxes}
        assert states[first_id] == "draining"
        other = await h.pool.acquire(timeout_s=10)
        assert other.sandbox_id != first_id
        h.pool.checkpoints.remove(checkpoint)
        h.pool.checkpoints_changed()
        await trio.sleep(2.0)
        ids = [s.sandbox_id for s in h.pool.statistics().sandboxes]
        assert first_id not in ids
        await h.pool.release(other)


class SlowCopies:
    """Stands in for `preserve_checkpoints` (the real one runs in the facade and Modal tests):
    copying out takes `seconds`; it records when each copy began and ended."""

    def __init__(self, seconds: float, tmp_path: Path) -> None:
        self.seconds = seconds
        self.tmp_path = tmp_path
        self.began: list[float] = []
        self.ended: list[float] = []

    async def __call__(self, ledger: CheckpointLedger, sandbox: Any) -> int:
        self.began.append(trio.current_time())
        await trio.sleep(self.seconds)
        for checkpoint in ledger.to_preserve(sandbox):
            ledger.add_copy(checkpoint, TarCopy(path=self.tmp_path / checkpoint.checkpoint_id))
        self.ended.append(trio.current_time())
        return 1


async def test_rotation_copies_checkpoints_out_at_once_while_slots_are_held(
    autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """At its rotation point a sandbox storing a checkpoint has it copied out at once, its slot
    still held; it stops when the slot comes back, and the checkpoint stays held."""
    copies = SlowCopies(5.0, tmp_path)
    monkeypatch.setattr(pool_module, "preserve_checkpoints", copies)
    async with running_pool(
        min_sandboxes=1, max_sandboxes=2, slots_per_sandbox=1, max_lifetime=100.0
    ) as h:
        lease = await h.pool.acquire()
        ready = trio.current_time()
        first_id = lease.sandbox_id
        checkpoint = hold_checkpoint(h.pool, lease)
        await trio.sleep(200.0)
        assert copies.began == [ready + 90.0]
        assert copies.ended == [ready + 95.0]
        assert first_id in [s.sandbox_id for s in h.pool.statistics().sandboxes]
        await h.pool.release(lease)
        await trio.sleep(2.0)
        assert first_id not in [s.sandbox_id for s in h.pool.statistics().sandboxes]
        assert h.pool.checkpoints.holds(checkpoint)
        assert h.pool.checkpoints.copy_of(checkpoint) is not None


async def test_a_checkpoint_taken_in_a_draining_sandbox_is_copied_out_at_once(
    autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Past its rotation point a sandbox whose slot is still held has a new checkpoint copied
    out as soon as it is taken, not when the slot comes back."""
    copies = SlowCopies(5.0, tmp_path)
    monkeypatch.setattr(pool_module, "preserve_checkpoints", copies)
    async with running_pool(
        min_sandboxes=1, max_sandboxes=2, slots_per_sandbox=1, max_lifetime=100.0
    ) as h:
        lease = await h.pool.acquire()
        await trio.sleep(95.0)  # draining, nothing to copy
        assert copies.began == []
        taken = trio.current_time()
        checkpoint = hold_checkpoint(h.pool, lease)
        await trio.sleep(10.0)
        assert copies.began == [taken]
        assert h.pool.checkpoints.copy_of(checkpoint) is not None
        await h.pool.release(lease)


async def test_an_idle_sandbox_stops_once_its_checkpoints_are_copied_out(
    autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """An idle sandbox storing a checkpoint is copied out of at its idle timeout and stops
    when the copy is done, not before; a sandbox whose checkpoints have copies stops on time."""
    copies = SlowCopies(5.0, tmp_path)
    monkeypatch.setattr(pool_module, "preserve_checkpoints", copies)
    async with running_pool(
        min_sandboxes=0, max_sandboxes=2, slots_per_sandbox=1, idle_timeout=10.0
    ) as h:
        lease = await h.pool.acquire()
        first_id = lease.sandbox_id
        checkpoint = hold_checkpoint(h.pool, lease)
        await h.pool.release(lease)
        released = trio.current_time()
        await trio.sleep(14.0)
        assert copies.began == [released + 10.0]
        assert first_id in [s.sandbox_id for s in h.pool.statistics().sandboxes]
        await trio.sleep(2.0)
        assert copies.ended == [released + 15.0]
        assert h.pool.statistics().sandboxes == ()
        assert h.pool.checkpoints.copy_of(checkpoint) is not None
        assert h.driver.terminated == 1


async def test_a_checkpoint_stopped_with_its_rotated_modal_sandbox_says_why(
    autojump_clock: trio.abc.Clock,
) -> None:
    """On Modal a rotated sandbox stops even while it stores a checkpoint (the provider ends it
    at its timeout anyway); a restore of that checkpoint says why and what to do."""
    async with running_pool(
        backend="modal",
        app_name="pool-tests",
        min_sandboxes=1,
        max_sandboxes=2,
        slots_per_sandbox=1,
        max_lifetime=100.0,
    ) as h:
        lease = await h.pool.acquire()
        first_id = lease.sandbox_id
        checkpoint = hold_checkpoint(h.pool, lease)
        await h.pool.release(lease)
        await trio.sleep(95.0)  # past the rotation point (90 s after ready)
        assert first_id not in [s.sandbox_id for s in h.pool.statistics().sandboxes]
        other = await h.pool.acquire(timeout_s=10)
        with pytest.raises(CheckpointLost) as lost:
            await restore(h.pool.checkpoints, other, checkpoint)
        assert str(lost.value) == (
            f"checkpoint ck-1 cannot be used: it was stored only in sandbox {first_id}, which "
            "was stopped (rotated before its maximum lifetime); Modal ends a sandbox at its "
            "max_lifetime (100 s; at most 24 h) whatever the pool does: raise it for searches "
            "that outlive it; take a new checkpoint"
        )
        await h.pool.release(other)


async def test_permanent_start_failure_fails_waiters(autojump_clock: trio.abc.Clock) -> None:
    """A start error that retrying cannot fix reaches the waiting caller at once, as it is."""
    async with running_pool(min_sandboxes=0, max_sandboxes=1, slots_per_sandbox=1) as h:
        h.driver.fail_next_creates = [IsolationUnavailable("bubblewrap is not installed")]
        with pytest.raises(IsolationUnavailable, match="bubblewrap"):
            await h.pool.acquire(timeout_s=60)
        assert trio.current_time() == pytest.approx(1.0)


async def test_transient_start_failures_are_retried(autojump_clock: trio.abc.Clock) -> None:
    """Retryable start failures back off and retry; the waiter gets a slot in the end."""
    async with running_pool(min_sandboxes=0, max_sandboxes=1, slots_per_sandbox=1) as h:
        h.driver.fail_next_creates = [
            SandboxStartFailed("capacity"),
            SandboxStartFailed("capacity"),
        ]
        lease = await h.pool.acquire(timeout_s=60)
        # create 1 fails at 1 s, retry after 1 s backoff fails at 3 s, retry after 2 s -> 6 s.
        assert trio.current_time() == pytest.approx(6.0)
        assert (await lease.exec(Command(command="echo ok"))).stdout == b"ok\n"


async def test_repeated_start_failures_fail_waiters(autojump_clock: trio.abc.Clock) -> None:
    """After several failed starts in a row, waiters get the start error instead of hanging."""
    async with running_pool(min_sandboxes=0, max_sandboxes=1, slots_per_sandbox=1) as h:
        h.driver.fail_next_creates = [SandboxStartFailed(f"boom {n}") for n in range(3)]
        with pytest.raises(SandboxStartFailed, match="boom 2"):
            await h.pool.acquire(timeout_s=600)


async def test_start_failure_after_driver_retries_fails_waiters_at_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A start error whose driver already retried reaches the waiter as it is, not as a timeout."""
    async with running_pool(min_sandboxes=0, max_sandboxes=1, slots_per_sandbox=1) as h:
        h.driver.fail_next_creates = [SandboxStartFailed("quota exceeded", attempts=4)]
        with pytest.raises(SandboxStartFailed, match="quota exceeded"):
            await h.pool.acquire(timeout_s=60)
        assert trio.current_time() == pytest.approx(1.0)
        assert h.driver.created == 0


async def test_one_create_out_of_retries_fails_no_waiter_while_others_start(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A create that spent its retries while another create of the image succeeds fails nobody."""
    async with running_pool(min_sandboxes=0, max_sandboxes=2, slots_per_sandbox=1) as h:
        h.driver.fail_next_creates = [SandboxStartFailed("unlucky create", attempts=3)]
        leases: list[Lease] = []

        async def acquire() -> None:
            leases.append(await h.pool.acquire(timeout_s=60))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(acquire)
            nursery.start_soon(acquire)
        assert len(leases) == 2
        assert h.driver.created == 2
        assert trio.current_time() <= 3.0  # a replacement create, not the 60 s deadline
        outputs = [(await lease.exec(Command(command="echo ok"))).stdout for lease in leases]
        assert outputs == [b"ok\n", b"ok\n"]


async def test_creates_out_of_retries_fail_waiters_once_none_is_left(
    autojump_clock: trio.abc.Clock,
) -> None:
    """When every create in flight spends its retries, the waiters get the provider's cause."""
    async with running_pool(min_sandboxes=0, max_sandboxes=2, slots_per_sandbox=1) as h:
        h.driver.fail_next_creates = [
            SandboxStartFailed(f"quota exceeded {n}", attempts=3) for n in range(2)
        ]
        failures: list[BaseException] = []

        async def acquire() -> None:
            try:
                await h.pool.acquire(timeout_s=60)
            except SandboxStartFailed as exc:
                failures.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(acquire)
            nursery.start_soon(acquire)
        assert [str(exc).startswith("quota exceeded") for exc in failures] == [True, True]
        assert trio.current_time() == pytest.approx(1.0)


async def test_driver_retry_budget_fits_inside_the_acquire_deadline(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The driver is given half the acquire deadline to retry a failing create."""
    async with running_pool(min_sandboxes=1, acquire_timeout_s=20) as h:
        await h.pool.acquire()
        assert [spec.create_retry_budget_s for spec in h.driver.specs] == [10.0]


async def test_deadline_after_a_failed_start_reports_the_start_error(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A caller whose deadline passes after a start failed gets that failure, not AcquireTimeout."""
    async with running_pool(min_sandboxes=0, max_sandboxes=1, slots_per_sandbox=1) as h:
        h.driver.fail_next_creates = [SandboxStartFailed("image registry is down")]
        with pytest.raises(SandboxStartFailed, match="image registry is down"):
            await h.pool.acquire(timeout_s=1.5)
        assert trio.current_time() == pytest.approx(1.5)


async def test_given_up_pool_fails_fast_during_backoff_then_tries_again(
    autojump_clock: trio.abc.Clock,
) -> None:
    """After the pool gave up, callers fail at once while it backs off, then a start is retried."""
    async with running_pool(min_sandboxes=0, max_sandboxes=1, slots_per_sandbox=1) as h:
        h.driver.fail_next_creates = [SandboxStartFailed("quota exceeded", attempts=3)]
        with pytest.raises(SandboxStartFailed):
            await h.pool.acquire(timeout_s=60)
        with pytest.raises(SandboxStartFailed, match="quota exceeded"):
            await h.pool.acquire(timeout_s=60)
        assert trio.current_time() == pytest.approx(1.0)
        await trio.sleep(1.0)
        lease = await h.pool.acquire(timeout_s=60)
        assert trio.current_time() == pytest.approx(3.0)
        assert (await lease.exec(Command(command="echo healed"))).stdout == b"healed\n"


async def test_commands_in_one_slot_run_one_at_a_time(autojump_clock: trio.abc.Clock) -> None:
    """Two commands sent to one slot at once run one after the other, in order."""
    async with running_pool(min_sandboxes=1, max_sandboxes=1, slots_per_sandbox=2) as h:
        lease = await h.pool.acquire()
        other = await h.pool.acquire()
        start = trio.current_time()
        finished: list[str] = []

        async def run(target: Lease, command: str) -> None:
            await target.exec(Command(command=command))
            finished.append(f"{target.index}:{command}@{trio.current_time() - start:g}")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, lease, "sleep 2")
            await trio.lowlevel.checkpoint()
            nursery.start_soon(run, lease, "sleep 1")
            nursery.start_soon(run, other, "sleep 1")
        assert sorted(finished) == sorted(
            [f"{lease.index}:sleep 2@2", f"{lease.index}:sleep 1@3", f"{other.index}:sleep 1@1"]
        )


async def test_cancelled_command_is_killed_and_slot_stays_usable(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Cancelling a caller mid-command kills the command; the slot serves the next one."""
    async with running_pool(min_sandboxes=1, max_sandboxes=1, slots_per_sandbox=1) as h:
        lease = await h.pool.acquire()
        with trio.move_on_after(5):
            await lease.exec(Command(command="sleep 1000"))
        # The command is already gone when the cancelled caller moves on.
        assert h.driver.by_id[lease.sandbox_id].running == {}
        start = trio.current_time()
        assert (await lease.exec(Command(command="echo next"))).stdout == b"next\n"
        assert trio.current_time() - start < 1


async def test_two_hundred_trajectories_through_fifty_slots(autojump_clock: trio.abc.Clock) -> None:
    """200 trajectories share 5 sandboxes x 10 slots and all complete."""
    async with running_pool(min_sandboxes=1, max_sandboxes=5, slots_per_sandbox=10) as h:
        done: list[bytes] = []

        async def trajectory(number: int) -> None:
            lease = await h.pool.acquire(f"traj-{number}", timeout_s=600)
            for step in range(3):
                result = await lease.exec(Command(command=f"echo {number}-{step}"))
                await trio.sleep(1)
                done.append(result.stdout)
            await h.pool.release(lease)

        async with trio.open_nursery() as nursery:
            for number in range(200):
                nursery.start_soon(trajectory, number)
        assert len(done) == 600
        assert h.driver.max_alive == 5
        assert h.pool.statistics().commands_run == 600


async def test_stopping_the_pool_terminates_every_sandbox(autojump_clock: trio.abc.Clock) -> None:
    """Cancelling the pool terminates its sandboxes and fails waiting callers."""
    async with running_pool(min_sandboxes=3, max_sandboxes=3, slots_per_sandbox=1) as h:
        await trio.sleep(1)
        await trio.testing.wait_all_tasks_blocked()
        assert len(h.driver.alive) == 3
    assert h.driver.alive == set()
    assert h.driver.terminated == 3


async def test_requests_queued_on_a_dying_sandbox_fail_too(autojump_clock: trio.abc.Clock) -> None:
    """A request still waiting for its slot when the sandbox dies fails with SandboxLost."""
    async with running_pool(min_sandboxes=1, max_sandboxes=1, slots_per_sandbox=1) as h:
        lease = await h.pool.acquire()
        start = trio.current_time()
        outcomes: list[str] = []

        async def run(command: str) -> None:
            try:
                await lease.exec(Command(command=command))
            except SandboxLost:
                outcomes.append(f"lost:{command}")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, "sleep 100")
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(run, "sleep 1")  # queued behind the first on the same slot
            nursery.start_soon(_kill_later, h.driver, lease.sandbox_id)
        assert sorted(outcomes) == ["lost:sleep 1", "lost:sleep 100"]
        assert trio.current_time() - start == pytest.approx(5.0)


async def test_a_release_whose_reset_is_in_flight_is_answered_when_the_pool_stops(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Stopping the pool mid-reset still answers the release (issue 8, defect 10)."""
    answered: list[float] = []
    done = trio.Event()
    async with trio.open_nursery() as outer:
        driver = FakeDriver(outer)
        driver.reset_latency_s = 30.0
        pool = ProfilePool(SandboxConfig(name="test", backend="local", slots_per_sandbox=1), driver)
        with trio.CancelScope() as pool_scope:

            async def release_then_note(lease: Any) -> None:
                await pool.release(lease)
                answered.append(trio.current_time())
                done.set()

            async with trio.open_nursery() as nursery:
                await nursery.start(pool.run)
                lease = await pool.acquire()
                outer.start_soon(release_then_note, lease)
                await trio.sleep(5)
                pool_scope.cancel()
        with trio.fail_after(10):
            await done.wait()
        outer.cancel_scope.cancel()
    assert answered == [5]


async def test_an_error_the_sandbox_answers_at_once_reaches_the_caller_at_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A call for a slot the sandbox does not have fails at once, not after a grace wait."""
    async with running_pool(min_sandboxes=1, max_sandboxes=1, slots_per_sandbox=1) as h:
        lease = await h.pool.acquire()
        started = trio.current_time()
        with pytest.raises(AgentError, match="slot 7 does not exist"):
            await lease.sandbox.call(7, Command(command="true"))
        assert trio.current_time() == started


async def test_a_lost_sandbox_is_logged_without_nesting_its_own_message(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """The pool's lost-sandbox line and the caller's error say 'was lost' once each."""
    async with running_pool(min_sandboxes=1, max_sandboxes=1, slots_per_sandbox=1) as h:
        lease = await h.pool.acquire()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_kill_later, h.driver, lease.sandbox_id)
            with pytest.raises(SandboxLost) as lost:
                await lease.exec(Command(command="sleep 100"))
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(SandboxLost) as again:
            await lease.exec(Command(command="true"))
    assert str(lost.value).count("was lost") == 1
    assert str(again.value).count("was lost") == 1
    lines = [record.getMessage() for record in caplog.records if "was lost" in record.getMessage()]
    assert lines
    assert all(line.count("was lost") == 1 for line in lines), lines
