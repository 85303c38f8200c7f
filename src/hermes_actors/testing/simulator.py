"""A simulated provider for running the real runtime at trainer scale on trio's virtual clock.

What is simulated, and nothing else: time (`trio.testing.MockClock` with autojump, so ten
thousand trajectories' think times pass in no real time) and the provider. The supervisor, the
pools, the sandbox actors and the agent client are the real ones, unchanged; they reach the
simulated provider through the ordinary driver seam (`SimulatedDriver`), and speak the real
agent protocol to a simulated agent (`_sim_sandbox`). That seam is the cleanest one: it is the
only interface the runtime has to the outside, so every decision above it (pacing, packing,
scaling, replacement, resets, heartbeats, framing) runs as in production.

* `ProviderModel`: what the provider does (creation latency and failures, an account-wide
  creation rate limit with a burst, random sandbox loss, the maximum lifetime, prices). The
  defaults are Modal's published figures (creation p50 2.7 s, p95 11.8 s, p99 about 22 s; about
  2% failed creates; 5 creates/s; CPU and memory priced per second).
* `SimulatedProvider`: the provider's state and its accounting (creates issued, refused,
  failed; sandboxes alive, peak, sandbox-seconds, cost; loss storms).
* `SimulatedDriver`: a `SandboxDriver` in front of it, pacing creates with the same
  `CreateThrottle` and retry delays as the modal driver.
* `Scenario` / `simulate` / `run_scenario`: a trainer running batches of trajectories (acquire,
  then think and run a command, step after step, then release) through the real `Runtime`, and
  the figures of the run (`ScenarioResult`).

Deterministic with a seed: every draw comes from seeded generators and `run_scenario` seeds
trio's scheduler, so one seed gives the same figures every time.
"""

from __future__ import annotations

import functools
import math
import random
import time
from collections.abc import Sequence
from typing import Protocol

import attrs
import trio
import trio.testing

from hermes_actors._config import Profiles, SandboxConfig
from hermes_actors._errors import AcquireTimeout, InfrastructureError, SandboxStartFailed
from hermes_actors._values import Command
from hermes_actors.drivers._modal import (
    DEFAULT_RETRY_DELAYS_S,
    CreateThrottle,
    RetryReason,
    create_with_retries,
)
from hermes_actors.runtime._pool import Lease
from hermes_actors.runtime._runtime import Runtime
from hermes_actors.testing._sim_sandbox import SimulatedSandbox

__all__ = [
    "Constant",
    "CreateFailed",
    "Distribution",
    "LogNormal",
    "LogUniform",
    "LossStorm",
    "ProviderModel",
    "RateLimited",
    "Scenario",
    "ScenarioResult",
    "SideBatch",
    "SimulatedDriver",
    "SimulatedProvider",
    "SimulatedSandbox",
    "Uniform",
    "run_scenario",
    "simulate",
]

_Z95 = 1.6448536269514722


# -- distributions ----------------------------------------------------------------------------


class Distribution(Protocol):
    """Draws one value (seconds) from a seeded generator."""

    def sample(self, rng: random.Random) -> float: ...


@attrs.frozen
class Constant:
    value: float

    def sample(self, rng: random.Random) -> float:
        return self.value


@attrs.frozen
class Uniform:
    low: float
    high: float

    def sample(self, rng: random.Random) -> float:
        return rng.uniform(self.low, self.high)


@attrs.frozen
class LogUniform:
    """Spread evenly over orders of magnitude: as many 50-500 ms commands as 2-20 s ones."""

    low: float
    high: float

    def sample(self, rng: random.Random) -> float:
        return math.exp(rng.uniform(math.log(self.low), math.log(self.high)))


@attrs.frozen
class LogNormal:
    """A log-normal given by its median and 95th percentile (slow tails), capped at `cap`."""

    median: float
    p95: float
    cap: float = math.inf

    def sample(self, rng: random.Random) -> float:
        sigma = math.log(self.p95 / self.median) / _Z95
        return min(self.cap, self.median * math.exp(rng.gauss(0.0, sigma)))


# -- the provider -----------------------------------------------------------------------------


