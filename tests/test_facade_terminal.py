"""terminal_tool / cleanup_vm: the sync agent facade, through the process-wide portal."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hermes_actors.drivers._local import SANDBOX_MARKER_VAR, bwrap_problem, marked_pids
from hermes_actors.terminal_tool import (
    MAX_OUTPUT_CHARS,
    cleanup_vm,
    shutdown_terminal_backend,
    terminal_tool,
)
from sandbox_support import kill_agent, processes_with

PROFILES_YAML = """\
default_profile: fast
profiles:
  fast:
    backend: local
    isolation: none
    slots_per_sandbox: 4
    min_pool: 1
    max_pool: 2
    execution_timeout_s: 20
  isolated:
    backend: local
    isolation: bwrap
    slots_per_sandbox: 2
    min_sandboxes: 0
    max_sandboxes: 1
"""


@pytest.fixture
def profiles_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Profiles for the process-wide terminal backend; it is shut down after the test."""
    path = tmp_path / "profiles.yaml"
    path.write_text(PROFILES_YAML)
    monkeypatch.setenv("TERMINAL_MODAL_PROFILES_FILE", str(path))
    shutdown_terminal_backend()
    yield path
    shutdown_terminal_backend()


def run(command: str, **options: Any) -> dict[str, Any]:
    reply = json.loads(terminal_tool(command, **options))
    assert set(reply) == {"output", "exit_code", "error"}
    return reply  # type: ignore[no-any-return]


def test_a_task_keeps_its_files_until_cleanup_vm(profiles_file: Path) -> None:
    """Files written under a task_id persist across calls; cleanup_vm wipes them."""
    assert run("echo hello > notes.txt", task_id="t1") == {
        "output": "",
        "exit_code": 0,
        "error": None,
    }
    assert run("cat notes.txt", task_id="t1")["output"] == "hello\n"
    assert run("cat notes.txt", task_id="t2")["exit_code"] == 1
    cleanup_vm("t1")
    after = run("cat notes.txt", task_id="t1")
    assert after["exit_code"] == 1
    assert after["error"] == "command exited with status 1"
    assert "No such file" in after["output"]
    cleanup_vm("t1")
    cleanup_vm("never-used")


def test_calls_without_task_id_get_a_fresh_workspace(profiles_file: Path) -> None:
    """Without task_id every call runs in a clean slot that is released afterwards."""
    assert run("echo x > f; cat f") == {"output": "x\n", "exit_code": 0, "error": None}
    assert run("ls -A")["output"] == ""


def test_cleanup_vm_kills_the_tasks_background_processes(profiles_file: Path) -> None:
    """cleanup_vm kills what the task left running."""
    token = f"hermes-term-{secrets.token_hex(4)}"
    run(f"(exec -a {token} sleep 60) > /dev/null 2>&1 &", task_id="bg")
    # The call may return before the background subshell has exec'd its sleep.
    deadline = time.monotonic() + 5
    while not processes_with(token) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert processes_with(token)
    cleanup_vm("bg")
    assert processes_with(token) == []


def test_timeouts_unknown_profiles_and_long_output_are_reported_not_raised(
    profiles_file: Path,
) -> None:
    """A timeout and an unknown profile give an error string; long output keeps head and tail."""
    started = time.monotonic()
    timed_out = run("echo before; sleep 30", task_id="slow", timeout=0.3)
    assert time.monotonic() - started < 10
    assert timed_out == {
        "output": "before\n",
        "exit_code": 124,
        "error": "command timed out after 0.3 s (its processes were killed)",
    }
    assert run("echo still usable", task_id="slow")["output"] == "still usable\n"
    unknown = run("echo hi", profile="gpu")
    assert unknown["exit_code"] is None
    assert unknown["error"] == "no profile named 'gpu'; known profiles: 'fast', 'isolated'"
    clash = run("echo hi", task_id="slow", profile="isolated")
    assert clash["error"] == (
        "task 'slow' already runs in profile 'fast'; call cleanup_vm('slow') before using "
        "profile 'isolated'"
    )
    long = run("python3 -c \"print('h' + 'x' * 200000 + 't', end='')\"")
    output = long["output"]
    assert output.startswith("hx")
    assert output.endswith("xt")
    assert "characters omitted] ..." in output
    assert MAX_OUTPUT_CHARS < len(output) < MAX_OUTPUT_CHARS + 100


def test_a_lost_sandbox_gives_an_error_and_the_task_starts_afresh(profiles_file: Path) -> None:
    """When the task's sandbox dies the call reports it, and the next call gets a new slot."""
    sandbox_id = run(f"echo ${SANDBOX_MARKER_VAR}", task_id="victim")["output"].strip()
    assert sandbox_id.startswith("local-fast-")
    killer = threading.Timer(0.5, kill_agent, args=(sandbox_id,))
    killer.start()
    try:
        lost = run("sleep 30", task_id="victim")
    finally:
        killer.join()
    assert lost["exit_code"] is None
    assert lost["error"].startswith("sandbox infrastructure failure (sandbox_lost): ")
    again = run(f"echo ${SANDBOX_MARKER_VAR}", task_id="victim")
    assert again["exit_code"] == 0, again
    assert again["output"].strip() not in ("", sandbox_id)


