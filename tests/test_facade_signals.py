"""Host programs stopped by a signal leave nothing behind, and exit as the signal says.

Each test runs a small program in a subprocess (its own TMPDIR, so the sandboxes' directories
are countable), signals it while commands run, and counts what is left: processes, and
sandbox directories.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hermes_actors.drivers._local import SANDBOX_MARKER_VAR
from proc_support import pids_with_env
from sandbox_support import processes_with

PROFILES_YAML = """\
profiles:
  default:
    backend: local
    isolation: none
    slots_per_sandbox: 10
    min_sandboxes: 1
    max_sandboxes: 6
    execution_timeout_s: 120
"""


def start_program(body: str, tmp_path: Path, token: str) -> tuple[subprocess.Popen[str], Path]:
    """Start `body` as a program with its own TMPDIR; wait until it prints `ready`."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    profiles = tmp_path / "profiles.yaml"
    profiles.write_text(PROFILES_YAML)
    script = tmp_path / "program.py"
    script.write_text(textwrap.dedent(body))
    env = {
        **os.environ,
        "TERMINAL_MODAL_PROFILES_FILE": str(profiles),
        "TOKEN": token,
        "TMPDIR": str(temp),
    }
    program = subprocess.Popen(
        [sys.executable, str(script)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert program.stdout is not None
    line = program.stdout.readline()
    assert line.strip() == "ready", line + (program.stderr.read() if program.stderr else "")
    return program, temp


def wait_gone(token: str, temp: Path, limit_s: float) -> float:
    """Seconds until no process carries `token` and no sandbox directory is left."""
    started = time.monotonic()
    while time.monotonic() - started < limit_s:
        if not processes_with(token) and not list(temp.glob("hermes-*")):
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(
        f"left after {limit_s} s: processes {processes_with(token)}, "
        f"directories {list(temp.glob('hermes-*'))}"
    )


SYNC_PROGRAM = """
    import os
    from hermes_actors.terminal_tool import terminal_tool
    token = os.environ["TOKEN"]
    terminal_tool(f"(exec -a {token}-bg sleep 600) > /dev/null 2>&1 &", task_id="kept")
    reply = terminal_tool("echo $HERMES_SANDBOX_ID", task_id="kept")
    print("ready", flush=True)
    print(reply, flush=True)
    terminal_tool(f"exec -a {token}-fg sleep 600", task_id="kept")
    print("not reached", flush=True)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_stop_a_sync_program_like_ctrl_c(
    tmp_path: Path, signum: signal.Signals
) -> None:
    """SIGTERM/SIGHUP: every sandbox process and directory gone within 5 s, status the signal's."""
    token = f"hermes-sig-{secrets.token_hex(4)}"
    program, temp = start_program(SYNC_PROGRAM, tmp_path, token)
    try:
        time.sleep(0.3)
        assert processes_with(token)
        assert list(temp.glob("hermes-*"))
        signalled = time.monotonic()
        program.send_signal(signum)
        status = program.wait(timeout=10)
        assert time.monotonic() - signalled < 5
        assert status == -signum
        assert program.stdout is not None
        out = program.stdout.read()
        assert "not reached" not in out
        sandbox_id = json.loads(out.splitlines()[0])["output"].strip()
        wait_gone(token, temp, 1.0)
        assert pids_with_env(f"{SANDBOX_MARKER_VAR}={sandbox_id}") == []
    finally:
        program.kill()
        program.communicate()


def test_sigterm_stops_a_trio_program_using_async_with(tmp_path: Path) -> None:
    """A trio program in `async with backend:` stops its sandboxes on SIGTERM, then dies of it."""
    token = f"hermes-sig-{secrets.token_hex(4)}"
    program, temp = start_program(
        """
        import os, trio
        from hermes_actors import ToolBackend
        token = os.environ["TOKEN"]

        async def main():
            async with ToolBackend() as backend:
                slot = await backend.acquire("t")
                background = f"(exec -a {token}-bg sleep 600) >/dev/null 2>&1 &"
                await backend.execute_batch([(slot, "bash", {"command": background})])
                print("ready", flush=True)
                await backend.execute_batch(
                    [(slot, "bash", {"command": f"exec -a {token}-fg sleep 600"})]
                )
                print("not reached", flush=True)

        trio.run(main)
        """,
        tmp_path,
        token,
    )
    try:
        time.sleep(0.3)
        assert processes_with(token)
        signalled = time.monotonic()
        program.send_signal(signal.SIGTERM)
        status = program.wait(timeout=10)
        assert time.monotonic() - signalled < 5
        assert status == -signal.SIGTERM
        wait_gone(token, temp, 1.0)
    finally:
        program.kill()
        program.communicate()


def test_ctrl_c_of_a_thread_pool_of_terminal_tool_calls_exits_promptly(tmp_path: Path) -> None:
    """Ctrl-C cancels the in-flight calls of 50 threads; the program exits within seconds."""
    token = f"hermes-pool-{secrets.token_hex(4)}"
    program, temp = start_program(
        """
        import os, json, threading
        from concurrent.futures import ThreadPoolExecutor
        from hermes_actors.terminal_tool import terminal_tool
        token = os.environ["TOKEN"]
        started = threading.Semaphore(0)

        def work(index):
            started.release()
            return json.loads(terminal_tool(f"exec -a {token}-{index} sleep 600"))

        with ThreadPoolExecutor(50) as executor:
            futures = [executor.submit(work, index) for index in range(200)]
            for _ in range(50):
                started.acquire()
            print("ready", flush=True)
            replies = [future.result() for future in futures]
        print("not reached", flush=True)
        """,
        tmp_path,
        token,
    )
    try:
        deadline = time.monotonic() + 30
        while len(processes_with(token)) < 50 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(processes_with(token)) >= 50
        interrupted = time.monotonic()
        program.send_signal(signal.SIGINT)
        status = program.wait(timeout=20)
        elapsed = time.monotonic() - interrupted
        assert program.stderr is not None
        errors = program.stderr.read()
        assert "KeyboardInterrupt" in errors
        assert status != 0
        assert elapsed < 5, errors[-2000:]
        wait_gone(token, temp, 2.0)
    finally:
        program.kill()
        program.communicate()
