"""ModalToolBackend driven the way the original Hermes Agent's Atropos code drives it (issue 10).

The original's `ToolExecutor` and `AgentEnv` stay out of this repository; `OriginalShapedExecutor`
below is our own restatement of the calls they make, in their order and with their argument
shapes: the backend comes from `ModalSandboxConfig.from_agent_env_config(env_config)` and is
started with `start()`; a batching loop collects tool calls for a 20 ms window, acquires one
slot per new trajectory with `acquire(trajectory_id)` (positional, concurrently), groups calls by
timeout (the call's `timeout` clamped to [1, 600], else `backend.default_timeout_s`, else 30 s),
rewrites `terminal` to `bash` (dropping `timeout`, keeping `background`), adds the env's
`allow_network` and `require_sandbox` to every `bash` call, sends `execute_batch(requests,
timeout_s=...)` and turns each result into the agent's result with `result.to_tool_result()`,
setting its `uniq_id`; an exception in that step ends the loop, as it does in the original. A
trajectory ends with `release(slot, reset_workspace=True)`; closing releases what is left with
`reset_workspace=False`, then `stop(purge=True)`.

The only line not written as a Hermes user writes it is the one that points the config at the
local backend (the Modal names default to Modal).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import re
import runpy
import tarfile
import time
import uuid
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import attrs
import pytest
import trio

from hermes_actors import ConfigError, ModalSandboxConfig, ModalToolBackend
from hermes_actors.drivers._local import HOST_PID_VAR, bwrap_problem
from hermes_actors.testing.modal_emulator import ModalEmulator
from proc_support import cmdline, pids_with_env

#: Trajectories and tool calls per trajectory of the drop-in workload.
TRAJECTORIES = 32
CALLS_PER_TRAJECTORY = 5


# -- the caller: our restatement of the original's executor and env --------------------------------


def agent_env_config(**changes: Any) -> SimpleNamespace:
    """An object with the attributes (and defaults) of the original's `AgentEnvConfig`."""
    settings: dict[str, Any] = {
        "tool_pool_mode": "modal",
        "allow_network": True,
        "require_sandbox": False,
        "require_stateful_sandbox": False,
        "tool_batch_window_ms": 20,
        "tool_max_batch_size": 200,
        "purge_job_on_shutdown": True,
        "modal_app_name": "atropos-sandbox",
        "modal_image": "python:3.11",
        "modal_gpu": None,
        "modal_cpu": 1.0,
        "modal_memory": 2048,
        "modal_slots_per_sandbox": 10,
        "modal_min_sandboxes": 1,
        "modal_max_sandboxes": 5,
        "modal_idle_timeout": 120,
        "modal_max_lifetime": 3600,
        "modal_acquire_timeout": 60.0,
        "modal_execution_timeout": 30.0,
        "modal_secrets": "",
        "modal_env_vars": "",
        "modal_workspace_base": "/data",
    }
    settings.update(changes)
    return SimpleNamespace(**settings)


def local_backend(env_config: SimpleNamespace, *, isolation: str = "none") -> ModalToolBackend:
    """The backend the env builds, pointed at the local backend (the one test-only line)."""
    config = ModalSandboxConfig.from_agent_env_config(env_config)
    return ModalToolBackend(attrs.evolve(config, backend="local", isolation=isolation))


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]
    uniq_id: str = field(default_factory=lambda: str(uuid.uuid4()))


@dataclass
class Queued:
    trajectory_id: str
    call: ToolCall
    timeout_s: float | None
    future: asyncio.Future[Any]


