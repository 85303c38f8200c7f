"""Logging (a named logger per layer, each warning kind once) and the progress display."""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path

import pytest

from hermes_actors import Progress
from hermes_actors._logging import LAYER_LOGGERS, configure_logging, warn_once_filter

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
