"""`hermes-actors shell` under a pseudo-terminal: keys in, screen out, as a person uses it."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from cli_support import HERMES, Terminal, clean_environment, host_sandbox_pids
from proc_support import pids_with_argv

#: Marks a command's `sleep` so that the test can find it from the host and end it.
TAG = "hermes-cli-shell-tag"


def _wait_for_tagged() -> list[int]:
    deadline = time.monotonic() + 30
    while True:
        found = pids_with_argv(TAG, at_start=True)
        if found:
            return found
        assert time.monotonic() < deadline, "the tagged sleep never started"
        time.sleep(0.02)


def test_shell_runs_commands_ctrl_c_cancels_one_and_ctrl_d_leaves(tmp_path: Path) -> None:
    """In `shell`, a command's output shows as it is written and cd/export persist; Ctrl-C
    kills only the running command and the prompt returns; up-arrow recalls history; Ctrl-D
    leaves with 0 and releases the sandbox."""
    # Even a profile whose bash calls are `fresh` gets a persistent shell at the prompt.
    profiles = tmp_path / "profiles.yaml"
    profiles.write_text("profiles:\n  default:\n    shell: fresh\n")
    terminal = Terminal([*HERMES, "shell", "--profiles", str(profiles)], clean_environment())
    try:
        terminal.expect("Ctrl-D leaves")
        terminal.expect("$ ")
        terminal.send("echo hello from $((6 * 7))\r")
        terminal.expect("hello from 42\r\n")
        terminal.expect("$ ")
        # The slot's shell persists: cd and export carry over to the next command.
        terminal.send("mkdir -p work/sub && cd work/sub && export GREETING=hey\r")
        terminal.expect("$ ")
        terminal.send('echo "$GREETING from $(basename $PWD)"\r')
        terminal.expect("hey from sub\r\n")
        terminal.expect("$ ")
        # Output shows as it is written: the first line is on the screen while the command
        # waits for the test to end its tagged sleep.
        terminal.send(f"echo first; (exec -a {TAG} sleep 600); echo second\r")
        terminal.expect("first\r\n")
        for pid in _wait_for_tagged():
            os.kill(pid, signal.SIGTERM)
        terminal.expect("second\r\n")
        terminal.expect("$ ")
        # A slow command: Ctrl-C cancels it, the shell stays.
        started = time.monotonic()
        terminal.send("sleep 60; echo never\r")
        time.sleep(1.0)
        terminal.send("\x03")
        terminal.expect("command cancelled")
        assert time.monotonic() - started < 30
        terminal.expect("$ ")
        terminal.send("echo still here\r")
        assert "never" not in terminal.expect("still here\r\n")
        terminal.expect("$ ")
        # Ctrl-C at the prompt only gives a new prompt.
        terminal.send("\x03")
        terminal.expect("$ ")
        # History: up-arrow brings back the last command.
        terminal.send("\x1b[A\r")
        terminal.expect("still here\r\n")
        terminal.expect("$ ")
        assert host_sandbox_pids(terminal.pid)  # the slot's sandbox runs while the shell does
        terminal.send("\x04")
        assert terminal.wait() == 0
    finally:
        if terminal.fd >= 0:  # the test failed before the shell left
            os.kill(terminal.pid, signal.SIGKILL)
            os.waitpid(terminal.pid, 0)
            os.close(terminal.fd)
    assert host_sandbox_pids(terminal.pid) == []


def test_run_on_a_terminal_shows_the_sandbox_starting_then_streams_the_output() -> None:
    """On a terminal, `run` draws a live line while its sandbox starts, clears it, then shows
    the command's output as it is written; its exit code is the command's."""
    terminal = Terminal(
        [*HERMES, "run", "--", "echo first; echo finished; exit 3"],
        clean_environment(),
    )
    try:
        terminal.expect("starting a default sandbox")  # the live display
        terminal.expect("first\r\nfinished\r\n")
        assert terminal.wait() == 3
        assert "starting a default sandbox" not in terminal.screen  # no summary line left
    finally:
        if terminal.fd >= 0:
            os.kill(terminal.pid, signal.SIGKILL)
            os.waitpid(terminal.pid, 0)
            os.close(terminal.fd)
