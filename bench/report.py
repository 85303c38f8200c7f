"""The report of a benchmark run: markdown tables, the issue's targets, and a PNG chart.

Every figure is a median over the repetitions with its min-max. A ratio "x limit" is the limit's
median time over the row's (1.00x: as fast as the limit; below: slower), always against the
limit that uses the row's shell. A speed-up over a peer is the peer's median time over the
row's. Cells with failed commands are shown as failures, never as figures.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import attrs

from bench.workloads import LATENCY_WARMUP_S, BenchResult, Measurement, median, percentile

TITLES = {
    "tiny": "1. Tiny commands (spawn-bound)",
    "external": "1b. External commands (a process per command for every row)",
    "short": "2. Short real commands (concurrency-bound)",
    "latency": "3. Agent latency (sequential calls on one warm task)",
    "churn": "4. Churn (acquire, commands, release with reset)",
    "scale": "5. Scale (every slot held at once, one command each)",
}
HERMES_ROWS = (
    "hermes-none",
    "hermes-bwrap",
    "hermes-persistent-none",
    "hermes-persistent-bwrap",
)
#: The rows of issue 11 (one long-lived shell per slot) and its targets.
PERSISTENT_ROWS = ("hermes-persistent-none", "hermes-persistent-bwrap")
LATENCY_TARGET_MS = 0.5
_HOST_PATH = (
    "a hermes command costs CPU in three processes where the peer's threads only spawn: "
    "measured per command with /proc schedstat (40 x 25 `echo`, warm shells), about 0.1 ms in "
    "the host's trio thread (facade, actors, agent stream), 0.09 ms in the agent and 0.1 ms "
    "in the slot's bash (the call's redirections to its output FIFOs; a command that could "
    "change a shell variable also has bash write `export -p`, about 0.08 ms more). On 2 CPUs "
    "shared with other work every hop also waits for a CPU"
)
_IN_PROCESS = (
    "it runs the command with `subprocess` in the calling process: one fork/exec and no "
    "inter-process hop, where `terminal_tool` crosses a thread (the portal), the actors, the "
    "agent process and the shell and back (measured per call with /proc schedstat: about "
    "0.05 ms in the calling thread, 0.25 ms in the portal's trio thread, 0.15 ms in the agent "
    "and 0.13 ms in the shell, each hop waiting for a CPU on a loaded machine)"
)
_RELEASE = (
    "it releases nothing: hermes' release with reset has the slot's keeper kill every process "
    "of the slot but its idle shell, wipes the workspace, and has the shell show its state again "
    "to compare with its first (`reuse_shell`, which these rows set: about 0.3 ms of bash per "
    "lease); each of a lease's five steps (acquire, 3 commands, release) takes the host path and "
    "a process hop, each waiting for a CPU (perf over the workload: the agent 38% of the CPU, "
    "the host 29%, bash 21%, the 50 slots' first keepers 11%)"
)
_SLOT_PROCESSES = (
    "it starts and keeps no process per slot between commands, while every slot starts its "
    "long-lived bash with the sandbox (warm shells) and keeps it, and that bash's keeper, the "
    "subreaper that makes the slot's processes its descendants (a fork of a small zygote of "
    "the agent). Time: about 4.6 ms of CPU per slot before the first command (measured with "
    "/proc schedstat: 0.85 ms for the zygote's fork, 1.7 ms in the keeper, 1.6 ms in bash, "
    "0.5 ms in the agent), 2.3 s of the 2 CPUs for 1,000 slots. Memory: about 0.3 MB of PSS "
    "per bash (2-3.5 MB of RSS counted again per process) and 1.9 MB per keeper (13 MB of RSS "
    "counted again)"
)
_ROUNDS = (
    "the 40 trajectories' 50 ms sleeps end together, so each of the 5 rounds queues 40 results "
    "and 40 next commands for 2 CPUs at once; each hermes command costs more CPU than a bare "
    "spawn (the host path, then the agent and the slot's keeper: about 0.4 ms more), which adds "
    "about 15 ms to every round, where the peer's threads only spawn"
)
#: Why a peer is still ahead of a persistent row on a workload, when it is (see the report).
AHEAD_REASONS: dict[tuple[str, str], str] = {
    ("tiny", "mini-swe-agent"): _HOST_PATH,
    ("tiny", "swerex-execute"): _HOST_PATH,
    ("external", "mini-swe-agent"): _HOST_PATH,
    ("external", "swerex-execute"): _HOST_PATH,
    ("short", "mini-swe-agent"): _ROUNDS,
    ("latency", "swerex-execute"): _IN_PROCESS,
    ("latency", "mini-swe-agent"): _IN_PROCESS,
    ("latency", "original-batch"): _IN_PROCESS,
    ("churn", "mini-swe-agent"): _RELEASE,
    ("churn", "swerex-execute"): _RELEASE,
    ("churn", "original-batch"): _RELEASE,
    ("scale", "mini-swe-agent"): _SLOT_PROCESSES,
    ("scale", "swerex-execute"): _SLOT_PROCESSES,
    ("scale", "original-batch"): _SLOT_PROCESSES,
}
MEMORY_TARGET_MB = 300.0


@attrs.frozen(kw_only=True)
class Stat:
    """Median and range of one figure over the repetitions."""

    median: float
    low: float
    high: float
    count: int

    def text(self, scale: float = 1.0, digits: int = 3) -> str:
        if self.count == 0 or math.isnan(self.median):
            return "n/a"
        if self.count == 1:
            return f"{self.median * scale:.{digits}f}"
        return (
            f"{self.median * scale:.{digits}f} "
            f"({self.low * scale:.{digits}f}-{self.high * scale:.{digits}f})"
        )


def stat(values: Sequence[float]) -> Stat:
    kept = [value for value in values if not math.isnan(value)]
    if not kept:
        return Stat(median=math.nan, low=math.nan, high=math.nan, count=0)
    return Stat(median=median(kept), low=min(kept), high=max(kept), count=len(kept))


class Summary:
    """The measurements of a run, grouped per (workload, row)."""

    def __init__(self, result: BenchResult) -> None:
        self.result = result
        self.cells: dict[tuple[str, str], list[Measurement]] = {}
        for measurement in result.measurements:
            self.cells.setdefault((measurement.workload, measurement.system), []).append(
                measurement
            )
        self.shell = {row.name: row.shell for row in result.rows}

    def measured(self, workload: str, system: str) -> list[Measurement]:
        return self.cells.get((workload, system), [])

    def failed(self, workload: str, system: str) -> bool:
        return any(m.failures for m in self.measured(workload, system))

    def figure(self, workload: str, system: str, of: Callable[[Measurement], float | None]) -> Stat:
        """A figure's stat over the repetitions, only from runs whose commands all succeeded."""
        values = []
        for measurement in self.measured(workload, system):
            value = of(measurement)
            if measurement.failures == 0 and value is not None:
                values.append(value)
        return stat(values)

    def time(self, workload: str, system: str) -> Stat:
        """The figure a workload is compared on: wall seconds, or p50 seconds for latency."""
        if workload == "latency":
            return self.figure(workload, system, lambda m: percentile(m.per_call_s, 50))
        return self.figure(workload, system, lambda m: m.wall_s)

    def limit_for(self, system: str) -> str:
        return f"limit-{self.shell.get(system, 'bash')}"

    def speedup(self, workload: str, system: str, over: str) -> float:
        """`over`'s median time divided by `system`'s (NaN when either is missing)."""
        mine = self.time(workload, system).median
        theirs = self.time(workload, over).median
        if math.isnan(mine) or math.isnan(theirs) or mine <= 0:
            return math.nan
        return theirs / mine


