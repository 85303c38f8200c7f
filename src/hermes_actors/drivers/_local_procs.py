"""Local sandboxes' processes and directories, from facts no command can change; and the
watchdog that removes them when their host dies.

Standard library only: besides being imported by the host (the local driver, `reap`, the Modal
emulator), this file's source is the watchdog program (`python3 -c <this file> <fd>`).

Ownership. A local sandbox's own processes (its agent and the agent's per-slot keepers, or
bwrap holding them) are the processes holding the *write* end of the sandbox's liveness pipe,
which the host creates and passes to the agent only; a slot's processes are the descendants of
its keeper, a subreaper, so an orphan stays below it whatever it does to its session or
environment. So "what belongs to this sandbox" is: the writers of its pipe and everything below
them (`sandbox_processes`). Environment variables are never consulted for ownership: a command
can strip them (`pids_with_environ_entry` exists for tests and the Modal emulator, which mimics
a provider that marks its processes).

The watchdog. One small process per local driver, in its own session (Ctrl-C at a terminal and
the host's death do not reach it). The host holds the only other end of its control socket and
sends it each sandbox's directory and the read end of that sandbox's liveness pipe. When the
host goes away for any reason (SIGKILL included) the socket reads EOF and the watchdog waits
(bounded) for every watched sandbox's processes to end on their own (the agent's dead-man
switch, bwrap's parent-death signal), kills those still holding a pipe and everything below
them, removes the directories, and exits. A sandbox the host terminated itself is forgotten
first (`forget`), so a clean stop leaves it nothing to do; the host closes the socket once it
watches no sandbox, and the watchdog exits.

Control messages (one JSON object per `SOCK_SEQPACKET` datagram):
``{"watch": id, "directory": path, "cgroup": path or null}`` with the pipe's read end attached
(SCM_RIGHTS), and
``{"forget": id}``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import shutil
import signal
import socket
import stat
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

#: How long, after its host is gone, the watchdog lets sandboxes end on their own.
WATCHDOG_GRACE_S = 2.0
#: How long a kill waits for its SIGKILLed processes to be gone.
KILL_WAIT_S = 2.0


# -- the process table ----------------------------------------------------------------------------


class ProcInfo(NamedTuple):
    """One process as /proc/<pid>/stat shows it."""

    ppid: int
    session: int
    start_ticks: int
    state: str

    @property
    def alive(self) -> bool:
        return self.state not in ("Z", "X")


def proc_info(pid: int) -> ProcInfo | None:
    """`pid`'s entry, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            data = handle.read()
    except OSError:
        return None
    # The command name may contain anything, parentheses included: split after its last ')'.
    fields = data[data.rfind(b")") + 2 :].split()
    try:
        return ProcInfo(int(fields[1]), int(fields[3]), int(fields[19]), fields[0].decode())
    except (IndexError, ValueError):
        return None


def process_table(include_dead: bool = False) -> dict[int, ProcInfo]:
    """Every process of the machine (zombies left out unless `include_dead`), read once."""
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            info = proc_info(int(name))
            if info is not None and (include_dead or info.alive):
                table[int(name)] = info
    return table


def start_ticks(pid: int) -> int | None:
    """When `pid` started (clock ticks since boot), or None when it is gone."""
    info = proc_info(pid)
    return info.start_ticks if info is not None else None


def is_alive(pid: int, start_ticks: int | None = None) -> bool:
    """Whether `pid` runs (not a zombie) and, given `start_ticks`, is still that process."""
    info = proc_info(pid)
    if info is None or not info.alive:
        return False
    return start_ticks is None or info.start_ticks == start_ticks


def with_descendants(roots: Iterable[int], table: dict[int, ProcInfo]) -> set[int]:
    """`roots` and every process below them in `table`."""
    children: dict[int, list[int]] = {}
    for pid, info in table.items():
        children.setdefault(info.ppid, []).append(pid)
    found = set(roots)
    pending = list(found)
    while pending:
        for child in children.get(pending.pop(), ()):
            if child not in found:
                found.add(child)
                pending.append(child)
    return found