class OriginalShapedExecutor:
    """Batches tool calls of many trajectories onto a backend, as the original executor does."""

    def __init__(self, backend: Any, env_config: SimpleNamespace) -> None:
        self.backend = backend
        self.env_config = env_config
        self.queue: asyncio.Queue[Queued | None] = asyncio.Queue()
        self.slots: dict[str, Any] = {}
        self.slots_lock = asyncio.Lock()
        self.loop_task: asyncio.Task[None] | None = None
        self.stopping = False
        self.batches_sent = 0

    async def start(self) -> None:
        self.loop_task = asyncio.create_task(self.run_loop())

    async def execute(self, trajectory_id: str, call: ToolCall) -> Any:
        timeout_s: float | None = None
        requested = call.arguments.get("timeout")
        if isinstance(requested, int | float):
            timeout_s = max(1.0, min(float(requested), 600.0))
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        await self.queue.put(Queued(trajectory_id, call, timeout_s, future))
        return await future

    async def release_trajectory(self, trajectory_id: str, reset_workspace: bool = False) -> None:
        async with self.slots_lock:
            slot = self.slots.pop(trajectory_id, None)
        if slot is not None:
            await self.backend.release(slot, reset_workspace=reset_workspace)

    async def close(self) -> None:
        self.stopping = True
        await self.queue.put(None)
        if self.loop_task is not None:
            await self.loop_task
        async with self.slots_lock:
            left, self.slots = list(self.slots.values()), {}
        for slot in left:
            await self.backend.release(slot, reset_workspace=False)

    async def slot_for(self, trajectory_id: str) -> Any:
        async with self.slots_lock:
            if trajectory_id in self.slots:
                return self.slots[trajectory_id]
        slot = await self.backend.acquire(trajectory_id)
        async with self.slots_lock:
            if trajectory_id in self.slots:
                await self.backend.release(slot, reset_workspace=False)
                return self.slots[trajectory_id]
            self.slots[trajectory_id] = slot
            return slot

    async def run_loop(self) -> None:
        window_s = self.env_config.tool_batch_window_ms / 1000
        pending: list[Queued] = []
        deadline = 0.0
        while not (self.stopping and self.queue.empty() and not pending):
            wait = max(0.0, deadline - time.perf_counter()) if pending else None
            try:
                item = await asyncio.wait_for(self.queue.get(), timeout=wait)
            except TimeoutError:
                item = None
            else:
                if item is None:
                    continue
                pending.append(item)
                if len(pending) == 1:
                    deadline = time.perf_counter() + window_s
                if len(pending) < self.env_config.tool_max_batch_size:
                    continue
            if pending:
                batch, pending = pending, []
                await self.run_batch(batch)

    async def run_batch(self, batch: list[Queued]) -> None:
        trajectory_ids = list({item.trajectory_id for item in batch})
        slots = await asyncio.gather(*(self.slot_for(tid) for tid in trajectory_ids))
        slot_of = dict(zip(trajectory_ids, slots, strict=True))
        by_timeout: dict[float, list[Queued]] = {}
        for item in batch:
            timeout_s = item.timeout_s
            if timeout_s is None:
                timeout_s = self.backend.default_timeout_s
            if timeout_s is None:
                timeout_s = 30.0
            by_timeout.setdefault(float(timeout_s), []).append(item)
        for timeout_s, items in by_timeout.items():
            requests = []
            for item in items:
                tool, args = item.call.name, dict(item.call.arguments)
                if tool == "terminal":
                    tool = "bash"
                    args.pop("timeout", None)
                if tool == "bash":
                    args.pop("allow_network", None)
                    args.pop("require_sandbox", None)
                    args["allow_network"] = bool(self.env_config.allow_network)
                    args["require_sandbox"] = bool(self.env_config.require_sandbox)
                    args.pop("timeout", None)
                requests.append((slot_of[item.trajectory_id], tool, args))
            results = await self.backend.execute_batch(requests, timeout_s=timeout_s)
            self.batches_sent += 1
            for item, result in zip(items, results, strict=True):
                tool_result = result.to_tool_result()
                tool_result.uniq_id = item.call.uniq_id
                if not item.future.done():
                    item.future.set_result(tool_result)


async def with_deadline(awaitable: Any, seconds: float = 60.0) -> Any:
    """A caller that would wait forever (a dead batching loop) fails the test instead."""
    return await asyncio.wait_for(awaitable, timeout=seconds)


def sandbox_processes() -> list[int]:
    """Live processes of the local sandboxes this test process started (each carries its
    host's pid); sandboxes of tests running beside it, in other processes, are not counted."""
    return pids_with_env(f"{HOST_PID_VAR}={os.getpid()}")


def slot_counts(backend: Any) -> tuple[int, int]:
    """(total, available) slots over every pool, from the original's `get_status()` shape."""
    status = backend.get_status()
    pools = status["pools"].values() if "pools" in status else [status]
    return (
        sum(pool["total_slots"] for pool in pools),
        sum(pool["available_slots"] for pool in pools),
    )


