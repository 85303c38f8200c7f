"""General trio helpers shared by the actors; nothing here knows about sandboxes or pools.

* `Reply`: the one-shot cell a request carries. The actor resolves it with sync `set`/`fail`
  and never blocks on the caller; the caller awaits `wait()`. A caller that gives up (is
  cancelled) abandons the cell, and whatever the actor had already handed over is given back
  through `on_abandoned`, so a lease is never lost between "actor said yes" and "caller heard it".
* `call`: send a request carrying a fresh `Reply` to an actor's mailbox and await the answer.
* `fail_pending`, `close_mailbox`: what an actor does when it stops, so no caller ever hangs.
* `bounded_cleanup`: graceful cleanup under a bounded shield, escalating to a forceful path.
* `collapse` / `collapse_exception_groups`: turn an internal exception group whose only
  meaningful leaf is one exception back into that exception, for the facades.
* `IdleDeadline`: an idle timeout as a cancel-scope deadline pushed forward on activity.

Invariants: a `Reply` resolves at most once and is abandoned at most once; a value handed
over is either taken by `wait()` or given back exactly once (by `on_abandoned` when the caller
gives up after `set`, or by the actor itself when `set` returns False). No shield here is
unbounded.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import math
from collections.abc import Awaitable, Callable, Iterable, Iterator
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

import trio

from hermes_actors._errors import RuntimeStopped

__all__ = [
    "IdleDeadline",
    "Reply",
    "bounded_cleanup",
    "call",
    "close_mailbox",
    "collapse",
    "collapse_exception_groups",
    "fail_pending",
]

logger = logging.getLogger(__name__)

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
    """

    __slots__ = (
        "_abandoned",
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
        if self._state is _State.VALUE and not self._taken and self._on_abandoned is not None:
            value: T = self._value  # type: ignore[assignment]
            self._value = None
            try:
                self._on_abandoned(value)
            except Exception:
                logger.exception("on_abandoned callback of %r failed", self)

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

    Used by an actor that stops, so that no caller hangs. Returns how many replies it failed.
    """
    failed = 0
    for reply in replies:
        if not reply.done and not reply.abandoned and reply.fail(exc_factory()):
            failed += 1
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


async def bounded_cleanup(
    limit_s: float,
    graceful: Callable[[], Awaitable[object]],
    forceful: Callable[[], object] | None = None,
) -> bool:
    """Run `graceful()` shielded for at most `limit_s` seconds, then `forceful()` if needed.

    Returns True if `graceful()` completed in time. If the limit passes or `graceful()`
    raises an `Exception` (logged), the sync `forceful()` runs and False is returned; an
    exception from `forceful()` is logged too, since this usually runs on the way out of a
    cancelled or failing task whose own exception must not be replaced. The shield means an
    outer cancellation does not cut the cleanup short, but it never lasts beyond `limit_s`;
    this function does not add a cancellation point of its own after the cleanup.
    Other `BaseException`s (e.g. `KeyboardInterrupt`) run `forceful()` and propagate.
    """
    completed = False
    try:
        with trio.move_on_after(limit_s, shield=True):
            try:
                await graceful()
            except Exception:
                logger.exception("graceful cleanup failed; using the forceful path")
            else:
                completed = True
    except BaseException:
        _run_forceful(forceful)
        raise
    if not completed:
        _run_forceful(forceful)
    return completed


def _run_forceful(forceful: Callable[[], object] | None) -> None:
    if forceful is None:
        return
    try:
        forceful()
    except Exception:
        logger.exception("forceful cleanup failed")


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


def collapse(exc_group: BaseExceptionGroup[BaseException]) -> BaseException:
    """Return the one meaningful exception of a group, or the group itself.

    * `trio.Cancelled` leaves are noise beside anything else: a group of one other exception
      (appearing any number of times as the same object) plus cancellations collapses to it;
    * a group of only `Cancelled` leaves collapses to the first of them, likewise a group of
      only `KeyboardInterrupt`s (plus cancellations) to the first `KeyboardInterrupt`;
    * anything else (two different errors) is returned unchanged.
    """
    leaves = list(_leaves(exc_group))
    meaningful: list[BaseException] = []
    for leaf in leaves:
        if not isinstance(leaf, trio.Cancelled) and all(leaf is not m for m in meaningful):
            meaningful.append(leaf)
    if len(meaningful) == 1:
        return meaningful[0]
    if not meaningful and leaves:
        return leaves[0]
    if meaningful and all(isinstance(leaf, KeyboardInterrupt) for leaf in meaningful):
        return meaningful[0]
    return exc_group


@contextlib.contextmanager
def collapse_exception_groups() -> Iterator[None]:
    """Re-raise an exception group escaping the block as its one meaningful exception.

    See `collapse` for which groups collapse; others propagate unchanged. The collapsed
    exception keeps its own traceback, `__cause__` and `__context__` (the internal group is
    not chained to it), so users never see the internal group.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        collapsed = collapse(group)
        if collapsed is group:
            raise
        # Raising inside this handler would chain the group as `__context__`: restore the
        # exception's own context so the internal group stays invisible.
        context = collapsed.__context__
        suppress = collapsed.__suppress_context__
        try:
            raise collapsed
        finally:
            collapsed.__context__ = context
            collapsed.__suppress_context__ = suppress
            del collapsed, context


class IdleDeadline:
    """An idle timeout: a cancel scope whose deadline `touch()` pushes forward.

    Use as `with IdleDeadline(timeout_s) as idle:`; the body is cancelled once `timeout_s`
    seconds pass without a `touch()`, and afterwards `idle.expired` says whether that is why
    it ended. The scope is built with an absolute `deadline=` on entry. `cancel(reason)`
    cancels the body for another reason (then `expired` stays False). Once cancelled, the
    deadline no longer matters: `touch()` cannot revive the body.
    """

    def __init__(self, timeout_s: float) -> None:
        if not (timeout_s > 0 and not math.isnan(timeout_s)):
            raise ValueError(f"idle timeout must be > 0 seconds: {timeout_s!r}")
        self.timeout_s = timeout_s
        self._scope: trio.CancelScope | None = None
        self._cancelled_explicitly = False

    @property
    def scope(self) -> trio.CancelScope:
        """The cancel scope (exists once the block is entered)."""
        if self._scope is None:
            raise RuntimeError("IdleDeadline is not entered yet")
        return self._scope

    @property
    def deadline(self) -> float:
        """The current absolute deadline on the trio clock."""
        return self.scope.deadline

    @property
    def expired(self) -> bool:
        """True if the body was cancelled because it stayed idle past the deadline."""
        if self._scope is None or self._cancelled_explicitly or not self._scope.cancel_called:
            return False
        return trio.current_time() >= self._scope.deadline

    def touch(self) -> None:
        """Record activity: move the deadline to now + `timeout_s` (no effect once cancelled)."""
        if not self.scope.cancel_called:
            self.scope.deadline = trio.current_time() + self.timeout_s

    def cancel(self, reason: str | None = None) -> None:
        """Cancel the body now for a reason other than idleness."""
        self._cancelled_explicitly = True
        self.scope.cancel(reason=reason)

    def __enter__(self) -> Self:
        if self._scope is not None:
            raise RuntimeError("IdleDeadline cannot be entered twice")
        self._scope = trio.CancelScope(deadline=trio.current_time() + self.timeout_s)
        self._scope.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        assert self._scope is not None
        return self._scope.__exit__(exc_type, exc, traceback)


def clone_exception(exc: BaseException) -> BaseException:
    """A fresh exception object equal to `exc` (same class, args and attributes, no traceback).

    One exception object must not be raised in several tasks at once: each raise rewrites its
    `__traceback__` and `__context__`. Works for classes whose `__init__` takes other arguments
    than their `args`, since it bypasses `__init__`.
    """
    clone = type(exc).__new__(type(exc), *exc.args)
    clone.args = exc.args
    clone.__dict__.update(exc.__dict__)
    clone.__cause__ = exc.__cause__
    clone.__suppress_context__ = exc.__suppress_context__
    return clone
