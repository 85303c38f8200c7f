"""The runtime on the virtual clock: profiles routed to pools, pool crashes supervised."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from hermes_actors._config import SandboxConfig, profiles_from_mapping
from hermes_actors._errors import ConfigError, RuntimeStopped
from hermes_actors._values import Command, ListFiles, ReadFile, WriteFile
from hermes_actors.runtime._pool import ProfilePool
from hermes_actors.runtime._runtime import Runtime
from hermes_actors.runtime._supervisor import SupervisorEscalation
from hermes_actors.testing.fake_driver import FakeDriver


def two_profiles() -> dict[str, SandboxConfig]:
    return {
        "default": SandboxConfig(
            name="default", backend="local", min_sandboxes=1, slots_per_sandbox=2
        ),
        "big": SandboxConfig(name="big", backend="local", min_sandboxes=2, slots_per_sandbox=4),
        "lazy": SandboxConfig(name="lazy", backend="local", min_sandboxes=0, slots_per_sandbox=4),
    }


@asynccontextmanager
async def running_runtime() -> AsyncIterator[tuple[Runtime, FakeDriver]]:
    async with trio.open_nursery() as nursery:
        driver = FakeDriver(nursery)
        driver.create_latency_s = 1.0
        runtime = Runtime(profiles_from_mapping(two_profiles()), drivers={"local": driver})
        await nursery.start(runtime.run)
        yield runtime, driver
        nursery.cancel_scope.cancel()


async def test_profiles_with_a_minimum_are_warm_at_start_and_others_start_on_first_use(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Every profile with min_sandboxes starts with the runtime; one without starts when used."""
    async with running_runtime() as (runtime, driver):
        assert trio.current_time() == 0
        await trio.sleep(1.0)
        await trio.testing.wait_all_tasks_blocked()
        assert [pool.profile for pool in runtime.status().pools] == ["default", "big"]
        assert driver.created == 3
        assert [pool.slots_free for pool in runtime.status().pools] == [2, 8]
        lease = await runtime.acquire("lazy", "traj-1")
        assert trio.current_time() == 2.0
        assert lease.profile == "lazy"
        assert lease.trajectory_id == "traj-1"
        await trio.testing.wait_all_tasks_blocked()
        assert [pool.profile for pool in runtime.status().pools] == ["default", "big", "lazy"]
        assert driver.created == 4
        result = await runtime.call(lease, Command(command="echo hi"))
        assert result.stdout == b"hi\n"
        await runtime.call(lease, WriteFile(path="f.txt", data=b"data"))
        assert (await runtime.call(lease, ReadFile(path="f.txt"))).data == b"data"
        listing = await runtime.call(lease, ListFiles())
        assert [entry["path"] for entry in listing.entries] == ["f.txt"]
        await runtime.release(lease)
        assert runtime.status().pools[2].slots_held == 0


async def test_unknown_profile_names_the_known_ones(autojump_clock: trio.abc.Clock) -> None:
    """Asking for a profile that does not exist says which ones do."""
    async with running_runtime() as (runtime, _driver):
        with pytest.raises(
            ConfigError, match="unknown profile 'gpu'; known profiles: big, default"
        ):
            await runtime.acquire("gpu")


async def test_a_crashed_pool_is_restarted_with_fresh_state(
    autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pool that crashes is restarted; its old sandboxes are gone and new acquires work."""
    async with running_runtime() as (runtime, driver):
        lease = await runtime.acquire()
        original_handle = ProfilePool._handle
        crashes = [1]

        def crash_once(self: ProfilePool, message: object) -> None:
            if crashes:
                crashes.pop()
                raise RuntimeError("bug in the pool")
            original_handle(self, message)  # type: ignore[arg-type]

        monkeypatch.setattr(ProfilePool, "_handle", crash_once)
        with pytest.raises(RuntimeStopped):
            await runtime.acquire()
        await trio.testing.wait_all_tasks_blocked()
        # The crashed pool's sandbox was terminated; the restarted pool pre-warms a new one.
        assert driver.terminated == 1
        fresh = await runtime.acquire(timeout_s=5)
        assert fresh.sandbox_id != lease.sandbox_id
        await runtime.release(lease)  # a lease of the old pool is released harmlessly
        assert (await runtime.call(fresh, Command(command="echo ok"))).stdout == b"ok\n"


async def test_a_crash_loop_escalates_out_of_run(
    autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pools that keep crashing make the runtime give up with SupervisorEscalation."""

    def always_crash(self: ProfilePool, message: object) -> None:
        raise RuntimeError("bug in the pool")

    monkeypatch.setattr(ProfilePool, "_handle", always_crash)
    with pytest.RaisesGroup(SupervisorEscalation, flatten_subgroups=True):
        async with trio.open_nursery() as nursery:
            driver = FakeDriver(nursery)
            runtime = Runtime(profiles_from_mapping(two_profiles()), drivers={"local": driver})
            await nursery.start(runtime.run)
            for _ in range(10):
                with pytest.raises(RuntimeStopped):
                    await runtime.acquire()
                await trio.sleep(1)
    assert driver.alive == set()
