"""Bounded cleanup and exception-group collapsing: trio helpers with no domain knowledge.

* `bounded_cleanup`: graceful cleanup under a bounded shield, escalating to a forceful path.
* `collapse` / `collapse_exception_groups`: turn an internal exception group whose only
  meaningful leaf is one exception back into that exception, for the facades.
* `clone_exception`: a fresh copy of an error, to raise the same failure in several tasks.

No shield here is unbounded.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Awaitable, Callable, Iterator
from typing import Literal

import trio

__all__ = [
    "bounded_cleanup",
    "clone_exception",
    "collapse",
    "collapse_exception_groups",
]

logger = logging.getLogger("hermes_actors.cleanup")


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


class collapse_exception_groups:  # lower case: used like the function it was
    """Re-raise an exception group escaping the block as its one meaningful exception.

    See `collapse` for which groups collapse; others propagate unchanged. The collapsed
    exception keeps its own traceback, `__cause__` and `__context__` (the internal group is
    not chained to it), so users never see the internal group. (A class, not a generator
    context manager: it wraps every call on the command path, where that costs.)
    """

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: types.TracebackType | None,
    ) -> Literal[False]:
        if not isinstance(exc, BaseExceptionGroup):
            return False
        collapsed = collapse(exc)
        if collapsed is exc:
            return False
        # Raising while the group is being handled would chain it as `__context__`: restore
        # the exception's own context so the internal group stays invisible.
        context = collapsed.__context__
        suppress = collapsed.__suppress_context__
        try:
            raise collapsed
        finally:
            collapsed.__context__ = context
            collapsed.__suppress_context__ = suppress
            del collapsed, context


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