# -- the drop-in workload --------------------------------------------------------------------------


def trajectory_calls(index: int) -> list[tuple[ToolCall, Any]]:
    """Five calls of the shapes models send, each with a check of its result."""

    def ok_output(expected: str) -> Any:
        def check(result: Any) -> bool:
            return bool(result.success and result.error == "" and result.output.strip() == expected)

        return check

    def returncode_zero(result: Any) -> bool:
        return bool(result.success and result.metadata.get("returncode") == 0)

    return [
        (ToolCall("write_file", {"path": "notes/plan.txt", "content": f"trajectory {index}\n"}),
         lambda result: result.success and result.error == ""),
        (ToolCall("terminal", {"command": "cat notes/plan.txt", "timeout": 20}),
         ok_output(f"trajectory {index}")),
        (ToolCall("bash", {"command": f"echo {index} > out.txt && cat out.txt"}),
         lambda result: returncode_zero(result) and result.output.strip() == str(index)),
        (ToolCall("read_file", {"path": "out.txt"}), ok_output(str(index))),
        (ToolCall("terminal", {"command": "ls notes", "background": False}),
         ok_output("plan.txt")),
    ]  # fmt: skip


async def run_original_shaped_workload(
    trajectories: int = TRAJECTORIES,
    env_config: SimpleNamespace | None = None,
    backend: Any = None,
) -> tuple[int, int, float, list[str]]:
    """Run the workload; return (calls that succeeded, calls made, seconds, problems seen)."""
    env_config = env_config or agent_env_config()
    backend = backend or local_backend(env_config)
    await backend.start()
    executor = OriginalShapedExecutor(backend, env_config)
    await executor.start()
    problems: list[str] = []
    succeeded = 0

    async def trajectory(index: int) -> None:
        nonlocal succeeded
        trajectory_id = str(uuid.uuid4())
        try:
            for call, check in trajectory_calls(index):
                result = await with_deadline(executor.execute(trajectory_id, call))
                if result.uniq_id != call.uniq_id:
                    problems.append(f"{call.name}: uniq_id {result.uniq_id!r}")
                elif check(result):
                    succeeded += 1
                else:
                    problems.append(f"{call.name}: {result.to_dict()!r}")
        finally:
            await executor.release_trajectory(trajectory_id, reset_workspace=True)

    started = time.perf_counter()
    try:
        await asyncio.gather(*(trajectory(index) for index in range(trajectories)))
        elapsed = time.perf_counter() - started
        total, available = slot_counts(backend)
        if total != available:
            problems.append(f"{total - available} slots still held after every trajectory")
    finally:
        await executor.close()
        await backend.stop(purge=True)
    return succeeded, trajectories * CALLS_PER_TRAJECTORY, elapsed, problems


def test_original_shaped_executor_runs_32_trajectories_of_5_calls() -> None:
    """32 concurrent trajectories x 5 calls through the original's call pattern all succeed,
    and the backend's sandbox processes are gone after its stop."""
    before = set(sandbox_processes())
    succeeded, calls, _, problems = asyncio.run(run_original_shaped_workload())
    assert problems == []
    assert succeeded == calls == TRAJECTORIES * CALLS_PER_TRAJECTORY
    assert set(sandbox_processes()) - before == set()


def test_original_shaped_executor_on_modal_with_the_strict_policy(
    modal_emulator: ModalEmulator,
) -> None:
    """On the modal backend (emulated) require_sandbox and allow_network=False are met."""
    env_config = agent_env_config(
        require_sandbox=True,
        allow_network=False,
        modal_cpu=0.5,
        modal_memory=256,
        modal_slots_per_sandbox=4,
        modal_max_sandboxes=2,
    )
    config = ModalSandboxConfig.from_agent_env_config(env_config)
    backend = ModalToolBackend(attrs.evolve(config, backend="modal"), run_id="compat-tests")
    succeeded, calls, _, problems = asyncio.run(
        run_original_shaped_workload(8, env_config, backend)
    )
    assert problems == []
    assert succeeded == calls == 8 * CALLS_PER_TRAJECTORY
    sandboxes = modal_emulator.sandboxes()
    assert 1 <= len(sandboxes) <= 2
    assert all(state.returncode is not None for state in sandboxes)


