"""A command's output streamed while it runs: agent frames, the bounded buffer, the facade.

Ordering, never timing: a command that prints a line and then waits for a tagged `sleep` to end
shows its line to the consumer before the test ends that `sleep` (the test does so only after
it saw the line), so the line demonstrably arrived while the command ran.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from agent_harness import AgentProcess
from conftest import skip_without_bwrap
from hermes_actors import OutputBuffer, OutputChunk, SandboxConfig, ToolBackend
from hermes_actors._output import OutputTally
from hermes_actors.testing.modal_emulator import ModalEmulator
from proc_support import pids_with_argv

DEADLINE_S = 30.0


def _frames_until_reply(agent: AgentProcess, request_id: int) -> list[dict[str, Any]]:
    """Every frame of one request, its reply last (output frames share the request's id)."""
    frames = [agent.wait_reply(request_id)]
    while "ok" not in frames[-1]:
        frames.append(agent.wait_reply(request_id))
    return frames


# -- the agent ---------------------------------------------------------------------------------


def test_agent_sends_output_frames_before_the_reply(tmp_path: Any) -> None:
    """A streamed exec's output frames arrive, in order, before its reply, and add up to it."""
    with AgentProcess(str(tmp_path)) as agent:
        request = agent.send(
            "exec",
            slot=0,
            command="printf 'one\\n'; printf 'err\\n' >&2; printf 'two\\n'",
            stream_output=True,
        )
        frames = _frames_until_reply(agent, request)
    *outputs, reply = frames
    assert reply["ok"] is True
    assert all("output" in frame and "ok" not in frame for frame in outputs)
    stdout = b"".join(frame["data"] for frame in outputs if frame["output"] == "stdout")
    stderr = b"".join(frame["data"] for frame in outputs if frame["output"] == "stderr")
    assert stdout == reply["result"]["stdout"] == b"one\ntwo\n"
    assert stderr == reply["result"]["stderr"] == b"err\n"
    assert all(frame["skipped"] == 0 for frame in outputs)


def test_agent_skips_frames_for_a_lagging_host_and_counts_them(tmp_path: Any) -> None:
    """While the host does not read, frames are skipped, and the counts add up exactly."""
    marker = tmp_path / "written"
    with AgentProcess(str(tmp_path / "root")) as agent:
        request = agent.send(
            "exec",
            slot=0,
            command=f"head -c 8000000 /dev/zero; touch {marker}; sleep 0.2",
            stream_output=True,
            max_output_bytes=1000,
        )
        # Not reading while the command writes: the agent's unsent frames pile up.
        for _ in range(3000):
            if marker.exists():
                break
            time.sleep(0.01)
        assert marker.exists()
        *outputs, reply = _frames_until_reply(agent, request)
    result = reply["result"]
    delivered = sum(len(frame["data"]) for frame in outputs)
    skipped = sum(frame["skipped"] for frame in outputs)
    assert delivered < 8000000  # the agent held back what the host did not take
    # Bytes skipped after the last frame are not in any frame: the host's tally adds them.
    assert delivered + skipped <= len(result["stdout"]) + result["stdout_dropped"] == 8000000
    seen: list[OutputChunk] = []
    tally = OutputTally(seen.append)
    for frame in outputs:
        tally.deliver(OutputChunk.from_wire(frame))
    tally.finish(result)
    assert sum(len(chunk.data) + chunk.skipped for chunk in seen) == 8000000


def test_agent_streams_a_command_that_cannot_start(tmp_path: Any) -> None:
    """A streamed argv that does not exist streams the shell-like error its result carries."""
    with AgentProcess(str(tmp_path)) as agent:
        request = agent.send("exec", slot=0, argv=["/no/such/program"], stream_output=True)
        *outputs, reply = _frames_until_reply(agent, request)
    assert reply["result"]["exit_code"] == 127
    assert b"".join(frame["data"] for frame in outputs) == reply["result"]["stderr"]


def test_agent_refuses_a_non_bool_stream_flag(tmp_path: Any) -> None:
    """`stream_output` must be a bool: anything else is a bad request."""
    with AgentProcess(str(tmp_path)) as agent:
        reply = agent.request("exec", slot=0, command="true", stream_output="yes")
    assert reply["ok"] is False
    assert reply["error"]["code"] == "bad_request"


def test_agent_streams_persistent_shell_calls(tmp_path: Any) -> None:
    """A call in the slot's persistent shell streams too, merged stderr included."""
    with AgentProcess(str(tmp_path)) as agent:
        request = agent.send(
            "exec",
            slot=0,
            command="echo out; echo err >&2",
            shell="persistent",
            merge_stderr=True,
            stream_output=True,
        )
        *outputs, reply = _frames_until_reply(agent, request)
    assert b"".join(frame["data"] for frame in outputs) == reply["result"]["stdout"]
    assert reply["result"]["stdout"] == b"out\nerr\n"
    assert {frame["output"] for frame in outputs} == {"stdout"}


# -- the bounded pieces ------------------------------------------------------------------------


def test_tally_reports_what_the_agent_skipped_at_the_end() -> None:
    """Bytes the capture saw but no frame carried arrive as a last chunk's `skipped`."""
    seen: list[OutputChunk] = []
    tally = OutputTally(seen.append)
    tally.deliver(OutputChunk(stream="stdout", data=b"abc"))
    tally.finish({"stdout": b"abcdef", "stdout_dropped": 10, "stderr": b""})
    assert seen[-1] == OutputChunk(stream="stdout", data=b"", skipped=13)
    assert len(seen) == 2


def test_tally_stops_calling_a_sink_that_raises(caplog: pytest.LogCaptureFixture) -> None:
    """A sink that raises is logged once and not called again (the reader must survive)."""
    calls: list[OutputChunk] = []

    def sink(chunk: OutputChunk) -> None:
        calls.append(chunk)
        raise RuntimeError("consumer bug")

    tally = OutputTally(sink)
    tally.deliver(OutputChunk(stream="stdout", data=b"a"))
    tally.deliver(OutputChunk(stream="stdout", data=b"b"))
    assert len(calls) == 1
    assert "output sink failed" in caplog.text


async def test_buffer_skips_past_its_bound_and_counts_exactly() -> None:
    """Past `max_bytes` unconsumed, data is skipped and counted in the stream's next chunk."""
    buffer = OutputBuffer(max_bytes=4)
    for piece in (b"ab", b"cd", b"ef", b"gh"):
        buffer(OutputChunk(stream="stdout", data=piece))
    buffer(OutputChunk(stream="stderr", data=b"x", skipped=2))
    buffer.close()
    received = [chunk async for chunk in buffer]
    assert received == [
        OutputChunk(stream="stdout", data=b"ab"),
        OutputChunk(stream="stdout", data=b"cd"),
        OutputChunk(stream="stderr", data=b"", skipped=3),
        OutputChunk(stream="stdout", data=b"", skipped=4),
    ]


async def test_buffer_consumer_waits_for_data_and_ends_on_close() -> None:
    """An empty buffer's consumer waits until a chunk or the close arrives."""
    buffer = OutputBuffer()
    received: list[bytes] = []

    async def consume() -> None:
        async for chunk in buffer:
            received.append(chunk.data)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consume)
        await trio.testing.wait_all_tasks_blocked()
        buffer(OutputChunk(stream="stdout", data=b"late"))
        await trio.testing.wait_all_tasks_blocked()
        assert received == [b"late"]
        buffer.close()
    assert received == [b"late"]


