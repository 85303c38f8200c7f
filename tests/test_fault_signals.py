"""Fault suite, signals: a host program stopped by SIGINT, SIGTERM, SIGHUP or SIGKILL.

Each host is a small script (a trio program, an asyncio program, or a sync program whose 50
`ThreadPoolExecutor` threads call `terminal_tool`) with 50 commands in flight. It runs below a
subreaper (`fault_support.HostRun`), so whatever it started stays countable after it dies, and
with its own `TMPDIR`, where the local driver makes the sandboxes' directories. Within the
case's bound after the signal (5 s, longer only where the code waits longer: `exit_bound_s`),
the host has exited with the status for the signal, said so in at most one line (no traceback),
and no process it started (the local driver's watchdog included) and no sandbox directory is
left. After SIGKILL the host can do nothing: the agents' dead-man switch ends the processes and
the watchdog removes the directories. A host still running at its bound prints its threads'
stacks (SIGUSR1, `faulthandler`) into the failure.
"""

from __future__ import annotations

import concurrent.futures
import secrets
import signal
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import attrs
import outcome
import pytest

from fault_support import HostRun, Reliability, processes, tree_entries, wait_for
from hermes_actors._trio._portal import CANCEL_WAIT_S, WATCH_INTERVAL_S
from hermes_actors.facades import _signals

pytestmark = pytest.mark.faults

COMMANDS = 50
#: Seconds after the signal by which everything must be gone (the issue's bound).
CLEANUP_S = 5.0
#: After SIGTERM or SIGHUP the handler gives closing every backend `SIGNAL_STOP_S` and its
#: portal thread `SIGNAL_PORTAL_STOP_S` more, then the signal ends the process: the issue's 5 s.
STOP_SIGNAL_BOUND_S = _signals.SIGNAL_STOP_S + _signals.SIGNAL_PORTAL_STOP_S
#: After Ctrl-C a portal host (asyncio, sync threads) first unwinds the calls it has in flight:
#: each cancelled call waits up to `CANCEL_WAIT_S` for its work in the portal to be cancelled
#: (its command killed) before the program moves on, and only then does the interrupt hook stop
#: every backend, as for SIGTERM. Alone this takes under 1 s; while the machine is loaded the
#: agents' killing of 50 commands has taken 4 s of it, with the host idle, waiting for them.
INTERRUPT_BOUND_S = CANCEL_WAIT_S + STOP_SIGNAL_BOUND_S
#: Sync threads: the portal sees the main thread's KeyboardInterrupt on its next look.
THREADS_INTERRUPT_BOUND_S = WATCH_INTERVAL_S + INTERRUPT_BOUND_S
#: A host that overruns its bound dumps its threads' stacks to stderr on this signal.
DUMP_SIGNAL = signal.SIGUSR1
#: How long the dump may take to arrive.
DUMP_WAIT_S = 1.0

PROFILES = """\
default_profile: hosted
profiles:
  hosted:
    backend: local
    isolation: {isolation}
    slots_per_sandbox: 10
    min_sandboxes: 0
    max_sandboxes: 5
    max_starting: 5
    execution_timeout_s: 600
"""

#: Run first in every host: its threads' stacks on `DUMP_SIGNAL`.
HOST_PRELUDE = f"""
import faulthandler, signal
faulthandler.register(signal.{DUMP_SIGNAL.name}, all_threads=True)
"""

HOSTS = {
    "trio": """
        import trio
        from hermes_actors import ToolBackend

        async def main():
            async with ToolBackend.with_profiles() as backend:
                slots = []
                async with trio.open_nursery() as nursery:
                    for n in range({commands}):
                        async def take(n=n):
                            slots.append(await backend.acquire(f"t{{n}}"))
                        nursery.start_soon(take)
                await backend.execute_batch(
                    [(slot, "bash", {{"command": "sleep {token}"}}) for slot in slots],
                    timeout_s=600,
                )

        trio.run(main)
    """,
    "asyncio": """
        import asyncio
        from hermes_actors import ToolBackend

        async def main():
            backend = ToolBackend.with_profiles()
            slots = await asyncio.gather(*(backend.acquire(f"t{{n}}") for n in range({commands})))
            await backend.execute_batch(
                [(slot, "bash", {{"command": "sleep {token}"}}) for slot in slots], timeout_s=600
            )
            await backend.stop()

        asyncio.run(main())
    """,
    "sync threads": """
        from concurrent.futures import ThreadPoolExecutor
        from hermes_actors import terminal_tool

        def run(n):
            return terminal_tool("sleep {token}", task_id=f"t{{n}}", timeout=600)

        with ThreadPoolExecutor({commands}) as pool:
            list(pool.map(run, range({commands})))
    """,
}