# -- results: the original's shape alongside ours --------------------------------------------------


def test_results_have_the_original_shape_and_convert_to_tool_results() -> None:
    """Success has error '' and metadata['returncode']; to_tool_result gives a settable result."""

    async def main() -> None:
        async with local_backend(agent_env_config()) as backend:
            slot = await backend.acquire("t")
            ok, failed, timed_out = await backend.execute_batch(
                [
                    (slot, "bash", {"command": "echo hi"}),
                    (slot, "bash", {"command": "echo oops >&2; exit 3"}),
                    (slot, "bash", {"command": "sleep 5"}),
                ],
                timeout_s=0.3,
            )
            assert (ok.success, ok.output, ok.error) == (True, "hi\n", "")
            assert ok.metadata["returncode"] == ok.metadata["exit_code"] == 0
            assert (failed.success, failed.output) == (False, "oops\n")
            assert failed.error == "command exited with status 3"
            assert failed.metadata["returncode"] == 3
            assert not timed_out.success
            assert timed_out.metadata["returncode"] == 124
            assert "timed out" in timed_out.error

            converted = ok.to_tool_result()
            assert converted.uniq_id == ok.execution_id
            converted.uniq_id = "call-1"
            assert converted.to_dict() == {
                "success": True,
                "output": "hi\n",
                "error": "",
                "metadata": dict(ok.metadata),
                "uniq_id": "call-1",
            }
            xml = failed.to_tool_result().to_xml()
            assert xml.startswith("<tool_response>")
            assert xml.endswith("</tool_response>")
            payload = json.loads(
                xml.removeprefix("<tool_response>").removesuffix("</tool_response>")
            )
            assert payload["success"] is False
            assert payload["error"] == "command exited with status 3"
            assert payload["metadata"]["returncode"] == 3
            await backend.release(slot)

    asyncio.run(main())


# -- the per-call policy the executor adds: require_sandbox, allow_network -------------------------


def bwrap_works() -> bool:
    return trio.run(bwrap_problem) is None


def test_require_sandbox_never_runs_a_command_without_isolation() -> None:
    """require_sandbox=True on an unisolated sandbox is an error result and nothing runs."""

    async def main() -> None:
        async with local_backend(agent_env_config(), isolation="none") as backend:
            slot = await backend.acquire("t")
            refused, allowed, listing = await backend.execute_batch(
                [
                    (slot, "bash", {"command": "touch ran", "require_sandbox": True,
                                    "allow_network": True}),
                    (slot, "bash", {"command": "echo fine", "require_sandbox": False,
                                    "allow_network": True}),
                    (slot, "bash", {"command": "ls"}),
                ]
            )  # fmt: skip
            assert not refused.success
            assert "require_sandbox" in refused.error
            assert "isolation" in refused.error
            assert refused.metadata["returncode"] is None
            assert allowed.success
            assert allowed.output == "fine\n"
            assert "ran" not in listing.output.split()
            await backend.release(slot)

    asyncio.run(main())


@pytest.mark.skipif(not bwrap_works(), reason="bubblewrap does not work on this machine")
def test_require_sandbox_and_no_network_run_under_bubblewrap() -> None:
    """Under bubblewrap require_sandbox is met, and allow_network=False finds no network."""

    async def main() -> None:
        async with local_backend(agent_env_config(), isolation="bwrap") as backend:
            slot = await backend.acquire("t")
            interfaces = "tail -n +3 /proc/net/dev | cut -d: -f1"
            policy = {"require_sandbox": True, "allow_network": False}
            [result] = await backend.execute_batch(
                [(slot, "bash", {"command": interfaces, **policy})]
            )
            assert result.success, result.error
            assert result.output.split() == ["lo"]
            assert result.metadata["network"] is False
            await backend.release(slot)

    asyncio.run(main())


