"""ToolBackend end to end on the local backend: batches, tools, lifecycle, the portal, failures."""

from __future__ import annotations

import asyncio
import base64
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio

from hermes_actors import (
    AgentError,
    ArtifactTooLarge,
    ConfigError,
    ExecutionResult,
    ModalToolBackend,
    SandboxConfig,
    ToolBackend,
    format_status,
)
from hermes_actors.drivers._local import SANDBOX_MARKER_VAR, marked_pids
from sandbox_support import kill_agent, processes_with


def local_config(**changes: Any) -> SandboxConfig:
    settings: dict[str, Any] = {
        "backend": "local",
        "isolation": "none",
        "slots_per_sandbox": 4,
        "min_sandboxes": 1,
        "max_sandboxes": 2,
        "acquire_timeout_s": 20.0,
    }
    settings.update(changes)
    return SandboxConfig(**settings)


def slots_held(backend: ToolBackend) -> int:
    return sum(pool.slots_held for pool in backend.status().pools)


def sandbox_ids(backend: ToolBackend) -> set[str]:
    return {sandbox.sandbox_id for pool in backend.status().pools for sandbox in pool.sandboxes}


def sandbox_processes(ids: set[str]) -> list[int]:
    markers = [f"{SANDBOX_MARKER_VAR}={sandbox_id}".encode() for sandbox_id in ids]
    return [pid for marker in markers for pid in marked_pids(marker)]


def sleeper(token: str, seconds: int = 30) -> str:
    """A shell command whose process is findable by `token` in its command line."""
    return f"exec -a {token} sleep {seconds}"


