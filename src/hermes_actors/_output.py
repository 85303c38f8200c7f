"""A command's output while it runs: the chunks a streamed command sends, and a bounded buffer.

A streamed `exec` (agent arg ``stream_output``) sends its output as it is read, in output frames
that precede its reply (see `hermes_actors._agent`). The client hands each frame, as an
`OutputChunk`, to the request's sink, a plain sync callable, from its reader task: a sink never
blocks and never raises into the reader (`OutputTally` guards it).

Nothing on the way holds more than a bound: the agent skips frames while the host lags (it never
slows the command for an observer), `OutputBuffer` skips what its consumer has not taken past
`max_bytes`, and every skip is counted in the next chunk's `skipped`, so a consumer knows exactly
how many bytes of each stream it did not see. The command's result still carries its head+tail
capture with exact dropped counts, as without streaming.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Mapping
from typing import Any, Literal

import attrs
import trio

__all__ = ["OutputBuffer", "OutputChunk", "OutputSink", "OutputTally"]

logger = logging.getLogger("hermes_actors.client")

StreamName = Literal["stdout", "stderr"]


@attrs.frozen(kw_only=True)
class OutputChunk:
    """A piece of a running command's output, in the order the command wrote it per stream."""

    #: `"stdout"` or `"stderr"` (a command with `merge_stderr` has stdout only).
    stream: StreamName
    data: bytes = attrs.field(repr=lambda data: f"<{len(data)} bytes>")
    #: Bytes of this stream that were not delivered just before `data` (a lagging reader).
    skipped: int = 0

    @classmethod
    def from_wire(cls, message: Mapping[str, Any]) -> OutputChunk:
        stream: StreamName = "stderr" if message.get("output") == "stderr" else "stdout"
        data = message.get("data", b"")
        return cls(
            stream=stream,
            data=data if isinstance(data, bytes) else b"",
            skipped=int(message.get("skipped") or 0),
        )


#: Where a streamed command's chunks go: called in the runtime's trio thread, must not block.
OutputSink = Callable[[OutputChunk], None]


class OutputTally:
    """Wraps a sink: counts what each stream delivered, and completes the count at the end.

    When the command's answer arrives, `finish` compares the bytes its capture saw (kept plus
    dropped) with those delivered and skipped so far, and reports any difference as a last,
    empty chunk's `skipped` (the agent skipped the command's last writes while the host lagged).
    A sink that raises is logged and not called again: the reader that calls it serves a whole
    sandbox.
    """

    __slots__ = ("_counts", "_sink")

    def __init__(self, sink: OutputSink) -> None:
        self._sink: OutputSink | None = sink
        self._counts: dict[str, int] = {"stdout": 0, "stderr": 0}

    def deliver(self, chunk: OutputChunk) -> None:
        self._counts[chunk.stream] += chunk.skipped + len(chunk.data)
        if self._sink is None:
            return
        try:
            self._sink(chunk)
        except Exception:
            logger.exception("an output sink failed; the command's further output is not streamed")
            self._sink = None

    def finish(self, answer: Mapping[str, Any]) -> None:
        streams: tuple[StreamName, ...] = ("stdout", "stderr")
        for stream in streams:
            data = answer.get(stream, b"")
            seen = (len(data) if isinstance(data, bytes) else 0) + int(
                answer.get(f"{stream}_dropped") or 0
            )
            missing = seen - self._counts[stream]
            if missing > 0:
                self.deliver(OutputChunk(stream=stream, data=b"", skipped=missing))


class OutputBuffer:
    """A bounded queue from a streamed command (its sink) to one trio consumer task.

    Call the buffer itself as the sink; iterate it (`async for chunk in buffer`) in a task of the
    same trio run; `close()` once the command ended (the iteration then stops after what is
    buffered). Past `max_bytes` buffered, new data is skipped and counted in that stream's next
    chunk (an empty one at the end if need be), so a slow consumer costs bounded memory and never
    blocks the command.
    """

    def __init__(self, max_bytes: int = 4 * 1024 * 1024) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1: {max_bytes}")
        self.max_bytes = max_bytes
        self._chunks: collections.deque[OutputChunk] = collections.deque()
        self._buffered = 0
        self._skipped: dict[StreamName, int] = {}
        self._closed = False
        self._changed = trio.Event()

    def __call__(self, chunk: OutputChunk) -> None:
        if self._closed:
            return
        if self._buffered + len(chunk.data) > self.max_bytes:
            self._skipped[chunk.stream] = (
                self._skipped.get(chunk.stream, 0) + chunk.skipped + len(chunk.data)
            )
            return
        skipped = chunk.skipped + self._skipped.pop(chunk.stream, 0)
        self._chunks.append(attrs.evolve(chunk, skipped=skipped))
        self._buffered += len(chunk.data)
        self._changed.set()

    def close(self) -> None:
        """No more chunks: what was skipped last is queued as empty chunks. Idempotent."""
        if self._closed:
            return
        for stream, skipped in sorted(self._skipped.items()):
            self._chunks.append(OutputChunk(stream=stream, data=b"", skipped=skipped))
        self._skipped.clear()
        self._closed = True
        self._changed.set()

    def __aiter__(self) -> OutputBuffer:
        return self

    async def __anext__(self) -> OutputChunk:
        await trio.lowlevel.checkpoint()
        while not self._chunks:
            if self._closed:
                raise StopAsyncIteration
            await self._changed.wait()
            self._changed = trio.Event()
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk.data)
        return chunk
