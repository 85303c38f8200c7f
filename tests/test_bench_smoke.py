"""The benchmark harness at smoke sizes: every row runs every workload and reports sane figures.

These tests never assert timings (the full run is not part of CI); they assert that each row
ran every command and printed what it must, that figures exist and are plausible, that failures
are reported as failures, that workload 5 samples the whole process tree, and that the report
and chart are written.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# `bench` lives at the repository root, next to `tests`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.peers import LimitSystem, all_systems
from bench.report import Summary, render_markdown, stat, targets, write_report
from bench.workloads import (
    SMOKE,
    WORKLOADS,
    BenchResult,
    Command,
    HermesSystem,
    Measurement,
    RowInfo,
    check_outcomes,
    empty_home,
    percentile,
    plan_for,
    run_benchmark,
    tree_memory,
    tree_pids,
    tree_rss_bytes,
)

ROW_NAMES = [system.name for system in all_systems()]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[BenchResult, Path]:
    """One smoke run of every row and workload, and the directory its report went to."""
    result = run_benchmark(all_systems(), SMOKE, repetitions=1)
    directory = tmp_path_factory.mktemp("bench-results")
    write_report(result, str(directory))
    return result, directory


def _row(result: BenchResult, name: str) -> RowInfo:
    [row] = [row for row in result.rows if row.name == name]
    return row


@pytest.mark.parametrize("name", ROW_NAMES)
def test_row_runs_every_workload_with_correct_output(
    smoke_run: tuple[BenchResult, Path], name: str
) -> None:
    """Each row runs every workload once and every command exits 0 printing what it must."""
    result, _ = smoke_run
    row = _row(result, name)
    if row.unavailable is not None:
        pytest.skip(f"{name} cannot run here: {row.unavailable}")
    for workload in WORKLOADS:
        runs = [m for m in result.measurements if m.system == name and m.workload == workload]
        assert len(runs) == 1, workload
        [run] = runs
        expected = sum(len(trajectory) for trajectory in plan_for(workload, SMOKE))
        assert run.commands == expected
        assert run.failures == 0, f"{workload}: {run.first_failure}"


@pytest.mark.parametrize("name", ROW_NAMES)
def test_row_figures_are_plausible(smoke_run: tuple[BenchResult, Path], name: str) -> None:
    """Walls are finite and positive, latency has one time per call, scale has a memory peak."""
    result, _ = smoke_run
    if _row(result, name).unavailable is not None:
        pytest.skip(f"{name} cannot run here: {_row(result, name).unavailable}")
    runs = {m.workload: m for m in result.measurements if m.system == name}
    for workload, run in runs.items():
        assert math.isfinite(run.wall_s), workload
        assert run.wall_s > 0, workload
    latency = runs["latency"]
    assert len(latency.per_call_s) == SMOKE.latency_calls
    assert all(value > 0 for value in latency.per_call_s)
    assert latency.wall_s == pytest.approx(sum(latency.per_call_s))
    scale = runs["scale"]
    assert scale.memory_samples >= 1
    # At least one python interpreter's worth of resident memory (the row's own process).
    assert scale.peak_rss_bytes is not None
    assert scale.peak_rss_bytes > 5_000_000
    # PSS splits shared pages, so it never exceeds RSS (both peaks come from the same samples).
    assert scale.peak_pss_bytes is not None
    assert 0 < scale.peak_pss_bytes <= scale.peak_rss_bytes


def test_hermes_rows_are_available_where_their_isolation_works(
    smoke_run: tuple[BenchResult, Path],
) -> None:
    """hermes-none always runs; hermes-bwrap runs when bubblewrap is installed, else says so."""
    result, _ = smoke_run
    assert _row(result, "hermes-none").unavailable is None
    reason = _row(result, "hermes-bwrap").unavailable
    if shutil.which("bwrap") is None:
        assert reason is not None
        assert "bubblewrap" in reason
    else:
        assert reason is None


def test_rows_are_interleaved_within_a_repetition(smoke_run: tuple[BenchResult, Path]) -> None:
    """Measurements go workload by workload, each workload running every runnable row."""
    result, _ = smoke_run
    runnable = [row.name for row in result.rows if row.unavailable is None]
    order = [(m.workload, m.system) for m in result.measurements]
    expected = [(workload, name) for workload in WORKLOADS for name in runnable]
    assert order == expected


def test_report_shows_every_row_workload_target_and_the_machine(
    smoke_run: tuple[BenchResult, Path],
) -> None:
    """latest.md names every row in every workload table, the targets and the machine."""
    _result, directory = smoke_run
    markdown = (directory / "latest.md").read_text()
    sections = markdown.split("\n## ")
    for title in ("1. Tiny", "2. Short", "3. Agent latency", "4. Churn", "5. Scale"):
        [section] = [s for s in sections if s.startswith(title)]
        for name in ROW_NAMES:
            assert f"| {name} |" in section, (title, name)
    assert "## Targets of issue 4" in markdown
    assert "FAILED" not in markdown
    for key in ("cpu", "cores", "memory", "kernel", "python", "/bin/sh", "swe-rex"):
        assert f"| {key} |" in markdown
    assert (directory / "latest.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_targets_are_computed_from_the_measurements(smoke_run: tuple[BenchResult, Path]) -> None:
    """Each hermes row gets every target, each met or missed by its measured ratio."""
    result, _ = smoke_run
    summary = Summary(result)
    found = targets(summary)
    assert {t.row for t in found} == {
        row.name for row in result.rows if row.name.startswith("hermes-") and not row.unavailable
    }
    for target in found:
        assert target.met is not None, target
    [tiny] = [t for t in found if t.row == "hermes-none" and "tiny" in t.text]
    ratio = summary.speedup("tiny", "hermes-none", "limit-bash")
    assert tiny.measured == f"{ratio:.2f}x"
    assert tiny.met == (ratio >= 0.9)


def test_a_row_that_breaks_is_recorded_as_failing_not_dropped() -> None:
    """A row whose shell does not exist fails all its commands, in-process and in the child."""
    broken = LimitSystem("no-such-shell-for-bench")
    result = run_benchmark([broken], SMOKE, repetitions=1, workloads=("tiny", "scale"))
    tiny, scale = result.measurements
    assert (tiny.workload, tiny.failures, tiny.commands) == ("tiny", 9, 9)
    assert tiny.first_failure is not None
    assert "FileNotFoundError" in tiny.first_failure
    assert math.isnan(tiny.wall_s)
    assert scale.workload == "scale"
    assert scale.failures == scale.commands == SMOKE.scale_slots
    assert scale.first_failure is not None
    assert "child exited" in scale.first_failure
    markdown = render_markdown(result)
    assert "FAILED in 1 of 1 repetitions" in markdown


def test_wrong_output_and_status_count_as_failures() -> None:
    """Commands that exit non-zero, print something else or never report are failures."""
    plan = [
        [Command(text="echo a", expected="a"), Command(text="exit 3", expected="")],
        [Command(text="echo b", expected="b"), Command(text="echo c", expected="c")],
    ]
    row = LimitSystem("bash")
    timed = row.run_trajectories([["echo a", "exit 3"], ["echo B"]], SMOKE)
    commands, failures, first = check_outcomes(plan, timed.outcomes)
    assert (commands, failures) == (4, 3)
    assert first == "'exit 3': exit 3, output ''"


def test_a_row_without_its_isolation_is_reported_unavailable() -> None:
    """A hermes row whose isolation cannot be used says why instead of running."""
    row = HermesSystem("no-such-isolation")
    reason = row.unavailable()
    assert reason is not None
    assert "isolation" in reason


def test_tree_memory_counts_grandchildren() -> None:
    """The sampled tree includes a grandchild and its resident memory."""
    grandchild = "x = bytearray(64_000_000); print('ready', flush=True); input()"
    root = subprocess.Popen(
        ["bash", "-c", f'{sys.executable} -c "{grandchild}"; true'],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert root.stdout is not None
        assert root.stdin is not None
        assert root.stdout.readline().strip() == "ready"
        pids = tree_pids(root.pid)
        assert len(pids) == 2
        assert pids[0] == root.pid
        assert tree_rss_bytes(root.pid) > 64_000_000
        rss, pss = tree_memory(root.pid)
        # The grandchild's buffer is its own: it counts in full in PSS too.
        assert 64_000_000 < pss <= rss
        root.stdin.write("\n")
        root.stdin.close()
        assert root.wait(timeout=30) == 0
    finally:
        if root.poll() is None:
            root.kill()
            root.wait()
        if root.stdout is not None:
            root.stdout.close()
    assert tree_rss_bytes(root.pid) == 0


def test_percentile_and_stat_follow_their_definitions() -> None:
    """Percentiles interpolate between ranks; stats ignore NaN and keep min, median, max."""
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 95) == pytest.approx(4.8)
    assert math.isnan(percentile([], 50))
    value = stat([3.0, math.nan, 1.0, 2.0])
    assert (value.median, value.low, value.high, value.count) == (2.0, 1.0, 3.0, 3)
    assert value.text() == "2.000 (1.000-3.000)"
    assert stat([math.nan]).text() == "n/a"


def test_a_missed_target_is_reported_as_missed() -> None:
    """A hermes row slower than 0.9x its limit gets `no` for that target."""
    rows = (
        RowInfo(name="limit-bash", shell="bash", description="", unavailable=None),
        RowInfo(name="hermes-none", shell="bash", description="", unavailable=None),
    )

    def run(system: str, wall: float) -> Measurement:
        return Measurement(
            workload="tiny", system=system, repetition=0, wall_s=wall, commands=1, failures=0
        )

    result = BenchResult(
        sizes=SMOKE,
        repetitions=1,
        rows=rows,
        workloads=("tiny",),
        measurements=(run("limit-bash", 1.0), run("hermes-none", 2.0)),
        skipped={},
        machine={},
        started_at="now",
        duration_s=1.0,
    )
    [tiny] = [t for t in targets(Summary(result)) if "tiny" in t.text]
    assert (tiny.measured, tiny.met) == ("0.50x", False)
    assert (
        "| workload tiny at least 0.9x the raw limit (limit-bash) | hermes-none | 0.50x | **no** |"
        in (render_markdown(result))
    )


def test_rows_run_with_an_empty_home_that_is_restored_afterwards() -> None:
    """Commands see HOME as an empty directory; the caller's HOME is back afterwards."""
    before = os.environ.get("HOME")
    with empty_home() as home:
        timed = LimitSystem("bash").run_trajectories([["echo $HOME; ls -A $HOME | wc -l"]], SMOKE)
    assert timed.outcomes == [[(0, f"{home}\n0\n")]]
    assert os.environ.get("HOME") == before
    assert not os.path.exists(home)


def test_repetitions_rotate_the_order_of_the_rows() -> None:
    """Each repetition starts the workload with the next row, so drift spreads over rows."""
    rows = [LimitSystem("bash"), LimitSystem("sh")]
    result = run_benchmark(rows, SMOKE, repetitions=2, workloads=("tiny",))
    order = [(m.repetition, m.system) for m in result.measurements]
    assert order == [(0, "limit-bash"), (0, "limit-sh"), (1, "limit-sh"), (1, "limit-bash")]
    assert all(m.failures == 0 for m in result.measurements)


async def test_the_big_command_bench_runs_every_row_with_the_right_output() -> None:
    """`bench.big_command` runs each row (output checked) and reports ratios to raw bash."""
    from bench.big_command import RAW_FILE, measure, report

    figures = await measure(size=200 * 1024, reps=1)
    assert RAW_FILE in figures
    assert {"hermes[none] fresh", "hermes[none] persistent"} <= set(figures)
    assert all(len(values) == 1 and values[0] > 0 for values in figures.values())
    text = report(figures, 200 * 1024)
    assert "| raw bash FILE |" in text
    assert "1.00x |" in text
