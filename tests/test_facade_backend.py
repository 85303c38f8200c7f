"""ToolBackend end to end on real processes: output, files and artifacts, stop, the portal.

Ordering, timeouts, cancellation (also of asyncio and other trio callers of the portal) and lost
sandboxes are tested on the fake driver (test_facade_fake.py); here each test needs what only
real processes show: real output, real files and archives, processes that are gone after a
stop, and the portal thread serving asyncio, sync and other trio callers.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import threading
import time
from typing import Any

import trio

from hermes_actors import (
    AgentError,
    ArtifactTooLarge,
    ExecutionResult,
    SandboxConfig,
    ToolBackend,
)
from hermes_actors.drivers._local import SANDBOX_MARKER_VAR
from proc_support import eventually, pids_with_env
from sandbox_support import processes_with


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
    markers = [f"{SANDBOX_MARKER_VAR}={sandbox_id}" for sandbox_id in ids]
    return [pid for marker in markers for pid in pids_with_env(marker)]


def sleeper(token: str, seconds: int = 30) -> str:
    """A shell command whose process is findable by `token` in its command line."""
    return f"exec -a {token} sleep {seconds}"


# -- batches and tools -------------------------------------------------------------------------


async def test_bash_output_and_exit_status() -> None:
    """bash gives stdout then stderr, and success only for exit 0."""
    async with ToolBackend(local_config()) as backend:
        slot = await backend.acquire("t")
        failed, fine = await backend.execute_batch(
            [
                (slot, "bash", {"command": "echo out; echo err >&2; exit 3"}),
                (slot, "bash", {"command": "echo fine"}),
            ]
        )
        assert failed.output == "out\nerr\n"
        assert (failed.success, failed.error) == (False, "command exited with status 3")
        assert failed.metadata["exit_code"] == 3
        assert (fine.success, fine.output, fine.error) == (True, "fine\n", "")


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


async def test_a_release_keeps_the_shell_only_where_the_profile_says_so() -> None:
    """reuse_shell keeps a slot's idle shell for its next lease, set back; by default a new one."""
    shell_pids = {}
    for reuse in (False, True):
        config = local_config(slots_per_sandbox=1, max_sandboxes=1, reuse_shell=reuse)
        async with ToolBackend(config) as backend:
            pids = []
            for lease in range(2):
                slot = await backend.acquire(f"t{lease}")
                [result] = await backend.execute_batch(
                    [(slot, "bash", {"command": 'echo "$$ [${SEEN-}]"; export SEEN=1'})]
                )
                pid, seen = result.output.split()
                assert seen == "[]", result.output
                pids.append(pid)
                await backend.release(slot)
            shell_pids[reuse] = pids
    assert shell_pids[False][0] != shell_pids[False][1]
    assert shell_pids[True][0] == shell_pids[True][1]


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


async def test_queued_fresh_commands_start_when_the_one_before_ends() -> None:
    """A slot's next queued command starts as soon as the one before it ends, not at the next
    frame from the host: with a heartbeat 200 s apart, rounds of 40 slots never stall."""
    config = SandboxConfig(
        name="wake",
        backend="local",
        isolation="none",
        shell="fresh",
        slots_per_sandbox=10,
        min_sandboxes=4,
        max_sandboxes=4,
        max_starting=4,
        agent_ttl_s=600.0,
    )
    async with ToolBackend(config) as backend:
        slots = [await backend.acquire(f"wake-{n}") for n in range(40)]
        batch = [(slot, "bash", {"command": "echo hi"}) for _ in range(10) for slot in slots]
        for _ in range(5):
            # A hang guard, not a speed target: a lost wakeup waits for the 200 s heartbeat.
            with trio.fail_after(100):
                results = await backend.execute_batch(batch)
            assert [result.output for result in results] == ["hi\n"] * len(batch)
        for slot in slots:
            await backend.release(slot)