# -- the facade, on each backend ---------------------------------------------------------------


def _local_config(isolation: str = "none") -> SandboxConfig:
    return SandboxConfig(name="stream", backend="local", isolation=isolation, min_sandboxes=0)


def _modal_config() -> SandboxConfig:
    return SandboxConfig(
        name="stream",
        backend="modal",
        app_name="hermes-stream-tests",
        cpu=0.5,
        memory=256,
        min_sandboxes=0,
        acquire_timeout_s=DEADLINE_S,
    )


@asynccontextmanager
async def _backend(kind: str, request: pytest.FixtureRequest) -> AsyncIterator[ToolBackend]:
    if kind == "modal":
        request.getfixturevalue("modal_emulator")
        config = _modal_config()
    else:
        isolation = kind.removeprefix("local-")
        await skip_without_bwrap(isolation)
        config = _local_config(isolation)
    async with ToolBackend(config) as backend:
        yield backend


@pytest.fixture(params=["local-none", "local-bwrap", "modal"])
def backend_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def _end_tagged_sleep(tag: str) -> None:
    """End the command's `sleep` tagged `tag` from the host (sandboxes share no files with us)."""
    with trio.fail_after(DEADLINE_S):
        # Polling on purpose: a process appearing in /proc cannot set a trio.Event.
        while not (found := _processes_named(tag)):  # noqa: ASYNC110
            await trio.sleep(0.02)
    for pid in found:
        os.kill(pid, signal.SIGTERM)


