"""Calling the blocking `modal` client from trio, and the agent's byte stream over one exec.

`call_modal` is the one adapter every modal call of the driver goes through. modal's blocking
API runs each call on an asyncio loop that modal keeps in a background thread; every such
callable also accepts the undocumented keyword `_future=True` and then returns a
`concurrent.futures.Future` instead of blocking. Awaiting that future through the trio token
holds no thread, and cancelling it cancels the server call. Because `_future` is not a documented
interface, `FUTURES_SUPPORTED` falls back to `trio.to_thread.run_sync` when the synchronizer
modal uses does not advertise it (a cancelled fallback call is abandoned, not cancelled).

Generators (stream iteration) cannot return futures, so the agent's stdout is pumped by one
dedicated thread per sandbox (`StdoutPump`), not a trio worker thread: it must not count against
trio's 40-thread limiter (200 sandboxes would starve every other `to_thread` call), and it ends
on its own when the exec's stdout ends, which happens when the agent or the sandbox ends.

Invariants:
* At most one stdin write (one `TaskExecStdinWrite` RPC) is in flight per exec; modal's writer
  clears its buffer only after a write succeeded, so writes never interleave or get lost.
* The stdout pump delivers chunks in order with backpressure (a bounded channel) and reports the
  end of the stream exactly once; closing the receiving side unblocks and stops it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import trio

logger = logging.getLogger("hermes_actors.drivers.modal")

_T = TypeVar("_T")

#: Largest single stdin write; modal's exec stdin buffer refuses more than 16 MiB at once.
MAX_STDIN_WRITE = 4 * 1024 * 1024
#: Chunks of agent output buffered between the pump thread and the trio side.
STDOUT_BUFFER_CHUNKS = 64


def _synchronicity_has_futures() -> bool:
    try:
        from synchronicity import synchronizer
    except ImportError:
        return False
    return getattr(synchronizer, "_RETURN_FUTURE_KWARG", None) == "_future"


#: Whether modal's blocking callables accept `_future=True` (else `call_modal` uses threads).
FUTURES_SUPPORTED = _synchronicity_has_futures()


async def await_future(future: concurrent.futures.Future[_T]) -> _T:
    """Wait for a concurrent future without holding a thread; cancelling cancels the future."""
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()

    def wake(_: concurrent.futures.Future[_T]) -> None:
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(done.set)

    future.add_done_callback(wake)
    try:
        await done.wait()
    except BaseException:
        future.cancel()
        raise
    return future.result()


async def call_modal(function: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    """Run one blocking modal call without blocking the trio loop; return its result.

    Cancellation cancels the server call (with futures) or abandons it (thread fallback).
    Exceptions are modal's own: callers map them at the driver boundary.
    """
    if not FUTURES_SUPPORTED:
        return await trio.to_thread.run_sync(
            functools.partial(function, *args, **kwargs), abandon_on_cancel=True
        )
    result = function(*args, _future=True, **kwargs)
    if isinstance(result, concurrent.futures.Future):
        return await await_future(result)
    # Not a coroutine underneath: the wrapper already returned the value.
    return result


class StdinStream(trio.abc.SendStream):
    """The agent's stdin: each `send_all` is one (or, above 4 MiB, a few) stdin write RPCs."""

    def __init__(self, process: Any, *, sandbox_id: str) -> None:
        self._process = process
        self._sandbox_id = sandbox_id
        self._sending = False
        self._closed = False
        self._broken: BaseException | None = None

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is writing to this sandbox's stdin")
        if self._closed:
            raise trio.ClosedResourceError("the sandbox's stdin is closed")
        if self._broken is not None:
            raise trio.BrokenResourceError(f"stdin of {self._sandbox_id} is broken") from (
                self._broken
            )
        self._sending = True
        try:
            view = memoryview(data)
            for start in range(0, len(view), MAX_STDIN_WRITE):
                self._process.stdin.write(bytes(view[start : start + MAX_STDIN_WRITE]))
                await call_modal(self._process.stdin.drain)
            await trio.lowlevel.checkpoint()
        except Exception as exc:
            self._broken = exc
            raise trio.BrokenResourceError(
                f"cannot write to the agent of {self._sandbox_id}: {exc!r}"
            ) from exc
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        """Send EOF to the agent (its dead-man switch then ends its commands). Idempotent."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        if self._broken is not None:
            await trio.lowlevel.checkpoint()
            return
        with trio.move_on_after(10, shield=True):
            try:
                self._process.stdin.write_eof()
                await call_modal(self._process.stdin.drain)
            except Exception as exc:
                # The exec or the sandbox is already gone: there is nothing left to close.
                logger.debug("closing stdin of %s: %r", self._sandbox_id, exc)


class StdoutStream(trio.abc.ReceiveStream):
    """The agent's stdout, fed by a `StdoutPump` thread; `b""` once the exec's stdout ended."""

    def __init__(self, receive: trio.MemoryReceiveChannel[bytes]) -> None:
        self._receive = receive
        self._pending = b""

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if not self._pending:
            try:
                self._pending = await self._receive.receive()
            except trio.EndOfChannel:
                return b""
            except trio.ClosedResourceError:
                raise trio.ClosedResourceError("the sandbox's stdout stream is closed") from None
        else:
            await trio.lowlevel.checkpoint()
        size = len(self._pending) if max_bytes is None else max_bytes
        chunk, self._pending = self._pending[:size], self._pending[size:]
        return chunk

    async def aclose(self) -> None:
        self._receive.close()
        await trio.lowlevel.checkpoint()

    def close(self) -> None:
        """Sync close: the pump thread's next delivery fails and it stops forwarding."""
        self._receive.close()


class StdoutPump:
    """One dedicated thread iterating an exec's stdout into a bounded trio channel.

    When the stream ends (or fails), the thread asks the exec for its exit code (bounded), then
    calls `on_end(exit_code)` on the trio thread. It never blocks the trio loop, and stops when
    the exec's stdout ends or the receiving side is closed.
    """

    def __init__(
        self,
        process: Any,
        *,
        name: str,
        on_end: Callable[[int | None], None],
        exit_code_timeout_s: float = 5.0,
    ) -> None:
        self._process = process
        self._name = name
        self._on_end = on_end
        self._exit_code_timeout_s = exit_code_timeout_s
        self._send, receive = trio.open_memory_channel[bytes](STDOUT_BUFFER_CHUNKS)
        self.stream = StdoutStream(receive)
        self._token = trio.lowlevel.current_trio_token()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    def is_running(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        try:
            for chunk in self._process.stdout:
                if not chunk:
                    continue
                trio.from_thread.run(self._send.send, bytes(chunk), trio_token=self._token)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.RunFinishedError):
            pass
        except trio.Cancelled:
            pass
        except Exception as exc:
            self.error = exc
            logger.debug("%s: stdout stream failed: %r", self._name, exc)
        exit_code = self._exit_code()
        with contextlib.suppress(trio.RunFinishedError):
            trio.from_thread.run_sync(self._finish, exit_code, trio_token=self._token)

    def _exit_code(self) -> int | None:
        try:
            if FUTURES_SUPPORTED:
                future = self._process.wait(_future=True)
                try:
                    code = future.result(timeout=self._exit_code_timeout_s)
                except concurrent.futures.TimeoutError:
                    future.cancel()
                    return None
            else:
                code = self._process.poll()
        except Exception as exc:
            logger.debug("%s: exit code unavailable: %r", self._name, exc)
            return None
        return code if isinstance(code, int) else None

    def _finish(self, exit_code: int | None) -> None:
        self._send.close()
        self._on_end(exit_code)
