"""Logging of hermes-actors: one named logger per layer, quiet by default, warnings once per kind.

The library only logs; it never configures handlers (a `NullHandler` on `hermes_actors` keeps
Python's last-resort handler from printing to a program that did not ask). Programs choose:
the `hermes-actors` command calls `configure_logging(verbosity)`: warnings only by default,
`-v` info, `-vv` debug.

A warning of one kind (the same logger and message template, whatever its arguments) is logged
once at WARNING; repeats go out at DEBUG, so a missing bubblewrap is reported once, not once per
sandbox, and `-vv` still shows every one.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Final, TextIO

__all__ = ["LAYER_LOGGERS", "WarnOnce", "configure_logging", "warn_once_filter"]

#: The logger of each layer, from the facades down to the drivers (see docs/architecture.md).
LAYER_LOGGERS: Final[tuple[str, ...]] = (
    "hermes_actors.config",
    "hermes_actors.backend",
    "hermes_actors.terminal",
    "hermes_actors.portal",
    "hermes_actors.status",
    "hermes_actors.runtime._supervisor",
    "hermes_actors.reply",
    "hermes_actors.cleanup",
    "hermes_actors.pool",
    "hermes_actors.sandbox",
    "hermes_actors.client",
    "hermes_actors.drivers.local",
    "hermes_actors.drivers.modal",
    "hermes_actors.reap",
    "hermes_actors.signals",
    "hermes_actors.trees",
    "hermes_actors.cli",
    "hermes_actors.testing.modal_emulator",
    "hermes_actors.testing.fake_driver",
)


class WarnOnce(logging.Filter):
    """Let the first warning of each kind through; demote its repeats to DEBUG.

    The kind is the logger's name and the record's message template (`record.msg`), so
    `"sandbox %s lost"` for a thousand sandboxes is one kind. Thread-safe.
    """

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING:
            return True
        kind = (record.name, str(record.msg))
        with self._lock:
            repeated = kind in self._seen
            self._seen.add(kind)
        if repeated:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            # A logger filter runs before the handlers' level checks, so this record still
            # reaches a DEBUG handler but no WARNING one.
        return True

    def reset(self) -> None:
        """Forget the kinds seen (a new run in the same process reports them again)."""
        with self._lock:
            self._seen.clear()


#: The one filter every layer logger carries.
warn_once_filter: Final = WarnOnce()

logging.getLogger("hermes_actors").addHandler(logging.NullHandler())
for _name in LAYER_LOGGERS:
    logging.getLogger(_name).addFilter(warn_once_filter)


def configure_logging(verbosity: int, stream: TextIO | None = None) -> logging.Handler:
    """Send hermes-actors' logs to `stream` (stderr): 0 warnings, 1 info, 2+ debug.

    Returns the handler it installed (replacing one installed before by this function).
    """
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    root = logging.getLogger("hermes_actors")
    for handler in list(root.handlers):
        if getattr(handler, "_hermes_cli", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler._hermes_cli = True  # type: ignore[attr-defined]
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter("hermes-actors: %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    return handler
