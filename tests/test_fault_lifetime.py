"""Fault suite, lifetime: an idle sandbox keeps serving its held slot, whatever thread started it.

trio retires an idle worker thread after `IDLE_TIMEOUT` (10 s); a sandbox started from such a
thread must not die with it. Each test holds a slot through `ToolBackend` (trio, `async with`)
and a task through `terminal_tool` (a plain thread), leaves both idle until trio has retired
every idle worker (its idle time shortened, so the wait takes a second, not ten), and checks
that the same workspace, files intact, still answers.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import attrs
import outcome
import pytest
import trio

import terminal_support
from fault_support import Reliability
from hermes_actors import (
    SandboxConfig,
    ToolBackend,
    cleanup_vm,
    profiles_from_mapping,
)
from sandbox_support import retire_trio_worker_threads, short_worker_idle_time

pytestmark = pytest.mark.faults

T = TypeVar("T")

#: How long the slots stay idle once the workers are gone: a sandbox killed with the thread
#: that started it would be dead by then.
IDLE_AFTER_RETIREMENT_S = 0.5


async def in_plain_thread(function: Callable[[], T]) -> T:
    """Run a blocking call in a thread of its own: never one of trio's cached workers, which
    could be the very thread that started a sandbox, kept alive by being reused."""
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()
    box: list[outcome.Outcome[T]] = []

    def run() -> None:
        try:
            box.append(outcome.capture(function))
        finally:
            token.run_sync_soon(done.set)

    thread = threading.Thread(target=run, name="fault-suite-terminal-tool")
    thread.start()
    await done.wait()
    thread.join()
    return box[0].unwrap()


@pytest.fixture(scope="module")
def terminal_profiles(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Profiles of the process-wide terminal backend (one per isolation); shut down after."""
    with terminal_support.terminal_profiles(
        tmp_path_factory.mktemp("lifetime") / "profiles.yaml",
        "default_profile: none\n"
        "profiles:\n"
        "  none: {backend: local, isolation: none, slots_per_sandbox: 2, min_sandboxes: 0}\n"
        "  bwrap: {backend: local, isolation: bwrap, slots_per_sandbox: 2, min_sandboxes: 0}\n",
    ):
        yield


@attrs.frozen
class Survival:
    """What one isolation mode's held slot and task answered after the idle wait."""

    before: tuple[str, str]  # the workspaces' paths (ToolBackend slot, terminal_tool task)
    backend_reply: Any
    tool_reply: dict[str, Any]


async def _idle_slots(isolation: str) -> Survival:
    """Hold a slot and a task, write a file in each, idle past worker retirement, read back."""
    config = SandboxConfig(
        name=isolation,
        backend="local",
        isolation=isolation,  # type: ignore[arg-type]
        slots_per_sandbox=2,
        min_sandboxes=0,
    )
    profiles = profiles_from_mapping({isolation: config}, default_profile=isolation)
    task = f"lifetime-{isolation}"
    async with ToolBackend(profiles) as backend:
        slot = await backend.acquire("lifetime")
        [wrote] = await backend.execute_batch(
            [(slot, "bash", {"command": "echo backend-kept > keep.txt && pwd"})]
        )
        assert wrote.success, wrote
        reply = await in_plain_thread(
            lambda: terminal_support.run(
                "echo tool-kept > keep.txt && pwd", task_id=task, profile=isolation
            )
        )
        assert reply["exit_code"] == 0, reply

        await retire_trio_worker_threads()
        await trio.sleep(IDLE_AFTER_RETIREMENT_S)

        [read] = await backend.execute_batch([(slot, "bash", {"command": "cat keep.txt && pwd"})])
        after = await in_plain_thread(
            lambda: terminal_support.run("cat keep.txt && pwd", task_id=task, profile=isolation)
        )
        await backend.release(slot)
        await in_plain_thread(lambda: cleanup_vm(task))
    return Survival(
        before=(wrote.output.strip(), reply["output"].strip()), backend_reply=read, tool_reply=after
    )


@pytest.fixture(scope="module")
def survivals(terminal_profiles: None) -> dict[str, outcome.Outcome[Survival]]:
    """Both isolation modes idle at once (one wait for both); each test judges its own."""
    results: dict[str, outcome.Outcome[Survival]] = {}

    async def both() -> None:
        async def one(isolation: str) -> None:
            results[isolation] = await outcome.acapture(_idle_slots, isolation)

        async with trio.open_nursery() as nursery:
            for isolation in ("bwrap", "none"):
                nursery.start_soon(one, isolation)

    with short_worker_idle_time():
        trio.run(both)
    return results


def _judge(isolation: str, survival: Survival, reliability: Reliability) -> None:
    read, after = survival.backend_reply, survival.tool_reply
    # Answered: served by the same workspace, files intact (a lost sandbox is no such answer).
    answered = int(read.success and "backend-kept" in read.output) + int(
        after["exit_code"] == 0 and "tool-kept" in after["output"]
    )
    reliability.record(
        "lifetime",
        f"sandbox idle past trio's worker-thread retirement ({isolation})",
        injected=2,
        requests=2,
        answered=answered,
    )
    assert read.success, read
    assert read.output.split() == ["backend-kept", survival.before[0]]
    assert after["exit_code"] == 0, after
    assert after["output"].split() == ["tool-kept", survival.before[1]]


@pytest.mark.bwrap
def test_idle_bwrap_sandbox_outlives_trio_worker_threads(
    survivals: dict[str, outcome.Outcome[Survival]], reliability: Reliability
) -> None:
    """An idle bwrap sandbox serves its held slot, files intact, after trio retires threads."""
    _judge("bwrap", survivals["bwrap"].unwrap(), reliability)


def test_idle_none_sandbox_outlives_trio_worker_threads(
    survivals: dict[str, outcome.Outcome[Survival]], reliability: Reliability
) -> None:
    """An idle `none` sandbox serves its held slot, files intact, after trio retires threads."""
    _judge("none", survivals["none"].unwrap(), reliability)
