"""The tree benchmark at smoke sizes: every part runs and reports (no timing is asserted)."""

from __future__ import annotations

import sys
from pathlib import Path

# `bench` lives at the repository root, next to `tests`.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.trees import SMOKE, measure_local, measure_modal, render  # noqa: E402

from hermes_actors.testing.modal_emulator import ModalEmulator  # noqa: E402


async def test_smoke_run_measures_forks_calls_and_acquires(modal_emulator: ModalEmulator) -> None:
    """Forks land in the source's sandbox, cross forks in others; calls are counted per target."""
    modal = await measure_modal(modal_emulator, SMOKE)
    # An in-sandbox fork is one request to the agent: no control-plane call at all.
    assert set(modal.in_sandbox_calls) == {"TaskExecStdinWrite"}
    assert modal.cross_sandboxes == SMOKE.cross_targets
    assert modal.cross_calls_per_target <= 3
    # Across sandboxes: one directory snapshot at the source, one mount and unmount per target.
    assert modal.cross_source_calls["TaskSnapshotDirectory"] == 1
    for calls in modal.cross_target_calls:
        assert calls["TaskMountDirectory"] == calls["TaskUnmountDirectory"] == 1
    # A restore into another sandbox: the checkpoint snapshotted once, then mounts only.
    first = dict(modal.restore_first_calls)
    assert first.pop("TaskExecStdinWrite") >= 1
    assert first == {"TaskSnapshotDirectory": 1, "TaskMountDirectory": 1, "TaskUnmountDirectory": 1}
    again = dict(modal.restore_again_calls)
    assert again.pop("TaskExecStdinWrite") >= 1
    assert again == {"TaskMountDirectory": 1, "TaskUnmountDirectory": 1}
    local = await measure_local(SMOKE, "none")
    assert local.same_sandbox == SMOKE.branches
    assert len(local.fork_ms) == len(local.cp_ms) == len(local.cross_ms) == SMOKE.repetitions
    assert local.first_image_ms > 0
    assert local.second_image_ms > 0
    report = render(SMOKE, local, modal)
    assert "| fork into 2 slots of the source's sandbox (2 landed there) |" in report
    assert "provider calls per target sandbox" in report
    assert "restore into another sandbox, first / again" in report