async def test_execute_batch_streams_output_while_the_command_runs(
    backend_kind: str, request: pytest.FixtureRequest
) -> None:
    """The first line reaches `on_output` before the command (waiting for the test) ends."""
    tag = f"hermes-stream-wait-{os.getpid()}"
    got_first = trio.Event()
    chunks: list[tuple[int, OutputChunk]] = []

    def on_output(index: int, chunk: OutputChunk) -> None:
        chunks.append((index, chunk))
        if b"first" in b"".join(c.data for _, c in chunks):
            got_first.set()

    async with _backend(backend_kind, request) as backend:
        slot = await backend.acquire("streamer")
        command = f"echo first; (exec -a {tag} sleep 600); echo second; echo problem >&2"
        results: list[Any] = []

        async def run() -> None:
            results.extend(
                await backend.execute_batch(
                    [(slot, "bash", {"command": command})], on_output=on_output
                )
            )

        with trio.fail_after(DEADLINE_S):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run)
                await got_first.wait()
                assert not results  # still running: it waits for the test
                await _end_tagged_sleep(tag)
        await backend.release(slot)
    [result] = results
    assert result.success, result
    assert {index for index, _ in chunks} == {0}
    stdout = b"".join(c.data for _, c in chunks if c.stream == "stdout")
    stderr = b"".join(c.data for _, c in chunks if c.stream == "stderr")
    assert stdout == b"first\nsecond\n"
    assert stderr == b"problem\n"


async def test_streaming_costs_no_provider_call_per_chunk(
    modal_emulator: ModalEmulator,
) -> None:
    """On Modal, a command streaming many chunks makes no more provider calls than a quiet one."""

    async def calls_for(command: str, on_output: Callable[[int, OutputChunk], None] | None) -> int:
        async with ToolBackend(_modal_config()) as backend:
            slot = await backend.acquire("counted")
            before = sum(modal_emulator.call_counts().values())
            [result] = await backend.execute_batch(
                [(slot, "bash", {"command": command})], on_output=on_output
            )
            after = sum(modal_emulator.call_counts().values())
            assert result.success, result
            await backend.release(slot)
        return after - before

    chunks: list[OutputChunk] = []
    chatty = "for i in $(seq 20); do echo line-$i; sleep 0.02; done"
    streamed = await calls_for(chatty, lambda _, chunk: chunks.append(chunk))
    quiet = await calls_for("sleep 0.4", None)
    assert len(chunks) >= 5  # really streamed in many pieces
    assert streamed <= quiet + 1


async def test_cancelling_a_streamed_command_kills_it(tmp_path: Any) -> None:
    """Cancelling the batch mid-stream kills the command: its slot is free and nothing runs."""
    tag = f"hermes-stream-cancel-{os.getpid()}"
    started = trio.Event()

    def on_output(index: int, chunk: OutputChunk) -> None:
        started.set()

    async with ToolBackend(_local_config()) as backend:
        slot = await backend.acquire("cancelled")
        with trio.move_on_after(DEADLINE_S) as deadline:
            async with trio.open_nursery() as nursery:

                async def run() -> None:
                    await backend.execute_batch(
                        [(slot, "bash", {"command": f"echo go; exec -a {tag} sleep 600"})],
                        on_output=on_output,
                    )

                nursery.start_soon(run)
                await started.wait()
                nursery.cancel_scope.cancel()
        assert not deadline.cancelled_caught
        assert not _processes_named(tag)
        [after] = await backend.execute_batch([(slot, "bash", {"command": "echo free"})])
        assert after.output == "free\n"
        await backend.release(slot)


def _processes_named(tag: str) -> list[int]:
    return pids_with_argv(tag, at_start=True)
