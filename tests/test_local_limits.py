"""Local sandboxes enforce the profile's limits where the host allows it, and say which.

A memory hog or a fork bomb in one slot must not take down the host process or the other
slots. Always: RLIMIT_DATA per process (memory, any isolation) and RLIMIT_NPROC of the slot's
own uid (processes; bwrap started by root). Where the host delegated a cgroup v2 subtree to the
runtime: one cgroup per sandbox with memory.max, cpu.max and pids.max. The decision and the files
written are tested against a fake cgroup file system (this machine has cgroup v1 controllers
only); the real-kernel test runs where a delegated v2 subtree exists. The process limit is
lowered for the fork bomb test to keep it cheap; the slot used (7) is one the other suites leave
alone, since the count is per uid.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from hermes_actors import SandboxConfig, ToolBackend
from hermes_actors.drivers import _local
from hermes_actors.drivers._local_cgroups import (
    ENV_CGROUP_PARENT,
    CgroupParent,
    create_sandbox_cgroup,
    find_delegated_cgroup,
)
from proc_support import pids_of_uid
from sandbox_support import open_local_sandbox

MIB = 1024 * 1024


def processes_of_uid(uid: int) -> int:
    return len(pids_of_uid(uid))


@pytest.mark.parametrize("isolation", ["none", "bwrap"])
async def test_a_memory_hog_fails_its_allocation_and_the_sandbox_serves_on(isolation: str) -> None:
    """A process allocating past the profile's memory gets MemoryError; the other slots serve."""
    async with open_local_sandbox(isolation, memory=256) as sandbox:
        limits = sandbox.handle.enforced_limits
        assert limits.memory_bytes_per_process == 256 * MIB
        if limits.cgroup is None:  # no delegated cgroup here: rlimits alone, and it says so
            assert limits.cpu is None
            assert "cpu not enforced" in limits.describe()
        assert "memory 256 MiB per process (RLIMIT_DATA)" in limits.describe()
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
    # A slot no other test uses: its uid (SLOT_UID_BASE + slot) and that uid's process limit are
    # shared by every sandbox on the host, and other tests run sandboxes at the same time. The
    # sandbox has that many slots (the agent refuses a slot outside its sandbox's range), and
    # fresh shells: no slot keeps a shell between calls, so the uid's count is the bomb's alone.
    slot = 97
    async with open_local_sandbox("bwrap", slots_per_sandbox=slot + 1, shell="fresh") as sandbox:
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


# -- cgroup v2: the decision and the files, on a fake cgroup file system ---------------------------


def fake_host(
    tmp_path: Path,
    *,
    membership: str = "0::/hermes.service\n",
    subtree_control: str = "memory pids cpu",
    mount_root: str = "/",
    cgroup2_mounted: bool = True,
) -> tuple[str, Path]:
    """A fake /proc/self (cgroup, mountinfo) and cgroup2 tree; returns both."""
    cgroupfs = tmp_path / "cgroupfs"
    own = cgroupfs / "hermes.service"
    own.mkdir(parents=True)
    for directory in (cgroupfs, own):
        (directory / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
        (directory / "cgroup.procs").write_text("")
    (cgroupfs / "cgroup.subtree_control").write_text("cpu memory pids\n")
    (own / "cgroup.subtree_control").write_text(subtree_control + "\n")
    proc_self = tmp_path / "proc-self"
    proc_self.mkdir()
    (proc_self / "cgroup").write_text(membership)
    mounts = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
    mounts += "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
    if cgroup2_mounted:
        mounts += f"41 31 0:38 {mount_root} {cgroupfs} rw,relatime - cgroup2 cgroup2 rw\n"
    (proc_self / "mountinfo").write_text(mounts)
    return str(proc_self), cgroupfs


def snapshot(root: Path, leave_out: Path | None = None) -> dict[str, str]:
    return {
        str(path): path.read_text()
        for path in root.rglob("*")
        if path.is_file() and (leave_out is None or leave_out not in path.parents)
    }


def test_a_delegated_subtree_is_the_own_cgroup_with_controllers_for_its_children(
    tmp_path: Path,
) -> None:
    """Our own v2 cgroup, writable, enabling controllers for children, is used, and only those."""
    proc_self, cgroupfs = fake_host(tmp_path, subtree_control="pids memory io")
    parent, why = find_delegated_cgroup(proc_self=proc_self, environ={})
    assert why == ""
    assert parent == CgroupParent(
        path=str(cgroupfs / "hermes.service"), controllers=frozenset({"memory", "pids"})
    )


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ({"membership": "4:memory:/x\n1:cpu:/\n"}, "in no cgroup v2 hierarchy (cgroup v1 only)"),
        ({"cgroup2_mounted": False}, "no cgroup2 file system holding this process's cgroup"),
        ({"subtree_control": ""}, "enables none of memory, cpu, pids for its children"),
        ({"membership": "0::/elsewhere\n"}, "is not a cgroup v2 directory"),
    ],
    ids=["cgroup v1 only", "no cgroup2 mount", "no controllers delegated", "cgroup not found"],
)
def test_without_a_delegated_subtree_there_is_no_cgroup_and_the_reason_says_why(
    tmp_path: Path, host: dict[str, object], reason: str
) -> None:
    """cgroup v1 only, no cgroup2 mount, no controllers for children: no cgroup, and why."""
    proc_self, _ = fake_host(tmp_path, **host)  # type: ignore[arg-type]
    parent, why = find_delegated_cgroup(proc_self=proc_self, environ={})
    assert parent is None
    assert reason in why


