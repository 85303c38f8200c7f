"""terminal_tool / cleanup_vm: the sync agent facade.

Timeouts, concurrency and lost sandboxes run on the public fake driver in virtual time: the
process-wide backend is entered in the test's trio run and terminal_tool is called from worker
threads, as a trio program's sync agent code would call it. Files, background processes,
bubblewrap and the process-wide portal (Ctrl-C, interpreter exit) run end to end on real
processes.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from hermes_actors import SandboxConfig, ToolBackend, profiles_from_mapping
from hermes_actors.drivers._local import SANDBOX_MARKER_VAR, bwrap_problem
from hermes_actors.facades import _terminal
from hermes_actors.terminal_tool import (
    MAX_OUTPUT_CHARS,
    cleanup_vm,
    shutdown_terminal_backend,
    terminal_tool,
)
from hermes_actors.testing.fake_driver import FakeDriver, Script
from proc_support import pids_with_env
from sandbox_support import processes_with
from terminal_support import run, terminal_profiles

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
def profiles_file(tmp_path: Path) -> Iterator[Path]:
    """Profiles for the process-wide terminal backend; it is shut down after the test."""
    with terminal_profiles(tmp_path / "profiles.yaml", PROFILES_YAML) as path:
        yield path


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
    assert pids_with_env(f"{SANDBOX_MARKER_VAR}={sandbox_id}") == []


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
    assert pids_with_env(f"{SANDBOX_MARKER_VAR}={sandbox_id}") == []


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


# -- on the fake driver, in virtual time -------------------------------------------------------


def fake_config(**changes: Any) -> SandboxConfig:
    settings: dict[str, Any] = {
        "backend": "local",
        "slots_per_sandbox": 4,
        "min_sandboxes": 1,
        "max_sandboxes": 2,
        "execution_timeout_s": 50.0,
    }
    settings.update(changes)
    return SandboxConfig(**settings)


@asynccontextmanager
async def fake_terminal(
    clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
    script: Script | None = None,
) -> AsyncIterator[FakeDriver]:
    """terminal_tool's process-wide backend on the fake driver, entered in this trio run."""
    # trio cannot see worker threads: with no cushion the clock would jump (through heartbeat
    # deadlines) while a thread is between two calls. A few real milliseconds of idleness
    # before each jump keep virtual time still while threads work.
    clock.autojump_threshold = 0.02
    async with trio.open_nursery() as nursery:
        driver = FakeDriver(nursery, script=script)
        profiles = profiles_from_mapping(
            {"fast": fake_config(), "isolated": fake_config(min_sandboxes=0)},
            default_profile="fast",
        )
        async with ToolBackend(profiles, drivers={"local": driver}) as backend:
            monkeypatch.setattr(_terminal, "_backend", backend)
            try:
                yield driver
            finally:
                await trio.to_thread.run_sync(shutdown_terminal_backend)
        nursery.cancel_scope.cancel()


async def call(command: str, **options: Any) -> dict[str, Any]:
    """terminal_tool from a worker thread, as sync agent code in a trio program calls it."""
    return await trio.to_thread.run_sync(functools.partial(run, command, **options))


