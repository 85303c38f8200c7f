"""Logging (a named logger per layer, each warning kind once) and the progress display."""

from __future__ import annotations

import io
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from cli_support import Terminal, clean_environment
from hermes_actors import Progress
from hermes_actors._logging import LAYER_LOGGERS, configure_logging, warn_once_filter
from hermes_actors._progress import _board, show_warmup
from hermes_actors._status import PoolStatus, SandboxStatus

SRC = Path(__file__).resolve().parent.parent / "src" / "hermes_actors"


@pytest.fixture
def captured() -> io.StringIO:
    stream = io.StringIO()
    yield stream
    logging.getLogger("hermes_actors").handlers[:] = [
        handler
        for handler in logging.getLogger("hermes_actors").handlers
        if not getattr(handler, "_hermes_cli", False)
    ]
    logging.getLogger("hermes_actors").setLevel(logging.NOTSET)
    warn_once_filter.reset()


def test_every_logger_in_the_package_is_a_declared_layer_logger() -> None:
    """Each module logs through one of the named layer loggers (which carry the once filter)."""
    names = set()
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        names.update(re.findall(r'getLogger\("([^"]+)"\)', text))
        if "getLogger(__name__)" in text:
            relative = path.relative_to(SRC.parent).with_suffix("")
            names.add(".".join(relative.parts))
    missing = names - {"hermes_actors"} - set(LAYER_LOGGERS)
    assert not missing, f"add {missing} to LAYER_LOGGERS in src/hermes_actors/_logging.py"


def test_a_warning_of_one_kind_is_logged_once_and_repeats_show_at_debug(
    captured: io.StringIO,
) -> None:
    """The same warning for many sandboxes appears once; -vv shows the repeats too."""
    configure_logging(0, captured)
    logger = logging.getLogger("hermes_actors.drivers.local")
    for sandbox in range(5):
        logger.warning("running sandbox %d WITHOUT isolation", sandbox)
    logger.warning("another kind")
    assert captured.getvalue().splitlines() == [
        "hermes-actors: WARNING hermes_actors.drivers.local: running sandbox 0 WITHOUT isolation",
        "hermes-actors: WARNING hermes_actors.drivers.local: another kind",
    ]
    warn_once_filter.reset()
    loud = io.StringIO()
    configure_logging(2, loud)
    for sandbox in range(3):
        logger.warning("running sandbox %d WITHOUT isolation", sandbox)
    assert [line.split(":")[1].split()[0] for line in loud.getvalue().splitlines()] == [
        "WARNING",
        "DEBUG",
        "DEBUG",
    ]


def test_logging_is_quiet_by_default_and_verbose_on_request(captured: io.StringIO) -> None:
    """Info is hidden at verbosity 0 and shown at 1; debug needs 2."""
    logger = logging.getLogger("hermes_actors.pool")
    configure_logging(0, captured)
    logger.info("hidden")
    configure_logging(1, captured)
    logger.info("shown")
    logger.debug("hidden too")
    assert captured.getvalue() == "hermes-actors: INFO hermes_actors.pool: shown\n"


def test_progress_prints_plain_lines_at_most_once_per_interval() -> None:
    """Off a terminal: the first line at once, then one per interval, and a last one."""
    stream = io.StringIO()
    with Progress("tool calls", total=4, stream=stream, interval_s=3600) as progress:
        progress.start(4)
        for ok in (True, False, True, True):
            progress.finish(ok=ok)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("tool calls: done 0/4  failed 0  in flight 4  ")
    assert lines[1].startswith("tool calls: done 4/4  failed 1  in flight 0  ")
    assert re.search(r"[0-9.]+/s  [0-9.]+s$", lines[1])


def test_progress_stays_silent_for_short_work_when_asked() -> None:
    """With quiet_for_s, work that ends sooner prints nothing at all."""
    stream = io.StringIO()
    with Progress("running", total=1, stream=stream, quiet_for_s=3600) as progress:
        progress.start()
        progress.finish()
    assert stream.getvalue() == ""


def test_progress_on_a_terminal_draws_live_and_leaves_one_line() -> None:
    """Live mode draws with rich while running and leaves the summary line when done."""
    stream = io.StringIO()
    with Progress("batch", total=2, stream=stream, live=True) as progress:
        progress.start(2)
        progress.finish()
        progress.finish(ok=False)
    assert stream.getvalue().splitlines()[-1].startswith("batch: done 2/2  failed 1  in flight 0")


def test_live_displays_at_once_are_rows_of_one_display() -> None:
    """Two live displays at once share one display (never drawn over each other); the first to
    end leaves its summary line, and the display stops with the last."""
    stream = io.StringIO()
    with Progress("outer", total=1, stream=stream, live=True) as outer:
        shared = _board._rich
        assert shared is not None
        with Progress("inner", total=1, stream=stream, live=True) as inner:
            assert _board._rich is shared
            assert [task.description for task in shared.tasks] == ["outer", "inner"]
            inner.start()
            inner.finish()
        assert [task.description for task in shared.tasks] == ["outer"]
        outer.start()
        outer.finish()
    assert _board._rich is None
    lines = stream.getvalue().splitlines()
    assert any(line.startswith("inner: done 1/1  failed 0") for line in lines)
    assert lines[-1].startswith("outer: done 1/1  failed 0")


