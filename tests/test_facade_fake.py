"""ToolBackend's ordering, timeouts, cancellation, lifecycle and tool results, on the fake driver.

Everything here runs against the real client, actors, pools and facade, with fake sandboxes
(`hermes_actors.testing.fake_driver`): no processes. In virtual time (trio's autojump clock),
with exact times, except where the backend runs on its portal thread for asyncio or other trio
callers (its own trio run, in real time). Real processes are exercised by the contract and
end-to-end tests.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import hermes_actors._config as config_module
from hermes_actors import (
    ConfigError,
    ModalToolBackend,
    SandboxConfig,
    Slot,
    SlotState,
    ToolBackend,
    format_status,
    profiles_from_mapping,
)
from hermes_actors.drivers._modal import ModalDriver
from hermes_actors.drivers._registry import DRIVERS
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


async def test_bad_tools_or_arguments_give_error_results(autojump_clock: trio.abc.Clock) -> None:
    """Unknown or unhashable tools, bad arguments and foreign slots give error results."""
    async with fake_backend() as (backend, _):
        slot = await backend.acquire("t")
        released = await backend.acquire("gone")
        await backend.release(released)
        requests: list[Any] = [
            (slot, "python", {"code": "1"}),
            (slot, "bash", {}),
            (slot, "bash", {"command": "true", "cwd": "/"}),
            (slot, "bash", {"command": ["ls"]}),
            (slot, "bash", {"command": "true", "timeout": -1}),
            (slot, "write_file", {"path": "x", "content": 3}),
            (slot, "read_file", "x"),
            ("not-a-slot", "bash", {"command": "true"}),
            (released, "bash", {"command": "true"}),
            (slot, ["bash"], {"command": "true"}),
            (slot, {}, {"command": "true"}),
            (slot, "bash", {"command": "echo fine"}),
        ]
        results = await backend.execute_batch(requests)
        errors = [result.error for result in results]
        available = "available tools: bash, terminal, read_file, write_file"
        assert errors[0] == f"unknown tool 'python'; {available}"
        expected = "{command, allow_network?, background?, require_sandbox?, shell?, timeout?}"
        assert errors[1] == f"bash: missing 'command' argument(s); expected {expected}"
        assert errors[2] == f"bash: unknown 'cwd' argument(s); expected {expected}"
        assert errors[3] == "bash: 'command' must be a str, got list"
        assert errors[4] == "bash: 'timeout' must be a number > 0, got -1"
        assert errors[5] == "write_file: 'content' must be str or bytes, got int"
        assert errors[6] == "read_file: args must be a mapping, got str"
        assert errors[7] == "expected a Slot from acquire(), got str"
        assert errors[8] is not None
        assert errors[8].startswith(f"slot {released.slot_id} is not held by this backend")
        assert errors[9] == f"unknown tool ['bash']; {available}"
        assert errors[10] == f"unknown tool {{}}; {available}"
        assert [result.success for result in results] == [False] * 11 + [True]
        assert results[11].output == "fine\n"
        assert all("infra_error" not in result.metadata for result in results)


async def test_default_timeout_applies_when_the_call_gives_none(
    autojump_clock: trio.abc.Clock,
) -> None:
    """default_timeout_s bounds a bash call that gives no timeout, in a batch that gives none."""
    driver_config = fake_config(execution_timeout_s=42.0)
    async with fake_backend(driver_config) as (backend, _):
        assert backend.default_timeout_s == 42.0
        backend.default_timeout_s = 4
        with pytest.raises(ValueError, match="default_timeout_s must be a number > 0"):
            backend.default_timeout_s = 0
        slot = await backend.acquire("t")
        started = trio.current_time()
        [result] = await backend.execute_batch([(slot, "bash", {"command": "sleep 30"})])
        assert trio.current_time() - started == 4
        assert result.metadata["timed_out"] is True


async def test_unknown_profile_is_a_config_error(autojump_clock: trio.abc.Clock) -> None:
    """acquire with an unknown profile raises ConfigError naming the known profiles."""
    async with fake_backend() as (backend, _):
        with pytest.raises(ConfigError, match=r"no profile named 'gpu'; known profiles: 'default'"):
            await backend.acquire("t", profile="gpu")
        assert held(backend) == 0


async def test_a_lost_sandbox_gives_retryable_infra_results_and_a_new_acquire_works(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A sandbox lost mid-batch gives infra_error/retryable results at once, not a hang."""
    async with fake_backend(fake_config(slots_per_sandbox=1, max_sandboxes=3)) as (
        backend,
        driver,
    ):
        doomed, healthy = await backend.acquire("doomed"), await backend.acquire("healthy")
        assert doomed.sandbox_id != healthy.sandbox_id

        async def kill_at_one_second() -> None:
            await trio.sleep(1)
            driver.kill(doomed.sandbox_id)

        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(kill_at_one_second)
            lost, after, fine = await backend.execute_batch(
                [
                    (doomed, "bash", {"command": "sleep 30"}),
                    (doomed, "bash", {"command": "echo never"}),
                    (healthy, "bash", {"command": "sleep 2"}),
                ]
            )
        assert trio.current_time() - started == 2
        for result in (lost, after):
            assert result.success is False
            assert result.metadata["infra_error"] == "sandbox_lost"
            assert result.metadata["retryable"] is True
            assert result.error is not None
            assert doomed.sandbox_id in result.error
        assert fine.success
        await backend.release(doomed)
        fresh = await backend.acquire("retry")
        assert fresh.sandbox_id != doomed.sandbox_id
        [result] = await backend.execute_batch([(fresh, "bash", {"command": "echo again"})])
        assert result.output == "again\n"


