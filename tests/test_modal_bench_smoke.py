"""The modal call benchmark at smoke sizes: both systems run every command and are counted.

No timing is asserted (the full run is not part of CI): these tests check that every command of
both systems ran and printed what it must, that the calls are counted per method over the
measured window, and that the command line prints and writes the report.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# `bench` lives at the repository root, next to `tests`.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.modal_calls import SMOKE, measure, render  # noqa: E402

from hermes_actors.testing.modal_emulator import ModalEmulator  # noqa: E402


async def test_smoke_run_counts_every_call_of_both_systems(modal_emulator: ModalEmulator) -> None:
    """Both systems run every command correctly; calls per command are counted per method."""
    result = await measure(modal_emulator, SMOKE)
    hermes, baseline, floor = result.hermes, result.baseline, result.floor
    assert (hermes.failures, baseline.failures, floor.failures) == (0, 0, 0)
    assert len(hermes.runs) == len(baseline.runs) == SMOKE.repetitions
    (baseline_run,) = baseline.runs
    # One provider exec per command: start it, read its stdout, wait for it.
    assert baseline_run.calls == {
        "TaskExecStart": SMOKE.commands,
        "TaskExecStdioRead": SMOKE.commands,
        "TaskExecWait": SMOKE.commands,
    }
    (hermes_run,) = hermes.runs
    # Through the agent, a command is only a (shared) stdin write: no exec, no stream, no poll.
    assert set(hermes_run.calls) == {"TaskExecStdinWrite"}
    assert 1 <= hermes_run.calls["TaskExecStdinWrite"] <= SMOKE.commands
    # The whole run adds the one-off calls: lookups, create, the agent's exec and its stream.
    for method in ("AppGetOrCreate", "SandboxCreateV2", "TaskExecStart", "TaskExecStdioRead"):
        assert hermes.whole_run_calls[method] >= 1
    assert hermes.whole_run_calls_per_command > hermes.calls_per_command
    assert result.speedup > 0
    assert modal_emulator.sandboxes()
    assert all(state.returncode is not None for state in modal_emulator.sandboxes())
    report = render(result)
    assert "| hermes calls/command (batch) |" in report
    assert "| throughput vs baseline |" in report


def test_command_line_prints_and_writes_the_table(tmp_path: Path) -> None:
    """`python -m bench.modal_calls` runs on its own emulator and writes the markdown table."""
    output = tmp_path / "modal_calls.md"
    environment = {
        name: value for name, value in os.environ.items() if not name.startswith("MODAL_")
    }
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.modal_calls",
            "--commands=4",
            "--sandboxes=1",
            "--slots=2",
            "--latency-ms=1",
            "--reps=1",
            f"--output={output}",
        ],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    written = output.read_text()
    assert written == completed.stdout
    assert "4 `bash` commands over 2 slots" in written
    assert "| baseline (one sb.exec per command) | 3.000 |" in written