def test_allow_network_is_applied_or_the_result_says_it_could_not_be() -> None:
    """No network where the backend cannot take it away: refused; network not available: said."""

    async def main() -> None:
        async with local_backend(agent_env_config(), isolation="none") as backend:
            slot = await backend.acquire("t")
            refused, unmet = await backend.execute_batch(
                [
                    (slot, "bash", {"command": "touch ran", "allow_network": False}),
                    (slot, "bash", {"command": "ls", "allow_network": True}),
                ]
            )
            assert not refused.success
            assert "allow_network=False" in refused.error
            assert unmet.success
            assert "ran" not in unmet.output.split()
            assert unmet.metadata["network"] is True
            await backend.release(slot)

    asyncio.run(main())
    if bwrap_works():

        async def isolated() -> None:
            async with local_backend(agent_env_config(), isolation="bwrap") as backend:
                slot = await backend.acquire("t")
                [result] = await backend.execute_batch(
                    [(slot, "bash", {"command": "echo ran", "allow_network": True})]
                )
                assert result.success
                assert result.output == "ran\n"
                assert result.metadata["network"] is False
                assert "allow_network=True could not be met" in result.metadata["network_note"]
                await backend.release(slot)

        asyncio.run(isolated())


def test_policy_arguments_of_the_wrong_type_are_bad_requests() -> None:
    """allow_network / require_sandbox / background must be bools: anything else is refused."""

    async def main() -> None:
        async with local_backend(agent_env_config()) as backend:
            slot = await backend.acquire("t")
            results = await backend.execute_batch(
                [
                    (slot, "bash", {"command": "true", "require_sandbox": "yes"}),
                    (slot, "bash", {"command": "true", "allow_network": 1}),
                    (slot, "bash", {"command": "true", "background": "no"}),
                ]
            )
            for result, name in zip(
                results, ["require_sandbox", "allow_network", "background"], strict=True
            ):
                assert not result.success
                assert f"{name!r} must be a bool" in result.error
            await backend.release(slot)

    asyncio.run(main())


def test_background_bash_calls_run_detached_until_the_slot_is_reset() -> None:
    """background=True returns at once with the pid and log; a reset release kills it."""

    async def main() -> None:
        async with local_backend(agent_env_config()) as backend:
            slot = await backend.acquire("t")
            started = time.perf_counter()
            [detached] = await backend.execute_batch(
                [(slot, "bash", {"command": "echo up; sleep 60", "background": True})]
            )
            assert time.perf_counter() - started < 5
            assert detached.success, detached.error
            pid = detached.metadata["background_pid"]
            log = detached.metadata["background_log"]
            assert (
                detached.output
                == f"started in the background (pid {pid}); its output goes to {log}"
            )
            assert log.startswith(slot.workspace_dir + "/")
            for _ in range(100):
                # The detached job opens its log itself, maybe after the start has replied.
                reading = f"cat {log} 2>/dev/null || true"
                [read] = await backend.execute_batch([(slot, "bash", {"command": reading})])
                assert read.success, read.error
                if read.output:
                    break
                await asyncio.sleep(0.05)
            assert read.output == "up\n"
            [alive] = await backend.execute_batch([(slot, "bash", {"command": f"kill -0 {pid}"})])
            assert alive.success
            await backend.release(slot, reset_workspace=True)
            assert b"sleep 60" not in cmdline(pid)

    asyncio.run(main())


# -- artifacts: the original's arguments and payloads ----------------------------------------------

READ_KEYS = {"success", "content", "error", "encoding", "truncated", "bytes", "file_size", "path",
             "mime", "sha256"}  # fmt: skip
LIST_KEYS = {"success", "entries", "truncated", "error"}
ARCHIVE_KEYS = {"success", "content", "error", "encoding", "format", "bytes", "entry_count"}


