"""The runtime on the modal backend, through the Modal API emulator and the real modal client.

The pool logic itself is tested on the virtual clock with the fake driver (`test_pool.py`);
these tests check that the same behaviour holds end to end on the modal driver: pre-warm and
scale up, scale down after idle, provider-side sandbox death, slot reset on release, and batch
results in request order. The emulator runs on its own thread and real time, so they poll with
short real deadlines instead of using trio's virtual clock.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from hermes_actors import SandboxConfig, ToolBackend
from hermes_actors._config import profiles_from_mapping
from hermes_actors._errors import AcquireTimeout, AgentError, SandboxLost
from hermes_actors._values import Command, ListFiles, ReadFile, WriteFile
from hermes_actors.runtime._runtime import Runtime
from hermes_actors.testing.modal_emulator import ModalEmulator
from proc_support import eventually

APP_NAME = "hermes-runtime-tests"
#: Real-time bound on anything these tests wait for (sandbox start, scale down, replacement).
DEADLINE_S = 15.0


def _profile(**changes: Any) -> SandboxConfig:
    settings: dict[str, Any] = {
        "name": "rt",
        "backend": "modal",
        "app_name": APP_NAME,
        "cpu": 0.5,
        "memory": 256,
        "acquire_timeout_s": DEADLINE_S,
        **changes,
    }
    return SandboxConfig(**settings)


@asynccontextmanager
async def running_runtime(**changes: Any) -> AsyncIterator[Runtime]:
    """A runtime with one modal profile, running in a nursery until the block ends."""
    profiles = profiles_from_mapping({"rt": _profile(**changes)}, default_profile="rt")
    runtime = Runtime(profiles, run_id="runtime-tests")
    async with trio.open_nursery() as nursery:
        await nursery.start(runtime.run)
        yield runtime
        nursery.cancel_scope.cancel()


def running_ids(emulator: ModalEmulator) -> set[str]:
    return {state.sandbox_id for state in emulator.sandboxes() if state.returncode is None}


def pid_alive(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie awaiting its reaper counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


async def test_prewarms_min_sandboxes_then_scales_up_to_max(modal_emulator: ModalEmulator) -> None:
    """The pool pre-warms min_sandboxes, starts more under load, and never exceeds max."""
    async with running_runtime(min_sandboxes=1, max_sandboxes=2, slots_per_sandbox=2) as runtime:
        await eventually(
            lambda: len(running_ids(modal_emulator)) == 1, DEADLINE_S, what="the pre-warmed sandbox"
        )
        assert len(modal_emulator.calls("SandboxCreateV2")) == 1
        leases = []
        async with trio.open_nursery() as nursery:

            async def hold(index: int) -> None:
                leases.append(await runtime.acquire(trajectory_id=f"trajectory-{index}"))

            for index in range(4):
                nursery.start_soon(hold, index)
        assert len({lease.sandbox_id for lease in leases}) == 2
        assert running_ids(modal_emulator) == {lease.sandbox_id for lease in leases}
        for lease in leases:
            result = await runtime.call(lease, Command(command="echo $HERMES_SANDBOX_ID"))
            assert result.stdout.decode().strip() == lease.sandbox_id
        with pytest.raises(AcquireTimeout):
            await runtime.acquire(timeout_s=0.5)
        assert len(modal_emulator.calls("SandboxCreateV2")) == 2
        for lease in leases:
            await runtime.release(lease)
    assert running_ids(modal_emulator) == set()


async def test_scales_down_to_min_after_idle_timeout(modal_emulator: ModalEmulator) -> None:
    """A sandbox idle for idle_timeout above min_sandboxes is terminated; the rest stay."""
    async with running_runtime(
        min_sandboxes=1, max_sandboxes=2, slots_per_sandbox=1, idle_timeout=1.0
    ) as runtime:
        first = await runtime.acquire()
        second = await runtime.acquire()
        assert first.sandbox_id != second.sandbox_id
        await runtime.release(first)
        await runtime.release(second)
        released_at = trio.current_time()
        await eventually(
            lambda: len(running_ids(modal_emulator)) == 1, DEADLINE_S, what="one sandbox stopped"
        )
        assert trio.current_time() - released_at >= 1.0
        stopped = {state.sandbox_id for state in modal_emulator.sandboxes()} - running_ids(
            modal_emulator
        )
        (stopped_id,) = stopped
        # Stopped by our own policy (terminate, 137), not by the provider's idle timeout (124).
        assert {state.sandbox_id: state.returncode for state in modal_emulator.sandboxes()}[
            stopped_id
        ] == 137
        assert len(modal_emulator.calls("SandboxTerminateV2")) == 1
        # The survivor is the pool's warm minimum: it stays and serves.
        await trio.sleep(1.5)
        assert len(running_ids(modal_emulator)) == 1
        lease = await runtime.acquire()
        assert (await runtime.call(lease, Command(command="echo warm"))).stdout == b"warm\n"
        await runtime.release(lease)


async def test_provider_killed_sandbox_fails_held_slots_and_is_replaced(
    modal_emulator: ModalEmulator,
) -> None:
    """A sandbox the provider kills fails its held slots with a retryable SandboxLost; the
    pool replaces it with a new sandbox."""
    async with running_runtime(min_sandboxes=1, max_sandboxes=1, slots_per_sandbox=2) as runtime:
        busy = await runtime.acquire(trajectory_id="busy")
        idle = await runtime.acquire(trajectory_id="idle")
        assert busy.sandbox_id == idle.sandbox_id
        doomed = busy.sandbox_id

        async def kill_soon() -> None:
            await trio.sleep(0.3)
            modal_emulator.kill_sandbox(doomed, "internal_failure")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(kill_soon)
            with trio.fail_after(DEADLINE_S), pytest.raises(SandboxLost) as lost:
                await runtime.call(busy, Command(command="sleep 60"))
        assert lost.value.retryable
        with pytest.raises(SandboxLost) as lost_idle:
            await runtime.call(idle, Command(command="echo hi"))
        assert lost_idle.value.retryable
        await runtime.release(busy)
        await runtime.release(idle)
        fresh = await runtime.acquire(timeout_s=DEADLINE_S)
        assert fresh.sandbox_id != doomed
        assert (await runtime.call(fresh, Command(command="echo alive"))).stdout == b"alive\n"
        assert running_ids(modal_emulator) == {fresh.sandbox_id}
        (pool,) = runtime.status().pools
        assert pool.sandboxes_lost == 1
        await runtime.release(fresh)


async def test_release_resets_the_slot(modal_emulator: ModalEmulator) -> None:
    """Released slots come back empty: files (dotfiles too) gone, processes (escapees too) dead."""
    async with running_runtime(min_sandboxes=1, max_sandboxes=1, slots_per_sandbox=1) as runtime:
        lease = await runtime.acquire(trajectory_id="first")
        await runtime.call(lease, WriteFile(path="notes.txt", data=b"secret"))
        await runtime.call(lease, WriteFile(path=".hidden/config", data=b"x"))
        result = await runtime.call(
            lease,
            Command(command="sleep 300 & echo $!; setsid sleep 300 > /dev/null 2>&1 & echo $!"),
        )
        pids = [int(line) for line in result.stdout.split()]
        assert len(pids) == 2
        assert all(pid_alive(pid) for pid in pids)
        await runtime.release(lease)
        await eventually(
            lambda: not any(pid_alive(pid) for pid in pids),
            DEADLINE_S,
            what="slot processes killed",
        )
        again = await runtime.acquire(trajectory_id="second")
        assert (again.sandbox_id, again.index) == (lease.sandbox_id, lease.index)
        assert (await runtime.call(again, ListFiles(recursive=True))).entries == ()
        listing = await runtime.call(again, Command(command="ls -A"))
        assert listing.stdout == b""
        await runtime.release(again)
    assert all(not pid_alive(pid) for pid in pids)


async def test_execute_batch_returns_results_in_request_order(
    modal_emulator: ModalEmulator,
) -> None:
    """Results come back in request order although later requests finish first."""
    config = _profile(min_sandboxes=1, max_sandboxes=2, slots_per_sandbox=3)
    async with ToolBackend(config, run_id="batch-tests") as backend:
        slots = [await backend.acquire(f"trajectory-{index}") for index in range(4)]
        requests: list[tuple[Any, str, dict[str, Any]]] = []
        for index, slot in enumerate(slots):
            # The first requests sleep longest, so they finish last.
            delay = 0.1 * (len(slots) - index)
            requests.append((slot, "bash", {"command": f"sleep {delay}; echo bash-{index}"}))
            requests.append((slot, "write_file", {"path": "out.txt", "content": f"file-{index}"}))
            requests.append((slot, "read_file", {"path": "out.txt"}))
        results = await backend.execute_batch(requests)
        assert [result.slot_id for result in results] == [slot.slot_id for slot, _, _ in requests]
        assert all(result.success for result in results), results
        for index in range(len(slots)):
            bash, write, read = results[3 * index : 3 * index + 3]
            assert bash.output == f"bash-{index}\n"
            assert write.metadata["size"] == len(f"file-{index}")
            assert read.output == f"file-{index}"
        assert len({slot.sandbox_id for slot in slots}) == 2
        for slot in slots:
            await backend.release(slot)
    assert running_ids(modal_emulator) == set()


async def test_creates_are_throttled_at_the_strictest_profiles_rate(
    modal_emulator: ModalEmulator,
) -> None:
    """One driver serves every modal profile, creating at most creates_per_second of the
    strictest one."""
    profiles = profiles_from_mapping(
        {
            "slow": _profile(name="slow", min_sandboxes=3, max_sandboxes=3, creates_per_second=2.0),
            "fast": _profile(name="fast", min_sandboxes=0, creates_per_second=20.0),
        },
        default_profile="slow",
    )
    runtime = Runtime(profiles, run_id="throttle-tests")
    async with trio.open_nursery() as nursery:
        await nursery.start(runtime.run)
        await eventually(
            lambda: len(running_ids(modal_emulator)) == 3, DEADLINE_S, what="three warm sandboxes"
        )
        nursery.cancel_scope.cancel()
    arrivals = [call.at for call in modal_emulator.calls("SandboxCreateV2")]
    assert len(arrivals) == 3
    # 0.5 s apart at the client; the RPCs' arrival may jitter by a few milliseconds.
    assert all(later - earlier >= 0.45 for earlier, later in itertools.pairwise(arrivals))


async def test_reap_orphans_at_start_stops_a_dead_runs_sandboxes(
    modal_emulator: ModalEmulator,
) -> None:
    """With reap_orphans, a new run terminates what a crashed run left in its app first."""
    from hermes_actors.drivers._modal import ModalDriver

    crashed = ModalDriver(run_id="crashed-run")
    try:
        orphan = await crashed.create(_profile(name="rt"))
        profiles = profiles_from_mapping(
            {"rt": _profile(reap_orphans=True, reap_min_age_s=0.0, min_sandboxes=1)}
        )
        runtime = Runtime(profiles, run_id="next-run")
        async with trio.open_nursery() as nursery:
            await nursery.start(runtime.run)
            await eventually(
                lambda: (
                    orphan.sandbox_id not in running_ids(modal_emulator)
                    and len(running_ids(modal_emulator)) == 1
                ),
                DEADLINE_S,
                what="the orphan reaped and one fresh sandbox warm",
            )
            nursery.cancel_scope.cancel()
    finally:
        await crashed.aclose()
    assert running_ids(modal_emulator) == set()


async def test_stop_with_purge_terminates_other_runs_leftovers(
    modal_emulator: ModalEmulator,
) -> None:
    """stop(purge=True) terminates this run's sandboxes and what crashed runs left in the app."""
    from hermes_actors.drivers._modal import ModalDriver

    crashed = ModalDriver(run_id="crashed-run")
    try:
        orphan = await crashed.create(_profile(name="rt"))
        backend = ToolBackend(_profile(min_sandboxes=1))
        async with backend:
            slot = await backend.acquire()
            assert len(running_ids(modal_emulator)) == 2
            await backend.stop(purge=True)
            assert running_ids(modal_emulator) == set()
            del slot
        assert orphan.sandbox_id not in running_ids(modal_emulator)
    finally:
        await crashed.aclose()


