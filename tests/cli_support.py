"""Test support for the command line: run `hermes-actors` as a user would, in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping

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
    found = []
    needle = f"HERMES_HOST_PID={host_pid}".encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as handle:
                if needle in handle.read().split(b"\0"):
                    found.append(int(entry.name))
        except OSError:
            continue
    return found