async def test_timeouts_come_from_the_call_the_environment_or_the_profile(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A command over its timeout is killed (exit 124, said in error); the task goes on."""
    async with fake_terminal(autojump_clock, monkeypatch) as driver:
        timed_out = await call("sleep 30", task_id="slow", timeout=2)
        assert timed_out == {
            "output": "",
            "exit_code": 124,
            "error": "command timed out after 2 s (its processes were killed)",
        }
        assert not any(sandbox.running for sandbox in driver.alive)
        assert (await call("echo still usable", task_id="slow"))["output"] == "still usable\n"
        killed = "s (its processes were killed)"
        profile_default = await call("sleep 100", task_id="slow")
        assert profile_default["error"] == f"command timed out after 50 {killed}"
        monkeypatch.setenv("TERMINAL_TIMEOUT", "7")
        from_environment = await call("sleep 100", task_id="slow")
        assert from_environment["error"] == f"command timed out after 7 {killed}"
        # The original's positional form: (command, background, timeout, task_id).
        positional = await trio.to_thread.run_sync(terminal_tool, "sleep 100", False, 3, "slow")
        assert json.loads(positional)["error"] == f"command timed out after 3 {killed}"
        monkeypatch.setenv("TERMINAL_TIMEOUT", "soon")
        assert (await call("echo hi"))["error"] == (
            "environment: TERMINAL_TIMEOUT: expected a number of seconds > 0, got 'soon'; fix or "
            "unset it"
        )


async def test_unknown_profiles_and_profile_clashes_are_reported_not_raised(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unknown profile, or another profile for a running task, is an error string."""
    async with fake_terminal(autojump_clock, monkeypatch):
        unknown = await call("echo hi", profile="gpu")
        assert unknown == {
            "output": "",
            "exit_code": None,
            "error": "no profile named 'gpu'; known profiles: 'fast', 'isolated'",
        }
        assert (await call("echo hi", task_id="t"))["exit_code"] == 0
        clash = await call("echo hi", task_id="t", profile="isolated")
        assert clash["error"] == (
            "task 't' already runs in profile 'fast'; call cleanup_vm('t') before using "
            "profile 'isolated'"
        )
        await trio.to_thread.run_sync(cleanup_vm, "t")
        assert (await call("echo hi", task_id="t", profile="isolated"))["output"] == "hi\n"


async def test_long_output_keeps_its_head_and_tail(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Output over MAX_OUTPUT_CHARS keeps its head and tail with a note of what was left out."""

    async def script(command: str) -> tuple[int, bytes]:
        return 0, b"h" + b"x" * 200_000 + b"t"

    async with fake_terminal(autojump_clock, monkeypatch, script) as _:
        output = (await call("print-a-lot"))["output"]
    assert output.startswith("hx")
    assert output.endswith("xt")
    assert "characters omitted] ..." in output
    assert MAX_OUTPUT_CHARS < len(output) < MAX_OUTPUT_CHARS + 100


async def test_a_lost_sandbox_gives_an_error_and_the_task_starts_afresh(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the task's sandbox dies mid-command the call says so; the next call gets a new one."""
    async with fake_terminal(autojump_clock, monkeypatch) as driver, trio.open_nursery() as nursery:
        assert (await call("echo first", task_id="victim"))["exit_code"] == 0
        [doomed] = driver.alive

        async def kill_at_one_second() -> None:
            await trio.sleep(1)
            driver.kill(doomed.sandbox_id)

        nursery.start_soon(kill_at_one_second)
        started = trio.current_time()
        lost = await call("sleep 30", task_id="victim")
        assert trio.current_time() - started < 30
        assert lost["exit_code"] is None
        assert lost["error"].startswith("sandbox infrastructure failure (sandbox_lost): ")
        assert doomed.sandbox_id in lost["error"]
        again = await call("echo again", task_id="victim")
        assert again == {"output": "again\n", "exit_code": 0, "error": None}
        assert not doomed.is_alive()
        assert driver.created == 2


async def test_concurrent_callers_from_threads_run_at_once(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several threads call terminal_tool at once: their commands run concurrently."""
    callers = 6
    arrived: list[str] = []
    everyone_in = trio.Event()
    finished_at: list[float] = []

    async def script(command: str) -> tuple[int, bytes]:
        # A barrier: each command waits until all have arrived, so they must run at once.
        arrived.append(command)
        if len(arrived) == callers:
            everyone_in.set()
        await everyone_in.wait()
        await trio.sleep(3)
        finished_at.append(trio.current_time())
        return 0, command.encode() + b"\n"

    replies: dict[int, dict[str, Any]] = {}

    async def agent(index: int) -> None:
        replies[index] = await call(f"task-{index}", task_id=f"thread-{index}", timeout=600)

    async with fake_terminal(autojump_clock, monkeypatch, script):
        with trio.fail_after(60):  # serialized calls would never pass the barrier
            async with trio.open_nursery() as nursery:
                for index in range(callers):
                    nursery.start_soon(agent, index)
    assert {index: reply["output"] for index, reply in replies.items()} == {
        index: f"task-{index}\n" for index in range(callers)
    }
    assert len(set(finished_at)) == 1


WARM_PROFILES_YAML = """\
default_profile: main
profiles:
  main: {backend: local, isolation: none, slots_per_sandbox: 2, min_sandboxes: 1}
  side: {backend: local, isolation: none, slots_per_sandbox: 2, min_sandboxes: 1}
  lazy: {backend: local, isolation: none, slots_per_sandbox: 2, min_sandboxes: 0}
"""


def test_the_first_call_warms_every_profile_with_a_minimum(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """terminal_tool's first call starts every profile's min_sandboxes, not only its own."""
    with terminal_profiles(tmp_path / "profiles.yaml", WARM_PROFILES_YAML):
        assert run("echo hi")["output"] == "hi\n"
        pools = {
            pool.profile: len(pool.sandboxes) for pool in _terminal._get_backend().status().pools
        }
        assert pools == {"main": 1, "side": 1}


def test_a_working_directory_profiles_file_is_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without TERMINAL_MODAL_PROFILES_FILE, terminal_tool reads ./modal_profiles.yaml."""
    (tmp_path / "modal_profiles.yaml").write_text(WARM_PROFILES_YAML)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TERMINAL_MODAL_PROFILES_FILE", raising=False)
    shutdown_terminal_backend()
    try:
        unknown = run("echo hi", profile="gpu")
        assert unknown["error"] == "no profile named 'gpu'; known profiles: 'main', 'side', 'lazy'"
        assert not _terminal._get_backend().running  # an unknown profile starts nothing
    finally:
        shutdown_terminal_backend()