def pids_with_environ_entry(entry: bytes, table: dict[int, ProcInfo] | None = None) -> list[int]:
    """Live pids whose environment holds `entry` (``NAME=value``). Not an ownership fact: a
    process can drop or forge it (see the module docstring)."""
    found = []
    for pid in table if table is not None else process_table():
        try:
            with open(f"/proc/{pid}/environ", "rb") as handle:
                if entry in handle.read().split(b"\0"):
                    found.append(pid)
        except OSError:
            continue
    return sorted(found)


def pipe_name(fd: int) -> str:
    """``pipe:[inode]``: how /proc/<pid>/fd shows the pipe `fd` is an end of."""
    return os.readlink(f"/proc/self/fd/{fd}")


def pipe_writers(pipe: str, table: dict[int, ProcInfo]) -> set[int]:
    """Processes in `table` holding the write end of `pipe` (``pipe:[inode]``).

    Read ends do not count: the host and the watchdog hold those to watch the pipe.
    """
    writers = set()
    for pid in table:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") != pipe:
                    continue
                with open(f"/proc/{pid}/fdinfo/{fd}") as handle:
                    flags = next(line for line in handle if line.startswith("flags:"))
            except (OSError, StopIteration):
                continue
            if int(flags.split()[1], 8) & os.O_ACCMODE != os.O_RDONLY:
                writers.add(pid)
                break
    return writers


def now_ticks() -> int:
    """The time since boot in clock ticks, the unit of `ProcInfo.start_ticks`."""
    with open("/proc/uptime") as handle:
        return int(float(handle.read().split()[0]) * os.sysconf("SC_CLK_TCK"))


def sandbox_processes(
    pipe: str, table: dict[int, ProcInfo] | None = None, *, started_after: int | None = None
) -> set[int]:
    """A sandbox's live processes: the writers of its liveness pipe and everything below them.

    `started_after` (ticks since boot, when the pipe was made) leaves out writers older than the
    pipe: after a reboot or a wrap of inode numbers an unrelated pipe may have the same name.
    """
    table = process_table() if table is None else table
    writers = pipe_writers(pipe, table)
    if started_after is not None:
        writers = {pid for pid in writers if table[pid].start_ticks >= started_after}
    found = with_descendants(writers, table)
    found.discard(os.getpid())
    return found


def kill_all(find: Callable[[], set[int]], wait_s: float = KILL_WAIT_S) -> int:
    """SIGKILL what `find()` returns, until it returns nothing new; returns how many.

    Everything found is stopped first (a stopped process neither forks nor lets its children
    be reparented away), then all are killed together; returns once none of them is alive
    (at most `wait_s`).
    """
    stopped: set[int] = set()
    for _ in range(100):
        new = find() - stopped
        if not new:
            break
        for pid in new:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGSTOP)
        stopped |= new
    for pid in stopped:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    # SIGKILL takes effect asynchronously.
    deadline = time.monotonic() + wait_s
    while any(is_alive(pid) for pid in stopped) and time.monotonic() < deadline:
        time.sleep(0.005)
    return len(stopped)


def kill_sandbox_processes(pipe: str) -> int:
    """SIGKILL every process of the sandbox whose liveness pipe is `pipe`; returns how many."""
    return kill_all(lambda: sandbox_processes(pipe))


def remove_tree(path: str) -> None:
    """Delete a sandbox directory even where its commands made parts read-only.

    Only what is inside `path` is ever made writable: never its parent (the shared temp dir).
    """
    if not os.path.lexists(path):
        return

    def make_writable(function: object, failed: str, exc_info: Any) -> None:
        if isinstance(exc_info[1], FileNotFoundError):
            return  # already gone (removed twice, or by its own commands)
        with contextlib.suppress(OSError):
            # Never the parent of `path` itself: that is not ours (it is /tmp, usually).
            if failed != path:
                os.chmod(os.path.dirname(failed), stat.S_IRWXU)
            os.chmod(failed, stat.S_IRWXU)
        with contextlib.suppress(FileNotFoundError):
            if os.path.isdir(failed) and not os.path.islink(failed):
                shutil.rmtree(failed, ignore_errors=True)
            else:
                os.unlink(failed)

    shutil.rmtree(path, onerror=make_writable)


