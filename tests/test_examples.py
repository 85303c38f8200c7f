"""Every example in examples/ runs to completion on the local backend (with small sizes)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *arguments: str) -> subprocess.CompletedProcess[str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("TERMINAL_", "MODAL_"))
    }
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *arguments],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_quickstart_shows_the_terminal_tool() -> None:
    """quickstart.py runs commands, keeps a task's files, times out, and cleans up; its
    progress (plain lines off a terminal) goes to stderr."""
    done = run_example("quickstart.py")
    assert done.returncode == 0, done.stderr
    blocks = [block for block in done.stdout.split("--- ") if block]
    replies = {
        title: json.loads(body) for title, _, body in (block.partition("\n") for block in blocks)
    }
    assert replies["run it in the same task"] == {"output": "42\n", "exit_code": 0, "error": None}
    assert replies["a failing command"]["exit_code"] == 2
    assert replies["a command that times out"]["exit_code"] == 124
    assert replies["after cleanup_vm the files are gone"]["exit_code"] == 2
    assert "terminal_tool calls: done 6/6  failed 3  in flight 0" in done.stderr


def test_rl_batch_runs_trajectories_through_execute_batch() -> None:
    """rl_batch.py drives every trajectory's turns and summarizes throughput and failures."""
    done = run_example("rl_batch.py", "--trajectories", "12", "--slots-per-sandbox", "4")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "12 slots on 3 sandbox(es)" in done.stdout
    assert "acquiring slots: done 12/12  failed 0  in flight 0" in done.stdout
    assert "turn 5/5: done 60/60  failed 2  in flight 0" in done.stdout
    # Policies 3 and 10 write a wrong solution: their tests fail, as command failures.
    assert (
        "tests passed: 10/12; failed tool calls: 2 (command failures 2, infrastructure failures 0)"
    ) in done.stdout
    assert re.search(r"tool calls: 60 in [0-9.]+s \([0-9]+ calls/s\)", done.stdout)
    assert re.search(r"^default +local +3 +0 +12 ", done.stdout, re.MULTILINE)


def test_asyncio_trainer_uses_the_same_api_from_asyncio() -> None:
    """asyncio_trainer.py runs episodes from asyncio, counted by the progress display; the
    cancelled one frees its slot."""
    done = run_example("asyncio_trainer.py", "--episodes", "6")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "episodes: done 6/6  failed 0  in flight 0" in done.stderr
    assert re.search(r"^episodes: 6 in [0-9.]+s; mean reward", done.stdout, re.MULTILINE)
    assert "abandoned episode: cancelled: the command was killed" in done.stdout
    assert "slots still held after all episodes: 0" in done.stdout


def test_multi_profile_serves_two_profiles_from_one_backend() -> None:
    """multi_profile.py places trajectories in the profile they ask for; its batch streams
    into the progress display."""
    done = run_example("multi_profile.py", "--isolation", "none")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "tool calls: done 5/5  failed 0  in flight 0" in done.stderr
    says = re.findall(r"profile=(\w+) .* says (\w+)", done.stdout)
    assert says == [("small", "small")] * 3 + [("big", "big")] * 2
    assert re.search(r"^big +local +2 +0 +2 ", done.stdout, re.MULTILINE)


def test_tree_search_forks_tries_candidates_and_keeps_the_best() -> None:
    """tree_search.py forks a prepared workspace, scores each branch and keeps the best."""
    done = run_example("tree_search.py", "--branches", "4", "--files", "50", "--isolation", "none")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "branch 3: return max(low, min(x, high))        score 5/5 (vendor files: 50)" in (
        done.stdout
    )
    assert "kept branch 3 (score 1.00)" in done.stdout
    assert re.search(
        r"4 forks of 52 files, 4 in the source's sandbox; prepare: \d+ ms, fork:", done.stdout
    )
