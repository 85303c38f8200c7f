"""Live progress of long work: done / failed / in flight and the rate.

On a terminal, a live display drawn by rich (redrawn in place, removed when done); elsewhere (a
log, a pipe, CI) plain lines, at most one per `interval_s` plus a last one, so logs stay short.
The examples' batches and `hermes-actors run` use `Progress`; a backend's pool start-up uses
`show_warmup` (live on a terminal, log records otherwise: a library never writes into a
program's output).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, TextIO

import trio
from rich.console import Console
from rich.progress import BarColumn, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress

from hermes_actors._status import PoolStatus

__all__ = ["ENV_PROGRESS", "Progress", "show_warmup"]

logger = logging.getLogger("hermes_actors.backend")


class _Board:
    """The one live display of this process: every live `Progress` and warm-up is a row of it.

    Two rich displays at once would draw over each other's lines (a trainer's batch progress
    while its backend warms, say), so rows share one display, started by the first row on the
    first row's stream and stopped when the last row leaves. While it shows, the program's
    prints to `sys.stdout` / `sys.stderr` go above the rows when that stream is a terminal too
    (else rows would be drawn over them); a stream that is not a terminal is never touched, so
    output meant for a file or a pipe goes there. Thread-safe (rows come from the program's
    thread and the portal's).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rich: RichProgress | None = None
        self._rows = 0

    def add(self, stream: TextIO, description: str, total: int | None, counts: str) -> TaskID:
        with self._lock:
            if self._rich is None:
                self._rich = RichProgress(
                    SpinnerColumn(),
                    TextColumn("[bold]{task.description}"),
                    BarColumn(),
                    TextColumn("{task.fields[counts]}"),
                    TimeElapsedColumn(),
                    console=Console(file=stream, stderr=stream is sys.stderr),
                    transient=True,
                    redirect_stdout=_is_terminal(sys.stdout),
                    redirect_stderr=_is_terminal(sys.stderr),
                )
                self._rich.start()
            self._rows += 1
            return self._rich.add_task(description, total=total, counts=counts)

    def update(self, row: TaskID, **changes: Any) -> None:
        with self._lock:
            if self._rich is not None and row in self._rich.task_ids:  # not removed meanwhile
                self._rich.update(row, **changes)

    def remove(self, row: TaskID, stream: TextIO, last_line: str | None) -> None:
        """Take a row away; `last_line` stays as its record (printed above the rows left)."""
        with self._lock:
            rich = self._rich
            if rich is None:
                return
            rich.remove_task(row)
            self._rows -= 1
            if self._rows == 0:
                rich.stop()
                self._rich = None
            elif last_line is not None:
                rich.console.print(last_line, markup=False, highlight=False, soft_wrap=True)
                return
        if last_line is not None:
            stream.write(last_line + "\n")
            stream.flush()


_board = _Board()


def _is_terminal(stream: TextIO | None) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


class Progress:
    """Counters of a batch of work shown live while it runs.

    `with Progress("tool calls", total=64) as progress:` then `progress.start()` when an item
    starts and `progress.finish(ok=...)` when it ends (or `progress.set(...)` for all at once).
    `live` forces the display mode (default: live when `stream` is a terminal). Plain lines
    start only after `quiet_for_s` (work that ends sooner prints none). On a terminal the live
    display is replaced by one summary line at the end, unless `summary` is False. Thread-safe.
    """

    def __init__(
        self,
        description: str,
        total: int | None = None,
        *,
        stream: TextIO | None = None,
        live: bool | None = None,
        interval_s: float = 1.0,
        quiet_for_s: float = 0.0,
        summary: bool = True,
    ) -> None:
        self.description = description
        self.total = total
        self.done = 0
        self.failed = 0
        self.in_flight = 0
        self._stream = stream if stream is not None else sys.stderr
        self._live = self._stream.isatty() if live is None else live
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._quiet_for_s = quiet_for_s
        self._summary = summary
        self._last_line = float("-inf")
        self._lines = 0
        self._row: TaskID | None = None

    # -- counting ------------------------------------------------------------------------------

    def start(self, count: int = 1) -> None:
        """`count` items started."""
        with self._lock:
            self.in_flight += count
        self._show()

    def finish(self, *, ok: bool = True, count: int = 1) -> None:
        """`count` items ended, successfully or not."""
        with self._lock:
            self.in_flight = max(0, self.in_flight - count)
            self.done += count
            if not ok:
                self.failed += count
        self._show()

    def set(
        self,
        *,
        done: int | None = None,
        failed: int | None = None,
        in_flight: int | None = None,
        description: str | None = None,
    ) -> None:
        """Set counters outright."""
        with self._lock:
            self.done = self.done if done is None else done
            self.failed = self.failed if failed is None else failed
            self.in_flight = self.in_flight if in_flight is None else in_flight
            self.description = self.description if description is None else description
        self._show()

    def tick(self) -> None:
        """Refresh the display (plain mode: a line if `interval_s` passed since the last one)."""
        self._show()

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self._started

    @property
    def rate(self) -> float:
        """Items done per second so far."""
        elapsed = self.elapsed_s
        return self.done / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        """The counters as one plain line."""
        total = f"/{self.total}" if self.total is not None else ""
        return (
            f"{self.description}: done {self.done}{total}  failed {self.failed}  "
            f"in flight {self.in_flight}  {self.rate:.1f}/s  {self.elapsed_s:.1f}s"
        )

    def close_live(self) -> None:
        """End the live display now (it vanishes; no summary line): what follows is shown by
        other means, such as a command's streamed output. Plain lines go on as before."""
        if self._row is not None:
            _board.remove(self._row, self._stream, None)
            self._row = None
            self._summary = False

    # -- display -------------------------------------------------------------------------------

    def _counts(self) -> str:
        total = f"/{self.total}" if self.total is not None else ""
        return (
            f"done {self.done}{total}  failed {self.failed}  in flight {self.in_flight}  "
            f"{self.rate:.1f}/s"
        )

    def _show(self, *, final: bool = False) -> None:
        row = self._row
        if row is not None:
            _board.update(
                row, completed=self.done, description=self.description, counts=self._counts()
            )
            return
        if self._live:
            return
        now = time.monotonic()
        with self._lock:
            if final:
                if self._quiet_for_s and not self._lines:
                    return
            elif (
                now - self._started < self._quiet_for_s or now - self._last_line < self._interval_s
            ):
                return
            self._last_line = now
            self._lines += 1
        self._stream.write(self.line() + "\n")
        self._stream.flush()

    def __enter__(self) -> Progress:
        self._started = time.monotonic()
        if self._live:
            self._row = _board.add(self._stream, self.description, self.total, self._counts())
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._row is not None:
            # The live row vanishes; one line stays as the record of what happened.
            _board.remove(self._row, self._stream, self.line() if self._summary else None)
            self._row = None
            return
        if not self._live:
            self._show(final=True)


# -- pool start-up -------------------------------------------------------------------------------

#: Set to 0 to keep `ToolBackend` from drawing its warm-up display on a terminal.
ENV_PROGRESS = "HERMES_ACTORS_PROGRESS"


def _warm_counts(ready: int, target: int, starting: int, failed: int) -> str:
    return f"ready {ready}/{target}  starting {starting}  failed {failed}"


def _ready(pool: PoolStatus) -> int:
    return sum(1 for sandbox in pool.sandboxes if sandbox.state in ("ready", "draining"))


async def show_warmup(
    snapshot: Callable[[], Sequence[PoolStatus] | None],
    targets: Mapping[str, int],
    *,
    stream: TextIO | None = None,
    live: bool | None = None,
    interval_s: float = 0.1,
) -> None:
    """Show sandboxes warming per profile until each pool has its `targets[profile]` ready.

    On a terminal (`stream`, default stderr; `live` forces the mode) a live display, one row
    per profile, which vanishes once every pool is warm; `$HERMES_ACTORS_PROGRESS=0` turns it
    off. Elsewhere only `hermes_actors.backend` log records (INFO): a library must not write
    into a program's output. `snapshot()` gives the pools' status, or None once the runtime
    stopped (the display ends). Polls every `interval_s`; cancellation ends it cleanly.
    """
    targets = {profile: count for profile, count in targets.items() if count > 0}
    if not targets:
        return
    out = stream if stream is not None else sys.stderr
    if live is None:
        live = os.environ.get(ENV_PROGRESS, "1") != "0" and out.isatty()
    if not live and not logger.isEnabledFor(logging.INFO):
        return  # nothing would show
    for profile, count in targets.items():
        logger.info("profile %s: warming %d sandbox(es)", profile, count)
    started = trio.current_time()
    rows: dict[str, TaskID] = {}
    if live:
        for profile, count in targets.items():
            rows[profile] = _board.add(
                out, f"warming {profile}", count, _warm_counts(0, count, 0, 0)
            )
    warm: set[str] = set()
    try:
        while len(warm) < len(targets):
            pools = snapshot()
            if pools is None:
                return
            for pool in pools:
                if pool.profile not in targets:
                    continue
                ready = _ready(pool)
                target = targets[pool.profile]
                if rows:
                    _board.update(
                        rows[pool.profile],
                        completed=min(ready, target),
                        counts=_warm_counts(ready, target, pool.starting, pool.infra_failures),
                    )
                if ready >= targets[pool.profile] and pool.profile not in warm:
                    warm.add(pool.profile)
                    logger.info(
                        "profile %s: %d sandbox(es) warm in %.1f s",
                        pool.profile,
                        ready,
                        trio.current_time() - started,
                    )
            if len(warm) < len(targets):
                await trio.sleep(interval_s)
    finally:
        for row in rows.values():
            _board.remove(row, out, None)