def test_artifact_helpers_take_the_original_arguments_and_return_its_payloads() -> None:
    """read/list/archive_artifacts answer with the payload fields the executor parses."""

    async def main() -> None:
        async with local_backend(agent_env_config()) as backend:
            slot = await backend.acquire("t")
            await backend.execute_batch(
                [
                    (slot, "write_file", {"path": "out/report.txt", "content": "héllo world"}),
                    (slot, "write_file", {"path": "out/sub/data.bin", "content": "0123456789"}),
                ]
            )
            text = await backend.read_artifact(
                slot, "out/report.txt", encoding="text", max_bytes=None, include_sha256=True
            )
            assert set(text) == READ_KEYS
            data = "héllo world".encode()
            assert text["success"] is True
            assert text["content"] == "héllo world"
            assert text["error"] == ""
            assert (text["encoding"], text["truncated"]) == ("text", False)
            assert text["bytes"] == text["file_size"] == len(data)
            assert text["path"] == "out/report.txt"
            assert text["sha256"] == hashlib.sha256(data).hexdigest()

            head = await backend.read_artifact(slot, "out/sub/data.bin", encoding="base64",
                                               max_bytes=4)  # fmt: skip
            assert base64.b64decode(head["content"]) == b"0123"
            assert (head["encoding"], head["truncated"], head["bytes"]) == ("base64", True, 4)
            assert head["file_size"] == 10
            assert head["sha256"] is None

            missing = await backend.read_artifact(slot, "nope.txt")
            assert missing["success"] is False
            assert "nope.txt" in missing["error"]

            listing = await backend.list_artifacts(slot, "out", recursive=True, max_entries=None)
            assert set(listing) == LIST_KEYS
            assert listing["success"] is True
            assert listing["truncated"] is False
            by_path = {entry["path"]: entry for entry in listing["entries"]}
            assert set(by_path) == {"out/report.txt", "out/sub", "out/sub/data.bin"}
            for entry in listing["entries"]:
                assert set(entry) == {"path", "is_dir", "size", "mtime"}
                assert isinstance(entry["mtime"], float)
            assert by_path["out/sub"]["is_dir"] is True
            assert by_path["out/sub/data.bin"]["size"] == 10
            cut = await backend.list_artifacts(slot, ".", recursive=True, max_entries=1)
            assert (len(cut["entries"]), cut["truncated"]) == (1, True)

            archive = await backend.archive_artifacts(
                slot, "out", archive_format="tar.gz", max_bytes=None, max_entries=None
            )
            assert set(archive) == ARCHIVE_KEYS
            assert archive["success"] is True
            assert (archive["encoding"], archive["format"]) == ("base64", "tar.gz")
            raw = base64.b64decode(archive["content"])
            assert archive["bytes"] == len(raw)
            with tarfile.open(fileobj=io.BytesIO(raw), mode="r:gz") as tar:
                names = {member.name.removeprefix("./") for member in tar.getmembers()}
                report = tar.extractfile("out/report.txt")
                assert report is not None
                assert report.read() == data
            assert {"out/report.txt", "out/sub/data.bin"} <= names
            assert archive["entry_count"] == len(names)

            small = await backend.archive_artifacts(slot, "out", archive_format="tgz", max_bytes=10)
            assert small["success"] is False
            assert "10 bytes" in small["error"]
            few = await backend.archive_artifacts(slot, "out", max_entries=1)
            assert few["success"] is False
            assert "max_entries" in few["error"]
            plain = await backend.archive_artifacts(slot, "out", archive_format="tar")
            assert (plain["success"], plain["format"]) == (True, "tar")
            with tarfile.open(
                fileobj=io.BytesIO(base64.b64decode(plain["content"])), mode="r:"
            ) as tar:
                report = tar.extractfile("out/report.txt")
                assert report is not None
                assert report.read() == data
            zipped = await backend.archive_artifacts(slot, "out", archive_format="zip")
            assert (zipped["success"], zipped["format"]) == (True, "zip")
            raw_zip = base64.b64decode(zipped["content"])
            assert zipped["bytes"] == len(raw_zip)
            with zipfile.ZipFile(io.BytesIO(raw_zip)) as archive_zip:
                assert archive_zip.read("out/report.txt") == data
                assert archive_zip.read("out/sub/data.bin") == b"0123456789"
                assert "out/sub/" in archive_zip.namelist()
            wrong = await backend.archive_artifacts(slot, "out", archive_format="rar")
            assert wrong["success"] is False
            assert "tar.gz" in wrong["error"]
            await backend.release(slot)

    asyncio.run(main())