async def eventually(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Wait (polling real processes) until `condition()` holds; fail after `timeout_s`."""
    with trio.move_on_after(timeout_s):
        while not condition():  # noqa: ASYNC110 - processes send no event to wait for
            await trio.sleep(0.02)
        return
    raise AssertionError(f"condition did not hold within {timeout_s} s")


# -- batches and tools -------------------------------------------------------------------------


async def test_bad_tool_or_arguments_give_error_results() -> None:
    """Unknown tools, bad arguments and foreign slots give error results; valid requests run."""
    async with ToolBackend(local_config()) as backend:
        slot = await backend.acquire("t")
        released = await backend.acquire("gone")
        await backend.release(released)
        requests: list[Any] = [
            (slot, "python", {"code": "1"}),
            (slot, "bash", {}),
            (slot, "bash", {"command": "true", "cwd": "/"}),
            (slot, "bash", {"command": ["ls"]}),
            (slot, "bash", {"command": "true", "timeout": -1}),
            (slot, "write_file", {"path": "x", "content": 3}),
            (slot, "read_file", "x"),
            ("not-a-slot", "bash", {"command": "true"}),
            (released, "bash", {"command": "true"}),
            (slot, "bash", {"command": "echo fine"}),
        ]
        results = await backend.execute_batch(requests)
        errors = [result.error for result in results]
        assert errors[0] == (
            "unknown tool 'python'; available tools: bash, terminal, read_file, write_file"
        )
        expected = "{command, allow_network?, background?, require_sandbox?, shell?, timeout?}"
        assert errors[1] == f"bash: missing 'command' argument(s); expected {expected}"
        assert errors[2] == f"bash: unknown 'cwd' argument(s); expected {expected}"
        assert errors[3] == "bash: 'command' must be a str, got list"
        assert errors[4] == "bash: 'timeout' must be a number > 0, got -1"
        assert errors[5] == "write_file: 'content' must be str or bytes, got int"
        assert errors[6] == "read_file: args must be a mapping, got str"
        assert errors[7] == "expected a Slot from acquire(), got str"
        assert errors[8] is not None
        assert errors[8].startswith(f"slot {released.slot_id} is not held by this backend")
        assert [result.success for result in results] == [False] * 9 + [True]
        assert results[9].output == "fine\n"
        assert all("infra_error" not in result.metadata for result in results)


async def test_bash_output_exit_status_and_timeout() -> None:
    """bash gives stdout then stderr, success only for exit 0, and a killed command on timeout."""
    async with ToolBackend(local_config()) as backend:
        slot = await backend.acquire("t")
        failed, timed_out, default_timeout = await backend.execute_batch(
            [
                (slot, "bash", {"command": "echo out; echo err >&2; exit 3"}),
                (slot, "bash", {"command": "echo partial; sleep 30", "timeout": 0.3}),
                (slot, "bash", {"command": "sleep 30"}),
            ],
            timeout_s=0.2,
        )
        assert failed.output == "out\nerr\n"
        assert (failed.success, failed.error) == (False, "command exited with status 3")
        assert failed.metadata["exit_code"] == 3
        assert timed_out.success is False
        assert timed_out.output == "partial\n"
        assert timed_out.metadata["timed_out"] is True
        assert timed_out.error == "command timed out after 0.3 s (its processes were killed)"
        assert 0.3 <= timed_out.metadata["duration_s"] < 5
        assert default_timeout.metadata["timed_out"] is True
        assert default_timeout.error == "command timed out after 0.2 s (its processes were killed)"


async def test_default_timeout_applies_when_the_call_gives_none() -> None:
    """default_timeout_s bounds a bash call that gives no timeout, in a batch that gives none."""
    backend = ToolBackend(local_config(execution_timeout_s=42.0))
    assert backend.default_timeout_s == 42.0
    backend.default_timeout_s = 0.2
    with pytest.raises(ValueError, match="default_timeout_s must be a number > 0"):
        backend.default_timeout_s = 0
    async with backend:
        slot = await backend.acquire("t")
        [result] = await backend.execute_batch([(slot, "bash", {"command": "sleep 30"})])
        assert result.metadata["timed_out"] is True


async def test_output_beyond_the_cap_keeps_head_and_tail_and_counts_drops() -> None:
    """Output over max_output_bytes keeps its head and tail, marks the gap and counts drops."""
    async with ToolBackend(local_config(max_output_bytes=1000)) as backend:
        slot = await backend.acquire("t")
        [result] = await backend.execute_batch(
            [
                (slot, "bash", {"command": "head -c 3000 /dev/zero | tr '\\0' a; printf END"}),
            ]
        )
        assert result.metadata["stdout_dropped"] == 2003
        assert result.output.startswith("a" * 500 + "\n[... 2003 bytes of stdout omitted ...]\n")
        assert result.output.endswith("a" * 497 + "END")


async def test_files_and_artifacts() -> None:
    """write_file/read_file round-trip; artifacts are read, listed, archived, failures reported."""
    async with ToolBackend(local_config()) as backend:
        slot = await backend.acquire("t")
        write, read, missing = await backend.execute_batch(
            [
                (slot, "write_file", {"path": "out/report.txt", "content": "héllo"}),
                (slot, "read_file", {"path": "out/report.txt"}),
                (slot, "read_file", {"path": "nope.txt"}),
            ]
        )
        assert (write.success, write.output) == (True, "wrote 6 bytes to out/report.txt")
        assert (read.success, read.output) == (True, "héllo")
        assert missing.success is False
        assert missing.error is not None
        assert "not_found" in missing.error
        artifact = await backend.read_artifact(slot, "out/report.txt")
        assert (artifact["success"], artifact["content"]) == (True, "héllo")
        listing = await backend.list_artifacts(slot, "out")
        assert [(entry["is_dir"], entry["size"]) for entry in listing["entries"]] == [(False, 6)]
        archive = await backend.archive_artifacts(slot, "out")
        assert base64.b64decode(archive["content"])[:2] == b"\x1f\x8b"
        await backend.execute_batch(
            [(slot, "bash", {"command": "head -c 200000 /dev/urandom > out/noise.bin"})]
        )
        too_large = await backend.archive_artifacts(slot, "out", max_bytes=10_000)
        assert too_large["success"] is False
        assert str(ArtifactTooLarge("out", 10_000)) == too_large["error"]
        escape = await backend.archive_artifacts(slot, "../..")
        assert escape["error"] == str(
            AgentError("path_escape", "'../..' is not a path inside the workspace")
        )
        missing_dir = await backend.archive_artifacts(slot, "no-such-dir")
        assert missing_dir["success"] is False
        assert "could not archive 'no-such-dir'" in missing_dir["error"]


# -- lifecycle ---------------------------------------------------------------------------------


async def test_async_with_runs_the_runtime_in_the_callers_trio_run() -> None:
    """Inside `async with`, the runtime runs in the caller's nursery: no portal thread."""
    backend = ModalToolBackend.with_profiles(
        profiles={"default": local_config(), "other": local_config(min_sandboxes=0)},
        app_name="facade-test",
    )
    assert backend.profiles.get_profile("other").app_name == "facade-test-other"
    async with backend:
        assert backend.running
        assert not [t for t in threading.enumerate() if t.name.startswith("hermes-actors-portal")]
        slot = await backend.acquire("t", profile="other")
        assert slot.profile == "other"
        status = backend.status()
        assert {pool.profile for pool in status.pools} == {"default", "other"}
        assert "other" in format_status(status)
    assert not backend.running
    assert backend.status().pools == ()


async def test_lazy_start_from_trio_without_async_with_uses_the_portal() -> None:
    """Without `start()` or `async with`, acquire starts the backend (on a portal thread)."""
    backend = ToolBackend(local_config())
    assert not backend.running
    try:
        slot = await backend.acquire("t")
        assert backend.running
        [result] = await backend.execute_batch([(slot, "bash", {"command": "echo lazy"})])
        assert result.output == "lazy\n"
        assert slots_held(backend) == 1
        await backend.release(slot)
        assert slots_held(backend) == 0
    finally:
        await backend.stop()
    assert not backend.running
    assert not [t for t in threading.enumerate() if t.name.startswith("hermes-actors-portal")]


async def test_stop_terminates_every_sandbox_and_process() -> None:
    """stop() kills running commands and background processes and terminates every sandbox."""
    token = f"hermes-stop-{secrets.token_hex(4)}"
    backend = ToolBackend(local_config(min_sandboxes=2))
    try:
        await backend.start()
        slot = await backend.acquire("t")
        [result] = await backend.execute_batch(
            [(slot, "bash", {"command": f"({sleeper(token)}) > /dev/null 2>&1 & echo started"})]
        )
        assert result.output == "started\n"
        ids = sandbox_ids(backend)
        assert len(ids) == 2
        # The background subshell may not have exec'd its renamed sleep yet.
        await eventually(lambda: bool(processes_with(token)))
        await backend.stop()
        assert processes_with(token) == []
        assert sandbox_processes(ids) == []
        # A stopped backend starts again on use.
        slot = await backend.acquire("again")
        assert slot.sandbox_id not in ids
    finally:
        await backend.stop()


async def test_unknown_profile_is_a_config_error() -> None:
    """acquire with an unknown profile raises ConfigError naming the known profiles."""
    async with ToolBackend(local_config()) as backend:
        with pytest.raises(ConfigError, match=r"no profile named 'gpu'; known profiles: 'default'"):
            await backend.acquire("t", profile="gpu")
        assert slots_held(backend) == 0


async def test_a_lost_sandbox_gives_retryable_infra_results_and_a_new_acquire_works() -> None:
    """Killing a sandbox's agent mid-batch gives infra_error/retryable results, not a hang."""
    async with ToolBackend(local_config(slots_per_sandbox=1, max_sandboxes=3)) as backend:
        doomed, healthy = await backend.acquire("doomed"), await backend.acquire("healthy")
        assert doomed.sandbox_id != healthy.sandbox_id

        async def kill_soon() -> None:
            await trio.sleep(0.5)
            kill_agent(doomed.sandbox_id)

        # Bounded: a reply that is never resolved must fail the test, not hang it.
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(kill_soon)
                lost, after, fine = await backend.execute_batch(
                    [
                        (doomed, "bash", {"command": "sleep 30"}),
                        (doomed, "bash", {"command": "echo never"}),
                        (healthy, "bash", {"command": "sleep 1; echo fine"}),
                    ]
                )
        for result in (lost, after):
            assert result.success is False
            assert result.metadata["infra_error"] == "sandbox_lost"
            assert result.metadata["retryable"] is True
            assert result.error is not None
            assert doomed.sandbox_id in result.error
        assert (fine.success, fine.output) == (True, "fine\n")
        await backend.release(doomed)
        fresh = await backend.acquire("retry")
        assert fresh.sandbox_id != doomed.sandbox_id
        [result] = await backend.execute_batch([(fresh, "bash", {"command": "echo again"})])
        assert result.output == "again\n"


# -- cancellation at every await ---------------------------------------------------------------


class _CancelAfterSteps(trio.abc.Instrument):
    """Cancels `scope` after `steps` task steps of the run (the caller's and the runtime's).

    Counting every task's steps, not only the caller's, moves the cancellation across every
    await on the operation's path, including those in the tasks it waits for.
    """

    def __init__(self, steps: int, scope: trio.CancelScope) -> None:
        self.steps, self.scope, self.count = steps, scope, 0

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        self.count += 1
        if self.count == self.steps:
            self.scope.cancel()


async def cancel_at_every_await(
    operation: Callable[[], Awaitable[object]],
    check: Callable[[], Awaitable[None]],
    max_steps: int = 3000,
) -> int:
    """Run `operation` cancelled after 1, 2, ... task steps until it completes; `check` each time.

    Returns how many distinct cancellation points were exercised.
    """
    for steps in range(1, max_steps):
        with trio.CancelScope() as scope:
            instrument = _CancelAfterSteps(steps, scope)
            trio.lowlevel.add_instrument(instrument)
            try:
                await operation()
            finally:
                trio.lowlevel.remove_instrument(instrument)
        await check()
        if not scope.cancelled_caught:
            return steps - 1
    raise AssertionError("the operation never completed")


async def test_cancelling_execute_batch_kills_its_real_processes() -> None:
    """A cancelled batch kills its commands' processes and leaves the slots usable."""
    token = f"hermes-batch-{secrets.token_hex(4)}"
    async with ToolBackend(local_config()) as backend:
        slots = [await backend.acquire("a"), await backend.acquire("b")]
        with trio.move_on_after(0.5) as scope:
            await backend.execute_batch(
                [(slot, "bash", {"command": sleeper(token)}) for slot in slots]
            )
        assert scope.cancelled_caught
        await eventually(lambda: processes_with(token) == [])
        results = await backend.execute_batch(
            [(slot, "bash", {"command": "echo ok"}) for slot in slots]
        )
        assert [result.output for result in results] == ["ok\n", "ok\n"]


async def test_cancelling_start_and_stop_at_every_await_leaves_nothing_running() -> None:
    """Entering or leaving `async with`, cancelled at any await, leaves no sandbox process."""
    seen: set[str] = set()

    async def start_and_stop() -> None:
        backend = ToolBackend(local_config())
        async with backend:
            seen.update(sandbox_ids(backend))

    async def nothing_left() -> None:
        assert sandbox_processes(seen) == []

    assert await cancel_at_every_await(start_and_stop, nothing_left) >= 2


# -- the portal (asyncio and other trio runs) --------------------------------------------------


def test_asyncio_program_uses_the_same_api() -> None:
    """From asyncio, the same awaits work (the runtime runs on a portal thread)."""

    async def main() -> list[ExecutionResult]:
        async with ToolBackend(local_config()) as backend:
            slots = [await backend.acquire(f"t{index}") for index in range(3)]
            results = await backend.execute_batch(
                [
                    (slot, "bash", {"command": f"sleep 0.3; echo {index}"})
                    for index, slot in enumerate(slots)
                ]
            )
            assert slots_held(backend) == 3
            for slot in slots:
                await backend.release(slot)
            assert slots_held(backend) == 0
            return results

    started = time.monotonic()
    results = asyncio.run(main())
    assert time.monotonic() - started < 10
    assert [result.output for result in results] == ["0\n", "1\n", "2\n"]
    assert not [t for t in threading.enumerate() if t.name.startswith("hermes-actors-portal")]


def test_cancelling_asyncio_callers_kills_commands_and_leaks_no_slot() -> None:
    """A cancelled asyncio task cancels its work in the portal: no slot held, no process left."""
    token = f"hermes-aio-{secrets.token_hex(4)}"

    async def main() -> None:
        backend = ToolBackend(local_config())
        await backend.start()
        try:
            for delay in (0.0, 0.001, 0.003, 0.01, 0.03, 0.1):
                task = asyncio.create_task(backend.acquire("t"))
                await asyncio.sleep(delay)
                task.cancel()
                try:
                    slot = await task
                except asyncio.CancelledError:
                    pass
                else:  # it finished before the cancel: a normal slot, released normally
                    await backend.release(slot)
                for _ in range(200):
                    if slots_held(backend) == 0:
                        break
                    await asyncio.sleep(0.02)
                assert slots_held(backend) == 0

            slot = await backend.acquire("t")
            batch = asyncio.create_task(
                backend.execute_batch([(slot, "bash", {"command": sleeper(token)})])
            )
            await asyncio.sleep(0.5)
            assert processes_with(token)
            batch.cancel()
            with pytest.raises(asyncio.CancelledError):
                await batch
            for _ in range(250):
                if not processes_with(token):
                    break
                await asyncio.sleep(0.02)
            assert processes_with(token) == []
            [result] = await backend.execute_batch([(slot, "bash", {"command": "echo ok"})])
            assert result.output == "ok\n"
            assert slots_held(backend) == 1
        finally:
            await backend.stop()

    asyncio.run(main())


async def test_cancelling_a_trio_caller_of_the_portal_cancels_the_work() -> None:
    """A trio caller outside the runtime's run, when cancelled, has its command killed."""
    token = f"hermes-trio-portal-{secrets.token_hex(4)}"
    backend = ToolBackend(local_config())
    try:
        slot = await backend.acquire("t")
        with trio.move_on_after(0.5) as scope:
            await backend.execute_batch([(slot, "bash", {"command": sleeper(token)})])
        assert scope.cancelled_caught
        await eventually(lambda: processes_with(token) == [])
        [result] = await backend.execute_batch([(slot, "bash", {"command": "echo ok"})])
        assert result.output == "ok\n"
    finally:
        await backend.stop()


def test_sync_callers_use_call_blocking() -> None:
    """call_blocking runs the async methods from sync code; stop_sync ends everything."""
    backend = ToolBackend(local_config())
    try:
        slot = backend.call_blocking(backend.acquire, "t")
        [result] = backend.call_blocking(
            backend.execute_batch, [(slot, "bash", {"command": "echo sync"})]
        )
        assert result.output == "sync\n"
        ids = sandbox_ids(backend)
    finally:
        backend.stop_sync()
    assert sandbox_processes(ids) == []
    assert not backend.running


# -- status for people -------------------------------------------------------------------------
