"""`python -m bench.scale`: trainer-scale scenarios on the simulated provider (issue 14).

Runs the real runtime (supervisor, pools, sandbox actors, agent client) on trio's virtual clock
over `hermes_actors.testing.simulator`'s provider model (Modal's published figures), and writes
`bench/results/scale.md` and `scale.png`. Options: `--smoke` (tiny sizes, for the tests),
`--only a,b` (scenario groups), `--scenario NAME` (one scenario, repeatable), `--output DIR`,
`--save FILE` and `--render-from FILE,...` (a report from saved runs, the rows of later runs
replacing those of earlier ones, and of this run last: re-run only what a change affects),
`--label TEXT` (this run's rows are named `NAME [TEXT]`, e.g. the code before a fix).
Every row says which run measured it.

Every figure is virtual time except "host CPU", which is what simulating cost this machine.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import logging
import math
import os
import pickle
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import attrs

import hermes_actors
from hermes_actors.testing.simulator import (
    LossStorm,
    ProviderModel,
    Scenario,
    ScenarioResult,
    SideBatch,
    run_scenario,
)

#: The label of the rows measured before lost trajectories went first (see `findings`).
BEFORE_REACQUIRE = "before: FIFO re-acquire"
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
GROUPS = ("slots", "slots10k", "warm", "pause", "storm", "ratelimit", "defaults", "fairness")


@attrs.frozen(kw_only=True)
class Sizes:
    small: int  # the 1,024-trajectory scenarios
    large: int  # the 10,240-trajectory scenarios
    steps: int


FULL = Sizes(small=1024, large=10240, steps=20)
SMOKE = Sizes(small=24, large=48, steps=3)


def tuned(name: str, trajectories: int, steps: int, slots: int, **changes: object) -> Scenario:
    """A cold pool sized for the batch, creating at the account's limit (5/s)."""
    base = Scenario(
        name=name,
        trajectories=trajectories,
        steps=steps,
        slots_per_sandbox=slots,
        creates_per_second=5.0,
        max_starting=64,
    )
    return attrs.evolve(base, **changes)  # type: ignore[arg-type]