def test_artifact_helpers_report_bad_arguments_and_released_slots_as_failed_payloads() -> None:
    """Bad arguments, a directory read, a released slot: success False and why, never raised."""

    async def main() -> None:
        async with local_backend(agent_env_config()) as backend:
            slot = await backend.acquire("t")
            await backend.execute_batch([(slot, "bash", {"command": "mkdir d; echo x > d/f"})])
            failures = [
                (await backend.read_artifact(slot, "d/f", encoding="utf16"), "encoding must be"),
                (await backend.read_artifact(slot, "d/f", max_bytes=-1), "max_bytes must be"),
                (await backend.read_artifact(slot, "d"), "is a directory"),
                (await backend.read_artifact(slot, "../etc/passwd"), "path_escape"),
                (await backend.list_artifacts(slot, "d/f"), "not a directory"),
                (await backend.list_artifacts(slot, "d", max_entries=True), "max_entries must"),
                (await backend.archive_artifacts(slot, "d", timeout_s=0), "timeout_s must"),
            ]
            await backend.release(slot)
            failures.append((await backend.list_artifacts(slot, "d"), "is not held"))
            for payload, reason in failures:
                assert payload["success"] is False
                assert reason in payload["error"], payload

    asyncio.run(main())


# -- the rest of the surface -----------------------------------------------------------------------


def test_status_profiles_and_multi_profile_start(tmp_path: Path) -> None:
    """with_profiles (positional and profiles_file=), start(profiles_to_start=), get_status and
    list_profiles behave as the original's."""
    path = tmp_path / "profiles.yaml"
    path.write_text(
        "profiles:\n"
        "  default:\n    backend: local\n    isolation: none\n    slots_per_sandbox: 2\n"
        "  big:\n    backend: local\n    isolation: none\n    memory: 4096\n"
        "    min_sandboxes: 1\n"
    )
    from_file = ModalToolBackend.with_profiles("my-run", None, "default", profiles_file=str(path))
    assert set(from_file.list_profiles()) == {"default", "big"}
    assert from_file.list_profiles()["big"] == {
        "image": "python:3.11",
        "gpu": None,
        "cpu": 1.0,
        "memory": 4096,
        "slots_per_sandbox": 10,
        "max_sandboxes": 5,
        "active": False,
    }

    async def main() -> None:
        await from_file.start(profiles_to_start=["default", "big"])
        try:
            status = from_file.get_status()
            assert status["profiles"] == ["default", "big"]
            assert status["default_profile"] == "default"
            assert sorted(status["active_pools"]) == ["big", "default"]
            assert status["pools"]["default"]["slots_per_sandbox"] == 2
            assert status["pools"]["big"]["sandboxes"] == 1
            slot = await from_file.acquire("t", "big")
            big = from_file.get_status()["pools"]["big"]
            assert (big["healthy_sandboxes"], big["total_slots"], big["available_slots"]) == (
                1,
                10,
                9,
            )
            assert from_file.list_profiles()["big"]["active"] is True
            await from_file.release(slot)
        finally:
            await from_file.stop()

    asyncio.run(main())
    positional = ModalToolBackend.with_profiles(
        "app", {"default": ModalSandboxConfig(name="default")}, "default"
    )
    assert positional.list_profiles()["default"]["memory"] == 2048


def test_slots_carry_the_fields_the_executor_reads() -> None:
    """A slot has alloc_id, container_addr, workspace_dir, state and metadata."""

    async def main() -> None:
        async with local_backend(agent_env_config()) as backend:
            slot = await backend.acquire("traj-7")
            assert slot.trajectory_id == "traj-7"
            assert slot.alloc_id == slot.sandbox_id
            assert slot.container_addr == f"local://{slot.sandbox_id}"
            assert slot.workspace_dir
            [pwd] = await backend.execute_batch([(slot, "bash", {"command": "pwd"})])
            assert pwd.output.strip() == slot.workspace_dir
            assert slot.state.value == "acquired"
            assert isinstance(slot.metadata, Mapping)
            await backend.release(slot)
            assert slot.state.value == "available"

    asyncio.run(main())


