"""Local sandboxes enforce the profile's limits where the host allows it, and say which.

A memory hog or a fork bomb in one slot must not take down the host process or the other
slots. Memory: RLIMIT_DATA per process (any isolation). Processes: RLIMIT_NPROC of the slot's
own uid (bwrap started by root). The process limit is lowered for the fork bomb test to keep it
cheap; the slot used (7) is one the other suites leave alone, since the count is per uid.
"""

from __future__ import annotations

import os

import pytest
import trio

from hermes_actors.drivers import _local
from sandbox_support import open_local_sandbox

MIB = 1024 * 1024


def processes_of_uid(uid: int) -> int:
    count = 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if os.stat(f"/proc/{name}").st_uid != uid:
                continue
            with open(f"/proc/{name}/stat", "rb") as handle:
                if handle.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X"):
                    continue
        except (OSError, IndexError):
            continue
        count += 1
    return count


@pytest.mark.parametrize("isolation", ["none", "bwrap"])
async def test_a_memory_hog_fails_its_allocation_and_the_sandbox_serves_on(isolation: str) -> None:
    """A process allocating past the profile's memory gets MemoryError; the other slots serve."""
    async with open_local_sandbox(isolation, memory=256) as sandbox:
        assert sandbox.handle.enforced_limits.memory_bytes_per_process == 256 * MIB
        assert sandbox.handle.enforced_limits.cpu is None
        hog = await sandbox.client.exec(0, command="python3 -c 'b = bytearray(1 << 30)'")
        assert hog.exit_code == 1
        assert b"MemoryError" in hog.stderr
        fits = "python3 -c 'b = bytearray(64 << 20); print(len(b))'"
        assert (await sandbox.client.exec(1, command=fits)).stdout == b"67108864\n"


@pytest.mark.skipif(
    os.geteuid() != 0, reason="slot uids (and so a per-slot process limit) need root"
)
async def test_a_fork_bomb_stops_at_the_slot_limit_and_other_slots_serve(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A fork bomb in one slot stays under its process limit, others answer, a timeout ends it."""
    monkeypatch.setattr(_local, "PROCESSES_PER_SLOT", 100)
    slot = 7
    async with open_local_sandbox("bwrap") as sandbox:
        assert sandbox.handle.enforced_limits.processes_per_slot == 100
        uid = _local.SLOT_UID_BASE + slot
        peak = 0
        answers = []
        async with trio.open_nursery() as nursery:
            bomb = nursery.start_soon
            results = {}

            async def run_bomb() -> None:
                results["bomb"] = await sandbox.client.exec(
                    slot,
                    command="b() { b | b & }; while :; do b 2>/dev/null; sleep 0.05; done",
                    timeout_s=4.0,
                )

            bomb(run_bomb)
            for _ in range(20):
                await trio.sleep(0.1)
                peak = max(peak, processes_of_uid(uid))
                answers.append((await sandbox.client.exec(1, command="echo alive")).stdout)
        assert results["bomb"].timed_out
        assert 50 <= peak <= 100
        assert answers == [b"alive\n"] * 20
        assert processes_of_uid(uid) == 0