@pytest.mark.skipif(os.geteuid() != 0, reason="slot uids need the agent to be root")
async def test_slots_of_one_sandbox_run_as_their_own_named_users(
    modal_emulator: ModalEmulator,
) -> None:
    """Slots of one Modal sandbox run as their own named uids and keep out of each other's files."""
    lookup = (
        "import getpass, os, pwd; entry = pwd.getpwuid(os.getuid()); "
        "print(getpass.getuser(), entry.pw_dir == os.environ['HOME'], os.getcwd() == entry.pw_dir)"
    )
    async with running_runtime(min_sandboxes=1, max_sandboxes=1, slots_per_sandbox=2) as runtime:
        first = await runtime.acquire(trajectory_id="first")
        second = await runtime.acquire(trajectory_id="second")
        assert first.sandbox_id == second.sandbox_id
        await runtime.call(first, WriteFile(path="secret.txt", data=b"mine"))
        where = await runtime.call(first, Command(command="pwd"))
        workspace = where.stdout.decode().strip()
        for lease, shell in ((first, "fresh"), (second, "persistent")):
            named = await runtime.call(
                lease, Command(command=f'whoami; id -gn; python3 -c "{lookup}"', shell=shell)
            )
            assert named.exit_code == 0, named
            user = f"slot{lease.index}"
            assert named.stdout == f"{user}\n{user}\n{user} True True\n".encode()
        for shell in ("fresh", "persistent"):
            peek = await runtime.call(
                second,
                Command(
                    command=f"cat {workspace}/secret.txt; ls {workspace}; "
                    f"echo x > {workspace}/planted; echo done",
                    shell=shell,
                ),
            )
            assert b"mine" not in peek.stdout, peek
            assert b"Permission denied" in peek.stderr, peek
            assert peek.stdout.endswith(b"done\n")
        listing = await runtime.call(first, ListFiles(recursive=True))
        assert [entry["path"] for entry in listing.entries] == ["secret.txt"]
        with pytest.raises(AgentError):
            await runtime.call(second, ReadFile(path=f"{workspace}/secret.txt"))
        await runtime.release(first)
        await runtime.release(second)