SIGNALS = {
    "SIGINT": signal.SIGINT,
    "SIGTERM": signal.SIGTERM,
    "SIGHUP": signal.SIGHUP,
    "SIGKILL": signal.SIGKILL,
}


def exit_bound_s(host: str, signal_name: str) -> float:
    """Seconds after the signal by which the host has exited and left nothing behind."""
    if signal_name == "SIGINT" and host == "asyncio":
        return INTERRUPT_BOUND_S
    if signal_name == "SIGINT" and host == "sync threads":
        return THREADS_INTERRUPT_BOUND_S
    return CLEANUP_S


def _case(host: str, name: str, isolation: str) -> Any:
    return pytest.param(host, name, isolation, id=f"{host}-{name}-{isolation}")


def _isolation(host_index: int, signal_index: int) -> str:
    """Each signal meets both isolation modes across the hosts."""
    return ("bwrap", "none")[(host_index + signal_index) % 2]


CASES = [
    (host, name, _isolation(h, s)) for h, host in enumerate(HOSTS) for s, name in enumerate(SIGNALS)
]
#: Cases run this many at a time (each host starts 5 sandboxes and 50 commands).
PARALLEL_CASES = 6


@attrs.frozen
class CaseResult:
    status: int | None
    leftover_procs: list[str]
    leftover_dirs: list[str]
    stderr: str
    #: The host's threads' stacks when it had not exited by its bound ("" otherwise).
    stacks: str


def run_case(host: str, signal_name: str, isolation: str, workdir: Path) -> CaseResult:
    """Start the host, wait for its 50 commands, signal it, count what is left at its bound."""
    signum = SIGNALS[signal_name]
    bound_s = exit_bound_s(host, signal_name)
    # A unique sleep duration finds this host's commands in /proc.
    token = f"600.{secrets.randbelow(10**6):06d}"
    script = HOST_PRELUDE + textwrap.dedent(HOSTS[host]).format(commands=COMMANDS, token=token)
    profiles = workdir / "profiles.yaml"
    profiles.write_text(PROFILES.format(isolation=isolation))
    run = HostRun(script, workdir, {"TERMINAL_MODAL_PROFILES_FILE": str(profiles)})
    try:

        def in_flight() -> int:
            return sum(
                1 for proc in run.procs() if proc.argv[:1] == ("sleep",) and token in proc.argv
            )

        started = wait_for(lambda: in_flight() >= COMMANDS, 90)
        if not started:
            raise AssertionError(
                f"only {in_flight()} of {COMMANDS} commands started: {run.stderr()}"
            )
        signalled_at = time.monotonic()
        run.signal(signum)
        status = run.wait_exit(bound_s)
        stacks = ""
        if status is None and run.host_alive():
            # Where it waits: its stacks go to its stderr.
            run.signal(DUMP_SIGNAL)
            time.sleep(DUMP_WAIT_S)
            stacks = run.stderr()
        wait_for(
            lambda: not run.procs() and not tree_entries(run.temp_dir),
            max(0.0, signalled_at + bound_s - time.monotonic()),
        )
        return CaseResult(
            status=status,
            leftover_procs=[" ".join(proc.argv) for proc in run.procs()],
            leftover_dirs=tree_entries(run.temp_dir),
            stderr=run.stderr() if status is not None else "",
            stacks=stacks,
        )
    finally:
        run.close()