def test_config_constructors_of_the_original() -> None:
    """from_dict, from_env, from_agent_env_config, load_profiles and get_app_name."""
    config = ModalSandboxConfig.from_dict("gpu", {"gpu": "T4", "memory": 16384, "cpu": 4})
    assert (config.name, config.gpu, config.memory, config.cpu) == ("gpu", "T4", 16384, 4.0)
    assert config.execution_timeout_s == 30.0
    assert config.get_app_name() == "atropos-sandbox-gpu"
    assert config.with_app_name("run").get_app_name() == "run-gpu"

    from_env = ModalSandboxConfig.from_agent_env_config(
        agent_env_config(modal_secrets="a, b", modal_env_vars="X=1;Y=two", modal_gpu="A10G")
    )
    assert from_env.secrets == ("a", "b")
    assert dict(from_env.env_vars) == {"X": "1", "Y": "two"}
    assert from_env.gpu == "A10G"
    assert from_env.get_app_name() == "atropos-sandbox"
    with pytest.raises(ConfigError, match="modal_env_vars: expected KEY=VALUE pairs"):
        ModalSandboxConfig.from_agent_env_config(agent_env_config(modal_env_vars="NO_EQUALS"))
    with pytest.raises(ConfigError, match=r"from_dict\('gpu'\): \$\.memroy: unknown"):
        ModalSandboxConfig.from_dict("gpu", {"memroy": 1})


def test_from_env_and_load_profiles_read_the_atropos_variables(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """ATROPOS_MODAL_* (per profile first) and ATROPOS_MODAL_PROFILES(_FILE) are read."""
    monkeypatch.setenv("ATROPOS_MODAL_MEMORY", "4096")
    monkeypatch.setenv("ATROPOS_MODAL_PROFILE_PYTORCH_GPU_GPU", "T4")
    monkeypatch.setenv("ATROPOS_MODAL_PROFILE_PYTORCH_GPU_MEMORY", "16384")
    monkeypatch.setenv("ATROPOS_MODAL_SECRETS", "hf, wandb")
    gpu = ModalSandboxConfig.from_env("pytorch-gpu")
    assert (gpu.name, gpu.gpu, gpu.memory, gpu.secrets) == (
        "pytorch-gpu",
        "T4",
        16384,
        ("hf", "wandb"),
    )
    assert ModalSandboxConfig.from_env().memory == 4096
    monkeypatch.setenv("ATROPOS_MODAL_PROFILES", "pytorch-gpu")
    profiles = ModalSandboxConfig.load_profiles()
    assert set(profiles) == {"pytorch-gpu", "default"}
    monkeypatch.setenv("ATROPOS_MODAL_CPU", "lots")
    with pytest.raises(ValueError, match="ATROPOS_MODAL_CPU"):
        ModalSandboxConfig.from_env()

    path = tmp_path / "profiles.yaml"
    path.write_text("profiles:\n  small:\n    memory: 512\n")
    from_file = ModalSandboxConfig.load_profiles(str(path))
    assert list(from_file) == ["small"]
    assert from_file["small"].memory == 512


def test_the_original_defaults_clients_depend_on() -> None:
    """execution_timeout_s is 30 s and release keeps the workspace unless asked to reset it."""
    assert ModalSandboxConfig().execution_timeout_s == 30.0
    assert ModalToolBackend(ModalSandboxConfig()).default_timeout_s == 30.0

    async def main() -> None:
        async with local_backend(agent_env_config(modal_slots_per_sandbox=1)) as backend:
            slot = await backend.acquire("first")
            await backend.execute_batch([(slot, "write_file", {"path": "kept", "content": "x"})])
            await backend.release(slot)
            again = await backend.acquire("second")
            assert again.slot_id == slot.slot_id
            [listing] = await backend.execute_batch([(again, "bash", {"command": "ls"})])
            assert listing.output.split() == ["kept"]
            await backend.release(again, reset_workspace=True)
            third = await backend.acquire("third")
            [empty] = await backend.execute_batch([(third, "bash", {"command": "ls -A"})])
            assert empty.output == ""
            await backend.release(third)

    asyncio.run(main())


def test_the_migration_guide_example_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The code in docs/migrating.md runs as written."""
    guide = Path(__file__).parent.parent / "docs" / "migrating.md"
    blocks = re.findall(r"```python\n(.*?)```", guide.read_text(), re.DOTALL)
    assert blocks
    for index, block in enumerate(blocks):
        script = tmp_path / f"block{index}.py"
        script.write_text(block)
        runpy.run_path(str(script), run_name="__main__")
    assert capsys.readouterr().out == "True 'hello\\n' 0\n"