def _ratio(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}x"


@attrs.frozen(kw_only=True)
class Target:
    """One target of the issue, measured."""

    text: str
    row: str
    measured: str
    met: bool | None  # None: could not be measured


def targets(summary: Summary) -> list[Target]:
    """The issue's targets, for each hermes row."""
    found = []
    rows = [row.name for row in summary.result.rows if row.unavailable is None]
    for row in HERMES_ROWS:
        if row not in rows:
            continue
        limit = summary.limit_for(row)
        for workload in ("tiny", "short"):
            ratio = summary.speedup(workload, row, limit)
            found.append(
                Target(
                    text=f"workload {workload} at least 0.9x the raw limit ({limit})",
                    row=row,
                    measured=_ratio(ratio),
                    met=None if math.isnan(ratio) else ratio >= 0.9,
                )
            )
        for peer in ("original-batch", "swerex-execute"):
            ratio = summary.speedup("short", row, peer)
            found.append(
                Target(
                    text=f"workload short at least 10x {peer}",
                    row=row,
                    measured=_ratio(ratio),
                    met=None if math.isnan(ratio) else ratio >= 10,
                )
            )
        mine = summary.time("latency", row).median
        theirs = summary.time("latency", limit).median
        gap_ms = (mine - theirs) * 1e3
        found.append(
            Target(
                text=f"latency p50 within 1 ms of the raw limit ({limit})",
                row=row,
                measured="n/a"
                if math.isnan(gap_ms)
                else f"{gap_ms:+.2f} ms ({mine * 1e3:.2f} vs {theirs * 1e3:.2f} ms)",
                met=None if math.isnan(gap_ms) else gap_ms <= 1.0,
            )
        )
        ratio = summary.speedup("latency", row, "swerex-session")
        found.append(
            Target(
                text="latency p50 at least 20x faster than SWE-ReX sessions",
                row=row,
                measured=_ratio(ratio),
                met=None if math.isnan(ratio) else ratio >= 20,
            )
        )
        if row in PERSISTENT_ROWS:
            found += _persistent_targets(summary, row)
        peak = summary.figure("scale", row, lambda m: _mb(m.peak_rss_bytes))
        pss = summary.figure("scale", row, lambda m: _mb(m.peak_pss_bytes))
        wall = summary.time("scale", row)
        found.append(
            Target(
                text=f"scale completes with host memory under {MEMORY_TARGET_MB:g} MB",
                row=row,
                measured="n/a"
                if peak.count == 0
                else f"summed RSS: worst {peak.high:.0f} MB, median {peak.median:.0f} MB "
                f"(summed PSS: worst {pss.high:.0f} MB); wall {wall.median:.2f} s",
                met=None if peak.count == 0 else peak.high < MEMORY_TARGET_MB,
            )
        )
    return found


