"""The simulated provider and trainer: small scenarios on the virtual clock, repeatable by seed."""

from __future__ import annotations

import logging
import random
import re
import sys
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing

from hermes_actors._config import SandboxConfig
from hermes_actors._errors import SandboxLost, SandboxStartFailed
from hermes_actors._values import Command, ListFiles, ReadFile, WriteFile
from hermes_actors.runtime._sandbox import SandboxActor
from hermes_actors.testing.simulator import (
    Constant,
    LogNormal,
    LogUniform,
    LossStorm,
    ProviderModel,
    Scenario,
    SideBatch,
    SimulatedDriver,
    SimulatedProvider,
    percentile,
    run_scenario,
    simulate,
)

# `bench` lives at the repository root, next to `tests`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: A provider without randomness: every create takes 2 s and succeeds, nothing is lost.
STEADY = ProviderModel(
    create_latency=Constant(2.0), create_failure_rate=0.0, loss_per_hour=0.0, reset_s=0.0
)


def small(**changes: object) -> Scenario:
    base = Scenario(name="small", trajectories=24, steps=3, slots_per_sandbox=4)
    return attrs.evolve(base, **changes)  # type: ignore[arg-type]


def figures(result: object) -> dict[str, object]:
    values = attrs.asdict(result, recurse=False)  # type: ignore[arg-type]
    del values["host_cpu_s"], values["host_cpu_per_command_s"]
    return values


def test_same_seed_same_figures() -> None:
    """Two runs of one scenario and seed give identical figures; another seed differs."""
    first = run_scenario(small(seed=3))
    again = run_scenario(small(seed=3))
    other = run_scenario(small(seed=4))
    assert figures(first) == figures(again)
    assert figures(first) != figures(other)
    assert first.trajectories_done == 24
    assert first.commands == 24 * 3
    assert first.acquire_timeouts == 0


def test_constant_workload_has_exact_figures() -> None:
    """With fixed durations, wall time and sandbox-seconds are what the arithmetic says."""
    scenario = small(
        trajectories=2,
        steps=2,
        slots_per_sandbox=1,
        think=Constant(3.0),
        command=Constant(1.5),
        provider=STEADY,
    )
    result = run_scenario(scenario)
    # Both sandboxes are ready at 2 s (creates paced 0.2 s apart: the second at 2.2 s); each
    # trajectory then thinks 3 s and runs 1.5 s, twice; the release's reset takes no time.
    assert result.first_result_s == pytest.approx(2.0 + 4.5)
    assert result.wall_s == pytest.approx(2.2 + 9.0)
    assert result.sandboxes_created == 2
    assert result.sandbox_seconds == pytest.approx(9.0 + 9.0 + 0.2)
    assert result.peak_sandboxes == 2
    assert result.acquire_wait_p50_s == pytest.approx(2.0)
    assert result.acquire_wait_p99_s == pytest.approx(2.2)
    price = STEADY.price_per_cpu_second + 2 * STEADY.price_per_gib_second
    assert result.cost == pytest.approx(result.sandbox_seconds * price)


def test_slots_cut_sandbox_seconds() -> None:
    """Ten slots per sandbox use far fewer sandbox-seconds than one for the same workload."""
    one = run_scenario(small(trajectories=40, slots_per_sandbox=1, provider=STEADY))
    ten = run_scenario(small(trajectories=40, slots_per_sandbox=10, provider=STEADY))
    assert one.sandboxes_created == 40
    assert ten.sandboxes_created == 4
    assert one.sandbox_seconds > 5 * ten.sandbox_seconds
    assert one.commands == ten.commands == 40 * 3


def test_creation_stays_within_the_configured_rate() -> None:
    """The driver's pace keeps creates under the provider's limit: none refused."""
    result = run_scenario(small(trajectories=60, slots_per_sandbox=1, creates_per_second=5.0))
    assert result.creates_rate_limited == 0
    assert result.peak_creates_per_second <= 5
    assert result.trajectories_done == 60


