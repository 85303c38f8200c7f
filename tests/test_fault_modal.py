"""Fault suite, Modal through the emulator: failing creates, a dropped agent stream, a host SIGKILL.

The real `modal` client talks to `ModalEmulator` (see `conftest_modal.py`, whose fixture also
fails a test that leaves a sandbox process, a child process or a thread behind).
"""

from __future__ import annotations

import os
import signal
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import trio
from grpclib import Status

from fault_support import HostRun, Reliability, wait_for
from hermes_actors import (
    AcquireTimeout,
    InfrastructureError,
    SandboxConfig,
    ToolBackend,
    profiles_from_mapping,
)
from hermes_actors.testing.modal_emulator import ModalEmulator
from proc_support import argv, cmdline

pytestmark = pytest.mark.faults

APP = "hermes-fault-tests"


def _backend(**changes: Any) -> ToolBackend:
    settings: dict[str, Any] = {
        "name": "faulty",
        "backend": "modal",
        "app_name": APP,
        "cpu": 0.5,
        "memory": 256,
        "min_sandboxes": 0,
        "max_sandboxes": 2,
        "slots_per_sandbox": 4,
        "acquire_timeout_s": 20.0,
        **changes,
    }
    config = SandboxConfig(**settings)
    return ToolBackend(profiles_from_mapping({"faulty": config}, default_profile="faulty"))


def _running(emulator: ModalEmulator) -> list[str]:
    return [state.sandbox_id for state in emulator.sandboxes() if state.returncode is None]


async def test_creates_failing_n_times_then_succeeding(
    modal_emulator: ModalEmulator, reliability: Reliability
) -> None:
    """Creates refused a few times are retried; acquire gets a slot of the one sandbox made."""
    failures = 3
    modal_emulator.fail_next_creates(failures, Status.RESOURCE_EXHAUSTED, "slow down")
    async with _backend() as backend:
        slot = await backend.acquire("t0")
        [result] = await backend.execute_batch([(slot, "bash", {"command": "echo made"})])
        assert result.success, result
        assert result.output.strip() == "made"
        assert len(modal_emulator.sandboxes()) == 1
        await backend.release(slot)
    assert modal_emulator.call_counts()["SandboxCreateV2"] == failures + 1
    assert _running(modal_emulator) == []
    reliability.record(
        "modal",
        "sandbox create refused N times, then accepted",
        injected=failures,
        requests=2,
        answered=2,
        leaks=len(_running(modal_emulator)),
    )


CAUSES = {
    "quota": "sandbox quota of 10 reached",
    "image": "ghcr.io/nobody/missing:1",
    "secret": "no-such-secret",
    "auth": "token revoked",
}


@pytest.mark.parametrize("cause", sorted(CAUSES))
async def test_creates_failing_always_report_the_cause_in_time(
    modal_emulator: ModalEmulator, reliability: Reliability, cause: str
) -> None:
    """A create that keeps failing fails acquire with its cause, before the acquire deadline."""
    changes: dict[str, Any] = {"acquire_timeout_s": 6.0}
    if cause == "quota":
        modal_emulator.fail_next_creates(1000, Status.RESOURCE_EXHAUSTED, CAUSES[cause])
    elif cause == "image":
        modal_emulator.add_failing_image(CAUSES[cause])
        changes["image"] = CAUSES[cause]
    elif cause == "secret":
        changes["secrets"] = (CAUSES[cause],)
    else:
        modal_emulator.fail_next_creates(1000, Status.UNAUTHENTICATED, CAUSES[cause])
    async with _backend(**changes) as backend:
        for attempt in range(2):
            start = trio.current_time()
            with pytest.raises(InfrastructureError) as failed:
                await backend.acquire(f"t{attempt}")
            elapsed = trio.current_time() - start
            assert not isinstance(failed.value, AcquireTimeout), failed.value
            assert CAUSES[cause] in str(failed.value)
            assert elapsed < 6.0
    assert _running(modal_emulator) == []
    reliability.record(
        "modal",
        f"sandbox create failing for good ({cause})",
        injected=1,
        requests=2,
        answered=2,
        leaks=len(_running(modal_emulator)),
    )


def _agent_pids(emulator: ModalEmulator, sandbox_id: str) -> list[int]:
    """The agent's own process in an emulated sandbox (`python3 -c BOOTSTRAP`)."""
    found = []
    for state in emulator.sandboxes():
        if state.sandbox_id != sandbox_id:
            continue
        for pid in state.live_pids:
            words = argv(pid)
            if (
                len(words) > 2
                and words[1] == b"-c"
                and os.path.basename(words[0]).startswith(b"python")
            ):
                found.append(pid)
    return found


