"""`hermes-actors shell` under a pseudo-terminal: keys in, screen out, as a person uses it."""

from __future__ import annotations

import contextlib
import os
import pty
import select
import signal
import time
from pathlib import Path

from cli_support import HERMES, clean_environment, host_sandbox_pids


class Terminal:
    """A program on a pseudo-terminal: `send` keys, `expect` text on the screen."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        pid, fd = pty.fork()
        if pid == 0:  # the child: the program, with the terminal as its controlling tty
            try:
                os.execve(argv[0], argv, env)
            finally:
                os._exit(127)
        self.pid, self.fd = pid, fd
        self.screen = ""

    def send(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def expect(self, text: str, timeout_s: float = 30.0) -> str:
        """Read until `text` is on the screen after what was expected before; return the rest."""
        deadline = time.monotonic() + timeout_s
        while text not in self.screen:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{text!r} not on screen; screen: {self.screen!r}"
            ready, _, _ = select.select([self.fd], [], [], remaining)
            if ready:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:  # EIO: the program closed the terminal
                    chunk = b""
                assert chunk, f"{text!r} never came; the program left; screen: {self.screen!r}"
                self.screen += chunk.decode(errors="replace")
        before, _, self.screen = self.screen.partition(text)
        return before

    def wait(self, timeout_s: float = 60.0) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with_status = os.waitpid(self.pid, os.WNOHANG)
            if with_status[0] == self.pid:
                os.close(self.fd)
                self.fd = -1
                return os.waitstatus_to_exitcode(with_status[1])
            # Keep the terminal drained so the program never blocks writing to it.
            if select.select([self.fd], [], [], 0.05)[0]:
                with contextlib.suppress(OSError):
                    self.screen += os.read(self.fd, 65536).decode(errors="replace")
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        os.close(self.fd)
        self.fd = -1
        raise AssertionError(f"the program did not exit; screen: {self.screen!r}")


def test_shell_runs_commands_ctrl_c_cancels_one_and_ctrl_d_leaves(tmp_path: Path) -> None:
    """In `shell`, a command's output shows and cd/export persist; Ctrl-C kills only the running
    command and the prompt returns; up-arrow recalls history; Ctrl-D leaves with 0 and releases
    the sandbox."""
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