def test_rate_limit_answers_slow_creation_instead_of_failing() -> None:
    """A client pacing above the provider's limit slows down when refused; no acquire fails."""
    provider = attrs.evolve(STEADY, creates_per_second=2.0, create_burst=2)
    result = run_scenario(
        small(trajectories=150, slots_per_sandbox=1, creates_per_second=10.0, provider=provider)
    )
    assert result.creates_rate_limited > 0
    # Refusals are a fraction of the creates: the pace found the limit and kept to it.
    assert result.creates_rate_limited < result.sandboxes_created / 4
    assert result.peak_creates_per_second <= 2 * provider.creates_per_second + provider.create_burst
    assert result.acquire_failures == 0
    assert result.acquire_timeouts == 0
    assert result.trajectories_done == 150


def test_loss_storm_costs_steps_not_trajectories() -> None:
    """Sandboxes lost mid-run cost their steps; trajectories resume on fresh slots and finish."""
    result = run_scenario(
        small(
            trajectories=40,
            steps=6,
            slots_per_sandbox=2,
            think=Constant(1.0),
            command=Constant(10.0),
            provider=STEADY,
            loss_storm=LossStorm(at_s=20.0, fraction=0.5, over_s=5.0),
        )
    )
    assert result.sandboxes_lost == 10
    assert result.steps_lost > 0
    assert result.lost_wait_max_s > 0
    assert result.trajectories_done == 40
    assert result.commands == 40 * 6
    assert result.sandboxes_created == 20 + 10


def test_a_lost_trajectory_does_not_wait_for_the_batch_being_created() -> None:
    """A trajectory that loses its sandbox while most of the batch still waits for its first
    slot gets the next sandbox that comes up, not one after the whole batch's."""
    result = run_scenario(
        small(
            trajectories=100,
            steps=3,
            slots_per_sandbox=1,
            think=Constant(1.0),
            command=Constant(10.0),
            provider=STEADY,
            loss_storm=LossStorm(at_s=5.0, fraction=0.5, over_s=1.0),
        )
    )
    assert (result.sandboxes_lost, result.steps_lost) == (8, 8)
    # 85 trajectories still wait for their first slot, 17 s of creates at 5/s; a lost one
    # waits for the next sandbox to come up (one every 0.2 s).
    assert result.acquire_wait_p99_s > 20.0
    assert result.lost_wait_max_s < 1.0
    assert result.trajectories_done == 100


def test_a_second_profile_is_served_while_the_first_scales_up() -> None:
    """A late small batch of another profile does not wait for the big batch's creates."""
    result = run_scenario(
        small(
            trajectories=100,
            slots_per_sandbox=1,
            max_starting=8,
            provider=STEADY,
            side=SideBatch(trajectories=4, at_s=5.0),
        )
    )
    assert result.side_trajectories_done == 4
    assert result.trajectories_done == 100
    # Behind at most 8 creates of the other profile at 5/s, plus its own 2 s create.
    assert result.side_acquire_wait_p99_s <= 8 / 5 + 2.0 + 1.0
    assert result.acquire_wait_p99_s > 15.0


def test_failed_creates_are_retried() -> None:
    """Creates that fail are retried by the driver; the run completes."""
    provider = attrs.evolve(STEADY, create_failure_rate=0.3)
    result = run_scenario(small(trajectories=20, slots_per_sandbox=1, provider=provider, seed=1))
    assert result.creates_failed > 0
    assert result.creates_issued == result.sandboxes_created + result.creates_failed
    assert result.trajectories_done == 20


def test_log_normal_matches_its_percentiles() -> None:
    """The default creation latency has Modal's published median and tail."""
    rng = random.Random(0)
    latency = ProviderModel().create_latency
    draws = [latency.sample(rng) for _ in range(20000)]
    assert percentile(draws, 0.50) == pytest.approx(2.7, rel=0.05)
    assert percentile(draws, 0.95) == pytest.approx(11.8, rel=0.08)
    assert percentile(draws, 0.99) == pytest.approx(22.4, rel=0.15)
    assert LogNormal(1.0, 2.0, cap=3.0).sample(random.Random(1)) <= 3.0
    spread = LogUniform(0.05, 20.0)
    assert all(0.05 <= spread.sample(rng) <= 20.0 for _ in range(1000))


