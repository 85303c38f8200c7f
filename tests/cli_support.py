"""Test support for the command line: run `hermes-actors` as a user would, in a subprocess."""

from __future__ import annotations

import contextlib
import os
import pty
import select
import signal
import subprocess
import sys
import time
from collections.abc import Mapping

from proc_support import pids_with_env

#: The command, as `python -m` (the console script may belong to another checkout's install).
HERMES = [sys.executable, "-m", "hermes_actors.cli"]


def clean_environment(**changes: str) -> dict[str, str]:
    """This environment without TERMINAL_* settings (a user's shell), plus `changes`."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("TERMINAL_")}
    env.update(changes)
    return env


def hermes(
    *arguments: str,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """Run `hermes-actors ARGUMENTS...` to completion; its output is captured as text."""
    return subprocess.run(
        [*HERMES, *arguments],
        env=dict(env) if env is not None else clean_environment(),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def host_sandbox_pids(host_pid: int) -> list[int]:
    """Pids of local sandbox processes whose host is `host_pid` (their top processes)."""
    return pids_with_env(f"HERMES_HOST_PID={host_pid}")


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