class RateLimited(Exception):
    """The provider refused a create: the account's creation rate limit was exceeded."""


class CreateFailed(Exception):
    """The provider failed a create (a transient failure: retrying may succeed)."""


@attrs.frozen(kw_only=True)
class ProviderModel:
    """How the simulated provider behaves. Defaults: Modal's published figures."""

    #: Seconds from a create request to a running sandbox with its agent ready.
    create_latency: Distribution = LogNormal(median=2.7, p95=11.8, cap=300.0)
    #: Share of creates that fail (after their latency), retryably.
    create_failure_rate: float = 0.02
    #: The account's creation rate limit (a token bucket): refills per second, and its size.
    creates_per_second: float = 5.0
    create_burst: int = 5
    #: Chance per sandbox-hour that the provider loses a sandbox (host failure, preemption).
    loss_per_hour: float = 0.01
    #: Seconds a `reset_slot` takes (killing the slot's processes, wiping its workspace).
    reset_s: float = 0.05
    #: Commands share the sandbox's cores: more running commands than cores run slower.
    cpu_contention: bool = True
    #: Prices per second (Modal's CPU and memory prices; set your own contract's).
    price_per_cpu_second: float = 0.0000131
    price_per_gib_second: float = 0.00000222


@attrs.frozen(kw_only=True)
class LossStorm:
    """`fraction` of the sandboxes alive at `at_s` (after the batch starts) die within `over_s`."""

    at_s: float
    fraction: float = 0.1
    over_s: float = 60.0