def test_a_cgroup_not_writable_by_this_process_is_not_used(tmp_path: Path) -> None:
    """Writable is part of delegated: a cgroup the process cannot write to is never used."""
    proc_self, _ = fake_host(tmp_path)
    parent, why = find_delegated_cgroup(proc_self=proc_self, environ={}, writable=lambda _: False)
    assert parent is None
    assert why.endswith("is not writable by this process (not delegated to it)")


def test_a_cgroup_namespace_root_maps_to_the_mount_point(tmp_path: Path) -> None:
    """In a cgroup namespace the mount's root is the process's cgroup: paths map below it."""
    proc_self, cgroupfs = fake_host(
        tmp_path, membership="0::/hermes.service/inner\n", mount_root="/hermes.service"
    )
    (cgroupfs / "inner").mkdir()
    (cgroupfs / "inner" / "cgroup.subtree_control").write_text("cpu\n")
    parent, _ = find_delegated_cgroup(proc_self=proc_self, environ={})
    assert parent is not None
    assert parent.path == str(cgroupfs / "inner")


def test_an_operator_can_name_the_delegated_cgroup(tmp_path: Path) -> None:
    """HERMES_CGROUP_PARENT names the delegated directory, whatever this process's cgroup is."""
    proc_self, cgroupfs = fake_host(tmp_path, membership="4:memory:/\n")
    named = str(cgroupfs / "hermes.service")
    parent, _ = find_delegated_cgroup(proc_self=proc_self, environ={ENV_CGROUP_PARENT: named})
    assert parent is not None
    assert parent.path == named


def test_a_sandbox_cgroup_gets_the_profile_limits_and_nothing_else_is_written(
    tmp_path: Path,
) -> None:
    """memory.max, cpu.max and pids.max go into the sandbox's own cgroup, and only there."""
    _, cgroupfs = fake_host(tmp_path)
    parent = CgroupParent(
        path=str(cgroupfs / "hermes.service"), controllers=frozenset({"memory", "cpu", "pids"})
    )
    before = snapshot(cgroupfs)
    cgroup = create_sandbox_cgroup(
        parent, "hermes-local-p-1", memory_bytes=512 * MIB, cpu=1.5, processes=4096
    )
    own = cgroupfs / "hermes.service" / "hermes-local-p-1"
    assert cgroup.path == str(own)
    assert (own / "memory.max").read_text() == f"{512 * MIB}\n"
    assert (own / "cpu.max").read_text() == "150000 100000\n"
    assert (own / "pids.max").read_text() == "4096\n"
    assert snapshot(cgroupfs, leave_out=own) == before