def test_invalid_configuration_is_an_error_string(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broken profiles file is reported in `error`, naming the file and the path."""
    path = tmp_path / "bad.yaml"
    path.write_text("profiles:\n  default:\n    slots_per_sandbox: many\n")
    monkeypatch.setenv("TERMINAL_MODAL_PROFILES_FILE", str(path))
    shutdown_terminal_backend()
    try:
        reply = run("echo hi")
    finally:
        shutdown_terminal_backend()
    assert reply["exit_code"] is None
    assert reply["error"].startswith("the sandbox configuration is invalid: ")
    assert f"{path}: $.profiles.default.slots_per_sandbox: expected int, got str" in reply["error"]


def test_concurrent_callers_from_threads(profiles_file: Path) -> None:
    """Several threads call terminal_tool at once, each task in its own workspace."""
    replies: dict[int, dict[str, Any]] = {}

    def agent(index: int) -> None:
        run(f"echo {index} > mine.txt; sleep 0.3", task_id=f"thread-{index}")
        replies[index] = run("cat mine.txt", task_id=f"thread-{index}")

    threads = [threading.Thread(target=agent, args=(index,)) for index in range(6)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert time.monotonic() - started < 10
    assert {index: reply["output"] for index, reply in replies.items()} == {
        index: f"{index}\n" for index in range(6)
    }


def test_bwrap_profile_runs_commands_isolated(profiles_file: Path) -> None:
    """A bwrap profile runs the command inside the sandbox: workspace under /data, no network."""
    import trio

    problem = trio.run(bwrap_problem)
    if problem is not None:
        pytest.skip(f"bubblewrap is not usable here: {problem}")
    reply = run("pwd; cat /sys/class/net/*/operstate 2>/dev/null | sort -u", profile="isolated")
    assert reply["exit_code"] == 0, reply
    lines = reply["output"].splitlines()
    assert lines[0].startswith("/data/")


def _script_leaves_nothing(
    body: str, tmp_path: Path, token: str
) -> subprocess.CompletedProcess[str]:
    profiles = tmp_path / "profiles.yaml"
    profiles.write_text(PROFILES_YAML)
    script = tmp_path / "agent.py"
    script.write_text(textwrap.dedent(body))
    env = {**os.environ, "TERMINAL_MODAL_PROFILES_FILE": str(profiles), "TOKEN": token}
    return subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60
    )


def test_a_sync_program_interrupted_by_ctrl_c_leaves_no_sandbox(tmp_path: Path) -> None:
    """Ctrl-C during terminal_tool kills the command and every sandbox before the program exits."""
    token = f"hermes-sigint-{secrets.token_hex(4)}"
    done = _script_leaves_nothing(
        """
        import os, signal, threading
        from hermes_actors.terminal_tool import terminal_tool
        token = os.environ["TOKEN"]
        terminal_tool(f"(exec -a {token}-bg sleep 60) > /dev/null 2>&1 &", task_id="kept")
        print(terminal_tool(f"echo $HERMES_SANDBOX_ID", task_id="kept"), flush=True)
        threading.Timer(0.5, os.kill, args=(os.getpid(), signal.SIGINT)).start()
        terminal_tool(f"exec -a {token}-fg sleep 60", task_id="kept")
        print("not reached")
        """,
        tmp_path,
        token,
    )
    assert "KeyboardInterrupt" in done.stderr
    assert "not reached" not in done.stdout
    sandbox_id = json.loads(done.stdout.splitlines()[0])["output"].strip()
    assert processes_with(token) == []
    assert marked_pids(f"{SANDBOX_MARKER_VAR}={sandbox_id}".encode()) == []


def test_a_sync_program_that_just_ends_leaves_no_sandbox(tmp_path: Path) -> None:
    """A script that ends without cleanup_vm still terminates its sandboxes at exit."""
    token = f"hermes-exit-{secrets.token_hex(4)}"
    done = _script_leaves_nothing(
        """
        import os
        from hermes_actors import terminal_tool
        token = os.environ["TOKEN"]
        terminal_tool(f"(exec -a {token} sleep 60) > /dev/null 2>&1 &", task_id="kept")
        print(terminal_tool(f"echo $HERMES_SANDBOX_ID", task_id="kept"))
        """,
        tmp_path,
        token,
    )
    assert done.returncode == 0, done.stderr
    sandbox_id = json.loads(done.stdout)["output"].strip()
    assert sandbox_id
    assert processes_with(token) == []
    assert marked_pids(f"{SANDBOX_MARKER_VAR}={sandbox_id}".encode()) == []


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ({"command": "true", "task_id": ["t"]}, "'task_id' must be a str or None, got list"),
        ({"command": "true", "profile": 3}, "'profile' must be a str or None, got int"),
        ({"command": b"true"}, "'command' must be a str, got bytes"),
        ({"command": "echo \0"}, "'command' must not contain NUL characters"),
        ({"command": "true", "timeout": "5"}, "'timeout' must be a number of seconds > 0"),
        ({"command": "true", "timeout": -1}, "'timeout' must be a number of seconds > 0"),
        ({"command": "true", "timeout": float("nan")}, "'timeout' must be a number of seconds"),
        ({"command": "true", "task_id": {"a": 1}}, "'task_id' must be a str or None, got dict"),
    ],
)
def test_bad_argument_types_are_json_errors_never_raised(
    arguments: dict[str, Any], expected: str
) -> None:
    """Arguments of the wrong type give the JSON error reply; nothing raises, nothing starts."""
    reply = json.loads(terminal_tool(**arguments))
    assert reply["output"] == ""
    assert reply["exit_code"] is None
    assert expected in reply["error"]
    cleanup_vm(["not", "a", "str"])  # type: ignore[arg-type]
