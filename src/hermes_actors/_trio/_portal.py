"""The portal: a trio loop on its own thread, serving calls from other threads and event loops.

The runtime is trio code. Programs that are not (asyncio trainers, plain sync scripts, trio code
that did not open the runtime in its own nursery) reach it through a `Portal`: one thread running
`trio.run`, with one nursery in which every call becomes a task. No thread is created per call.

* A call is scheduled with the portal's `TrioToken.run_sync_soon`, which spawns a task in the
  portal nursery. The task's outcome travels back the way the caller waits: an asyncio future
  resolved with `loop.call_soon_threadsafe`, a trio `Event` set through the caller's own token,
  or a `threading.Event` for a blocking caller.
* Cancelling the caller (an asyncio task cancelled, a trio scope cancelled, Ctrl-C in a blocking
  call) cancels the task in the portal, then waits (bounded by `CANCEL_WAIT_S`) until it has
  finished, so a cancelled command is killed before the caller moves on. A value that the work
  produced but the caller did not take (it was cancelled in between) is handed to the call's
  `on_abandoned`, run as a task in the portal, so a lease is never lost in transit.
* Ctrl-C: while the main thread unwinds a KeyboardInterrupt, every call in flight (from any
  thread) is cancelled and new calls are refused, so threads blocked in the portal return at
  once and the program can exit.
* `stop()` cancels every task in the portal, waits for the loop to finish and joins the thread.
  It is also run at interpreter exit (registered with `threading`'s pre-join exit hooks, so it
  runs while the thread can still be stopped): a script that ends, or dies of Ctrl-C, leaves
  nothing running.

`PortalHost` keeps one async context manager (a trio-native service with its own nursery)
open on a portal: entered by one keeper task at the first call, left by `aclose()`/`close()`.

Invariants: every call gets exactly one outcome (its value, its error, or `RuntimeStopped` when
the portal is gone); no caller ever waits for a portal that has stopped.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import logging
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import outcome
import sniffio
import trio

from hermes_actors._errors import RuntimeStopped

__all__ = ["CANCEL_WAIT_S", "Portal", "PortalHost", "main_thread_interrupted"]

logger = logging.getLogger("hermes_actors.portal")

T = TypeVar("T")
U = TypeVar("U")

#: How long a cancelled caller waits for its work in the portal to finish being cancelled.
CANCEL_WAIT_S = 10.0
#: How often the portal looks for a Ctrl-C unwinding in the main thread.
WATCH_INTERVAL_S = 0.2
#: How long `stop()` waits for the portal's tasks (and the runtime's teardown) to finish.
STOP_WAIT_S = 60.0


def _stopped_error(what: str) -> RuntimeStopped:
    return RuntimeStopped(
        f"the hermes-actors portal thread has stopped, so {what} cannot run; start the backend "
        "again (or create a new one)"
    )


class _Call(Generic[T]):
    """One call into the portal: its task there, and how its outcome gets back to the caller.

    `deliver` is called (in the portal thread) exactly once with the outcome, or with None when
    the caller's cancellation stopped the work before it produced anything.
    """

    def __init__(
        self,
        portal: Portal,
        function: Callable[[], Awaitable[T]],
        deliver: Callable[[outcome.Outcome[T] | None], None],
    ) -> None:
        self._portal = portal
        self._function = function
        self._deliver_to_caller = deliver
        self._delivered = False
        self._delivered_lock = threading.Lock()
        self._scope: trio.CancelScope | None = None
        self._cancel_requested = False
        self._interrupted: str | None = None

    def deliver(self, result: outcome.Outcome[T] | None) -> None:
        """Hand the outcome to the caller; only the first outcome counts (any thread)."""
        with self._delivered_lock:
            if self._delivered:
                return
            self._delivered = True
        self._portal._forget(self)
        self._deliver_to_caller(result)

    async def run(self) -> None:
        """Run the work in the portal (as a task of its nursery) and deliver its outcome."""
        self._scope = trio.CancelScope()
        if self._cancel_requested:
            self._scope.cancel(reason="caller cancelled")
        result: outcome.Outcome[T] | None = None
        try:
            with self._scope:
                result = outcome.Value(await self._function())
        except Exception as exc:
            result = outcome.Error(exc)
        except BaseException:
            # The portal itself is stopping: the caller gets a clean error, the portal its
            # cancellation.
            self.deliver(outcome.Error(_stopped_error("the call")))
            raise
        if result is None and self._interrupted is not None:
            result = outcome.Error(RuntimeStopped(self._interrupted))
        self.deliver(result)

    def cancel_threadsafe(self) -> None:
        """Ask the portal to cancel this call's work (from any thread); a no-op once stopped."""
        self._portal.run_sync_soon(self._cancel)

    def _cancel(self) -> None:
        self._cancel_requested = True
        if self._scope is not None:
            self._scope.cancel(reason="caller cancelled")

    def interrupt(self, why: str) -> None:
        """Cancel the work for a reason of the portal's (in the portal thread); the caller gets
        `RuntimeStopped(why)`."""
        self._interrupted = why
        self._cancel()