class SimulatedProvider:
    """The provider's side: accepts or refuses creates, runs sandboxes, bills them.

    Sandboxes run in `nursery` (they die with it). Every figure is read off the attributes.
    """

    def __init__(self, model: ProviderModel, nursery: trio.Nursery, *, seed: int = 0) -> None:
        self.model = model
        self._nursery = nursery
        self._rng = random.Random(f"provider-{seed}")
        self._tokens = float(model.create_burst)
        self._refilled_at = trio.current_time()
        self._ids = 0
        self.live: dict[str, SimulatedSandbox] = {}
        #: Virtual times at which create requests arrived (accepted or not).
        self.create_times: list[float] = []
        self.creates_rate_limited = 0
        self.creates_failed = 0
        self.sandboxes_created = 0
        self.sandboxes_lost = 0
        self.peak_live = 0
        #: (virtual time, sandboxes alive) at every change.
        self.timeline: list[tuple[float, int]] = [(trio.current_time(), 0)]
        self._finished_seconds = 0.0
        self._finished_cost = 0.0

    # -- creates --------------------------------------------------------------------------------

    def _take_token(self) -> bool:
        now = trio.current_time()
        rate, burst = self.model.creates_per_second, self.model.create_burst
        self._tokens = min(float(burst), self._tokens + (now - self._refilled_at) * rate)
        self._refilled_at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    async def create(self, spec: SandboxConfig) -> SimulatedSandbox:
        """One create request. Raises `RateLimited` (at once) or `CreateFailed` (after latency)."""
        self.create_times.append(trio.current_time())
        if not self._take_token():
            self.creates_rate_limited += 1
            await trio.lowlevel.checkpoint()
            raise RateLimited(
                f"creation rate limit of {self.model.creates_per_second:g}/s exceeded"
            )
        latency = self.model.create_latency.sample(self._rng)
        fails = self._rng.random() < self.model.create_failure_rate
        lost_after = self._loss_delay()
        await trio.sleep(latency)
        if fails:
            self.creates_failed += 1
            raise CreateFailed("the provider could not start the sandbox")
        self._ids += 1
        sandbox = SimulatedSandbox(
            sandbox_id=f"sim-{self._ids}",
            spec=spec,
            reset_s=self.model.reset_s,
            contention=self.model.cpu_contention,
            on_exit=self._gone,
        )
        await self._nursery.start(sandbox.serve)
        self.sandboxes_created += 1
        self.live[sandbox.sandbox_id] = sandbox
        self.peak_live = max(self.peak_live, len(self.live))
        self.timeline.append((trio.current_time(), len(self.live)))
        expires = spec.max_lifetime if math.isfinite(spec.max_lifetime) else math.inf
        if lost_after < expires:
            self._nursery.start_soon(self._kill_after, sandbox, lost_after, "lost")
        elif math.isfinite(expires):
            self._nursery.start_soon(self._kill_after, sandbox, expires, "maximum lifetime")
        return sandbox

    def _loss_delay(self) -> float:
        rate = self.model.loss_per_hour / 3600.0
        return self._rng.expovariate(rate) if rate > 0 else math.inf

    async def _kill_after(self, sandbox: SimulatedSandbox, delay: float, reason: str) -> None:
        with trio.CancelScope() as scope:
            # Stop waiting as soon as the sandbox ends otherwise.
            self._nursery.start_soon(self._cancel_on_exit, sandbox, scope)
            await trio.sleep(delay)
            self.kill(sandbox.sandbox_id, reason)

    async def _cancel_on_exit(self, sandbox: SimulatedSandbox, scope: trio.CancelScope) -> None:
        await sandbox.wait_exited()
        scope.cancel()

    # -- deaths and billing ---------------------------------------------------------------------

    def kill(self, sandbox_id: str, reason: str = "lost") -> None:
        """The provider kills a sandbox (its agent vanishes, its stream ends)."""
        sandbox = self.live.get(sandbox_id)
        if sandbox is None:
            return
        if reason == "maximum lifetime":  # not a loss: the sandbox lived its whole life
            sandbox.die(124, reason)
        else:
            self.sandboxes_lost += 1
            sandbox.die(137, reason)

    def _price_per_second(self, sandbox: SimulatedSandbox) -> float:
        spec = sandbox.spec
        return (
            spec.cpu * self.model.price_per_cpu_second
            + spec.memory / 1024 * self.model.price_per_gib_second
        )

    def _gone(self, sandbox: SimulatedSandbox) -> None:
        if self.live.pop(sandbox.sandbox_id, None) is None:
            return
        seconds = trio.current_time() - sandbox.created_at
        self._finished_seconds += seconds
        self._finished_cost += seconds * self._price_per_second(sandbox)
        self.timeline.append((trio.current_time(), len(self.live)))

    def sandbox_seconds(self) -> float:
        """Seconds of sandbox life billed so far (alive ones up to now)."""
        now = trio.current_time()
        return self._finished_seconds + sum(now - s.created_at for s in self.live.values())

    def cost(self) -> float:
        now = trio.current_time()
        return self._finished_cost + sum(
            (now - s.created_at) * self._price_per_second(s) for s in self.live.values()
        )

    async def loss_storm(self, storm: LossStorm) -> int:
        """Kill `storm.fraction` of the sandboxes alive now, spread over `storm.over_s`."""
        victims = [self.live[key] for key in sorted(self.live, key=lambda k: int(k[4:]))]
        count = round(len(victims) * storm.fraction)
        chosen = self._rng.sample(victims, count)
        times = sorted(self._rng.uniform(0, storm.over_s) for _ in chosen)
        started = trio.current_time()
        for victim, offset in zip(chosen, times, strict=True):
            await trio.sleep_until(started + offset)
            self.kill(victim.sandbox_id, "lost in a loss storm")
        return count

    def peak_creates_per_second(self) -> int:
        """The most create requests that arrived within any one second (a half-open window).

        Request times a rounding error apart from a second's edge count as outside it.
        """
        times, peak, first = self.create_times, 0, 0
        for last, at in enumerate(times):
            while times[first] <= at - 1.0 + 1e-9:
                first += 1
            peak = max(peak, last - first + 1)
        return peak


def _retry_reason(exc: Exception) -> RetryReason | None:
    if isinstance(exc, RateLimited):
        return "rate limit"
    return "transient" if isinstance(exc, CreateFailed) else None


