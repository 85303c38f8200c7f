"""terminal_tool called the way the original Hermes Agent's callers call it (issue 10).

The original's tool dispatcher calls `terminal_tool(command=..., background=..., timeout=...,
task_id=...)` with the model's arguments, scripts and docs call it positionally
(`terminal_tool("python train.py", profile="gpu")`), agents end a task with `cleanup_vm(task_id)`,
and the tool registry asks `check_terminal_requirements()` before offering the tool.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hermes_actors.terminal_tool import (
    TERMINAL_TOOL_DESCRIPTION,
    check_terminal_requirements,
    cleanup_all_environments,
    cleanup_vm,
    get_active_environments_info,
    terminal_tool,
)
from sandbox_support import processes_with
from terminal_support import terminal_profiles

PROFILES_YAML = """\
profiles:
  default:
    backend: local
    isolation: none
    slots_per_sandbox: 4
    min_sandboxes: 1
    max_sandboxes: 2
"""


@pytest.fixture
def profiles_file(tmp_path: Path) -> Iterator[Path]:
    """Profiles for the process-wide terminal backend; it is shut down after the test."""
    with terminal_profiles(tmp_path / "profiles.yaml", PROFILES_YAML) as path:
        yield path


def reply_of(text: str) -> dict[str, Any]:
    reply = json.loads(text)
    assert set(reply) == {"output", "exit_code", "error"}
    return reply  # type: ignore[no-any-return]


def wait_for(condition: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition did not hold in time"
        time.sleep(0.02)


def test_positional_and_keyword_calls_of_the_original_signature(profiles_file: Path) -> None:
    """(command, background, timeout, task_id, profile) positionally and by keyword.

    A positional timeout's effect is tested in virtual time (test_facade_terminal.py)."""
    assert reply_of(terminal_tool("echo hi")) == {"output": "hi\n", "exit_code": 0, "error": None}
    assert reply_of(terminal_tool("echo one > f", False, 10, "task-a"))["exit_code"] == 0
    assert reply_of(terminal_tool("cat f", False, None, "task-a", "default"))["output"] == "one\n"
    # The tool dispatcher's call, with the model's arguments (absent ones as None / False).
    dispatched = terminal_tool(command="cat f", background=False, timeout=None, task_id="task-a")
    assert reply_of(dispatched)["output"] == "one\n"
    cleanup_vm("task-a")


def test_background_commands_return_at_once_and_die_at_cleanup_vm(profiles_file: Path) -> None:
    """background=True detaches the command, says where its output goes; cleanup_vm kills it."""
    token = f"hermes-bg-{secrets.token_hex(4)}"
    started = time.monotonic()
    reply = reply_of(
        terminal_tool(f"echo ready; exec -a {token} sleep 60", background=True, task_id="bg")
    )
    assert time.monotonic() - started < 5
    assert reply["exit_code"] == 0
    assert reply["error"] is None
    match = re.search(r"terminal_tool\('(cat [^']+)', task_id='bg'\)", reply["output"])
    assert match, reply["output"]
    wait_for(lambda: processes_with(token))
    wait_for(lambda: reply_of(terminal_tool(match.group(1), task_id="bg"))["output"] != "")
    log = reply_of(terminal_tool(match.group(1), task_id="bg"))
    assert log == {"output": "ready\n", "exit_code": 0, "error": None}
    cleanup_vm("bg")
    wait_for(lambda: processes_with(token) == [])


def test_background_without_task_id_runs_in_the_default_task(profiles_file: Path) -> None:
    """As in the original, a call without task_id that must outlive the call uses 'default'."""
    token = f"hermes-bg-default-{secrets.token_hex(4)}"
    reply = reply_of(terminal_tool(f"exec -a {token} sleep 60", background=True))
    assert reply["exit_code"] == 0
    assert "task_id='default'" in reply["output"]
    wait_for(lambda: processes_with(token))
    assert "default" in get_active_environments_info()["task_ids"]
    cleanup_vm("default")
    wait_for(lambda: processes_with(token) == [])


def test_active_environments_info_and_cleanup_all(profiles_file: Path) -> None:
    """get_active_environments_info lists the tasks; cleanup_all_environments ends them all."""
    token = f"hermes-all-{secrets.token_hex(4)}"
    for task_id in ("one", "two"):
        terminal_tool(f"exec -a {token} sleep 60", background=True, task_id=task_id)
    terminal_tool("head -c 100000 /dev/zero > blob", task_id="two")
    info = get_active_environments_info()
    assert set(info) == {"count", "task_ids", "workdirs", "total_disk_usage_mb"}
    assert info["count"] == 2
    assert sorted(info["task_ids"]) == ["one", "two"]
    workdir = reply_of(terminal_tool("pwd", task_id="one"))["output"].strip()
    assert info["workdirs"]["one"] == workdir
    assert info["total_disk_usage_mb"] >= 0.09
    wait_for(lambda: len(processes_with(token)) == 2)
    assert cleanup_all_environments() == 2
    assert get_active_environments_info()["count"] == 0
    wait_for(lambda: processes_with(token) == [])
    assert cleanup_all_environments() == 0


def test_check_terminal_requirements_says_whether_the_tool_can_run(
    profiles_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """True when the configured backend can run commands; False (never raising) otherwise."""
    assert "background" in TERMINAL_TOOL_DESCRIPTION
    assert check_terminal_requirements() is True
    broken = tmp_path / "broken.yaml"
    broken.write_text("profiles:\n  default:\n    slots_per_sandbox: many\n")
    monkeypatch.setenv("TERMINAL_MODAL_PROFILES_FILE", str(broken))
    assert check_terminal_requirements() is False
