"""`Reply`: the one-shot cell a request carries, and what actors do with mailboxes of them.

* `Reply`: the actor resolves it with sync `set`/`fail` and never blocks on the caller; the
  caller awaits `wait()`. A caller that gives up (is cancelled) abandons the cell: whatever the
  actor had already handed over is given back through `on_abandoned`, and the actor's
  `on_abandon` hook runs (how an actor learns to cancel the work the caller gave up on). The
  actor `close()`s the cell once it is done with it; `wait_closed()` waits for that.
* `call`: send a request carrying a fresh `Reply` to an actor's mailbox and await the answer.
* `fail_pending`, `close_mailbox`: what an actor does when it stops, so no caller ever hangs.

Invariants: a `Reply` resolves at most once and is abandoned at most once; a value handed
over is either taken by `wait()` or given back exactly once (by `on_abandoned` when the caller
gives up after `set`, or by the actor itself when `set` returns False).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any, Generic, TypeVar

import trio

from hermes_actors._errors import RuntimeStopped

__all__ = ["Reply", "call", "close_mailbox", "fail_pending"]

logger = logging.getLogger("hermes_actors.reply")

T = TypeVar("T")
M = TypeVar("M")


class _State(enum.Enum):
    PENDING = "pending"
    VALUE = "value"
    ERROR = "error"


class Reply(Generic[T]):
    """A one-shot reply cell: the actor resolves it once, the caller awaits it.

    `on_abandoned(value)` is called (synchronously, exactly once) when the caller gives up
    after a value was set but before it took it: it is how the actor takes back what it handed
    over. If the caller gave up *before* the value was set, `set` returns False instead and
    `on_abandoned` is not called: the actor sees False and takes the value back itself.

    The actor may also register `on_abandon(hook)`: a sync hook run when the caller gives up
    (at once if it already has), whatever the cell holds; it is how an actor cancels work that
    nobody waits for. `close()` says the actor is done with the cell (resolved or dropped);
    `wait_closed()` lets a caller that gave up wait for that.
    """

    __slots__ = (
        "_abandon_hooks",
        "_abandoned",
        "_closed",
        "_error",
        "_event",
        "_on_abandoned",
        "_state",
        "_taken",
        "_traceback",
        "_value",
    )

    def __init__(self, on_abandoned: Callable[[T], None] | None = None) -> None:
        self._on_abandoned = on_abandoned
        self._event = trio.Event()
        self._state = _State.PENDING
        self._value: T | None = None
        self._error: BaseException | None = None
        self._traceback: TracebackType | None = None
        self._taken = False
        self._abandoned = False
        self._abandon_hooks: list[Callable[[], object]] = []
        self._closed = trio.Event()

    def __repr__(self) -> str:
        flag = " abandoned" if self._abandoned else ""
        return f"<Reply {self._state.value}{flag} at {id(self):#x}>"

    @property
    def done(self) -> bool:
        """True once the cell holds a value or an error."""
        return self._state is not _State.PENDING

    @property
    def abandoned(self) -> bool:
        """True once the caller gave up waiting (it will never take a value from this cell)."""
        return self._abandoned

    def set(self, value: T) -> bool:
        """Resolve the cell with `value`; never blocks.

        Returns False, and changes nothing, if the cell was already resolved or the caller
        already abandoned it: the value was not handed over and still belongs to the actor.
        """
        if self._state is not _State.PENDING or self._abandoned:
            return False
        self._state = _State.VALUE
        self._value = value
        self._event.set()
        return True

    def fail(self, exc: BaseException) -> bool:
        """Resolve the cell with an error that `wait()` raises; never blocks.

        Returns False, and changes nothing, if the cell was already resolved or abandoned.
        """
        if self._state is not _State.PENDING or self._abandoned:
            return False
        self._state = _State.ERROR
        self._error = exc
        self._traceback = exc.__traceback__
        self._event.set()
        return True

    def abandon(self) -> None:
        """Give up on the cell (the caller will not take its value); idempotent.

        If a value was already set and not yet taken, `on_abandoned(value)` is called now.
        An exception from `on_abandoned` is logged, not raised: abandoning happens on the way
        out of a cancelled caller, where it must not replace the cancellation.
        """
        if self._abandoned:
            return
        self._abandoned = True
        hooks, self._abandon_hooks = self._abandon_hooks, []
        for hook in hooks:
            self._run_hook(hook)
        if self._state is _State.VALUE and not self._taken and self._on_abandoned is not None:
            value: T = self._value  # type: ignore[assignment]
            self._value = None
            try:
                self._on_abandoned(value)
            except Exception:
                logger.exception("on_abandoned callback of %r failed", self)

    def on_abandon(self, hook: Callable[[], object]) -> None:
        """Run the sync `hook()` when the caller gives up (now, if it already has)."""
        if self._abandoned:
            self._run_hook(hook)
        else:
            self._abandon_hooks.append(hook)

    def _run_hook(self, hook: Callable[[], object]) -> None:
        try:
            hook()
        except Exception:
            logger.exception("on_abandon hook of %r failed", self)

    def close(self) -> None:
        """The actor is done with the cell: resolved, or dropped because it was abandoned."""
        self._abandon_hooks = []
        self._closed.set()

    async def wait_closed(self) -> None:
        """Wait until the cell is resolved or the actor has closed it."""
        if not self.done:
            await self._closed.wait()

    async def wait(self) -> T:
        """Wait for the cell to be resolved; return the value or raise the error.

        The error is raised afresh on each call, starting from the traceback it had when the
        actor failed the cell. This is always a checkpoint, even when the cell is already
        resolved. Cancellation: if the caller is cancelled here (even when a value is already
        waiting, or arrived just before the cancellation), nothing is taken, the cell is
        abandoned and a set value is given back through `on_abandoned`; a later `set` returns
        False. So a cancelled caller never holds what the actor handed over.
        """
        try:
            await self._event.wait()
            # Woken by `set` but cancelled before running: give the value back rather than
            # return it to a caller that will raise Cancelled at its next checkpoint anyway.
            await trio.lowlevel.checkpoint_if_cancelled()
        except BaseException:
            self.abandon()
            raise
        if self._state is _State.ERROR:
            assert self._error is not None
            raise self._error.with_traceback(self._traceback)
        self._taken = True
        return self._value  # type: ignore[return-value]


async def call(
    mailbox: trio.MemorySendChannel[M],
    make_message: Callable[[Reply[T]], M],
    *,
    on_abandoned: Callable[[T], None] | None = None,
) -> T:
    """Send `make_message(reply)` to an actor's mailbox and wait for the reply.

    Raises `RuntimeStopped` if the mailbox is closed (the actor has stopped) and whatever
    error the actor fails the reply with. Blocks while the mailbox is full (backpressure).
    Cancellation: a call cancelled while sending sent nothing; a call cancelled while waiting
    abandons its reply, with the `Reply` semantics for a value already handed over.
    """
    reply: Reply[T] = Reply(on_abandoned)
    message = make_message(reply)
    try:
        await mailbox.send(message)
    except (trio.ClosedResourceError, trio.BrokenResourceError) as exc:
        reply.abandon()
        raise RuntimeStopped(
            f"cannot send {type(message).__name__}: the actor's mailbox is closed because the "
            "actor has stopped (or the runtime was shut down); start the runtime again"
        ) from exc
    except BaseException:
        reply.abandon()
        raise
    return await reply.wait()


def fail_pending(replies: Iterable[Reply[Any]], exc_factory: Callable[[], BaseException]) -> int:
    """Fail every unresolved, unabandoned reply with a fresh `exc_factory()` error.

    Used by an actor that stops, so that no caller hangs; every reply is closed too (the actor
    is done with it). Returns how many replies it failed.
    """
    failed = 0
    for reply in replies:
        if not reply.done and not reply.abandoned and reply.fail(exc_factory()):
            failed += 1
        reply.close()
    return failed


def close_mailbox(
    mailbox: trio.MemoryReceiveChannel[M],
    replies_of: Callable[[M], Iterable[Reply[Any]]],
    exc_factory: Callable[[], BaseException],
) -> int:
    """Close an actor's mailbox, first failing the replies of the messages still queued in it.

    trio drops buffered messages when the last receive channel closes; their callers would
    hang. Sync, so no message can arrive between draining and closing. Later sends raise,
    and `call` turns that into `RuntimeStopped`. Returns how many replies it failed.
    """
    failed = 0
    while True:
        try:
            message = mailbox.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            break
        failed += fail_pending(replies_of(message), exc_factory)
    mailbox.close()
    return failed