class SimulatedDriver:
    """A `SandboxDriver` over a `SimulatedProvider`, paced and retried like the modal driver.

    Creates go through a `CreateThrottle` (`creates_per_second`, `max_starting` in flight);
    a refusal or a failed create is retried after `retry_delays_s` within the spec's
    `create_retry_budget_s`, a refusal also pushes the throttle back for every create. When the
    retries run out the create fails with `SandboxStartFailed` (retryable, with its attempts),
    and the pool decides (as with the modal driver, whose create loop this mirrors).
    """

    name = "simulated"

    def __init__(
        self,
        provider: SimulatedProvider,
        *,
        creates_per_second: float = 4.0,
        max_starting: int = 32,
        retry_delays_s: Sequence[float] = DEFAULT_RETRY_DELAYS_S,
        adaptive_pace: bool = True,
    ) -> None:
        self.provider = provider
        self.throttle = CreateThrottle(
            per_second=creates_per_second, max_in_flight=max_starting, adaptive=adaptive_pace
        )
        self.retry_delays_s = tuple(retry_delays_s)
        self.create_retries = 0

    async def create(self, spec: SandboxConfig) -> SimulatedSandbox:
        def give_up(exc: Exception, attempts: int, spent: float) -> Exception:
            if not isinstance(exc, RateLimited | CreateFailed):
                return exc  # not the provider's refusal: a defect, raised as it is
            tried = f" (gave up after {attempts} attempts in {spent:.1f} s)"
            return SandboxStartFailed(
                f"the simulated provider refused a sandbox of profile {spec.name!r}: "
                f"{exc}{tried if attempts > 1 else ''}",
                retryable=True,
                attempts=attempts,
            )

        def on_retry(exc: Exception, delay: float) -> None:
            self.create_retries += 1

        return await create_with_retries(
            functools.partial(self.provider.create, spec),
            throttle=self.throttle,
            retry_delays_s=self.retry_delays_s,
            budget_s=spec.create_retry_budget_s,
            retry_reason=_retry_reason,
            on_retry=on_retry,
            give_up=give_up,
        )

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


# -- the trainer ------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class SideBatch:
    """A second profile's batch, `at_s` after the first batch starts, on the same provider
    account and driver (their creates share one throttle): is it served fairly?"""

    trajectories: int
    at_s: float
    slots_per_sandbox: int = 1


@attrs.frozen(kw_only=True)
class Scenario:
    """A trainer's workload and the pool it runs on.

    Each batch starts `trajectories` at once; each trajectory holds one slot for `steps` steps
    of (think, then one command), then releases it. Batches are `pause_s` apart (a training
    step). A sandbox loss costs the trajectory its step: it takes a fresh slot and goes on.
    """

    name: str
    trajectories: int
    steps: int = 20
    batches: int = 1
    pause_s: float = 0.0
    think: Distribution = Uniform(2.0, 30.0)
    command: Distribution = LogUniform(0.05, 20.0)
    slots_per_sandbox: int = 10
    #: Cores and memory per sandbox; None: a quarter core and 512 MiB per slot (at least 1 core,
    #: 2 GiB), so a sandbox of many slots is priced as the bigger machine it needs.
    cpu: float | None = None
    memory_mib: int | None = None
    min_sandboxes: int = 0
    #: None: enough sandboxes for every trajectory at once.
    max_sandboxes: int | None = None
    #: Wait until `min_sandboxes` are ready before the first batch.
    prewarm: bool = False
    idle_timeout_s: float = 120.0
    max_lifetime_s: float = 24 * 3600.0
    max_starting: int = 64
    #: The client's creation pace (the profile's `creates_per_second`), and whether refusals
    #: slow it down (the default) or it stays fixed (as before the adaptive throttle).
    creates_per_second: float = 5.0
    adaptive_pace: bool = True
    acquire_timeout_s: float = 3600.0
    provider: ProviderModel = ProviderModel()
    loss_storm: LossStorm | None = None
    side: SideBatch | None = None
    #: Record the slots held and free and the waiters every this many seconds (None: never;
    #: each sample reads the pool's whole status, a cost that grows with its sandboxes).
    sample_every_s: float | None = None
    seed: int = 0

    @property
    def sandbox_cpu(self) -> float:
        return self.cpu if self.cpu is not None else max(1.0, 0.25 * self.slots_per_sandbox)

    @property
    def sandbox_memory_mib(self) -> int:
        if self.memory_mib is not None:
            return self.memory_mib
        return max(2048, 512 * self.slots_per_sandbox)

    @property
    def sandboxes_needed(self) -> int:
        return math.ceil(self.trajectories / self.slots_per_sandbox)

    def profile(self) -> SandboxConfig:
        return SandboxConfig(
            name="sim",
            backend="modal",
            cpu=self.sandbox_cpu,
            memory=self.sandbox_memory_mib,
            slots_per_sandbox=self.slots_per_sandbox,
            min_sandboxes=self.min_sandboxes,
            max_sandboxes=self.max_sandboxes or self.sandboxes_needed,
            idle_timeout=self.idle_timeout_s,
            max_lifetime=self.max_lifetime_s,
            acquire_timeout_s=self.acquire_timeout_s,
            max_starting=self.max_starting,
            creates_per_second=self.creates_per_second,
        )

    def profiles(self) -> Profiles:
        main = self.profile()
        configs = {"sim": main}
        if self.side is not None:
            slots = self.side.slots_per_sandbox
            configs["side"] = attrs.evolve(
                main,
                name="side",
                slots_per_sandbox=slots,
                cpu=max(1.0, 0.25 * slots),
                memory=max(2048, 512 * slots),
                max_sandboxes=math.ceil(self.side.trajectories / slots),
            )
        return Profiles(profiles=configs, default_profile="sim")