class Portal:
    """A trio event loop on a dedicated thread; see the module docstring."""

    def __init__(self, name: str = "hermes-actors-portal") -> None:
        self.name = name
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._stop_event: trio.Event | None = None
        self._lock = threading.Lock()
        self._stopped = False
        self._calls: set[_Call[Any]] = set()

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True while the portal thread runs and accepts calls."""
        return self._token is not None and not self._stopped

    @property
    def stopped(self) -> bool:
        """True once the portal has stopped (or is stopping) and takes no more calls."""
        return self._stopped

    @property
    def token(self) -> trio.lowlevel.TrioToken | None:
        """The portal loop's token while it runs (lets code see whether it is on the portal)."""
        return self._token if self.running else None

    def in_portal_thread(self) -> bool:
        """True when called from the portal's own thread (where blocking on it would deadlock)."""
        return self._thread is not None and threading.current_thread() is self._thread

    def start(self) -> None:
        """Start the portal thread and wait until its loop accepts calls. Idempotent."""
        with self._lock:
            if self._stopped:
                raise _stopped_error("nothing")
            if self._thread is not None:
                return
            # Not a daemon: a daemon thread would be frozen mid-teardown at exit. The exit hook
            # below stops it first.
            self._thread = threading.Thread(target=self._thread_main, name=self.name)
            self._thread.start()
            _register_exit_hook(self.stop)
        self._ready.wait()
        if self._start_error is not None:
            raise self._start_error

    def _thread_main(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # reported to `start`, or logged if it happened later
            if not self._ready.is_set():
                self._start_error = exc
            else:
                logger.exception("the portal loop crashed")
        finally:
            self._stopped = True
            self._ready.set()
            # Calls whose spawn never ran (queued as the loop ended) must not wait forever.
            with self._lock:
                orphans, self._calls = self._calls, set()
            for call in orphans:
                call.deliver(outcome.Error(_stopped_error("the call")))

    def _forget(self, call: _Call[Any]) -> None:
        with self._lock:
            self._calls.discard(call)

    @property
    def nursery(self) -> trio.Nursery:
        """The portal's nursery, for long-lived tasks started from inside the portal."""
        if self._nursery is None:
            raise _stopped_error("a task")
        return self._nursery

    async def _main(self) -> None:
        self._stop_event = trio.Event()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._token = trio.lowlevel.current_trio_token()
            self._ready.set()
            nursery.start_soon(self._watch_main_thread, name="portal-ctrl-c-watch")
            await self._stop_event.wait()
            nursery.cancel_scope.cancel(reason="portal stopped")

    async def _watch_main_thread(self) -> None:
        # Ctrl-C raises KeyboardInterrupt in the main thread only: threads blocked in
        # `call_blocking` (a ThreadPoolExecutor's workers) never see it, and the executor's
        # shutdown would wait for their commands to time out. So while the main thread is
        # unwinding a KeyboardInterrupt, every call in flight is cancelled and new ones are
        # refused (`main_thread_interrupted`).
        while True:
            await trio.sleep(WATCH_INTERVAL_S)
            if self._calls and main_thread_interrupted():
                self.interrupt_calls("interrupted by Ctrl-C (KeyboardInterrupt in the main thread)")

    def interrupt_calls(self, why: str) -> None:
        """Cancel every call in flight (in the portal thread); each caller gets
        `RuntimeStopped(why)`."""
        with self._lock:
            calls = list(self._calls)
        for call in calls:
            call.interrupt(why)

    def stop(self, timeout_s: float = STOP_WAIT_S) -> None:
        """Cancel every task in the portal, wait for them to finish, join the thread.

        Idempotent; blocking. Services see a cancellation and clean up (the runtime terminates
        its sandboxes) within `timeout_s`; the thread is joined for at most that long.
        """
        with self._lock:
            thread = self._thread
            if thread is None or thread is threading.current_thread():
                self._stopped = True
                if thread is not None:
                    self.run_sync_soon(self._request_stop)
                return
        self.run_sync_soon(self._request_stop)
        thread.join(timeout_s)
        if thread.is_alive():
            logger.warning("the portal thread did not stop within %g s", timeout_s)
        self._stopped = True

    def _request_stop(self) -> None:
        assert self._stop_event is not None
        self._stop_event.set()

    def run_sync_soon(self, function: Callable[[], object]) -> bool:
        """Run a sync function in the portal loop soon; False if the portal has stopped."""
        token = self._token
        if token is None:
            return False
        try:
            token.run_sync_soon(function)
        except trio.RunFinishedError:
            return False
        return True

    def _submit(self, call: _Call[Any]) -> None:
        def spawn() -> None:
            if self._nursery is None or self._stop_event is None or self._stop_event.is_set():
                call.deliver(outcome.Error(_stopped_error("the call")))
                return
            try:
                self._nursery.start_soon(call.run, name="portal-call")
            except RuntimeError:  # the nursery is closed: the portal is stopping
                call.deliver(outcome.Error(_stopped_error("the call")))

        if main_thread_interrupted():
            raise RuntimeStopped(
                "interrupted by Ctrl-C (KeyboardInterrupt in the main thread): no new call starts "
                "while the program unwinds it"
            )
        with self._lock:
            if self._stopped:
                raise _stopped_error("the call")
            self._calls.add(call)
        if not self.run_sync_soon(spawn):
            self._forget(call)
            raise _stopped_error("the call")

    # -- calls -----------------------------------------------------------------------------

    def call_blocking(
        self,
        function: Callable[[], Awaitable[T]],
        *,
        on_abandoned: Callable[[T], Awaitable[object]] | None = None,
    ) -> T:
        """Run `function()` in the portal and block this thread until it is done.

        Must not be called from the portal thread. `KeyboardInterrupt` (or any other exception
        raised in this thread while waiting) cancels the work and waits for it to finish before
        propagating.
        """
        if self.in_portal_thread():
            raise RuntimeError("call_blocking would deadlock: it was called from the portal thread")
        # `done` is held until the outcome is delivered: a bare lock is the cheapest one-shot
        # signal between two threads (a `threading.Event` is a condition over a lock).
        done = threading.Lock()
        done.acquire()
        box: list[outcome.Outcome[T] | None] = []
        state = {"abandoned": False}
        state_lock = threading.Lock()

        def deliver(result: outcome.Outcome[T] | None) -> None:
            with state_lock:
                box.append(result)
                abandoned = state["abandoned"]
            done.release()
            if abandoned:
                self._abandon(result, on_abandoned)

        call = _Call(self, function, deliver)
        self._submit(call)
        try:
            done.acquire()
        except BaseException:
            call.cancel_threadsafe()
            try:
                done.acquire(timeout=CANCEL_WAIT_S)
            finally:
                with state_lock:
                    state["abandoned"] = not box
                if box:
                    self._abandon(box[0], on_abandoned)
            raise
        result = box[0]
        assert result is not None
        return result.unwrap()

    async def call(
        self,
        function: Callable[[], Awaitable[T]],
        *,
        on_abandoned: Callable[[T], Awaitable[object]] | None = None,
    ) -> T:
        """Run `function()` in the portal and await it from asyncio or trio (another loop)."""
        library = sniffio.current_async_library()
        if library == "asyncio":
            return await self._call_from_asyncio(function, on_abandoned)
        if library == "trio":
            if trio.lowlevel.current_trio_token() is self._token:
                return await function()
            return await self._call_from_trio(function, on_abandoned)
        raise RuntimeError(f"hermes-actors cannot be awaited from {library!r}; use trio or asyncio")

    async def _call_from_asyncio(
        self,
        function: Callable[[], Awaitable[T]],
        on_abandoned: Callable[[T], Awaitable[object]] | None,
    ) -> T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[outcome.Outcome[T] | None] = loop.create_future()
        abandoned = False

        def resolve(result: outcome.Outcome[T] | None) -> None:  # in the caller's loop
            if abandoned:
                self._abandon(result, on_abandoned)
            elif not future.done():
                future.set_result(result)

        def deliver(result: outcome.Outcome[T] | None) -> None:  # in the portal thread
            try:
                loop.call_soon_threadsafe(resolve, result)
            except RuntimeError:  # the caller's loop is closed: nobody will take the value
                self._abandon(result, on_abandoned)

        call = _Call(self, function, deliver)
        self._submit(call)
        try:
            result = await asyncio.shield(future)
        except asyncio.CancelledError:
            call.cancel_threadsafe()
            try:
                await asyncio.wait({future}, timeout=CANCEL_WAIT_S)
            finally:
                if future.done():
                    self._abandon(future.result(), on_abandoned)
                else:
                    abandoned = True
            raise
        assert result is not None
        return result.unwrap()

    async def _call_from_trio(
        self,
        function: Callable[[], Awaitable[T]],
        on_abandoned: Callable[[T], Awaitable[object]] | None,
    ) -> T:
        caller_token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        box: list[outcome.Outcome[T] | None] = []
        abandoned = False

        def resolve(result: outcome.Outcome[T] | None) -> None:  # in the caller's loop
            if abandoned:
                self._abandon(result, on_abandoned)
                return
            box.append(result)
            done.set()

        def deliver(result: outcome.Outcome[T] | None) -> None:  # in the portal thread
            try:
                caller_token.run_sync_soon(resolve, result)
            except trio.RunFinishedError:
                self._abandon(result, on_abandoned)

        call = _Call(self, function, deliver)
        self._submit(call)
        try:
            await done.wait()
        except BaseException:
            call.cancel_threadsafe()
            with trio.move_on_after(CANCEL_WAIT_S, shield=True):
                await done.wait()
            if box:
                self._abandon(box[0], on_abandoned)
            else:
                abandoned = True  # `resolve` gives the value back if it still comes
            raise
        result = box[0]
        assert result is not None
        return result.unwrap()

    def _abandon(
        self,
        result: outcome.Outcome[T] | None,
        on_abandoned: Callable[[T], Awaitable[object]] | None,
    ) -> None:
        """A value nobody will take: give it to `on_abandoned` (as a task in the portal)."""
        if on_abandoned is None or not isinstance(result, outcome.Value):
            return
        value: T = result.value

        async def give_back() -> None:
            try:
                await on_abandoned(value)
            except Exception:
                logger.exception("giving back an abandoned result failed")

        def spawn() -> None:
            if self._nursery is not None:
                self._nursery.start_soon(give_back, name="portal-give-back")

        self.run_sync_soon(spawn)

    def call_sync(self, function: Callable[[], T]) -> T:
        """Run a sync function in the portal loop and block until it returns (any thread).

        Used for quick snapshots (`status()`); from the portal thread it simply calls it.
        """
        if self.in_portal_thread():
            return function()
        done = threading.Event()
        box: list[outcome.Outcome[T]] = []

        def run() -> None:
            box.append(outcome.capture(function))
            done.set()

        if not self.run_sync_soon(run):
            raise _stopped_error("the call")
        while not done.wait(1.0):
            if not self.running:
                raise _stopped_error("the call")
        return box[0].unwrap()


def main_thread_interrupted() -> bool:
    """True while the main thread is unwinding (handling) a KeyboardInterrupt."""
    if threading.current_thread() is threading.main_thread():
        return False  # a caller in the main thread is interrupted by the signal itself
    # `sys._current_exceptions` (3.11: (type, value, traceback) per thread id; 3.12: the
    # exception) is the one way to see another thread's exception in flight.
    handled: object = sys._current_exceptions().get(threading.main_thread().ident or -1)
    if isinstance(handled, tuple):
        handled = handled[1]
    return isinstance(handled, KeyboardInterrupt)


def _register_exit_hook(hook: Callable[[], object]) -> None:
    # `threading._register_atexit` hooks run at interpreter exit *before* non-daemon threads are
    # joined (concurrent.futures relies on it); a plain `atexit` hook would run only after that
    # join, which would wait forever for the portal thread.
    register = getattr(threading, "_register_atexit", None)
    if register is not None:
        with contextlib.suppress(RuntimeError):  # already shutting down: the thread is stopping
            register(hook)
            return
    atexit.register(hook)


class PortalHost(Generic[T]):
    """One async context manager kept open on a portal thread of its own, for callers outside it.

    A trio-native object (an async context manager whose `__aenter__` opens a nursery) can only
    be used from the trio run it was entered in. The host enters it in a task of its own
    `Portal` on first use and keeps it open; calls from any thread or event loop run in the
    portal as tasks, next to it. `aclose()`/`close()` leave the context, the one way it stops
    (its `__aexit__`), then stop the portal thread.

    If the context ends by itself (its body's task crashed), the crash is logged and the next
    call enters it again: a long-lived program keeps working after a transient failure.

    Invariants: the context is entered and left by one task (the keeper), never twice at once;
    every call gets exactly one outcome.
    """

    def __init__(self, context: contextlib.AbstractAsyncContextManager[T], *, name: str) -> None:
        self.portal = Portal(name=name)
        self._context = context
        self._enter_lock = trio.Lock()
        self._value: T | None = None
        self._open = False
        self._closing = trio.Event()
        self._closed = trio.Event()

    @property
    def running(self) -> bool:
        """True until the host is closed (the portal thread runs, or is about to)."""
        return not self.portal.stopped

    @property
    def is_open(self) -> bool:
        """True while the context is entered."""
        return self._open

    def start(self) -> None:
        """Start the portal thread (the context is entered on the first call). Idempotent."""
        self.portal.start()

    async def _enter(self) -> T:
        """The entered context (in the portal): entered now unless it is open already."""
        if self._open:
            assert self._value is not None
            return self._value
        async with self._enter_lock:
            if not self._open:
                self._closing, self._closed = trio.Event(), trio.Event()
                value: T = await self.portal.nursery.start(self._keep_open)
                return value
            assert self._value is not None
            return self._value

    async def _keep_open(self, *, task_status: trio.TaskStatus[T]) -> None:
        started = False
        try:
            async with self._context as value:
                # Both before `started`: a call arriving before the entering task resumes sees
                # the context open and takes its value from here.
                self._value, self._open = value, True
                started = True
                task_status.started(value)
                await self._closing.wait()
        except Exception:
            if not started:
                raise  # to the call that entered it
            logger.exception("%s ended by itself; the next call enters it again", self._context)
        finally:
            self._open = False
            self._value = None
            self._closed.set()

    async def _run(self, function: Callable[..., Awaitable[U]], args: tuple[Any, ...]) -> U:
        await self._enter()
        return await function(*args)

    async def call(
        self,
        function: Callable[..., Awaitable[U]],
        *args: Any,
        on_abandoned: Callable[[U], Awaitable[object]] | None = None,
    ) -> U:
        """`await function(*args)` in the portal, the context entered first; from asyncio or
        trio. Cancelling the caller cancels the work there (see `Portal.call`)."""
        return await self.portal.call(
            functools.partial(self._run, function, args), on_abandoned=on_abandoned
        )

    def call_blocking(
        self,
        function: Callable[..., Awaitable[U]],
        *args: Any,
        on_abandoned: Callable[[U], Awaitable[object]] | None = None,
    ) -> U:
        """`call` for sync code: blocks this thread (see `Portal.call_blocking`)."""
        return self.portal.call_blocking(
            functools.partial(self._run, function, args), on_abandoned=on_abandoned
        )

    async def _leave(self, limit_s: float) -> None:
        """Leave the context (in the portal) and wait, at most `limit_s`, until it is left."""
        if not self._open:
            return
        self._closing.set()
        with trio.move_on_after(limit_s):
            await self._closed.wait()

    async def aclose(self) -> None:
        """Leave the context, then stop the portal thread. Idempotent."""
        if self.portal.running:
            with contextlib.suppress(RuntimeStopped):
                await self.portal.call(functools.partial(self._leave, STOP_WAIT_S))
        self.portal.stop()

    def close(self, limit_s: float = STOP_WAIT_S, stop_wait_s: float = STOP_WAIT_S) -> None:
        """`aclose` for sync code: leaving may take `limit_s`, stopping the portal (which
        cancels what is still running there) `stop_wait_s` more."""
        if self.portal.running:
            with contextlib.suppress(RuntimeStopped):
                self.portal.call_blocking(functools.partial(self._leave, limit_s))
        self.portal.stop(stop_wait_s)
