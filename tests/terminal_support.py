"""Test support for `terminal_tool`: its process-wide backend on given profiles, and its replies."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hermes_actors import shutdown_terminal_backend, terminal_tool

__all__ = ["run", "terminal_profiles"]


@contextlib.contextmanager
def terminal_profiles(path: Path, text: str) -> Iterator[Path]:
    """Within the block, the process-wide terminal backend serves the profiles of YAML `text`
    (written to `path`, named by `$TERMINAL_MODAL_PROFILES_FILE`); it is shut down on entry and
    exit, and the variable restored. Yields `path`."""
    path.write_text(text)
    saved = os.environ.get("TERMINAL_MODAL_PROFILES_FILE")
    os.environ["TERMINAL_MODAL_PROFILES_FILE"] = str(path)
    shutdown_terminal_backend()
    try:
        yield path
    finally:
        shutdown_terminal_backend()
        if saved is None:
            os.environ.pop("TERMINAL_MODAL_PROFILES_FILE", None)
        else:
            os.environ["TERMINAL_MODAL_PROFILES_FILE"] = saved


def run(command: str, **options: Any) -> dict[str, Any]:
    """`terminal_tool`'s JSON reply, decoded (always its three keys)."""
    reply: dict[str, Any] = json.loads(terminal_tool(command, **options))
    assert set(reply) == {"output", "exit_code", "error"}, reply
    return reply