@attrs.frozen(kw_only=True)
class ScenarioResult:
    """The figures of one simulated run (times are virtual seconds from the first batch)."""

    scenario: Scenario
    #: The first command result any trajectory got.
    first_result_s: float
    wall_s: float
    #: Seconds spent pre-warming before the first batch (not in `wall_s`).
    prewarm_s: float
    acquire_wait_p50_s: float
    acquire_wait_p99_s: float
    peak_sandboxes: int
    mean_sandboxes: float
    sandbox_seconds: float
    cost: float
    creates_issued: int
    creates_rate_limited: int
    creates_failed: int
    #: The most create requests that reached the provider within any one second.
    peak_creates_per_second: int
    sandboxes_created: int
    sandboxes_lost: int
    #: Steps lost with a sandbox, and how long their trajectories waited for a new slot.
    steps_lost: int
    lost_wait_p50_s: float
    lost_wait_max_s: float
    acquire_timeouts: int
    #: The side batch's acquire waits and its trajectories done (zeros without one).
    side_acquire_wait_p50_s: float
    side_acquire_wait_p99_s: float
    side_trajectories_done: int
    #: Acquires failed with the pool's start error (it gave up starting sandboxes).
    acquire_failures: int
    trajectories_done: int
    commands: int
    #: Host CPU seconds of the whole run, and per simulated command.
    host_cpu_s: float
    host_cpu_per_command_s: float
    #: (virtual time, sandboxes alive) at every change.
    timeline: tuple[tuple[float, int], ...] = attrs.field(repr=False)
    #: (virtual time, slots held, slots free, waiters) every `sample_every_s`.
    capacity: tuple[tuple[float, int, int, int], ...] = attrs.field(repr=False)