async def test_agent_semantics_through_the_real_actor(autojump_clock: trio.abc.Clock) -> None:
    """The simulated agent serves the real actor: sleeps, timeouts, exit codes, files, resets."""
    async with trio.open_nursery() as nursery:
        provider = SimulatedProvider(STEADY, nursery)
        driver = SimulatedDriver(provider)
        config = SandboxConfig(name="p", slots_per_sandbox=2, cpu=2.0)
        actor = SandboxActor(driver=driver, config=config)
        await nursery.start(actor.run)
        started = trio.current_time()
        async with trio.open_nursery() as both:
            both.start_soon(lambda: actor.exec(0, Command(command="sleep 4")))
            both.start_soon(lambda: actor.exec(1, Command(command="sleep 4")))
        assert trio.current_time() - started == pytest.approx(4.0)
        timed_out = await actor.exec(0, Command(command="sleep 10", timeout_s=1.0))
        assert timed_out.timed_out
        assert timed_out.exit_code == 124
        assert (await actor.exec(1, Command(command="exit 3"))).exit_code == 3
        await actor.call(0, WriteFile(path="a", data=b"hi"))
        assert (await actor.call(0, ReadFile(path="a"))).data == b"hi"
        await actor.reset_slot(0)
        assert (await actor.call(0, ListFiles())).entries == ()
        with trio.move_on_after(1.0):
            await actor.exec(0, Command(command="sleep 100"))
        sandbox = next(iter(provider.live.values()))
        assert sandbox.busy == 0
        provider.kill(sandbox.sandbox_id)
        with pytest.raises(SandboxLost):
            await actor.exec(0, Command(command="sleep 1"))
        assert provider.live == {}
        assert provider.sandboxes_lost == 1
        nursery.cancel_scope.cancel()


async def test_contention_stretches_commands(autojump_clock: trio.abc.Clock) -> None:
    """More commands than cores run slower, as on a real machine."""
    async with trio.open_nursery() as nursery:
        provider = SimulatedProvider(STEADY, nursery)
        actor = SandboxActor(
            driver=SimulatedDriver(provider),
            config=SandboxConfig(name="p", slots_per_sandbox=2, cpu=1.0),
        )
        await nursery.start(actor.run)
        started = trio.current_time()
        async with trio.open_nursery() as both:
            both.start_soon(lambda: actor.exec(0, Command(command="sleep 4")))
            both.start_soon(lambda: actor.exec(1, Command(command="sleep 4")))
        assert trio.current_time() - started == pytest.approx(8.0)
        nursery.cancel_scope.cancel()


async def test_driver_gives_up_after_its_retries(autojump_clock: trio.abc.Clock) -> None:
    """A provider that refuses every create ends in a retryable SandboxStartFailed."""
    async with trio.open_nursery() as nursery:
        provider = SimulatedProvider(attrs.evolve(STEADY, create_failure_rate=1.0), nursery)
        driver = SimulatedDriver(provider, retry_delays_s=(1.0, 2.0))
        with pytest.raises(SandboxStartFailed) as failed:
            await driver.create(SandboxConfig(name="p"))
        assert failed.value.retryable
        assert provider.creates_failed == 3
        assert driver.create_retries == 2
        nursery.cancel_scope.cancel()


async def test_simulate_leaves_nothing_running(autojump_clock: trio.abc.Clock) -> None:
    """A scenario run under the test's own clock ends with every sandbox gone."""
    result = await simulate(small(provider=STEADY))
    assert result.trajectories_done == 24
    assert result.timeline[-1][1] == 0


def test_bench_scale_writes_its_report(tmp_path: Path) -> None:
    """`python -m bench.scale --smoke` writes the report with its targets, table and chart."""
    from bench import scale

    level = logging.getLogger("hermes_actors").level
    assert scale.main(["--smoke", "--only", "slots,storm", "--output", str(tmp_path)]) == 0
    # The runtime's warnings were silenced for the run only.
    assert logging.getLogger("hermes_actors").level == level
    report = (tmp_path / "scale.md").read_text()
    assert "## Targets" in report
    assert "| 24 x 10 slots |" in report
    assert "fewer sandbox-seconds" in report
    assert (tmp_path / "scale.png").stat().st_size > 10_000


def test_sizing_doc_code_runs() -> None:
    """The code in docs/sizing.md runs as written."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "sizing.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    assert blocks
    for block in blocks:
        exec(compile(block, "docs/sizing.md", "exec"), {})
