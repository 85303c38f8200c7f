"""The tests' reading of /proc: which processes live, below whom, with what argv or environment.

The process table comes from the runtime's own reader (`hermes_actors.drivers._local_procs`), so
the tests count survivors from /proc the way the local driver finds its processes; this module
adds what only tests look at: command lines and environment entries (a command can forge or
drop either, so the runtime never uses them for ownership; tests use them to find the
processes they tagged). `eventually` polls for a state that sends no event (processes, and
the Modal emulator's thread).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import trio

from hermes_actors.drivers._local_procs import (
    is_alive,
    kill_all,
    pids_with_environ_entry,
    proc_info,
    process_table,
    with_descendants,
)

__all__ = [
    "argv",
    "children_of",
    "cmdline",
    "comm",
    "descendants_of",
    "eventually",
    "is_alive",
    "kill_with_env",
    "parent_of",
    "pids_of_uid",
    "pids_with_argv",
    "pids_with_env",
    "pids_with_env_var",
    "process_table",
    "with_descendants",
]


def cmdline(pid: int) -> bytes:
    """`pid`'s raw command line (NUL-separated), or b"" when it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read()
    except OSError:
        return b""


def parent_of(pid: int) -> int:
    """`pid`'s parent (0 when it is gone)."""
    info = proc_info(pid)
    return 0 if info is None else info.ppid


def comm(pid: int) -> str:
    """`pid`'s name (what a process may set for itself, as the agent's keepers do), or ""."""
    try:
        with open(f"/proc/{pid}/comm") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def argv(pid: int) -> list[bytes]:
    """`pid`'s command line as words, or [] when it is gone."""
    return [word for word in cmdline(pid).split(b"\0") if word]


def pids_with_argv(token: str, *, at_start: bool = False) -> list[int]:
    """Live (non-zombie) pids whose command line contains `token` (or, with `at_start`,
    begins with it: commands started as `exec -a TOKEN ...`)."""
    needle = token.encode()
    found = []
    for pid in process_table():
        line = cmdline(pid)
        if line.startswith(needle) if at_start else needle in line:
            found.append(pid)
    return sorted(found)


def pids_of_uid(uid: int) -> list[int]:
    """Live (non-zombie) pids whose /proc entry belongs to `uid`."""
    found = []
    for pid in process_table():
        try:
            if os.stat(f"/proc/{pid}").st_uid == uid:
                found.append(pid)
        except OSError:  # gone since the table was read
            continue
    return sorted(found)


def pids_with_env(entry: str) -> list[int]:
    """Live (non-zombie) pids whose environment holds `entry` (``NAME=value``, whole)."""
    return pids_with_environ_entry(entry.encode())


def pids_with_env_var(name: str) -> list[int]:
    """Live pids whose environment sets `name`, to any value."""
    prefix = name.encode() + b"="
    found = []
    for pid in process_table():
        try:
            with open(f"/proc/{pid}/environ", "rb") as handle:
                entries = handle.read().split(b"\0")
        except OSError:
            continue
        if any(entry.startswith(prefix) for entry in entries):
            found.append(pid)
    return sorted(found)


def kill_with_env(entry: str) -> int:
    """SIGKILL every process whose environment holds `entry`, until none is left; how many."""
    return kill_all(lambda: set(pids_with_env(entry)))


def children_of(parent: int) -> list[int]:
    """`parent`'s direct children, zombies included (they are unreaped leftovers)."""
    table = process_table(include_dead=True)
    return sorted(pid for pid, info in table.items() if info.ppid == parent)


def descendants_of(root: int) -> list[int]:
    """Live processes below `root`, `root` left out."""
    return sorted(with_descendants([root], process_table()) - {root})


async def eventually(
    condition: Callable[[], bool], timeout_s: float = 10.0, what: str = "the condition"
) -> None:
    """Wait until `condition()` holds, polling; fail the test after `timeout_s`."""
    with trio.move_on_after(timeout_s):
        while not condition():  # noqa: ASYNC110 - what is polled sends no event to wait for
            await trio.sleep(0.02)
        return
    raise AssertionError(f"{what} did not hold within {timeout_s} s")