def percentile(values: Sequence[float], fraction: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


@attrs.define
class _Tally:
    acquire_waits: list[float] = attrs.field(factory=list)
    lost_waits: list[float] = attrs.field(factory=list)
    first_result: float = math.inf
    acquire_timeouts: int = 0
    acquire_failures: int = 0
    done: int = 0
    commands: int = 0


async def _trajectory(
    runtime: Runtime,
    scenario: Scenario,
    tally: _Tally,
    key: str,
    started: float,
    profile: str = "sim",
) -> None:
    rng = random.Random(f"trajectory-{scenario.seed}-{key}")

    async def acquire() -> Lease | None:
        asked = trio.current_time()
        try:
            lease = await runtime.acquire(profile, key)
        except AcquireTimeout:
            tally.acquire_timeouts += 1
            return None
        except InfrastructureError:
            # The pool gave up starting sandboxes (the provider's cause): the trainer drops it.
            tally.acquire_failures += 1
            return None
        tally.acquire_waits.append(trio.current_time() - asked)
        return lease

    lease = await acquire()
    if lease is None:
        return
    try:
        for _ in range(scenario.steps):
            await trio.sleep(scenario.think.sample(rng))
            duration = scenario.command.sample(rng)
            while True:
                try:
                    await runtime.call(lease, Command(command=f"sleep {duration:.6f}"))
                    break
                except InfrastructureError:
                    # The sandbox was lost: mask the step, go on in a fresh slot.
                    lost_at = trio.current_time()
                    await runtime.release(lease)
                    lease = await acquire()
                    if lease is None:
                        return
                    tally.lost_waits.append(trio.current_time() - lost_at)
            tally.commands += 1
            tally.first_result = min(tally.first_result, trio.current_time() - started)
        tally.done += 1
    finally:
        if lease is not None:
            with trio.CancelScope(shield=True):
                await runtime.release(lease)


async def _sample_capacity(
    runtime: Runtime, out: list[tuple[float, int, int, int]], started: float, every_s: float
) -> None:
    while True:
        pools = runtime.status().pools
        held = sum(p.slots_held for p in pools)
        free = sum(p.slots_free for p in pools)
        waiting = sum(p.waiters for p in pools)
        out.append((trio.current_time() - started, held, free, waiting))
        await trio.sleep(every_s)


async def simulate(scenario: Scenario) -> ScenarioResult:
    """Run `scenario` through a real `Runtime` over a simulated provider; return its figures.

    Meant for a virtual clock (`run_scenario` provides one; under pytest-trio use the
    `autojump_clock` fixture): on a real clock it would take as long as the workload.
    """
    cpu_started = time.process_time()
    tally = _Tally()
    capacity: list[tuple[float, int, int, int]] = []
    side_tally = _Tally()
    profiles = scenario.profiles()
    async with trio.open_nursery() as outer:
        provider = SimulatedProvider(scenario.provider, outer, seed=scenario.seed)
        driver = SimulatedDriver(
            provider,
            creates_per_second=scenario.creates_per_second,
            # One driver serves every profile of the account, as the runtime's modal driver.
            max_starting=scenario.max_starting * len(profiles.profiles),
            adaptive_pace=scenario.adaptive_pace,
        )
        runtime = Runtime(profiles, drivers={"modal": driver}, run_id=f"sim{scenario.seed}")
        async with trio.open_nursery() as nursery:
            await nursery.start(runtime.run)
            prewarm_started = trio.current_time()
            if scenario.prewarm:
                await _wait_ready(runtime, scenario.min_sandboxes * scenario.slots_per_sandbox)
            started = trio.current_time()
            prewarm_s = started - prewarm_started
            if scenario.sample_every_s is not None:
                every_s = scenario.sample_every_s
                nursery.start_soon(_sample_capacity, runtime, capacity, started, every_s)
            if scenario.loss_storm is not None:
                storm = scenario.loss_storm
                nursery.start_soon(_storm_at, provider, storm, started + storm.at_s)

            async def batches() -> None:
                for batch in range(scenario.batches):
                    if batch:
                        await trio.sleep(scenario.pause_s)
                    async with trio.open_nursery() as trainer:
                        for number in range(scenario.trajectories):
                            key = f"b{batch}-t{number}"
                            trainer.start_soon(_trajectory, runtime, scenario, tally, key, started)

            async def side_batch(side: SideBatch) -> None:
                await trio.sleep_until(started + side.at_s)
                async with trio.open_nursery() as trainer:
                    for number in range(side.trajectories):
                        trainer.start_soon(
                            _trajectory,
                            runtime,
                            scenario,
                            side_tally,
                            f"side-{number}",
                            started,
                            "side",
                        )

            async with trio.open_nursery() as work:
                work.start_soon(batches)
                if scenario.side is not None:
                    work.start_soon(side_batch, scenario.side)
            wall_s = trio.current_time() - started
            sandbox_seconds, cost = provider.sandbox_seconds(), provider.cost()
            nursery.cancel_scope.cancel(reason="the scenario is over")
        outer.cancel_scope.cancel(reason="the scenario is over")
    host_cpu = time.process_time() - cpu_started
    return ScenarioResult(
        scenario=scenario,
        first_result_s=tally.first_result,
        wall_s=wall_s,
        prewarm_s=prewarm_s,
        acquire_wait_p50_s=percentile(tally.acquire_waits, 0.50),
        acquire_wait_p99_s=percentile(tally.acquire_waits, 0.99),
        peak_sandboxes=provider.peak_live,
        mean_sandboxes=_mean_live(provider.timeline, started, started + wall_s),
        sandbox_seconds=sandbox_seconds,
        cost=cost,
        creates_issued=len(provider.create_times),
        creates_rate_limited=provider.creates_rate_limited,
        creates_failed=provider.creates_failed,
        peak_creates_per_second=provider.peak_creates_per_second(),
        sandboxes_created=provider.sandboxes_created,
        sandboxes_lost=provider.sandboxes_lost,
        steps_lost=len(tally.lost_waits),
        lost_wait_p50_s=percentile(tally.lost_waits, 0.50),
        lost_wait_max_s=max(tally.lost_waits, default=0.0),
        acquire_timeouts=tally.acquire_timeouts + side_tally.acquire_timeouts,
        side_acquire_wait_p50_s=percentile(side_tally.acquire_waits, 0.50),
        side_acquire_wait_p99_s=percentile(side_tally.acquire_waits, 0.99),
        side_trajectories_done=side_tally.done,
        acquire_failures=tally.acquire_failures + side_tally.acquire_failures,
        trajectories_done=tally.done,
        commands=tally.commands,
        host_cpu_s=host_cpu,
        host_cpu_per_command_s=host_cpu / max(1, tally.commands),
        timeline=tuple((at - started, live) for at, live in provider.timeline),
        capacity=tuple(capacity),
    )


async def _wait_ready(runtime: Runtime, slots: int) -> None:
    # The pool publishes no readiness event, only snapshots; on the virtual clock polling is free.
    while sum(p.slots_free for p in runtime.status().pools) < slots:  # noqa: ASYNC110
        await trio.sleep(0.5)


async def _storm_at(provider: SimulatedProvider, storm: LossStorm, at: float) -> None:
    await trio.sleep_until(at)
    await provider.loss_storm(storm)


def _mean_live(timeline: Sequence[tuple[float, int]], start: float, end: float) -> float:
    """The time-average of sandboxes alive over [start, end]."""
    if end <= start:
        return 0.0
    area, previous_at, previous_live = 0.0, start, 0
    for at, live in timeline:
        if at > end:
            break
        if at > start:
            area += (at - previous_at) * previous_live
            previous_at = at
        previous_live = live
    area += (end - previous_at) * previous_live
    return area / (end - start)


def run_scenario(scenario: Scenario) -> ScenarioResult:
    """Run `scenario` in a fresh trio run on a virtual clock; same seed, same figures."""
    # trio shuffles each scheduling batch with a module-level generator; seeding it makes the
    # order in which simultaneous tasks run (and so every figure) repeatable.
    scheduler = trio._core._run
    scheduler_rng = getattr(scheduler, "_r", None)
    if isinstance(scheduler_rng, random.Random):
        scheduler_rng.seed(f"scheduler-{scenario.seed}")
    # trio wakes the waiters of an event, and of a cancelled scope, in the order of a set of
    # tasks (by their address); its deterministic mode (made for Hypothesis) orders each batch
    # of runnable tasks by creation before shuffling it, so one seed gives one run whatever
    # the process.
    deterministic = getattr(scheduler, "_ALLOW_DETERMINISTIC_SCHEDULING", None)
    if deterministic is not None:
        scheduler._ALLOW_DETERMINISTIC_SCHEDULING = True  # type: ignore[misc]
    clock = trio.testing.MockClock(autojump_threshold=0)
    try:
        return trio.run(simulate, scenario, clock=clock)
    finally:
        if deterministic is not None:
            scheduler._ALLOW_DETERMINISTIC_SCHEDULING = deterministic  # type: ignore[misc]