@pytest.mark.parametrize("how", ["agent killed", "sandbox killed by the provider"])
async def test_agent_stream_dropping_mid_batch(
    modal_emulator: ModalEmulator, reliability: Reliability, how: str
) -> None:
    """Requests in flight when the agent stream drops are answered once each, as sandbox_lost."""
    async with _backend(max_sandboxes=1) as backend:
        slots = [await backend.acquire(f"t{n}") for n in range(4)]
        sandbox_id = slots[0].sandbox_id
        requests = [(slot, "bash", {"command": "sleep 30"}) for slot in slots]
        results: list[Any] = []

        async def batch() -> None:
            results.extend(await backend.execute_batch(requests, timeout_s=60))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(batch)
            with trio.fail_after(10):
                # Polling on purpose: the emulator's state lives in its own thread.
                while not any(  # noqa: ASYNC110
                    "sleep" in _cmdline(pid)
                    for state in modal_emulator.sandboxes()
                    for pid in state.live_pids
                ):
                    await trio.sleep(0.05)
            await trio.sleep(0.3)
            if how == "agent killed":
                for pid in _agent_pids(modal_emulator, sandbox_id):
                    os.kill(pid, signal.SIGKILL)
            else:
                modal_emulator.kill_sandbox(sandbox_id)
            with trio.fail_after(15):
                while not results:  # noqa: ASYNC110 - the batch's own task fills it
                    await trio.sleep(0.05)
        assert len(results) == len(requests)
        assert len({result.execution_id for result in results}) == len(requests)
        for result in results:
            assert not result.success
            assert result.metadata.get("infra_error") == "sandbox_lost", result
            assert result.metadata.get("retryable") is True
        for slot in slots:
            await backend.release(slot)
        fresh = await backend.acquire("after")
        assert fresh.sandbox_id != sandbox_id
        [after] = await backend.execute_batch([(fresh, "bash", {"command": "echo again"})])
        assert after.output.strip() == "again"
        await backend.release(fresh)
    leftovers = len(_running(modal_emulator)) + len(modal_emulator.live_pids())
    assert leftovers == 0
    reliability.record(
        "modal",
        f"agent stream dropped mid-batch ({how})",
        injected=1,
        requests=len(requests) + 1,
        answered=len(results) + 1,
        leaks=leftovers,
    )


def _cmdline(pid: int) -> str:
    return cmdline(pid).replace(b"\0", b" ").decode(errors="replace")


HOST = textwrap.dedent(
    """
    import sys, trio
    from hermes_actors import SandboxConfig, ToolBackend, profiles_from_mapping

    async def main():
        config = SandboxConfig(
            name="faulty", backend="modal", app_name=sys.argv[1], cpu=0.5, memory=256,
            min_sandboxes=0, max_sandboxes=2, slots_per_sandbox=2,
        )
        backend = ToolBackend(profiles_from_mapping({"faulty": config}, default_profile="faulty"))
        async with backend:
            slots = [await backend.acquire(f"t{n}") for n in range(4)]
            print("ready", flush=True)
            await backend.execute_batch(
                [(slot, "bash", {"command": "sleep 300"}) for slot in slots], timeout_s=600
            )

    trio.run(main)
    """
)


async def test_host_sigkill_then_the_next_run_reaps(
    modal_emulator: ModalEmulator, reliability: Reliability, tmp_path: Path
) -> None:
    """Sandboxes of a SIGKILLed host are gone once the next run starts with reap_orphans."""
    env = {**modal_emulator.env, "MODAL_CONFIG_PATH": "/nonexistent"}
    host = HostRun(HOST.replace("sys.argv[1]", repr(APP)), tmp_path, env)
    try:
        assert wait_for(lambda: len(_running(modal_emulator)) == 2, 30), "host never started"
        assert wait_for(
            lambda: sum("sleep 300" in _cmdline(p) for p in modal_emulator.live_pids()) == 4, 30
        ), "commands never started"
        orphans = set(_running(modal_emulator))
        host.signal(signal.SIGKILL)
        assert await trio.to_thread.run_sync(host.wait_exit, 10) == -signal.SIGKILL
    finally:
        host.close()
    started = time.monotonic()
    # The killed run's sandboxes are seconds old: reap them regardless of age.
    async with _backend(reap_orphans=True, reap_min_age_s=0.0) as backend:
        slot = await backend.acquire("next-run")
        left = orphans & set(_running(modal_emulator))
        assert left == set(), f"orphans of the killed run still running: {left}"
        await backend.release(slot)
    reap_s = time.monotonic() - started
    assert reap_s < 30
    assert _running(modal_emulator) == []
    reliability.record(
        "modal",
        "host SIGKILLed with commands in flight; next run reaps",
        injected=1,
        requests=0,
        answered=0,
        leaks=len(orphans & set(_running(modal_emulator))),
    )