def remove_cgroup(path: str, wait_s: float = KILL_WAIT_S) -> bool:
    """Kill whatever is left in a cgroup v2 directory (``cgroup.kill``) and remove it; whether
    it is gone."""
    kill = os.path.join(path, "cgroup.kill")
    if os.path.exists(kill):
        with contextlib.suppress(OSError), open(kill, "w") as handle:
            handle.write("1\n")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            os.rmdir(path)
            return True
        except FileNotFoundError:
            return True
        except OSError as exc:
            # EBUSY while processes are still inside (cgroup.kill takes effect asynchronously).
            if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                return False
        time.sleep(0.01)


# -- the watchdog ---------------------------------------------------------------------------------


class Watched(NamedTuple):
    """A sandbox the watchdog watches."""

    directory: str
    #: The read end of its liveness pipe (-1 if none came).
    fd: int
    #: Its cgroup v2 directory, if it has one.
    cgroup: str | None = None


def watchdog_clean_up(watched: dict[str, Watched], grace_s: float) -> None:
    """End every watched sandbox: wait up to `grace_s` for its liveness pipe to read EOF (all
    its processes gone), kill what still holds it, then remove its cgroup and directory."""
    pending = {entry.fd: sandbox_id for sandbox_id, entry in watched.items() if entry.fd >= 0}
    pipes = {}
    for fd in pending:
        with contextlib.suppress(OSError):
            pipes[fd] = pipe_name(fd)
            os.set_blocking(fd, False)
    deadline = time.monotonic() + grace_s
    while pending:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        readable, _, _ = select.select(list(pending), [], [], remaining)
        for fd in readable:
            try:
                ended = os.read(fd, 64) == b""
            except BlockingIOError:
                ended = False
            except OSError:
                ended = True
            if ended:
                del pending[fd]
    for fd in pending:
        if fd in pipes:
            kill_sandbox_processes(pipes[fd])
    for entry in watched.values():
        if entry.cgroup:
            remove_cgroup(entry.cgroup)
        remove_tree(entry.directory)
        if entry.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(entry.fd)


def watchdog_main(control_fd: int, grace_s: float = WATCHDOG_GRACE_S) -> None:
    """Serve the host's control socket until EOF, then clean up what it still watches."""
    for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(signum, signal.SIG_IGN)
    control = socket.socket(fileno=control_fd)
    watched: dict[str, Watched] = {}
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(control, 1 << 16, 4)
        except InterruptedError:
            continue
        except OSError:
            data, fds = b"", []
        if not data:
            break
        message = json.loads(data)
        if "watch" in message:
            fd = fds.pop(0) if fds else -1
            watched[message["watch"]] = Watched(message["directory"], fd, message.get("cgroup"))
        elif "forget" in message:
            entry = watched.pop(message["forget"], None)
            if entry is not None and entry.fd >= 0:
                os.close(entry.fd)
        for extra in fds:
            os.close(extra)
    control.close()
    watchdog_clean_up(watched, grace_s)


def watchdog_argv(python: str, control_fd: int) -> list[str]:
    """The command line of a watchdog serving `control_fd` (an inherited socket)."""
    with open(__file__, encoding="utf-8") as handle:
        source = handle.read()
    # -I -S: no site packages or environment variables: this file needs the standard library.
    return [python, "-I", "-S", "-c", source, str(control_fd)]


if __name__ == "__main__":  # the watchdog program: `python3 -c <this file> <control fd>`
    watchdog_main(int(sys.argv[1]))
