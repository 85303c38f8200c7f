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
        self._rich: RichProgress | None = None
        self._task: TaskID | None = None

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
        if self._rich is not None:
            self._rich.stop()
            self._rich = None
            self._task = None
            self._summary = False

    # -- display -------------------------------------------------------------------------------

    def _fields(self) -> dict[str, Any]:
        return {
            "failed": self.failed,
            "in_flight": self.in_flight,
            "rate": f"{self.rate:.1f}/s",
        }

    def _show(self, *, final: bool = False) -> None:
        if self._rich is not None and self._task is not None:
            self._rich.update(
                self._task,
                completed=self.done,
                description=self.description,
                **self._fields(),
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
            console = Console(file=self._stream, stderr=self._stream is sys.stderr)
            self._rich = RichProgress(
                SpinnerColumn(),
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn(
                    "done {task.completed}/{task.total}" if self.total else "done {task.completed}"
                ),
                TextColumn("failed {task.fields[failed]}"),
                TextColumn("in flight {task.fields[in_flight]}"),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                console=console,
                transient=True,
            )
            self._rich.start()
            self._task = self._rich.add_task(self.description, total=self.total, **self._fields())
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._rich is not None:
            self._rich.stop()
            self._rich = None
            self._task = None
            if self._summary:
                # The live display vanishes; one line stays as the record of what happened.
                self._stream.write(self.line() + "\n")
                self._stream.flush()
            return
        self._show(final=True)


# -- pool start-up -------------------------------------------------------------------------------

#: Set to 0 to keep `ToolBackend` from drawing its warm-up display on a terminal.
ENV_PROGRESS = "HERMES_ACTORS_PROGRESS"


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
    display: RichProgress | None = None
    rows: dict[str, TaskID] = {}
    if live:
        display = RichProgress(
            SpinnerColumn(),
            TextColumn("[bold]warming {task.description}"),
            BarColumn(),
            TextColumn("ready {task.completed}/{task.total}"),
            TextColumn("starting {task.fields[starting]}"),
            TextColumn("failed {task.fields[failed]}"),
            TimeElapsedColumn(),
            console=Console(file=out),
            transient=True,
            # The program's own prints go where they go: never through this display.
            redirect_stdout=False,
            redirect_stderr=False,
        )
        for profile, count in targets.items():
            rows[profile] = display.add_task(profile, total=count, starting=0, failed=0)
        display.start()
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
                if display is not None:
                    display.update(
                        rows[pool.profile],
                        completed=min(ready, targets[pool.profile]),
                        starting=pool.starting,
                        failed=pool.infra_failures,
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
        if display is not None:
            display.stop()
