"""Support for the fault suite (`tests/test_fault_*.py`): counting what is left, and the report.

Leftovers are counted from facts outside the runtime: `/proc` (processes, their parents, their
command lines, open fds, threads, RSS) and the directories sandboxes are made in. A host
program under test runs below a *subreaper* (`HostRun`), so every process it started, even one
that left its session or cleared its environment, stays in that subreaper's tree where it can
be counted, whatever the runtime believes it started.

`Reliability` collects, per injected fault, how many were injected, how many requests were
sent and answered, and how many leaks were found; `fault_report` (the pytest plugin) writes them
to `docs/reliability.md` when asked to (`--reliability-report`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs

from proc_support import argv, process_table

#: Name prefix of trio's cached worker threads (they retire by themselves after ~10 s idle).
TRIO_WORKER_PREFIX = "Trio thread "


# -- /proc ----------------------------------------------------------------------------------------


@attrs.frozen
class Proc:
    pid: int
    ppid: int
    state: str
    argv: tuple[str, ...]

    @property
    def alive(self) -> bool:
        return self.state not in ("Z", "X")


def processes() -> dict[int, Proc]:
    """Every process of the machine (zombies included), read once from /proc."""
    return {
        pid: Proc(
            pid, info.ppid, info.state, tuple(word.decode(errors="replace") for word in argv(pid))
        )
        for pid, info in process_table(include_dead=True).items()
    }


def descendants(root: int, table: dict[int, Proc] | None = None) -> list[Proc]:
    """Live processes below `root` (not `root` itself); zombies are not counted."""
    table = processes() if table is None else table
    children: dict[int, list[Proc]] = {}
    for proc in table.values():
        children.setdefault(proc.ppid, []).append(proc)
    found: list[Proc] = []
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), []):
            stack.append(child.pid)
            if child.alive:
                found.append(child)
    return found


def is_sandbox_root(proc: Proc) -> bool:
    """A sandbox's outermost process as a local driver starts it: bwrap, or the agent's python."""
    if not proc.argv:
        return False
    program = os.path.basename(proc.argv[0])
    if program == "bwrap":
        return True
    return program.startswith("python") and len(proc.argv) > 2 and proc.argv[1] == "-c"


def wait_for(condition: Callable[[], bool], timeout_s: float, interval_s: float = 0.05) -> bool:
    """Poll `condition` until it holds or `timeout_s` passes; whether it held."""
    deadline = time.monotonic() + timeout_s
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)


def tree_entries(directory: Path) -> list[str]:
    """What is left in a directory sandboxes were made in."""
    return sorted(os.listdir(directory)) if directory.exists() else []


@attrs.frozen
class Resources:
    """What this process holds: the figures a soak must bring back to where they started."""

    fds: int
    threads: int
    children: int
    temp_entries: int
    rss_kib: int

    @classmethod
    def now(cls, temp_dir: Path) -> Resources:
        own = os.getpid()
        # Not counted: the thread measuring (main, or a worker polling), and trio's idle workers.
        threads = [
            thread
            for thread in threading.enumerate()
            if thread.is_alive()
            and thread is not threading.current_thread()
            and thread is not threading.main_thread()
            and not thread.name.startswith(TRIO_WORKER_PREFIX)
        ]
        rss = 0
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
        return cls(
            fds=len(os.listdir("/proc/self/fd")),
            threads=len(threads),
            children=len(descendants(own)),
            temp_entries=len(tree_entries(temp_dir)),
            rss_kib=rss,
        )

    def leaks_against(self, start: Resources) -> dict[str, int]:
        """Counts above `start` (RSS is judged separately: it may grow within a bound)."""
        leaks = {
            "fds": self.fds - start.fds,
            "threads": self.threads - start.threads,
            "child processes": self.children - start.children,
            "temp directories": self.temp_entries - start.temp_entries,
        }
        return {name: count for name, count in leaks.items() if count > 0}


# -- a host program below a subreaper -------------------------------------------------------------

_REAPER = textwrap.dedent(
    """
    import ctypes, os, signal, subprocess, sys, time
    PR_SET_CHILD_SUBREAPER = 36
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        sys.exit("prctl(PR_SET_CHILD_SUBREAPER) failed")
    out, err = open(sys.argv[1] + ".stdout", "wb"), open(sys.argv[1] + ".stderr", "wb")
    # As from a terminal, whatever this suite was started from (a background job of a
    # non-interactive shell ignores SIGINT, and its children would inherit that).
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    host = subprocess.Popen(sys.argv[2:], stdin=subprocess.DEVNULL, stdout=out, stderr=err)
    print(host.pid, flush=True)
    print(host.wait(), flush=True)
    # Orphans of the host reparent here: reap them until the test closes our stdin.
    os.set_blocking(0, False)
    while True:
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            pass
        try:
            if os.read(0, 1) == b"":
                break
        except BlockingIOError:
            pass
        time.sleep(0.02)
    """
)


class HostRun:
    """A host program (a Python script) run below a subreaper, with its own temp directory.

    `pid` is the host's pid; `procs()` lists every live process the host started, even
    after the host exited (orphans reparent to the subreaper, never to init). Sandboxes of the
    local driver are made in `temp_dir` (the host's `TMPDIR`).
    """

    def __init__(self, script: str, workdir: Path, env: dict[str, str]) -> None:
        self.temp_dir = workdir / "tmp"
        self.temp_dir.mkdir()
        path = workdir / "host.py"
        path.write_text(script)
        self.stdout_path = workdir / "host.stdout"
        self.stderr_path = workdir / "host.stderr"
        full_env = {**os.environ, **env, "TMPDIR": str(self.temp_dir)}
        self.reaper = subprocess.Popen(
            [sys.executable, "-c", _REAPER, str(workdir / "host"), sys.executable, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=full_env,
            cwd=workdir,
            text=True,
        )
        assert self.reaper.stdout is not None
        self.pid = int(self.reaper.stdout.readline())
        self.returncode: int | None = None

    def procs(self) -> list[Proc]:
        return descendants(self.reaper.pid)

    def host_alive(self) -> bool:
        return any(proc.pid == self.pid for proc in self.procs())

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait_exit(self, timeout_s: float) -> int | None:
        """The host's exit status (negative: killed by that signal), None if still running."""
        assert self.reaper.stdout is not None
        result: list[str] = []
        reader = threading.Thread(target=lambda: result.append(self.reaper.stdout.readline()))  # type: ignore[union-attr]
        reader.daemon = True
        reader.start()
        reader.join(timeout_s)
        if not result or not result[0].strip():
            return None
        self.returncode = int(result[0])
        return self.returncode

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def close(self) -> None:
        """Kill whatever is left (counted by the test before), then the subreaper."""
        for proc in self.procs():
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
        assert self.reaper.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.reaper.stdin.close()
        try:
            self.reaper.wait(10)
        except subprocess.TimeoutExpired:
            self.reaper.kill()
            self.reaper.wait()
        assert self.reaper.stdout is not None
        self.reaper.stdout.close()


# -- the reliability report -----------------------------------------------------------------------


@attrs.define
class FaultFigures:
    """The figures of one fault across the run."""

    fault: str
    area: str
    injected: int = 0
    requests: int = 0
    answered: int = 0
    leaks: int = 0
    tests: dict[str, str] = attrs.field(factory=dict)


@attrs.define
class Reliability:
    """Per fault: injected, requests sent and answered, leaks found. Filled by the fault tests."""

    faults: dict[tuple[str, str], FaultFigures] = attrs.field(factory=dict)
    current_test: str | None = None
    _lock: threading.Lock = attrs.field(factory=threading.Lock)

    def record(
        self,
        area: str,
        fault: str,
        *,
        injected: int,
        requests: int = 0,
        answered: int = 0,
        leaks: int = 0,
    ) -> None:
        with self._lock:
            figures = self.faults.setdefault((area, fault), FaultFigures(fault=fault, area=area))
            figures.injected += injected
            figures.requests += requests
            figures.answered += answered
            figures.leaks += leaks
            if self.current_test is not None:
                figures.tests.setdefault(self.current_test, "ran")

    def outcome(self, test: str, outcome: str) -> None:
        with self._lock:
            for figures in self.faults.values():
                if test in figures.tests:
                    figures.tests[test] = outcome

    def rows(self) -> Iterator[FaultFigures]:
        return iter(sorted(self.faults.values(), key=lambda f: (f.area, f.fault)))


#: The session's collector (one per pytest process).
RELIABILITY = Reliability()