def test_only_the_delegated_controllers_are_written(tmp_path: Path) -> None:
    """With only pids delegated, only pids.max is written; the rest stays with the rlimits."""
    _, cgroupfs = fake_host(tmp_path)
    parent = CgroupParent(path=str(cgroupfs / "hermes.service"), controllers=frozenset({"pids"}))
    cgroup = create_sandbox_cgroup(parent, "hermes-x", memory_bytes=MIB, cpu=1.0, processes=8)
    assert sorted(os.listdir(cgroup.path)) == ["pids.max"]
    assert (cgroup.memory_bytes, cgroup.cpu, cgroup.processes) == (None, None, 8)


async def test_a_sandbox_runs_inside_its_cgroup_from_its_first_instruction(tmp_path: Path) -> None:
    """The agent joins its cgroup before it runs (its pid is in cgroup.procs); limits say so."""
    _, cgroupfs = fake_host(tmp_path)
    delegated = cgroupfs / "hermes.service"
    parent = CgroupParent(path=str(delegated), controllers=frozenset({"memory", "cpu", "pids"}))
    driver = _local.LocalDriver(root_dir=str(tmp_path), cgroup_parent=parent)
    handle = await driver.create(
        SandboxConfig(name="p", isolation="none", memory=256, cpu=0.5, slots_per_sandbox=4)
    )
    try:
        [own] = [path for path in delegated.iterdir() if path.name.startswith("hermes-local-p-")]
        procs = own / "cgroup.procs"
        # Written by the agent's first process before it execs the agent (the host does not
        # wait for that: whatever the agent starts comes after).
        for _ in range(500):
            if procs.exists() and procs.read_text().strip():
                break
            await trio.sleep(0.01)
        assert procs.read_text().split() == [str(handle.pid)]
        limits = handle.enforced_limits
        assert (limits.cgroup, limits.cpu) == (str(own), 0.5)
        assert limits.memory_bytes_per_sandbox == 256 * MIB
        assert limits.processes_per_sandbox == 4 * _local.PROCESSES_PER_SLOT
        assert limits.describe().startswith("memory 256 MiB per sandbox (cgroup), memory 256 MiB")
    finally:
        await handle.terminate()
        await driver.aclose()


def test_this_host_decides_as_its_cgroups_allow() -> None:
    """On this machine the decision is made and explained (v1 controllers only: no cgroup)."""
    parent, why = find_delegated_cgroup()
    assert (parent is None) == bool(why)
    assert _local.LocalDriver().cgroup_problem == why


_REAL_PARENT, _REAL_WHY = find_delegated_cgroup()


@pytest.mark.skipif(_REAL_PARENT is None, reason=f"no delegated cgroup v2 subtree: {_REAL_WHY}")
async def test_a_real_cgroup_limits_the_sandbox_and_goes_with_it() -> None:
    """With a delegated v2 subtree, the kernel holds the limits and the cgroup goes at the end."""
    async with open_local_sandbox("none", memory=64) as sandbox:
        limits = sandbox.handle.enforced_limits
        assert limits.cgroup is not None
        own = Path(limits.cgroup)
        assert str(sandbox.handle.pid) in (own / "cgroup.procs").read_text().split()
        if limits.memory_bytes_per_sandbox is not None:
            assert (own / "memory.max").read_text().strip() == str(64 * MIB)
        if limits.processes_per_sandbox is not None:
            result = await sandbox.client.exec(0, command="cat /proc/self/cgroup")
            assert own.name in result.stdout.decode()
    assert not await trio.Path(own).exists()


async def test_status_says_which_limits_each_sandbox_enforces() -> None:
    """A backend's status names each sandbox's limits and how they are enforced."""
    async with ToolBackend(SandboxConfig(isolation="none", memory=128, min_sandboxes=1)) as backend:
        await backend.acquire("t")
        [pool] = backend.status().pools
        [sandbox] = pool.sandboxes
        assert "memory 128 MiB per process (RLIMIT_DATA)" in sandbox.limits