def scenarios(group: str, sizes: Sizes) -> list[Scenario]:
    small, large, steps = sizes.small, sizes.large, sizes.steps
    if group == "slots":
        return [tuned(f"{small} x {s} slots", small, steps, s) for s in (1, 4, 10, 32)]
    if group == "slots10k":
        return [tuned(f"{large} x {s} slots", large, steps, s) for s in (1, 4, 10, 32)]
    if group == "warm":
        needed = math.ceil(small / 10)
        return [
            tuned(f"{small} x 10, cold", small, steps, 10),
            tuned(f"{small} x 10, warm", small, steps, 10, min_sandboxes=needed, prewarm=True),
        ]
    if group == "pause":
        # Two rollout batches 90 s apart (a training step): does the pool stay warm between?
        return [
            tuned(
                f"{small} x 10, 2 batches, idle {idle:g} s",
                small,
                steps,
                10,
                batches=2,
                pause_s=90.0,
                idle_timeout_s=idle,
            )
            for idle in (30.0, 120.0, 300.0)
        ]
    if group == "storm":
        # 10% of the sandboxes die within a minute, 2 minutes in: at one slot per sandbox most
        # trajectories are still waiting for their first slot then; at ten, a few are.
        storm = LossStorm(at_s=120.0, fraction=0.1, over_s=60.0)
        return [
            tuned(
                f"{n} x {slots}, loss storm",
                n,
                steps,
                slots,
                loss_storm=storm,
                # The chart draws the first storm's slots and waiters.
                sample_every_s=1.0 if (n, slots) == (small, 10) else None,
            )
            for n in (small, large)
            for slots in (10, 1)
        ]
    if group == "ratelimit":
        # The client paces at 10/s, the account allows 5/s: refusals must slow it, not fail.
        return [
            tuned(
                f"{small} x 1, pace 10/s > limit 5/s, {kind} pace",
                small,
                steps,
                1,
                creates_per_second=10.0,
                adaptive_pace=kind == "adaptive",
            )
            for kind in ("fixed", "adaptive")
        ]
    if group == "defaults":
        # The profile's default pace (4 creates/s) with the old and the new default max_starting.
        return [
            tuned(
                f"{small} x {slots}, max_starting {starting} ({when} default)",
                small,
                steps,
                slots,
                max_starting=starting,
                creates_per_second=4.0,
            )
            for slots in (1, 10)
            for starting, when in ((4, "old"), (32, "new"))
        ]
    if group == "fairness":
        # A small batch of a second profile arrives while the first one is still creating.
        side = SideBatch(trajectories=max(4, small // 64), at_s=60.0)
        return [
            tuned(
                f"{small} x 1 + {side.trajectories} of a 2nd profile at 60 s",
                small,
                steps,
                1,
                side=side,
            )
        ]
    raise ValueError(f"unknown group {group!r}; groups are {GROUPS}")


# -- the report ---------------------------------------------------------------------------------


def seconds(value: float) -> str:
    if math.isinf(value):
        return "-"
    return f"{value:,.1f}"


COLUMNS: Sequence[tuple[str, Callable[[ScenarioResult], str]]] = (
    ("scenario", lambda r: r.scenario.name),
    ("first result s", lambda r: seconds(r.first_result_s)),
    ("wall s", lambda r: seconds(r.wall_s)),
    (
        "acquire wait p50 / p99 s",
        lambda r: f"{r.acquire_wait_p50_s:.1f} / {r.acquire_wait_p99_s:.1f}",
    ),
    ("sandboxes peak / mean", lambda r: f"{r.peak_sandboxes:,} / {r.mean_sandboxes:,.0f}"),
    ("sandbox-s", lambda r: f"{r.sandbox_seconds:,.0f}"),
    ("cost $", lambda r: f"{r.cost:,.2f}"),
    (
        "creates issued / refused / failed",
        lambda r: f"{r.creates_issued:,} / {r.creates_rate_limited:,} / {r.creates_failed:,}",
    ),
    ("peak creates/s", lambda r: str(r.peak_creates_per_second)),
    (
        "lost sandboxes / steps, wait p50 / max s",
        lambda r: (
            f"{r.sandboxes_lost} / {r.steps_lost}, "
            f"{r.lost_wait_p50_s:.1f} / {r.lost_wait_max_s:.1f}"
        ),
    ),
    ("acquire timeouts / failures", lambda r: f"{r.acquire_timeouts} / {r.acquire_failures}"),
    (
        "host CPU s (per command ms)",
        lambda r: f"{r.host_cpu_s:,.1f} ({r.host_cpu_per_command_s * 1000:.2f})",
    ),
)


def run_letters(rows: Sequence[Row]) -> dict[Run, str]:
    """A letter per run, in the order the runs were measured."""
    runs = sorted({row.run for row in rows}, key=lambda run: run.date)
    return {run: chr(ord("A") + number) for number, run in enumerate(runs)}


#: The run column of rows kept from an earlier report (`--keep-rows-from`).
EARLIER = "earlier"


def kept_rows(path: str, measured: Sequence[Row]) -> dict[str, list[str]]:
    """The cells of an earlier report's figures whose scenarios were not measured again."""
    names = {row.result.scenario.name for row in measured}
    kept = {}
    with open(path) as file:
        for line in file:
            if not line.startswith("| ") or line.startswith("| scenario |"):
                continue
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if cells[0] not in names:
                kept[cells[0]] = cells[: len(COLUMNS)]
    return kept


def table(rows: Sequence[Row], kept: dict[str, list[str]], sizes: Sizes) -> list[str]:
    letters = run_letters(rows)
    cells = {
        row.result.scenario.name: [cell(row.result) for _, cell in COLUMNS] + [letters[row.run]]
        for row in rows
    }
    cells.update({name: [*values, EARLIER] for name, values in kept.items()})
    lines = [
        "| " + " | ".join(name for name, _ in COLUMNS) + " | run |",
        "|" + "|".join("---" for _ in COLUMNS) + "|---|",
    ]
    lines += ["| " + " | ".join(cells[name]) + " |" for name in sorted(cells, key=order(sizes))]
    return lines


def runs_described(rows: Sequence[Row]) -> list[str]:
    lines = []
    for run, letter in run_letters(rows).items():
        count = sum(1 for row in rows if row.run == run)
        lines.append(
            f"* {letter}: code {run.commit}, {run.date}, load average {run.load} at the start, "
            f"{run.jobs} job{'s' if run.jobs > 1 else ''}, {run.elapsed_s / 60:.1f} min of real "
            f"time for its scenarios ({count} of them in this report)"
            + (f"; its rows are marked [{run.label}]." if run.label else ".")
        )
    return lines


def find(results: Sequence[ScenarioResult], name: str) -> ScenarioResult | None:
    return next((r for r in results if r.scenario.name == name), None)


def live_at(result: ScenarioResult, at: float) -> int:
    return next((live for when, live in reversed(result.timeline) if when <= at), 0)


def storm_recovery(result: ScenarioResult) -> tuple[int, int, int]:
    """Sandboxes alive when the storm began, the fewest until 30 s after it, and then."""
    storm = result.scenario.loss_storm
    assert storm is not None
    before = live_at(result, storm.at_s)
    settled = storm.at_s + storm.over_s + 30.0
    during = [live for at, live in result.timeline if storm.at_s <= at <= settled]
    return before, min(during, default=before), live_at(result, settled)


def targets(results: Sequence[ScenarioResult], sizes: Sizes) -> list[str]:
    # Labelled rows measured other code (before a fix): the targets are the current code's.
    results = [r for r in results if " [" not in r.scenario.name]
    lines = []
    for n in (sizes.small, sizes.large):
        one, ten = find(results, f"{n} x 1 slots"), find(results, f"{n} x 10 slots")
        if one is None or ten is None:
            continue
        ratio = one.sandbox_seconds / ten.sandbox_seconds
        wall = ten.wall_s / one.wall_s
        met = ratio >= 5 and wall <= 1.10
        lines.append(
            f"* {n:,} trajectories, 10 slots against 1: **{ratio:.1f}x fewer sandbox-seconds** "
            f"(target >= 5x), wall time {wall:.2f}x of one sandbox per trajectory (target <= "
            f"1.10x): {'met' if met else 'NOT met'}."
        )
    paced = [
        r
        for r in results
        if r.scenario.creates_per_second <= r.scenario.provider.creates_per_second
    ]
    worst = max(
        paced, key=lambda r: r.peak_creates_per_second / r.scenario.creates_per_second, default=None
    )
    if worst is not None:
        within = all(
            r.peak_creates_per_second <= math.ceil(r.scenario.creates_per_second) for r in paced
        )
        lines.append(
            "* Creation never above the configured rate: the most create requests in any one "
            f"second was {max(r.peak_creates_per_second for r in paced)} (configured "
            f"{worst.scenario.creates_per_second:g}/s): {'met' if within else 'NOT met'}."
        )
    limited = [
        r for r in results if r.scenario.creates_per_second > r.scenario.provider.creates_per_second
    ]
    for r in limited:
        ok = r.acquire_failures == 0 and r.acquire_timeouts == 0
        verdict = ("met" if ok else "NOT met") if r.scenario.adaptive_pace else "before the fix"
        lines.append(
            f"* Rate-limit answers slow creation instead of failing acquires ({r.scenario.name}): "
            f"{r.creates_rate_limited:,} refusals, {r.acquire_failures} failed and "
            f"{r.acquire_timeouts} timed-out acquires: {verdict}."
        )
    for r in results:
        if r.scenario.loss_storm is None:
            continue
        before, lowest, settled = storm_recovery(r)
        ok = settled >= before and r.acquire_timeouts == 0 and r.acquire_failures == 0
        lines.append(
            f"* Capacity after a loss storm ({r.scenario.name}: {r.sandboxes_lost} sandboxes lost, "
            f"{r.steps_lost} steps lost, their trajectories waited {r.lost_wait_p50_s:.1f} s "
            f"median, {r.lost_wait_max_s:.1f} s at most for a new slot): {before} sandboxes "
            f"alive when it began, {lowest} at the lowest, {settled} 30 s after it; "
            f"{r.acquire_timeouts} acquire timeouts, {r.acquire_failures} failed acquires: "
            f"{'met' if ok else 'NOT met'}."
        )
    for r in results:
        if r.scenario.side is None:
            continue
        lines.append(
            f"* Fairness between profiles ({r.scenario.name}): the second profile's acquires "
            f"waited {r.side_acquire_wait_p50_s:.1f} s median, {r.side_acquire_wait_p99_s:.1f} s "
            f"p99, while the first profile's waited {r.acquire_wait_p50_s:.1f} s median: its "
            "creates join the shared throttle behind at most one max_starting of the other's."
        )
    big = [r for r in results if r.scenario.trajectories == sizes.large]
    if big:
        worst_cpu = max(big, key=lambda r: r.host_cpu_s)
        lines.append(
            f"* {sizes.large:,} trajectories simulated in at most {worst_cpu.host_cpu_s / 60:.1f} "
            f"min of host CPU per scenario ({worst_cpu.scenario.name}; "
            f"{worst_cpu.host_cpu_per_command_s * 1e3:.2f} ms per command, heartbeats and "
            "pool events included)."
        )
    return lines


def pair(results: Sequence[ScenarioResult], before: str, after: str) -> str | None:
    """One line comparing two rows on what a trainer feels and pays."""
    old, new = find(results, before), find(results, after)
    if old is None or new is None:
        return None
    return (
        f"  {before} -> {after}: first result {old.first_result_s:.1f} -> "
        f"{new.first_result_s:.1f} s, wall {old.wall_s:,.0f} -> {new.wall_s:,.0f} s, acquire wait "
        f"p50 {old.acquire_wait_p50_s:.1f} -> {new.acquire_wait_p50_s:.1f} s, p99 "
        f"{old.acquire_wait_p99_s:.1f} -> {new.acquire_wait_p99_s:.1f} s, sandbox-seconds "
        f"{old.sandbox_seconds:,.0f} -> {new.sandbox_seconds:,.0f}, refused creates "
        f"{old.creates_rate_limited:,} -> {new.creates_rate_limited:,}, failed acquires "
        f"{old.acquire_failures:,} -> {new.acquire_failures:,}"
        + (
            f", steps lost {old.steps_lost} -> {new.steps_lost} and their trajectories' wait "
            f"for a new slot p50 {old.lost_wait_p50_s:.1f} -> {new.lost_wait_p50_s:.1f} s, max "
            f"{old.lost_wait_max_s:.1f} -> {new.lost_wait_max_s:.1f} s."
            if old.steps_lost or new.steps_lost
            else "."
        )
    )


#: The label of the rows measured before a spent create stopped failing every waiter.
SPENT_CREATE_LABEL = "before: a spent create fails every waiter"


def failed_starts(results: Sequence[ScenarioResult], sizes: Sizes) -> str | None:
    name = f"{sizes.large} x 1, loss storm"
    old, new = find(results, f"{name} [{SPENT_CREATE_LABEL}]"), find(results, name)
    if old is None or new is None:
        return None
    return (
        "* **One create whose retries ran out failed every waiter (fixed).** In "
        f"{name}, {old.acquire_failures} acquires failed at once, 18 minutes in, with "
        '`SandboxStartFailed` ("gave up after 2 attempts in 30.4 s"): one create failed twice '
        "within the driver's retry budget (2% of creates fail), and the pool gave up on an "
        "error whose retries were spent, failing every waiter of the image, although the other "
        "creates in flight were succeeding. Now a spent create fails the waiters only when no "
        "other create of the image is under way or has come up since it began (an error the "
        "user must fix, or 3 failures in a row, still fail them at once). Rows marked "
        f"[{SPENT_CREATE_LABEL}] ran the code before this change:\n"
        f"  {old.scenario.name} -> {new.scenario.name}: failed acquires "
        f"{old.acquire_failures} -> {new.acquire_failures}, acquire timeouts "
        f"{old.acquire_timeouts} -> {new.acquire_timeouts}, wall {old.wall_s:,.0f} -> "
        f"{new.wall_s:,.0f} s, creates issued {old.creates_issued:,} -> {new.creates_issued:,}."
    )


def findings(results: Sequence[ScenarioResult], sizes: Sizes) -> list[str]:
    """What the simulation showed about the pool's policy, with the rows that show it."""
    n = sizes.small
    lines: list[str | None] = [
        "* **Creation pace against a rate limit (fixed).** The create throttle used to reserve "
        "start times ahead, at the full pace, for every create in flight, so a refusal's "
        "penalty did not hold back the creates already queued: measured once before the fix "
        "(commit ef0aaff, this scenario and seed), 170 refusals, the driver's retries ran out "
        "and 890 of the 1,024 acquires failed with the rate-limit error. Now only the head of "
        "the queue waits for its start time, so a penalty holds everyone back, and the pace "
        "adapts: a refusal halves it, each accepted create raises it by a fiftieth of the "
        "configured rate. The rows below isolate the adaptation (a fixed pace with the new "
        "queue, then the adaptive one):",
        pair(
            results,
            f"{n} x 1, pace 10/s > limit 5/s, fixed pace",
            f"{n} x 1, pace 10/s > limit 5/s, adaptive pace",
        ),
        "* **Scale-up pace (fixed).** Creation runs at `creates_per_second` only with about "
        "rate x slow-tail latency in flight; the old default of 4 sandboxes starting at once "
        "held creation near 1/s. The default `max_starting` is now 32:",
        pair(
            results,
            f"{n} x 1, max_starting 4 (old default)",
            f"{n} x 1, max_starting 32 (new default)",
        ),
        pair(
            results,
            f"{n} x 10, max_starting 4 (old default)",
            f"{n} x 10, max_starting 32 (new default)",
        ),
        "* **The pool's cost per event (fixed).** Every acquire, release, ready and exit "
        "scanned all the pool's sandboxes, which made a pool of thousands quadratic in host "
        "CPU; the pool now keeps indexes (counts by state, free slots, idle and ready "
        "sandboxes in time order), with the same decisions (the figures of 1,024 x 1 and "
        "1,024 x 10 did not change). Profiled at 512 one-slot sandboxes, those scans were the "
        "largest single cost; at 1,024, 45.6 s of host CPU before, 16.7 s after (together "
        "with the simulator no longer sampling the pool's status every second).",
        "* **Pre-warming (no change).** A warm pool answers the first acquires at once; it "
        "costs the sandbox-seconds of waiting for the trainer:",
        pair(results, f"{n} x 10, cold", f"{n} x 10, warm"),
        "* **Scale-down hysteresis (no change; a sizing matter).** Between two batches 90 s "
        "apart the pool stays warm only when `idle_timeout` covers the training step plus the "
        "spread of trajectory lengths (sandboxes go idle as their trajectories end):",
        pair(results, f"{n} x 10, 2 batches, idle 30 s", f"{n} x 10, 2 batches, idle 300 s"),
        "* **A trajectory that lost its sandbox queued behind the whole batch (fixed).** Its "
        "new acquire went to the back of the FIFO, so while a batch was still being created "
        "it waited for every trajectory still waiting for its first slot. Now a trajectory "
        "that lost its slot with its sandbox (known by its `trajectory_id`, for 15 minutes "
        "after the loss, also when it asks again before the pool has heard of the exit) goes "
        "ahead of every first-time acquire and takes the next slot that comes free or up: "
        "lost capacity is made good before new growth. Rows marked "
        f"[{BEFORE_REACQUIRE}] ran the code before this change (see run A below):",
        *(
            pair(results, f"{name} [{BEFORE_REACQUIRE}]", name)
            for name in (
                f"{sizes.large} x 1 slots",
                f"{sizes.large} x 1, loss storm",
                f"{sizes.large} x 10, loss storm",
                f"{n} x 1, loss storm",
                f"{n} x 10, loss storm",
            )
        ),
        failed_starts(results, sizes),
        "* **Repeatable runs (fixed, in the simulator).** trio wakes the waiters of an event "
        "and of a cancelled scope in the order of a set of tasks, by address, so one seed gave "
        "different figures in different processes (with the hash seed: a smoke run's wall "
        "time moved 10%). The simulator now runs trio's deterministic scheduling, and one seed "
        "gives one run in any process, so rows of different runs compare. Rows measured "
        "before this change (in the report this one replaces) differ from these by such "
        "scheduling noise alone: the 1,024 x 10 batch's wall time was 564 s, it is 574 s.",
        "* **Fairness between profiles (no change needed).** Profiles on one account share "
        "one create throttle, served in arrival order; each pool has at most `max_starting` "
        "creates queued, so a second profile's first sandboxes wait behind at most that many "
        "of the first profile's creates (see the targets above), not behind its whole batch.",
    ]
    return [line for line in lines if line is not None]


def render(
    rows: Sequence[Row], sizes: Sizes, chart: str | None, kept: dict[str, list[str]] | None = None
) -> str:
    results = [row.result for row in rows]
    kept = kept or {}
    model = ProviderModel()
    lines = [
        "# Scale by simulation (issue 14)",
        "",
        "Generated by `python -m bench.scale`. The real runtime (supervisor, pools, sandbox "
        "actors, agent client and protocol) runs on trio's virtual clock over a simulated "
        "provider; only time and the provider are simulated. Provider model (Modal's published "
        f"figures): creation latency log-normal p50 2.7 s, p95 11.8 s (p99 about 22 s), "
        f"{model.create_failure_rate:.0%} of creates fail, account limit "
        f"{model.creates_per_second:g} creates/s (burst {model.create_burst}), "
        f"{model.loss_per_hour:.0%} of sandboxes lost per hour, ${model.price_per_cpu_second} "
        f"per core-second and ${model.price_per_gib_second} per GiB-second.",
        "",
        f"Workload: each batch starts every trajectory at once; a trajectory takes a slot, then "
        f"{sizes.steps} steps of (think 2-30 s uniform, then one command of 50 ms-20 s "
        "log-uniform), then releases it (the slot is reset). A sandbox of n slots has "
        "max(1, n/4) cores and max(2, n/2) GiB; commands beyond its cores run slower. Pools "
        "start cold (min 0), max_sandboxes is what the batch needs, 64 sandboxes may start at "
        "once, the client paces creates at 5/s, idle timeout 120 s, acquire timeout 1 h; "
        "other settings as each row says. Sandbox-seconds and cost run from each create to "
        "its end, pre-warming included; wall time runs from the first batch's start to the "
        "last trajectory's end. Host CPU is this machine's process time for the whole run.",
        "",
        "## Targets",
        "",
        *targets(results, sizes),
        "",
        "## What the simulation showed about the pool's policy",
        "",
        *findings(results, sizes),
        "",
        "## Figures",
        "",
        *table(rows, kept, sizes),
        "",
    ]
    if chart:
        lines += [f"![scale]({chart})", ""]
    lines += [
        "The runs (the `run` column; the machine has 2 cores shared with other work, so real "
        "time depends on its load, host CPU much less):",
        "",
        *runs_described(rows),
        *(
            [
                f"* {EARLIER}: {len(kept)} rows kept as they were from the report this one "
                "replaces (`--keep-rows-from`): their figures are not in the targets and "
                "findings above."
            ]
            if kept
            else []
        ),
        "",
    ]
    return "\n".join(lines)


def draw(results: Sequence[ScenarioResult], sizes: Sizes, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axes = plt.subplots(2, 3, figsize=(19, 9))
    bars, walls, timeline, storm_axes = axes[0][0], axes[0][1], axes[1][0], axes[1][1]
    lost_axes = axes[0][2]
    axes[1][2].axis("off")
    for offset, n in ((-0.2, sizes.small), (0.2, sizes.large)):
        rows = [find(results, f"{n} x {s} slots") for s in (1, 4, 10, 32)]
        present = [(i, r) for i, r in enumerate(rows) if r is not None]
        if not present:
            continue
        xs = [i + offset for i, _ in present]
        bars.bar(
            xs,
            [r.sandbox_seconds / 3600 for _, r in present],
            width=0.4,
            label=f"{n:,} trajectories",
        )
        walls.bar(xs, [r.wall_s / 60 for _, r in present], width=0.4, label=f"{n:,} trajectories")
    for ax, title in ((bars, "sandbox-hours"), (walls, "wall time (min)")):
        ax.set_xticks(range(4), ["1 slot", "4 slots", "10 slots", "32 slots"])
        ax.set_title(title)
        ax.set_yscale("log")
        ax.legend()
    for s in (1, 4, 10, 32):
        r = find(results, f"{sizes.small} x {s} slots")
        if r is not None:
            times, alive = zip(*r.timeline, strict=True)
            timeline.step(times, alive, where="post", label=f"{s} slot(s)")
    timeline.set_title(f"sandboxes alive, {sizes.small:,} trajectories")
    timeline.set_xlabel("virtual seconds")
    timeline.set_yscale("log")
    timeline.legend()
    storm = find(results, f"{sizes.small} x 10, loss storm")
    if storm is not None:
        times, alive = zip(*storm.timeline, strict=True)
        storm_axes.step(times, alive, where="post", label="sandboxes alive")
        if storm.capacity:
            at, held, _free, waiting = zip(*storm.capacity, strict=True)
            storm_axes.plot(
                at, [h / storm.scenario.slots_per_sandbox for h in held], label="slots held / 10"
            )
            storm_axes.plot(at, waiting, label="waiting acquires")
        loss = storm.scenario.loss_storm
        assert loss is not None
        storm_axes.axvspan(
            loss.at_s, loss.at_s + loss.over_s, color="red", alpha=0.15, label="storm"
        )
        storm_axes.set_title(storm.scenario.name)
        storm_axes.set_xlabel("virtual seconds")
        storm_axes.legend()
    draw_lost_waits(lost_axes, results, sizes)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return True


def draw_lost_waits(ax: Any, results: Sequence[ScenarioResult], sizes: Sizes) -> None:
    """How long a trajectory that lost its sandbox waited for a new slot, before and after
    lost trajectories went first."""
    names = [
        f"{sizes.large} x 1 slots",
        *(f"{n} x {s}, loss storm" for n in (sizes.small, sizes.large) for s in (1, 10)),
    ]
    shown: list[tuple[str, ScenarioResult, ScenarioResult]] = []
    for name in names:
        old, new = find(results, f"{name} [{BEFORE_REACQUIRE}]"), find(results, name)
        if old is not None and new is not None:
            shown.append((name, old, new))
    if not shown:
        ax.axis("off")
        return
    xs = range(len(shown))
    for offset, label, when in ((-0.2, "before (FIFO)", 0), (0.2, "after (lost go first)", 1)):
        waits = [(old, new)[when].lost_wait_p50_s for _, old, new in shown]
        ax.bar([x + offset for x in xs], [max(0.1, w) for w in waits], width=0.4, label=label)
    ax.set_xticks(list(xs), [name.replace(", ", "\n") for name, _, _ in shown], fontsize=8)
    ax.set_yscale("log")
    ax.set_title("wait for a new slot after a loss, median (s)")
    ax.legend()


def _quiet() -> int:
    """Silence the runtime's warnings (losses and failed starts are part of the scenarios);
    returns the level it had."""
    logger = logging.getLogger("hermes_actors")
    level = logger.level
    logger.setLevel(logging.ERROR)
    return level


def _progress(result: ScenarioResult) -> None:
    print(
        f"{result.scenario.name}: wall {result.wall_s:,.0f} s, {result.sandbox_seconds:,.0f} "
        f"sandbox-s, host CPU {result.host_cpu_s:,.1f} s",
        flush=True,
    )


@attrs.frozen(kw_only=True)
class Run:
    """Where and when a set of rows was measured."""

    commit: str  # the code measured (`+changes`: with uncommitted changes)
    date: str  # UTC, at the start
    load: str  # the machine's load averages (1, 5, 15 min) at the start
    jobs: int
    elapsed_s: float
    label: str | None  # appended to this run's scenario names


@attrs.frozen(kw_only=True)
class Row:
    result: ScenarioResult
    run: Run


def _describe_code() -> str:
    """The commit of the runtime measured (the checkout `hermes_actors` was imported from)."""
    package = os.path.dirname(os.path.abspath(hermes_actors.__file__))

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=package, capture_output=True, check=True)
        return done.stdout.decode().strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        changes = git("status", "--porcelain", "--", ".")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}+changes" if changes else commit


def labelled(result: ScenarioResult, label: str | None) -> ScenarioResult:
    if label is None:
        return result
    scenario = attrs.evolve(result.scenario, name=f"{result.scenario.name} [{label}]")
    return attrs.evolve(result, scenario=scenario)


def order(sizes: Sizes) -> Callable[[str], tuple[int, int, str]]:
    """Rows in the order of the groups; a labelled row (`NAME [label]`) just before `NAME`."""
    position = {
        scenario.name: at
        for at, scenario in enumerate(s for g in GROUPS for s in scenarios(g, sizes))
    }

    def key(name: str) -> tuple[int, int, str]:
        base, _, label = name.partition(" [")
        return (position.get(base, len(position)), 0 if label else 1, name)

    return key


def merge(runs: Sequence[Sequence[Row]], sizes: Sizes) -> list[Row]:
    """One row per scenario name, the latest run's, in `order`."""
    latest: dict[str, Row] = {}
    for rows in runs:
        for row in rows:
            latest[row.result.scenario.name] = row
    return [latest[name] for name in sorted(latest, key=order(sizes))]


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (as in the tests)")
    parser.add_argument(
        "--only", default=None, help=f"comma-separated groups of {','.join(GROUPS)}"
    )
    parser.add_argument(
        "--scenario",
        action="append",
        default=[],
        help="run this scenario (its name as in the report); repeatable, adds to --only",
    )
    parser.add_argument("--output", default=RESULTS, help="directory for scale.md and scale.png")
    parser.add_argument("--jobs", type=int, default=1, help="scenarios run at once (processes)")
    parser.add_argument("--save", default=None, help="also pickle this run's rows to this file")
    parser.add_argument(
        "--render-from",
        default=None,
        help="comma-separated files saved with --save: their rows (later files and this run "
        "replacing earlier rows of the same name) make the report",
    )
    parser.add_argument("--label", default=None, help="name this run's rows `NAME [LABEL]`")
    parser.add_argument(
        "--keep-rows-from",
        default=None,
        help="an earlier scale.md: its rows of scenarios not measured here stay in the table",
    )
    options = parser.parse_args(argv)
    sizes = SMOKE if options.smoke else FULL
    groups = options.only.split(",") if options.only else []
    if not groups and not options.scenario and not options.render_from:
        groups = list(GROUPS)
    if unknown := [g for g in groups if g not in GROUPS]:
        parser.error(f"unknown groups {unknown}; groups are {list(GROUPS)}")
    every = {s.name: s for g in GROUPS for s in scenarios(g, sizes)}
    if unknown := [name for name in options.scenario if name not in every]:
        parser.error(f"unknown scenarios {unknown}; scenarios are {list(every)}")
    planned = [scenario for group in groups for scenario in scenarios(group, sizes)]
    planned += [every[name] for name in options.scenario if every[name] not in planned]
    level = _quiet()
    try:
        return _run(options, sizes, planned)
    finally:
        logging.getLogger("hermes_actors").setLevel(level)


def _measure(planned: Sequence[Scenario], jobs: int) -> list[ScenarioResult]:
    if jobs <= 1:
        results = []
        for scenario in planned:
            result = run_scenario(scenario)
            _progress(result)
            results.append(result)
        return results
    with concurrent.futures.ProcessPoolExecutor(jobs, initializer=_quiet) as pool:
        # The longest runs (most sandboxes) first, so that the processes finish together.
        by_cost = sorted(planned, key=lambda s: -s.trajectories * s.batches / s.slots_per_sandbox)
        futures = {id(scenario): pool.submit(run_scenario, scenario) for scenario in by_cost}
        results = []
        for scenario in planned:
            result = futures[id(scenario)].result()
            _progress(result)
            results.append(result)
        return results


def _run(options: argparse.Namespace, sizes: Sizes, planned: Sequence[Scenario]) -> int:
    runs: list[list[Row]] = []
    for path in options.render_from.split(",") if options.render_from else []:
        with open(path, "rb") as file:
            # Plain values only (this module may run as `__main__`): the run's fields and
            # the simulator's results.
            saved = pickle.load(file)
        run = Run(**saved["run"])
        runs.append([Row(result=result, run=run) for result in saved["results"]])
    if planned:
        date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
        started = time.monotonic()
        results = _measure(planned, options.jobs)
        run = Run(
            commit=_describe_code(),
            date=date,
            load=load,
            jobs=max(1, options.jobs),
            elapsed_s=time.monotonic() - started,
            label=options.label,
        )
        rows = [Row(result=labelled(result, options.label), run=run) for result in results]
        if options.save:
            with open(options.save, "wb") as file:
                saved = {"run": attrs.asdict(run), "results": [row.result for row in rows]}
                pickle.dump(saved, file)
        runs.append(rows)
    merged = merge(runs, sizes)
    os.makedirs(options.output, exist_ok=True)
    results = [row.result for row in merged]
    chart = "scale.png" if draw(results, sizes, os.path.join(options.output, "scale.png")) else None
    kept = kept_rows(options.keep_rows_from, merged) if options.keep_rows_from else {}
    report = render(merged, sizes, chart, kept)
    with open(os.path.join(options.output, "scale.md"), "w") as file:
        file.write(report)
    print(f"wrote {os.path.join(options.output, 'scale.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
