"""ToolBackend's ordering, timeouts, cancellation and tool results, on the public fake driver.

Everything here runs in virtual time (trio's autojump clock) against the real client, actors,
pools and facade, with fake sandboxes (`hermes_actors.testing.fake_driver`): exact times, no
processes. Real processes are exercised by the contract and end-to-end tests.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from hermes_actors import ModalToolBackend, SandboxConfig, Slot, ToolBackend, profiles_from_mapping
from hermes_actors.testing.fake_driver import FakeDriver


def fake_config(**changes: Any) -> SandboxConfig:
    settings: dict[str, Any] = {
        "backend": "local",
        "slots_per_sandbox": 4,
        "min_sandboxes": 1,
        "max_sandboxes": 2,
        "acquire_timeout_s": 20.0,
        "execution_timeout_s": 50.0,
    }
    settings.update(changes)
    return SandboxConfig(**settings)


@asynccontextmanager
async def fake_backend(
    config: SandboxConfig | None = None, **profiles: SandboxConfig
) -> AsyncIterator[tuple[ToolBackend, FakeDriver]]:
    async with trio.open_nursery() as nursery:
        driver = FakeDriver(nursery)
        driver.create_latency_s = 1.0
        if profiles:
            backend = ToolBackend(profiles_from_mapping(profiles), drivers={"local": driver})
        else:
            backend = ToolBackend(config or fake_config(), drivers={"local": driver})
        async with backend:
            yield backend, driver
        nursery.cancel_scope.cancel()


def held(backend: ToolBackend) -> int:
    return sum(pool.slots_held for pool in backend.status().pools)


async def test_results_come_back_in_request_order(autojump_clock: trio.abc.Clock) -> None:
    """One result per request, in request order, whatever finishes first."""
    async with fake_backend() as (backend, _):
        first, second = await backend.acquire("a"), await backend.acquire("b")
        started = trio.current_time()
        results = await backend.execute_batch(
            [
                (first, "bash", {"command": "sleep 3"}),
                (second, "bash", {"command": "echo second-1"}),
                (first, "bash", {"command": "echo first-2"}),
                (second, "bash", {"command": "sleep 1"}),
            ]
        )
        assert trio.current_time() - started == 3
        assert [result.output for result in results] == ["", "second-1\n", "first-2\n", ""]
        assert [result.slot_id for result in results] == [
            first.slot_id,
            second.slot_id,
            first.slot_id,
            second.slot_id,
        ]
        assert len({result.execution_id for result in results}) == 4


async def test_slots_run_concurrently_and_each_slot_in_request_order(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Different slots overlap exactly; one slot's calls run one after another, in order."""
    async with fake_backend() as (backend, _):
        slots = [await backend.acquire(f"t{index}") for index in range(4)]
        started = trio.current_time()
        results = await backend.execute_batch(
            [(slot, "bash", {"command": "sleep 5"}) for slot in slots]
        )
        assert trio.current_time() - started == 5
        assert all(result.success for result in results)
        started = trio.current_time()
        ordered = await backend.execute_batch(
            [
                (slots[0], "bash", {"command": "sleep 2"}),
                (slots[0], "write_file", {"path": "order.txt", "content": "two"}),
                (slots[0], "read_file", {"path": "order.txt"}),
                (slots[0], "bash", {"command": "sleep 3"}),
            ]
        )
        assert trio.current_time() - started == 5
        assert ordered[2].output == "two"


