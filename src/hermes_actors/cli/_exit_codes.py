"""The command line's exit codes (scripts rely on them; see `_main`) and its usage error.

Apart from `_main`, which parses and dispatches, so the commands it loads lazily can use them
without importing it back.
"""

from __future__ import annotations

from hermes_actors._errors import HermesError

__all__ = [
    "EXIT_BROKEN_PIPE",
    "EXIT_CONFIG",
    "EXIT_INFRASTRUCTURE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "UsageError",
]

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_INFRASTRUCTURE = 3
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141


class UsageError(HermesError):
    """The command line is wrong in a way argparse cannot see."""