def _persistent_targets(summary: Summary, row: str) -> list[Target]:
    """Issue 11's targets for a persistent-shell row."""
    found = []
    p50 = summary.time("latency", row).median * 1e3
    found.append(
        Target(
            text=f"latency p50 at most {LATENCY_TARGET_MS:g} ms (issue 11)",
            row=row,
            measured="n/a" if math.isnan(p50) else f"{p50:.2f} ms",
            met=None if math.isnan(p50) else p50 <= LATENCY_TARGET_MS,
        )
    )
    for workload, peer, at_least in (
        ("tiny", "mini-swe-agent", 2.0),
        ("churn", "mini-swe-agent", 1.0),
        ("external", "limit-bash", 1.0),
    ):
        ratio = summary.speedup(workload, row, peer)
        found.append(
            Target(
                text=f"workload {workload} at least {at_least:g}x {peer} (issue 11)",
                row=row,
                measured=_ratio(ratio),
                met=None if math.isnan(ratio) else ratio >= at_least,
            )
        )
    return found


def _ahead_section(summary: Summary) -> list[str]:
    """Where a peer (not a raw limit) is still faster than a persistent row, and why."""
    result = summary.result
    rows = [row.name for row in result.rows if row.unavailable is None]
    lines = ["## Where a peer is still ahead of the persistent shell", ""]
    found = False
    for workload in result.workloads:
        for row in PERSISTENT_ROWS:
            if row not in rows:
                continue
            for peer in rows:
                if peer in HERMES_ROWS or peer.startswith("limit-"):
                    continue
                ratio = summary.speedup(workload, row, peer)
                if math.isnan(ratio) or ratio >= 1.0:
                    continue
                found = True
                reason = AHEAD_REASONS.get((workload, peer), "")
                lines.append(
                    f"- {workload}: {peer} is ahead of {row} ({_ratio(ratio)})"
                    + (f": {reason}" if reason else "")
                )
    if not found:
        lines.append("None: the persistent rows are ahead of every peer on every workload run.")
    lines.append("")
    return lines