async def test_slot_state_follows_acquire_calls_release_and_loss(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A slot's state is ACQUIRED, EXECUTING during a call, RELEASING, AVAILABLE, ERROR if lost."""
    async with fake_backend(fake_config(slots_per_sandbox=1)) as (backend, driver):
        driver.reset_latency_s = 2.0
        slot = await backend.acquire("a")
        assert slot.state is SlotState.ACQUIRED
        seen: list[SlotState] = []

        async def look_at_one_second() -> None:
            await trio.sleep(1)
            seen.append(slot.state)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(look_at_one_second)
            await backend.execute_batch([(slot, "bash", {"command": "sleep 3"})])
        assert seen == [SlotState.EXECUTING]
        assert slot.state is SlotState.ACQUIRED
        async with trio.open_nursery() as nursery:
            nursery.start_soon(look_at_one_second)
            await backend.release(slot, reset_workspace=True)
        assert seen[1] is SlotState.RELEASING
        assert slot.state is SlotState.AVAILABLE

        doomed = await backend.acquire("b")
        driver.kill(doomed.sandbox_id)
        [lost] = await backend.execute_batch([(doomed, "bash", {"command": "echo never"})])
        assert lost.metadata["infra_error"] == "sandbox_lost"
        assert doomed.state is SlotState.ERROR
        await backend.release(doomed)
        assert doomed.state is SlotState.AVAILABLE


async def test_async_with_runs_the_runtime_in_the_callers_trio_run(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Inside `async with`, the runtime runs in the caller's nursery: no portal thread."""
    async with trio.open_nursery() as nursery:
        driver = FakeDriver(nursery)
        backend = ModalToolBackend.with_profiles(
            profiles={
                "default": fake_config(),
                "other": fake_config(min_sandboxes=0),
            },
            app_name="facade-test",
            drivers={"modal": driver, "local": driver},
        )
        assert backend.profiles.get_profile("other").app_name == "facade-test-other"
        async with backend:
            assert backend.running
            assert not [t for t in threading.enumerate() if t.name.startswith("hermes-actors")]
            slot = await backend.acquire("t", profile="other")
            assert slot.profile == "other"
            status = backend.status()
            assert {pool.profile for pool in status.pools} == {"default", "other"}
            assert "other" in format_status(status)
        assert not backend.running
        assert backend.status().pools == ()
        assert not driver.alive
        nursery.cancel_scope.cancel()


async def test_worker_threads_of_a_trio_program_use_call_blocking(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Sync code in worker threads reaches a backend entered with `async with` in that run."""
    async with fake_backend() as (backend, _):

        def sync_agent() -> str:
            slot = backend.call_blocking(backend.acquire, "threaded")
            [result] = backend.call_blocking(
                backend.execute_batch, [(slot, "bash", {"command": "echo from a thread"})]
            )
            backend.call_blocking(backend.release, slot)
            return result.output

        assert await trio.to_thread.run_sync(sync_agent) == "from a thread\n"
        assert held(backend) == 0
        assert not [t for t in threading.enumerate() if t.name.startswith("hermes-actors")]


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


async def test_cancelling_start_and_stop_at_every_await_leaves_nothing_running(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Entering or leaving `async with`, cancelled at any await, leaves no sandbox running."""
    async with trio.open_nursery() as nursery:
        driver = FakeDriver(nursery)
        driver.create_latency_s = 1.0

        async def start_and_stop() -> None:
            async with ToolBackend(fake_config(min_sandboxes=2), drivers={"local": driver}):
                await trio.sleep(2)  # the warm sandboxes are up: leaving has them to stop

        async def nothing_left() -> None:
            assert not driver.alive
            assert driver.terminated == driver.created

        assert await cancel_at_every_await(start_and_stop, nothing_left) >= 2
        assert driver.created >= 2
        nursery.cancel_scope.cancel()


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


def test_an_implicit_backend_pick_is_logged_once_with_its_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Each backend picked implicitly is logged once per process, saying why."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TERMINAL_ENV", raising=False)
    monkeypatch.delenv("TERMINAL_MODAL_PROFILES_FILE", raising=False)
    monkeypatch.setattr(config_module, "_announced", set())
    caplog.set_level(logging.INFO, logger="hermes_actors.config")
    for _ in range(3):
        ModalToolBackend()
        ToolBackend()
    picks = [record.getMessage() for record in caplog.records if "backend (" in record.getMessage()]
    reason = "no profile sets a backend and TERMINAL_ENV is unset"
    assert picks == [
        f"hermes-actors: using the modal backend ({reason})",
        f"hermes-actors: using the local backend ({reason})",
    ]


async def test_a_profiles_agent_ttl_is_the_dead_man_timeout(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A profile's agent_ttl_s is the agent's dead-man timeout; the host pings at a third of it."""
    async with fake_backend(fake_config(agent_ttl_s=30.0)) as (_, driver):
        await trio.sleep(2)  # the warm sandbox is up
        [sandbox] = driver.alive
        assert sandbox.agent_settings["ttl_s"] == 30.0
        pings = sandbox.pings
        await trio.sleep(35)
        assert sandbox.pings - pings == 3


def test_modal_profiles_reap_orphans_at_start_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ModalToolBackend's profiles reap a crashed run's sandboxes older than a safe age at start."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TERMINAL_ENV", raising=False)
    monkeypatch.delenv("TERMINAL_MODAL_PROFILES_FILE", raising=False)
    profiles = ModalToolBackend().profiles
    driver = DRIVERS["modal"].make(list(profiles.profiles.values()), "run-1")
    assert isinstance(driver, ModalDriver)
    assert (driver.reap_on_start, driver.reap_min_age_s) == (True, 900.0)


# -- callers of the portal thread (its own trio run: real time) ----------------------------------


def running_commands(driver: FakeDriver) -> int:
    return sum(len(sandbox.running) for sandbox in list(driver.alive))


def test_cancelling_asyncio_callers_cancels_their_work_and_leaks_no_slot() -> None:
    """A cancelled asyncio task cancels its work in the portal: no slot held, no command left."""
    driver = FakeDriver()
    driver.create_latency_s = 0.05  # the first cancels land while its sandbox starts

    async def settled(condition: Callable[[], bool]) -> None:
        for _ in range(500):
            if condition():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the portal did not settle within 5 s")

    async def main() -> None:
        backend = ToolBackend(fake_config(min_sandboxes=0), drivers={"local": driver})
        await backend.start()
        try:
            for delay in (0.0, 0.001, 0.003, 0.01, 0.03, 0.1):
                task = asyncio.create_task(backend.acquire("t"))
                await asyncio.sleep(delay)
                task.cancel()
                try:
                    slot = await task
                except asyncio.CancelledError:
                    pass
                else:  # it finished before the cancel: a normal slot, released normally
                    await backend.release(slot)
                await settled(lambda: held(backend) == 0)

            slot = await backend.acquire("t")
            batch = asyncio.create_task(
                backend.execute_batch([(slot, "bash", {"command": "sleep 600"})])
            )
            await settled(lambda: running_commands(driver) == 1)
            batch.cancel()
            with pytest.raises(asyncio.CancelledError):
                await batch
            await settled(lambda: running_commands(driver) == 0)
            [result] = await backend.execute_batch([(slot, "bash", {"command": "echo ok"})])
            assert result.output == "ok\n"
            assert held(backend) == 1
        finally:
            await backend.stop()

    asyncio.run(main())
    assert driver.alive == set()


async def test_cancelling_a_trio_caller_of_the_portal_cancels_the_work() -> None:
    """A trio caller outside the runtime's run, when cancelled, has its command cancelled."""
    driver = FakeDriver()
    backend = ToolBackend(fake_config(), drivers={"local": driver})
    try:
        slot = await backend.acquire("t")
        with trio.move_on_after(0.3) as scope:
            await backend.execute_batch([(slot, "bash", {"command": "sleep 600"})])
        assert scope.cancelled_caught
        with trio.fail_after(5):
            while running_commands(driver):  # noqa: ASYNC110 - another run's state: no event
                await trio.sleep(0.01)
        [result] = await backend.execute_batch([(slot, "bash", {"command": "echo ok"})])
        assert result.output == "ok\n"
    finally:
        await backend.stop()
    assert driver.alive == set()
