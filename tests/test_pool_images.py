"""Per-task images in one profile's pool, on the virtual clock with the fake driver."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from hermes_actors._errors import AcquireTimeout, SandboxStartFailed
from hermes_actors.runtime import _pool as pool_module
from test_pool import SlowCopies, hold_checkpoint, running_pool


def images_alive(h: object) -> list[str]:
    return sorted(sandbox.spec.image for sandbox in h.driver.alive)  # type: ignore[attr-defined]


async def test_each_image_gets_its_own_sandboxes(autojump_clock: trio.abc.Clock) -> None:
    """Slots of another image come from sandboxes started with that image, apart from the
    profile's own."""
    async with running_pool(min_sandboxes=1, max_sandboxes=4, slots_per_sandbox=2) as h:
        own = await h.pool.acquire("a")
        task = await h.pool.acquire("b", image="repo-b:latest")
        task_2 = await h.pool.acquire("c", image="repo-b:latest")
        assert own.image == "python:3.11"
        assert task.image == task_2.image == "repo-b:latest"
        assert task.sandbox is task_2.sandbox is not own.sandbox
        assert images_alive(h) == ["python:3.11", "repo-b:latest"]
        assert {s.image for s in h.pool.statistics().sandboxes} == {"python:3.11", "repo-b:latest"}


async def test_min_sandboxes_warm_only_the_profile_image(autojump_clock: trio.abc.Clock) -> None:
    """Pre-warming starts the profile's image only; another image starts on demand."""
    async with running_pool(min_sandboxes=2, max_sandboxes=4, slots_per_sandbox=1) as h:
        await trio.sleep(1.5)
        assert images_alive(h) == ["python:3.11", "python:3.11"]
        started = trio.current_time()
        await h.pool.acquire(image="other")
        assert trio.current_time() - started == pytest.approx(1.0)  # one create latency
        await trio.testing.wait_all_tasks_blocked()
        assert images_alive(h) == ["other", "python:3.11", "python:3.11"]


async def test_max_sandboxes_bounds_all_images_together(autojump_clock: trio.abc.Clock) -> None:
    """With the bound reached by busy sandboxes, a new image's acquire waits and times out."""
    async with running_pool(min_sandboxes=1, max_sandboxes=2, slots_per_sandbox=1) as h:
        await h.pool.acquire(image="one")
        await h.pool.acquire(image="two")
        assert h.driver.max_alive == 2  # the idle warm sandbox made room for the second image
        with pytest.raises(AcquireTimeout):
            await h.pool.acquire(image="three", timeout_s=30)
        assert h.driver.max_alive == 2


async def test_an_idle_image_pool_stops_after_the_idle_timeout(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Another image's sandboxes stop after idle_timeout, even below min_sandboxes; the
    profile's own stay at min_sandboxes."""
    async with running_pool(
        min_sandboxes=1, max_sandboxes=4, slots_per_sandbox=1, idle_timeout=60.0
    ) as h:
        lease = await h.pool.acquire(image="task-image")
        await h.pool.release(lease)
        released = trio.current_time()
        await trio.sleep_until(released + 59.9)
        assert images_alive(h) == ["python:3.11", "task-image"]
        await trio.sleep_until(released + 60.1)
        assert images_alive(h) == ["python:3.11"]
        assert h.pool.statistics().sandboxes_stopped == 1


async def test_idle_sandboxes_of_other_images_make_room(autojump_clock: trio.abc.Clock) -> None:
    """At the bound, a waiter of one image gets room by stopping an idle sandbox of another."""
    async with running_pool(
        min_sandboxes=0, max_sandboxes=2, slots_per_sandbox=1, idle_timeout=600.0
    ) as h:
        for image in ("a", "b"):
            await h.pool.release(await h.pool.acquire(image=image))
        assert images_alive(h) == ["a", "b"]
        started = trio.current_time()
        await h.pool.acquire(image="c")
        assert trio.current_time() - started == pytest.approx(1.0)
        assert len(h.driver.alive) == 2
        assert "c" in images_alive(h)


async def test_room_is_made_once_the_checkpoints_of_the_idle_sandbox_are_copied_out(
    autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Making room stops an idle sandbox of another image once its checkpoints are copied out,
    and no second sandbox meanwhile."""
    copies = SlowCopies(5.0, tmp_path)
    monkeypatch.setattr(pool_module, "preserve_checkpoints", copies)
    async with running_pool(
        min_sandboxes=0, max_sandboxes=2, slots_per_sandbox=1, idle_timeout=600.0
    ) as h:
        first = await h.pool.acquire(image="a")
        checkpoint = hold_checkpoint(h.pool, first)
        await h.pool.release(first)
        await h.pool.release(await h.pool.acquire(image="b"))
        started = trio.current_time()
        await h.pool.acquire(image="c")
        # The oldest idle one ("a") has its checkpoint copied (5 s), then stops; "c" starts (1 s).
        assert trio.current_time() - started == pytest.approx(6.0)
        assert copies.began == [started]
        assert images_alive(h) == ["b", "c"]
        assert h.pool.checkpoints.copy_of(checkpoint) is not None


async def test_a_broken_image_does_not_hold_back_the_profile_image(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Start failures of one image fail its waiters only; the profile's image still serves."""
    async with running_pool(min_sandboxes=0, max_sandboxes=3, slots_per_sandbox=1) as h:
        h.driver.fail_next_creates = [
            SandboxStartFailed("no such image", retryable=False),
        ]
        with pytest.raises(SandboxStartFailed, match="no such image"):
            await h.pool.acquire(image="missing:tag", timeout_s=30)
        lease = await h.pool.acquire(timeout_s=5)
        assert lease.image == "python:3.11"