def _mb(value: int | None) -> float | None:
    return None if value is None else value / 1e6


def _workload_description(workload: str, result: BenchResult) -> str:
    sizes = result.sizes
    if workload == "tiny":
        return (
            f"{sizes.tiny_trajectories} trajectories x {sizes.tiny_commands} sequential "
            "`echo` commands, all trajectories at once. Wall time of all commands. In the "
            "persistent rows these commands cannot change a shell variable, so bash does not "
            "write its `export -p` snapshot after them (a command that could, with a `$`, an "
            "`=`, `cd` or `export`..., costs about 0.08 ms more of bash CPU)."
        )
    if workload == "external":
        return (
            f"{sizes.tiny_trajectories} trajectories x {sizes.tiny_commands} sequential "
            "`/bin/echo` commands (an external program: every row starts a process per "
            "command), all trajectories at once. Wall time of all commands."
        )
    if workload == "short":
        return (
            f"{sizes.short_trajectories} trajectories x {sizes.short_commands} sequential "
            f"`sleep {sizes.short_sleep_s:g}; echo` commands, all at once. Wall time."
        )
    if workload == "latency":
        return (
            f"{sizes.latency_calls} sequential `true` calls on one warm task (hermes: "
            '`terminal_tool("true", task_id=...)`), after '
            f"{LATENCY_WARMUP_S:g} s of untimed ones (the first hundred or two calls on new "
            "processes run about 0.1 ms slower). Per-call time, p50 and p95 in ms. `true` "
            "cannot change a shell variable: see workload 1 for what a command that could costs."
        )
    if workload == "churn":
        return (
            f"{sizes.churn_trajectories} trajectories through {sizes.churn_slots} slots: "
            f"acquire, {sizes.churn_commands} `echo` commands, release with reset. Wall time."
        )
    return (
        f"{sizes.scale_slots} slots held at once, one `echo` each, from a cold start (hermes: "
        f"{sizes.scale_slots_per_sandbox} slots per sandbox). Wall time, and the peak of the "
        "summed RSS of the row's whole process tree (its process and every process it "
        "started), sampled every 10 ms; RSS counts shared pages once per process (so a "
        "forked or vforked child still sharing its parent's pages counts them again), so the "
        "same samples also sum PSS, which splits shared pages between their processes. The "
        "target is checked on the worst summed RSS of all repetitions."
    )


def _failure_note(summary: Summary, workload: str, system: str) -> str:
    failed = [m for m in summary.measured(workload, system) if m.failures]
    if not failed:
        return ""
    first = failed[0]
    return (
        f"FAILED in {len(failed)} of {len(summary.measured(workload, system))} repetitions "
        f"({first.failures}/{first.commands} commands; first: {first.first_failure})"
    )