@pytest.fixture(scope="module")
def signal_results(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> dict[tuple[str, str, str], outcome.Outcome[CaseResult]]:
    """The selected cases' results, run a few at a time (a test per case judges its own)."""
    selected = [
        case
        for case in CASES
        if any(
            getattr(item, "callspec", None) is not None
            and item.callspec.params.get("host") == case[0]
            and item.callspec.params.get("signal_name") == case[1]
            for item in request.session.items
        )
    ]

    # Made here, not in the pool's threads: the first `mktemp` of a session (re)creates the base
    # directory, and several threads doing that at once fail with "Directory not empty".
    workdirs = [tmp_path_factory.mktemp("host") for _ in selected]

    def one(case: tuple[str, str, str], workdir: Path) -> outcome.Outcome[CaseResult]:
        return outcome.capture(run_case, *case, workdir)

    with concurrent.futures.ThreadPoolExecutor(PARALLEL_CASES) as pool:
        return dict(zip(selected, pool.map(one, selected, workdirs), strict=True))


@pytest.mark.parametrize(("host", "signal_name", "isolation"), [_case(*case) for case in CASES])
def test_host_signal_with_commands_in_flight(
    signal_results: dict[tuple[str, str, str], outcome.Outcome[CaseResult]],
    reliability: Reliability,
    host: str,
    signal_name: str,
    isolation: str,
) -> None:
    """The host exits for the signal in one line; its processes and directories are gone in time."""
    signum = SIGNALS[signal_name]
    bound_s = exit_bound_s(host, signal_name)
    result = signal_results[(host, signal_name, isolation)].unwrap()
    reliability.record(
        "signals",
        f"host {signal_name} with {COMMANDS} commands in flight",
        injected=1,
        leaks=len(result.leftover_procs) + len(result.leftover_dirs),
    )
    status = result.status
    assert status is not None, (
        f"the host did not exit within {bound_s:g} s of {signal_name}; its stacks then:\n"
        f"{result.stacks}"
    )
    assert status in (-signum, 128 + signum), f"exit status {status} after {signal_name}"
    assert result.leftover_procs == [], f"processes left {bound_s:g} s after {signal_name}"
    assert result.leftover_dirs == [], f"sandbox directories left after {signal_name}"
    if signum != signal.SIGKILL:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert "Traceback" not in result.stderr, result.stderr
        assert len(lines) <= 1, result.stderr


def test_a_stop_signal_s_own_bounds_fit_the_issue_s() -> None:
    """SIGTERM/SIGHUP's stop and portal-stop bounds add up to at most the issue's 5 s."""
    assert STOP_SIGNAL_BOUND_S <= CLEANUP_S


def test_hosts_are_found_in_proc_while_running(tmp_path: Path) -> None:
    """The leftover count sees a host's commands: a plain sleep below the subreaper is found."""
    token = f"600.{secrets.randbelow(10**6):06d}"
    script = f"import os, subprocess\nsubprocess.Popen(['setsid', 'sleep', '{token}'])\n"
    run = HostRun(script, tmp_path, {})
    try:
        assert run.wait_exit(10) == 0
        # The host exited; its setsid orphan reparented to the subreaper and is still counted.
        assert wait_for(lambda: any(token in proc.argv for proc in run.procs()), 5)
    finally:
        run.close()
    # And `close()` ends what the count found.
    assert wait_for(lambda: not any(token in p.argv for p in processes().values() if p.alive), 5)


def test_an_uncaught_interrupt_stops_the_backends_and_says_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The hook stops every registered backend on an uncaught Ctrl-C and prints one line."""
    stopped: list[float] = []

    class Host:
        def stop_on_signal(self, limit_s: float) -> None:
            stopped.append(limit_s)

    host = Host()
    _signals.register_host(host)
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    _signals.install_interrupt_hook()
    assert sys.excepthook is _signals._excepthook
    group = BaseExceptionGroup("in a nursery", [KeyboardInterrupt(), KeyboardInterrupt()])
    for interrupt in (KeyboardInterrupt(), group):
        sys.excepthook(type(interrupt), interrupt, None)
    assert stopped == [_signals.SIGNAL_STOP_S] * 2
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["KeyboardInterrupt: interrupted; hermes-actors stopped every sandbox"] * 2


def test_other_errors_and_a_program_s_own_hook_are_left_alone(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Any other uncaught error keeps its traceback; a program's own excepthook is kept."""
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    _signals.install_interrupt_hook()
    try:
        raise ValueError("boom")
    except ValueError as error:
        sys.excepthook(ValueError, error, error.__traceback__)
    err = capsys.readouterr().err
    assert "Traceback" in err
    assert "ValueError: boom" in err

    def own(*args: object) -> None:
        """A program's own hook."""

    monkeypatch.setattr(sys, "excepthook", own)
    _signals.install_interrupt_hook()
    assert sys.excepthook is own


def test_a_program_that_catches_ctrl_c_still_does(tmp_path: Path) -> None:
    """The runtime never takes SIGINT from a program: its own `except KeyboardInterrupt` runs."""
    token = f"600.{secrets.randbelow(10**6):06d}"
    script = textwrap.dedent(
        f"""
        import sys, trio
        from hermes_actors import ToolBackend

        async def main():
            async with ToolBackend.with_profiles() as backend:
                slot = await backend.acquire("t")
                await backend.execute_batch([(slot, "bash", {{"command": "sleep {token}"}})])

        try:
            trio.run(main)
        except KeyboardInterrupt:
            print("saved my work", flush=True)
            sys.exit(3)
        """
    )
    profiles = tmp_path / "profiles.yaml"
    profiles.write_text(PROFILES.format(isolation="none"))
    run = HostRun(script, tmp_path, {"TERMINAL_MODAL_PROFILES_FILE": str(profiles)})
    try:
        assert wait_for(lambda: any(token in proc.argv for proc in run.procs()), 60)
        run.signal(signal.SIGINT)
        assert run.wait_exit(CLEANUP_S) == 3
        assert run.stdout() == "saved my work\n"
        assert run.stderr() == ""
        assert wait_for(lambda: not run.procs() and not tree_entries(run.temp_dir), CLEANUP_S)
    finally:
        run.close()