async def test_timeouts_come_from_the_call_the_batch_or_the_profile(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A bash call's own timeout wins over the batch's, which wins over the profile's."""
    async with fake_backend() as (backend, _):
        slot = await backend.acquire("t")
        for args, batch_timeout, expected in [
            ({"command": "sleep 100", "timeout": 2}, 7, 2),
            ({"command": "sleep 100"}, 7, 7),
            ({"command": "sleep 100"}, None, 50),
        ]:
            started = trio.current_time()
            [result] = await backend.execute_batch([(slot, "bash", args)], timeout_s=batch_timeout)
            assert trio.current_time() - started == expected
            assert result.metadata["timed_out"]
            assert result.metadata["exit_code"] == 124
            assert (
                result.error
                == f"command timed out after {expected:g} s (its processes were killed)"
            )


async def test_read_file_says_when_it_did_not_return_the_whole_file(
    autojump_clock: trio.abc.Clock,
) -> None:
    """read_file reports size and truncation, and is an error when the whole file was asked for."""
    async with fake_backend(fake_config(max_output_bytes=100)) as (backend, _):
        slot = await backend.acquire("t")
        whole, cut, head, small = await backend.execute_batch(
            [
                (slot, "write_file", {"path": "big.txt", "content": "x" * 250}),
                (slot, "read_file", {"path": "big.txt"}),
                (slot, "read_file", {"path": "big.txt", "max_bytes": 10}),
                (slot, "write_file", {"path": "small.txt", "content": "tiny"}),
            ]
        )
        assert whole.success
        assert not cut.success
        assert cut.metadata["truncated"]
        assert cut.metadata["size"] == 250
        assert cut.output == "x" * 100
        assert cut.error is not None
        assert "'big.txt' is 250 bytes, more than the 100-byte cap" in cut.error
        assert head.success
        assert head.output == "x" * 10
        assert (head.metadata["truncated"], head.metadata["size"]) == (True, 250)
        [read] = await backend.execute_batch([(slot, "read_file", {"path": "small.txt"})])
        assert read.success
        assert (read.output, read.metadata["truncated"], read.metadata["size"]) == (
            "tiny",
            False,
            4,
        )
        assert small.success


async def test_every_profile_with_a_minimum_is_warm_at_start(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Entering the backend warms every profile's min_sandboxes, not only the default's."""
    async with fake_backend(
        default=fake_config(name="default", min_sandboxes=1),
        gpu=fake_config(name="gpu", min_sandboxes=2),
        spare=fake_config(name="spare", min_sandboxes=0),
    ) as (backend, driver):
        await trio.sleep(1)
        await trio.testing.wait_all_tasks_blocked()
        assert driver.created == 3
        free = {pool.profile: pool.slots_free for pool in backend.status().pools}
        assert free == {"default": 4, "gpu": 8}
        started = trio.current_time()
        await backend.acquire("t", "gpu")
        assert trio.current_time() == started


class _CancelAfterSteps(trio.abc.Instrument):
    """Cancels `scope` after `steps` task steps of the run (every task's, not only the caller's)."""

    def __init__(self, steps: int, scope: trio.CancelScope) -> None:
        self.steps, self.scope, self.count = steps, scope, 0

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        self.count += 1
        if self.count == self.steps:
            self.scope.cancel()


async def cancel_at_every_await(
    operation: Callable[[], Awaitable[object]],
    check: Callable[[], Awaitable[None]],
    max_steps: int = 3000,
) -> int:
    """Run `operation` cancelled after 1, 2, ... task steps until it completes; `check` each time.

    Returns how many distinct cancellation points were exercised.
    """
    for steps in range(1, max_steps):
        with trio.CancelScope() as scope:
            instrument = _CancelAfterSteps(steps, scope)
            trio.lowlevel.add_instrument(instrument)
            try:
                await operation()
            finally:
                trio.lowlevel.remove_instrument(instrument)
        await check()
        if not scope.cancelled_caught:
            return steps - 1
    raise AssertionError("the operation never completed")


async def test_cancelling_acquire_and_release_at_every_await_leaks_no_slot(
    autojump_clock: trio.abc.Clock,
) -> None:
    """acquire and release cancelled at any await leave no slot held."""
    async with fake_backend() as (backend, _):
        acquired: list[Slot] = []

        async def acquire() -> None:
            acquired.append(await backend.acquire("t"))

        async def no_leak() -> None:
            for slot in acquired:
                await backend.release(slot)
            acquired.clear()
            await trio.testing.wait_all_tasks_blocked()
            assert held(backend) == 0

        assert await cancel_at_every_await(acquire, no_leak) >= 1

        holder: list[Slot] = []

        async def release() -> None:
            if not holder:
                holder.append(await backend.acquire("t"))
            await backend.release(holder[0])

        async def released() -> None:
            await trio.sleep(1)
            assert held(backend) == 0
            holder.clear()

        assert await cancel_at_every_await(release, released) >= 1


async def test_cancelling_execute_batch_at_every_await_kills_its_commands(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A batch cancelled at any await leaves no command running and the slots usable."""
    async with fake_backend() as (backend, driver):
        slots = [await backend.acquire("a"), await backend.acquire("b")]

        async def batch() -> None:
            await backend.execute_batch(
                [
                    (slots[0], "write_file", {"path": "f", "content": "x"}),
                    (slots[0], "bash", {"command": "sleep 10"}),
                    (slots[1], "bash", {"command": "sleep 10"}),
                ]
            )

        async def nothing_runs() -> None:
            assert held(backend) == 2
            assert all(not sandbox.running for sandbox in driver.alive)

        assert await cancel_at_every_await(batch, nothing_runs) >= 2

        with trio.move_on_after(3) as scope:
            await backend.execute_batch(
                [(slot, "bash", {"command": "sleep 100"}) for slot in slots]
            )
        assert scope.cancelled_caught
        assert trio.current_time() == scope.deadline
        assert all(not sandbox.running for sandbox in driver.alive)
        results = await backend.execute_batch(
            [(slot, "bash", {"command": "echo ok"}) for slot in slots]
        )
        assert [result.output for result in results] == ["ok\n", "ok\n"]


def test_modal_names_run_on_modal_and_tool_backend_follows_terminal_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ModalToolBackend's profiles default to modal, ToolBackend's to local; TERMINAL_ENV wins."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TERMINAL_ENV", raising=False)
    monkeypatch.delenv("TERMINAL_MODAL_PROFILES_FILE", raising=False)
    assert ModalToolBackend().profiles.get_profile().backend == "modal"
    assert ToolBackend().profiles.get_profile().backend == "local"
    modal = ModalToolBackend.with_profiles(profiles={"gpu": {"gpu": "A10G"}})
    assert modal.profiles.get_profile("gpu").backend == "modal"
    assert ToolBackend.with_profiles(profiles={"cpu": {}}).profiles.get_profile().backend == "local"
    monkeypatch.setenv("TERMINAL_ENV", "local")
    assert ModalToolBackend().profiles.get_profile().backend == "local"