def _workload_table(summary: Summary, workload: str) -> list[str]:
    result = summary.result
    lines = [f"## {TITLES[workload]}", "", _workload_description(workload, result), ""]
    if workload == "latency":
        header = "| row | shell | p50 ms | p95 ms | x limit (same shell) | notes |"
    elif workload == "scale":
        header = (
            "| row | shell | wall s | peak RSS sum MB | peak PSS sum MB | x limit (same shell) "
            "| notes |"
        )
    else:
        header = "| row | shell | wall s | commands/s | x limit (same shell) | notes |"
    columns = header.count("|") - 1
    lines += [header, "|" + "---|" * columns]
    empty = " - |" * (columns - 3)
    for row in result.rows:
        name = row.name
        if row.unavailable is not None:
            lines.append(f"| {name} | {row.shell} |{empty} unavailable: {row.unavailable} |")
            continue
        if (name, workload) in result.skipped:
            lines.append(f"| {name} | {row.shell} |{empty} {result.skipped[name, workload]} |")
            continue
        if not summary.measured(workload, name):
            continue
        note = _failure_note(summary, workload, name)
        limit = summary.limit_for(name)
        versus = "(the limit)" if name == limit else _ratio(summary.speedup(workload, name, limit))
        if workload == "latency":
            p50 = summary.time(workload, name)
            p95 = summary.figure(workload, name, lambda m: percentile(m.per_call_s, 95))
            cells = [p50.text(1e3, 2), p95.text(1e3, 2)]
        elif workload == "scale":
            wall = summary.time(workload, name)
            peak = summary.figure(workload, name, lambda m: _mb(m.peak_rss_bytes))
            pss = summary.figure(workload, name, lambda m: _mb(m.peak_pss_bytes))
            cells = [wall.text(1.0, 3), peak.text(1.0, 0), pss.text(1.0, 0)]
        else:
            wall = summary.time(workload, name)
            commands = summary.measured(workload, name)[0].commands
            rate = stat([commands / value for value in [wall.median]] if wall.count else [])
            cells = [wall.text(1.0, 3), rate.text(1.0, 0)]
        lines.append(f"| {name} | {row.shell} | {' | '.join(cells)} | {versus} | {note} |")
    lines.append("")
    return lines