# -- pool start-up ---------------------------------------------------------------------------------


def _pool(profile: str, states: list[str], failures: int = 0) -> PoolStatus:
    sandboxes = tuple(
        SandboxStatus(
            sandbox_id=f"{profile}-{index}",
            image="img",
            state=state,
            slots_free=1,
            slots_held=0,
            age_s=0.0,
            commands_run=0,
        )
        for index, state in enumerate(states)
    )
    return PoolStatus(
        profile=profile,
        backend="local",
        sandboxes=sandboxes,
        slots_free=len(sandboxes),
        slots_held=0,
        waiters=0,
        starting=states.count("starting"),
        commands_run=0,
        command_failures=0,
        infra_failures=failures,
        sandboxes_started=0,
        sandboxes_stopped=0,
        sandboxes_lost=0,
    )


async def test_warmup_off_a_terminal_only_logs_until_every_pool_is_warm(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """Off a terminal the warm-up writes nothing to its stream and logs each pool's start and
    the virtual time it took to warm; pools with nothing to warm are not mentioned."""
    stream = io.StringIO()
    timeline = [
        [_pool("cpu", ["starting", "starting"])],
        [_pool("cpu", ["ready", "starting"]), _pool("gpu", ["starting"])],
        [_pool("cpu", ["ready", "ready"]), _pool("gpu", ["starting"])],
        [_pool("cpu", ["ready", "ready"]), _pool("gpu", ["ready"])],
    ]
    calls = 0

    def snapshot() -> list[PoolStatus]:
        nonlocal calls
        calls += 1
        return timeline[min(calls, len(timeline)) - 1]

    caplog.set_level(logging.INFO, logger="hermes_actors.backend")
    await show_warmup(snapshot, {"cpu": 2, "gpu": 1, "none": 0}, stream=stream, live=False)
    assert stream.getvalue() == ""
    assert [record.getMessage() for record in caplog.records] == [
        "profile cpu: warming 2 sandbox(es)",
        "profile gpu: warming 1 sandbox(es)",
        "profile cpu: 2 sandbox(es) warm in 0.2 s",
        "profile gpu: 1 sandbox(es) warm in 0.3 s",
    ]
    assert trio.current_time() == pytest.approx(0.3)


async def test_warmup_ends_when_the_runtime_stops(autojump_clock: trio.abc.Clock) -> None:
    """A snapshot of None (the runtime stopped) ends the display although nothing is warm."""
    snapshots = iter([[_pool("cpu", ["starting"])], None])
    await show_warmup(lambda: next(snapshots), {"cpu": 1}, stream=io.StringIO(), live=True)
    assert trio.current_time() == pytest.approx(0.1)


async def test_warmup_shows_nothing_when_quiet_and_not_logging() -> None:
    """Off a terminal with INFO not logged, the warm-up does not even poll."""

    def snapshot() -> list[PoolStatus]:
        raise AssertionError("polled although nothing would show")

    logging.getLogger("hermes_actors.backend").setLevel(logging.WARNING)
    try:
        await show_warmup(snapshot, {"cpu": 1}, stream=io.StringIO(), live=False)
    finally:
        logging.getLogger("hermes_actors.backend").setLevel(logging.NOTSET)


WARM_PROGRAM = """
import sys, trio
from hermes_actors import SandboxConfig, ToolBackend

async def main():
    config = SandboxConfig(name="warmed", isolation="none", min_sandboxes=2, max_sandboxes=2)
    async with ToolBackend(config) as backend:
        while sum(s.state == "ready" for p in backend.status().pools for s in p.sandboxes) < 2:
            await trio.sleep(0.05)
        print("all warm", flush=True)

trio.run(main)
"""


def test_backend_start_on_a_terminal_shows_sandboxes_warming() -> None:
    """Under a pseudo-terminal, starting a backend draws its pools warming, then clears it."""
    terminal = Terminal([sys.executable, "-c", WARM_PROGRAM], clean_environment())
    try:
        before = terminal.expect("all warm")
        assert "warming warmed" in before
        assert "ready" in before
        assert terminal.wait() == 0
    finally:
        if terminal.fd >= 0:
            os.kill(terminal.pid, signal.SIGKILL)
            os.waitpid(terminal.pid, 0)
            os.close(terminal.fd)


def test_backend_start_off_a_terminal_writes_nothing() -> None:
    """Piped, a starting backend writes nothing of its own to stdout or stderr."""
    done = subprocess.run(
        [sys.executable, "-c", WARM_PROGRAM],
        env=clean_environment(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert (done.stdout, done.stderr) == ("all warm\n", "")
