"""How a program using hermes-actors ends on a signal: sandboxes stopped, one line, the signal's
exit status.

SIGTERM and SIGHUP stop the runtime like Ctrl-C does, then end the process as the signal would.
Two cases, one behaviour: every running backend is closed (its sandboxes terminated and their
directories removed, bounded by `SIGNAL_STOP_S`), one line goes to stderr, then the signal's
default action runs, so the exit status is the signal's.

* Backends on portal threads (asyncio and sync programs): `install_signal_handlers` (main thread
  only) takes SIGTERM and SIGHUP when they are at their default action; the handler stops every
  registered backend, then dies of the signal.
* A backend in the main thread's trio run (`async with backend:`) runs `serve_signals`, which
  receives the signals through trio while the backend is open.

Signals a program handles itself are left alone. A backend started outside the main thread
cannot install handlers (Python allows that only there): the signal then takes its default
action at once, and the local driver's watchdog removes the sandboxes
(`drivers._local_procs`).

Ctrl-C (SIGINT) is left to Python, so a program's own ``except KeyboardInterrupt`` and
``finally`` blocks run as usual and Python exits with SIGINT's status. Only an interrupt that no
code caught changes: while `sys.excepthook` is Python's own, `install_interrupt_hook` replaces
it so that, instead of a traceback wall, every backend still running is stopped and one line is
printed (any other exception is printed as before). A program that wants the traceback sets
its own hook (or `sys.excepthook = sys.__excepthook__`) after starting a backend.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import weakref
from collections.abc import Awaitable, Callable
from types import FrameType, TracebackType
from typing import Protocol

import trio

__all__ = ["install_interrupt_hook", "install_signal_handlers", "register_host", "serve_signals"]

logger = logging.getLogger("hermes_actors.signals")

#: How long a SIGTERM/SIGHUP may spend closing every backend before the signal takes effect.
SIGNAL_STOP_S = 4.0
#: How long, after that, a backend's portal thread may take to stop (it cancels what is left).
SIGNAL_PORTAL_STOP_S = 1.0
#: The signals that stop the runtime like Ctrl-C does, then take their default action.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class _Host(Protocol):
    def stop_on_signal(self, limit_s: float) -> None:
        """Terminate every sandbox, blocking for at most `limit_s` + `SIGNAL_PORTAL_STOP_S`."""


_hosts: weakref.WeakSet[_Host] = weakref.WeakSet()


def register_host(host: _Host) -> None:
    """Have `host.stop_on_signal()` run when a stop signal arrives."""
    _hosts.add(host)


def install_signal_handlers() -> None:
    """In the main thread: make SIGTERM and SIGHUP stop every backend like Ctrl-C does.

    Only signals still at their default action are taken (a program's own handlers are left
    alone). With no backend running the handler just takes the default action. Also installs
    `install_interrupt_hook` (from any thread).
    """
    install_interrupt_hook()
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) is signal.SIG_DFL:
            signal.signal(signum, _on_stop_signal)


def install_interrupt_hook() -> None:
    """End an uncaught Ctrl-C with the backends stopped and one line, not a traceback wall.

    Any thread. Only while `sys.excepthook` is Python's own (see the module docstring).
    """
    if sys.excepthook is sys.__excepthook__:
        sys.excepthook = _excepthook


def _excepthook(
    kind: type[BaseException], value: BaseException, traceback: TracebackType | None
) -> None:
    if not _is_interrupt(value):
        sys.__excepthook__(kind, value, traceback)
        return
    _stop_hosts("Ctrl-C")
    _say("KeyboardInterrupt: interrupted; hermes-actors stopped every sandbox")


def _is_interrupt(error: BaseException) -> bool:
    """A KeyboardInterrupt, or a group of nothing but KeyboardInterrupts."""
    if isinstance(error, BaseExceptionGroup):
        return all(_is_interrupt(inner) for inner in error.exceptions)
    return isinstance(error, KeyboardInterrupt)


def _say(line: str) -> None:
    with contextlib.suppress(Exception):  # stderr closed or broken: nothing to tell
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


def _stop_hosts(why: str) -> None:
    for host in list(_hosts):
        try:
            host.stop_on_signal(SIGNAL_STOP_S)
        except Exception:
            logger.exception("stopping a backend on %s failed", why)


def _on_stop_signal(signum: int, frame: FrameType | None) -> None:
    name = signal.Signals(signum).name
    if _hosts:
        _stop_hosts(name)
        _say(f"hermes-actors: {name}: stopped every sandbox, exiting")
    _die_of(signum)


def _die_of(signum: int) -> None:
    """Take the signal's default action (the process ends with the signal's status)."""
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


async def serve_signals(close: Callable[[], Awaitable[object]]) -> None:
    """For a core in the main thread's trio run: on SIGTERM/SIGHUP `close()`, then die of it.

    Runs until cancelled; does nothing outside the main thread or when the program handles
    those signals itself. Also installs `install_interrupt_hook`.
    """
    install_interrupt_hook()
    if threading.current_thread() is not threading.main_thread() or not all(
        signal.getsignal(signum) in (signal.SIG_DFL, _on_stop_signal) for signum in STOP_SIGNALS
    ):
        await trio.sleep_forever()
    with trio.open_signal_receiver(*STOP_SIGNALS) as received:
        async for signum in received:
            name = signal.Signals(signum).name
            with trio.move_on_after(SIGNAL_STOP_S, shield=True):
                await close()
            _stop_hosts(name)
            _say(f"hermes-actors: {name}: stopped every sandbox, exiting")
            _die_of(signum)