def _speedup_table(summary: Summary) -> list[str]:
    result = summary.result
    peers = [
        row.name for row in result.rows if row.unavailable is None and row.name not in HERMES_ROWS
    ]
    hermes = [row for row in HERMES_ROWS if any(r.name == row for r in result.rows)]
    lines = [
        "## hermes-actors against every other row",
        "",
        "Speed-up = the other row's median time over hermes' (latency: p50). Above 1: hermes is "
        "faster.",
        "",
        "| workload | hermes row | " + " | ".join(peers) + " |",
        "|---|---|" + "---|" * len(peers),
    ]
    for workload in result.workloads:
        for row in hermes:
            cells = [_ratio(summary.speedup(workload, row, peer)) for peer in peers]
            lines.append(f"| {workload} | {row} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def render_markdown(result: BenchResult, chart_name: str = "latest.png") -> str:
    summary = Summary(result)
    lines = [
        "# hermes-actors against the physical limit and the peers",
        "",
        f"Generated by `python -m bench` at {result.started_at} in {result.duration_s:.0f} s: "
        f"{result.repetitions} repetition(s); within each repetition every workload runs every "
        "row, in an order rotated at each repetition. Figures: median over the repetitions "
        "(min-max). Only runs whose every command printed what it must are counted. Rows run "
        "with an empty HOME. Shell: the shell each row's commands go through (`/bin/sh` is "
        'dash); "x limit" compares with the raw limit of the same shell.',
        "",
        f"![chart]({chart_name})",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        *[f"| {key} | {value} |" for key, value in result.machine.items()],
        "",
        "## Rows",
        "",
        "| row | shell | what it runs |",
        "|---|---|---|",
        *[f"| {row.name} | {row.shell} | {row.description} |" for row in result.rows],
        "",
        "## Targets of issue 4 and issue 11",
        "",
        "| target | row | measured | met |",
        "|---|---|---|---|",
    ]
    for target in targets(summary):
        verdict = {True: "yes", False: "**no**", None: "not measured"}[target.met]
        lines.append(f"| {target.text} | {target.row} | {target.measured} | {verdict} |")
    lines.append("")
    for workload in result.workloads:
        lines += _workload_table(summary, workload)
    lines += _speedup_table(summary)
    lines += _ahead_section(summary)
    lines += [
        "## Raw measurements",
        "",
        "| rep | workload | row | wall s | p50 ms | peak RSS MB | peak PSS MB | commands "
        "| failures |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in result.measurements:
        p50 = f"{percentile(m.per_call_s, 50) * 1e3:.2f}" if m.per_call_s else ""
        peak = f"{m.peak_rss_bytes / 1e6:.0f}" if m.peak_rss_bytes is not None else ""
        pss = f"{m.peak_pss_bytes / 1e6:.0f}" if m.peak_pss_bytes is not None else ""
        lines.append(
            f"| {m.repetition + 1} | {m.workload} | {m.system} | {m.wall_s:.3f} | {p50} | "
            f"{peak} | {pss} | {m.commands} | {m.failures} |"
        )
    lines.append("")
    return "\n".join(lines)


def _time_panel(summary: Summary, workload: str) -> Callable[[str], Stat]:
    """A row's time stat for `workload`, in the unit the chart shows (ms for latency)."""
    scale = 1e3 if workload == "latency" else 1.0

    def of(row: str) -> Stat:
        value = summary.time(workload, row)
        return Stat(
            median=value.median * scale,
            low=value.low * scale,
            high=value.high * scale,
            count=value.count,
        )

    return of


def render_chart(result: BenchResult, path: str) -> None:
    """One panel per workload (and one for workload 5's memory): medians with min-max bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    summary = Summary(result)
    panels: list[tuple[str, str, Callable[[str], Stat]]] = []
    for workload in result.workloads:
        unit = "p50 ms" if workload == "latency" else "wall s"
        panels.append((TITLES[workload], unit, _time_panel(summary, workload)))
        if workload == "scale":
            panels.append(
                (
                    "5. Scale: peak summed RSS (bars) and PSS (black ticks)",
                    "MB",
                    lambda row: summary.figure("scale", row, lambda m: _mb(m.peak_rss_bytes)),
                )
            )
    columns = 3
    rows_count = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(
        rows_count, columns, figsize=(6 * columns, 3.6 * rows_count), squeeze=False
    )
    names = [row.name for row in result.rows]
    for axis, (title, unit, of) in zip(axes.flat, panels, strict=False):
        labels, values, lows, highs, colors = [], [], [], [], []
        for name in names:
            value = of(name)
            if value.count == 0:
                continue
            labels.append(name)
            values.append(value.median)
            lows.append(value.median - value.low)
            highs.append(value.high - value.median)
            colors.append(
                "tab:green"
                if name in HERMES_ROWS
                else "tab:gray"
                if name.startswith("limit-")
                else "tab:orange"
            )
        positions = list(range(len(labels)))
        axis.barh(positions, values, xerr=[lows, highs], color=colors, capsize=3)
        if unit == "MB":
            pss = [
                summary.figure("scale", name, lambda m: _mb(m.peak_pss_bytes)).median
                for name in labels
            ]
            axis.plot(pss, positions, "k|", markersize=14, markeredgewidth=2)
        axis.set_yticks(positions, labels)
        axis.invert_yaxis()
        if values and min(values) > 0 and max(values) / min(values) > 20:
            axis.set_xscale("log")
            axis.xaxis.set_minor_formatter(NullFormatter())
        axis.set_title(title, fontsize=10)
        axis.set_xlabel(f"{unit} (median, min-max; lower is better)")
    for axis in list(axes.flat)[len(panels) :]:
        axis.set_visible(False)
    figure.suptitle("hermes-actors (green) vs the raw limit (gray) and the peers (orange)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_report(result: BenchResult, directory: str) -> tuple[str, str]:
    """Write `latest.md` and `latest.png` into `directory`; return both paths."""
    os.makedirs(directory, exist_ok=True)
    markdown_path = os.path.join(directory, "latest.md")
    chart_path = os.path.join(directory, "latest.png")
    render_chart(result, chart_path)
    with open(markdown_path, "w") as handle:
        handle.write(render_markdown(result, os.path.basename(chart_path)))
    return markdown_path, chart_path
