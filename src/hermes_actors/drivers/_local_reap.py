"""Finding and stopping what dead local runs left behind (`hermes-actors reap`).

Local sandboxes normally never outlive their run: bubblewrap dies with its parent and the agent
kills everything it started when its stream closes. What a host killed with SIGKILL can leave:

* its sandbox directories (workspaces and agent logs) under the temporary directory, and
* rarely, processes of a sandbox whose agent was stuck or killed first.

A sandbox's processes carry its id in their environment (`HERMES_SANDBOX_ID`), and its top
process (the agent, or bwrap) the pid of the host that started it (`HERMES_HOST_PID`). A sandbox
is left behind when that host is gone; a directory is left behind when no live sandbox process
works in it and its agent log is older than `min_age_s` (a sandbox being created is younger).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path

import attrs

from hermes_actors.drivers._local import (
    HOST_PID_VAR,
    SANDBOX_MARKER_VAR,
    kill_marked,
)
from hermes_actors.drivers._local_procs import remove_tree

__all__ = ["LocalLeftovers", "find_local_leftovers", "reap_local"]


@attrs.frozen(kw_only=True)
class LocalLeftovers:
    """What dead local runs left: sandboxes still running (id -> pids) and directories."""

    sandboxes: dict[str, tuple[int, ...]]
    directories: tuple[str, ...]

    @property
    def empty(self) -> bool:
        return not self.sandboxes and not self.directories


@attrs.frozen
class _Process:
    pid: int
    parent: int
    start_ticks: int
    sandbox_id: str
    host_pid: int | None
    cwd: str | None


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start ticks) of a process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2 :].split()
    return int(fields[1]), int(fields[19])


def _sandbox_processes() -> list[_Process]:
    found = []
    marker_prefix = SANDBOX_MARKER_VAR.encode() + b"="
    host_prefix = HOST_PID_VAR.encode() + b"="
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            with open(f"/proc/{pid}/environ", "rb") as handle:
                variables = handle.read().split(b"\0")
        except OSError:
            continue
        sandbox = next(
            (v[len(marker_prefix) :] for v in variables if v.startswith(marker_prefix)), None
        )
        stat = _stat(pid)
        if sandbox is None or stat is None:
            continue
        host = next((v[len(host_prefix) :] for v in variables if v.startswith(host_prefix)), None)
        cwd = None
        with contextlib.suppress(OSError):
            cwd = os.readlink(f"/proc/{pid}/cwd")
        found.append(
            _Process(
                pid=pid,
                parent=stat[0],
                start_ticks=stat[1],
                sandbox_id=sandbox.decode(errors="replace"),
                host_pid=int(host) if host and host.isdigit() else None,
                cwd=cwd,
            )
        )
    return found


def _host_alive(process: _Process) -> bool:
    assert process.host_pid is not None
    host = _stat(process.host_pid)
    # A host started after its sandbox is a different process that reuses the pid.
    return host is not None and host[1] <= process.start_ticks


def find_local_leftovers(root_dir: str | None = None, *, min_age_s: float = 60.0) -> LocalLeftovers:
    """What dead local runs left on this machine (see the module docstring). Reads only."""
    processes = _sandbox_processes()
    by_sandbox: dict[str, list[_Process]] = {}
    for process in processes:
        by_sandbox.setdefault(process.sandbox_id, []).append(process)
    marked = {process.pid for process in processes}
    dead: dict[str, tuple[int, ...]] = {}
    live_directories: set[str] = set()
    for sandbox_id, members in by_sandbox.items():
        tops = [process for process in members if process.host_pid is not None]
        if tops:
            alive = any(_host_alive(process) for process in tops)
        else:
            # No top process left: alive unless every process hangs off init or its own sandbox.
            alive = any(p.parent != 1 and p.parent not in marked for p in members)
        if alive:
            live_directories.update(p.cwd for p in members if p.cwd)
        else:
            dead[sandbox_id] = tuple(sorted(p.pid for p in members))
    root = Path(root_dir or tempfile.gettempdir())
    directories = []
    now = time.time()
    for candidate in sorted(root.glob("hermes-*")):
        log = candidate / "agent.log"
        try:
            if not (candidate / "ws").is_dir() or now - log.stat().st_mtime < min_age_s:
                continue
        except OSError:
            continue
        if os.fspath(candidate) not in live_directories:
            directories.append(os.fspath(candidate))
    return LocalLeftovers(sandboxes=dead, directories=tuple(directories))


def reap_local(leftovers: LocalLeftovers) -> int:
    """Kill the leftover sandboxes' processes and remove the leftover directories.

    Returns how many processes were killed.
    """
    killed = 0
    for sandbox_id in leftovers.sandboxes:
        killed += kill_marked(f"{SANDBOX_MARKER_VAR}={sandbox_id}".encode())
    for directory in leftovers.directories:
        with contextlib.suppress(FileNotFoundError):
            remove_tree(directory)
    return killed
