"""Local driver specifics beyond the contract suite: starts that fail or are cancelled leave
nothing, sandboxes live as long as promised, and a stuck sandbox is still cleaned up."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from agent_harness import escapee, processes_with_argv, wait_processes_with_argv
from hermes_actors._client import SandboxClient
from hermes_actors._config import SandboxConfig
from hermes_actors._errors import SandboxStartFailed
from hermes_actors.drivers import _local, _local_procs
from hermes_actors.drivers._local import LocalDriver
from hermes_actors.drivers._local_reap import (
    CHECKPOINT_COPIES_PREFIX,
    find_local_leftovers,
    reap_local,
    write_host_record,
)
from proc_support import cmdline, descendants_of
from sandbox_support import open_local_sandbox, retire_trio_worker_threads, short_worker_idle_time


async def test_a_start_that_fails_leaves_no_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the agent process cannot be started, the sandbox directory is removed."""

    def cannot_start(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(13, "Permission denied", "python3")

    monkeypatch.setattr(_local, "_spawn_agent", cannot_start)
    with pytest.raises(SandboxStartFailed, match="Permission denied"):
        await LocalDriver(root_dir=str(tmp_path)).create(SandboxConfig(name="p", isolation="none"))
    assert os.listdir(tmp_path) == []


async def test_a_start_cancelled_while_spawning_leaves_no_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A create cancelled in the middle still removes the directory it made."""
    with trio.CancelScope() as scope:

        async def cancelled_spawn(*args: Any, **kwargs: Any) -> Any:
            scope.cancel()
            await trio.lowlevel.checkpoint()

        monkeypatch.setattr(_local, "open_agent_process", cancelled_spawn)
        await LocalDriver(root_dir=str(tmp_path)).create(SandboxConfig(name="p", isolation="none"))
    assert scope.cancelled_caught
    assert os.listdir(tmp_path) == []


def test_removing_a_sandbox_directory_never_touches_its_parent(tmp_path: Path) -> None:
    """Removing a directory twice, or a read-only one, leaves the parent's mode as it was."""
    tmp_path.chmod(0o1777)
    gone = tmp_path / "hermes-gone"
    _local_procs.remove_tree(str(gone))
    locked = tmp_path / "hermes-locked"
    (locked / "ro").mkdir(parents=True)
    (locked / "ro" / "f").write_text("x")
    (locked / "ro").chmod(0o500)
    _local_procs.remove_tree(str(locked))
    _local_procs.remove_tree(str(locked))
    assert not locked.exists()
    assert tmp_path.stat().st_mode & 0o7777 == 0o1777


@pytest.mark.parametrize("isolation", ["bwrap", "none"])
async def test_an_idle_sandbox_outlives_the_thread_that_started_it(isolation: str) -> None:
    """A sandbox still serves its slot, files intact, after trio retires its worker threads."""
    with short_worker_idle_time():
        async with open_local_sandbox(isolation) as sandbox:
            await sandbox.client.write_file(0, "kept", b"still here")
            # Whichever worker threads took part in the start (the old spawn path forked from
            # one), they all retire now; the sandbox must not notice.
            await retire_trio_worker_threads()
            await trio.sleep(0.5)
            assert sandbox.handle.is_alive()
            result = await sandbox.client.exec(0, command="cat kept")
            assert (result.exit_code, result.stdout) == (0, b"still here")


def _spawn_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "hermes-sandbox-spawner"]


@pytest.mark.parametrize("isolation", ["bwrap", "none"])
async def test_the_spawn_thread_lasts_as_long_as_the_sandboxes_it_started(isolation: str) -> None:
    """The thread that starts sandboxes outlives each of them (one ending leaves the other
    alive) and is gone once the last one has ended."""
    async with open_local_sandbox(isolation) as first:
        async with open_local_sandbox(isolation) as second:
            assert _spawn_threads()
        await trio.sleep(0.3)  # had the thread ended, the signal would be on its way
        assert first.handle.is_alive()
        result = await first.client.exec(0, command="echo alive")
        assert (result.exit_code, result.stdout) == (0, b"alive\n")
        assert second.handle.is_alive() is False
    for _ in range(100):
        if not _spawn_threads():
            break
        await trio.sleep(0.05)
    assert _spawn_threads() == []


@pytest.mark.parametrize("isolation", ["bwrap", "none"])
async def test_terminate_kills_a_sandbox_whose_keepers_cannot_clean_up(isolation: str) -> None:
    """With the agent killed and its keepers frozen, terminate still leaves no process behind."""
    mark = "hermes-test-" + uuid.uuid4().hex
    async with open_local_sandbox(isolation) as sandbox:
        for slot in (0, 1):
            await sandbox.client.exec(slot, command=f"setsid env -i {escapee(mark)} &")
        await trio.to_thread.run_sync(wait_processes_with_argv, mark, 2)
        keepers = [
            pid
            for pid in descendants_of(sandbox.handle.pid)
            if cmdline(pid) == cmdline(sandbox.handle.pid)
            or (isolation == "bwrap" and b"hermes_agent" in cmdline(pid))
        ]
        assert keepers
        for pid in keepers:
            os.kill(pid, signal.SIGSTOP)
        os.killpg(sandbox.handle.pid, signal.SIGKILL)
    assert processes_with_argv(mark) == []


@pytest.mark.bwrap
@pytest.mark.skipif(os.geteuid() != 0, reason="slot uids need the host side to be root")
async def test_slot_users_have_a_name_and_their_workspace_as_home_under_bwrap() -> None:
    """whoami, getpass and pwd know each slot's uid; its passwd HOME is its workspace."""
    lookup = (
        "import getpass, os, pwd; entry = pwd.getpwuid(os.getuid()); "
        "print(getpass.getuser(), entry.pw_dir == os.environ['HOME'], os.getcwd() == entry.pw_dir)"
    )
    async with open_local_sandbox("bwrap") as sandbox:
        for slot in (0, 3):
            result = await sandbox.client.exec(
                slot, command=f'whoami; id -gn; python3 -c "{lookup}"'
            )
            assert result.exit_code == 0, result
            assert result.stdout == f"slot{slot}\nslot{slot}\nslot{slot} True True\n".encode()


# -- the watchdog (the dead-man switch for directories) -------------------------------------------


def _alive(pid: int) -> bool:
    info = _local_procs.proc_info(pid)
    return info is not None and info.alive


async def test_the_watchdog_runs_while_the_driver_has_sandboxes(tmp_path: Path) -> None:
    """One watchdog per driver, in its own session, while it has sandboxes; none after."""
    driver = LocalDriver(root_dir=str(tmp_path))
    assert driver.watchdog_pid is None
    first = await driver.create(SandboxConfig(name="p", isolation="none"))
    second = await driver.create(SandboxConfig(name="p", isolation="none"))
    watchdog = driver.watchdog_pid
    try:
        assert watchdog is not None
        assert _alive(watchdog)
        assert os.getsid(watchdog) == watchdog  # Ctrl-C at a terminal does not reach it
        await first.terminate()
        assert driver.watchdog_pid == watchdog
    finally:
        await second.terminate()
        await driver.aclose()
    assert driver.watchdog_pid is None
    assert not _alive(watchdog)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("isolation", ["bwrap", "none"])
async def test_the_watchdog_ends_what_its_host_left_when_the_host_goes(
    isolation: str, tmp_path: Path
) -> None:
    """A driver closed with a sandbox still running: the watchdog kills it and removes its dir."""
    mark = "hermes-test-" + uuid.uuid4().hex
    driver = LocalDriver(root_dir=str(tmp_path))
    handle = await driver.create(SandboxConfig(name="p", isolation=isolation))
    try:
        async with trio.open_nursery() as nursery:
            client = SandboxClient(handle)
            await nursery.start(client.run)
            await client.exec(0, command=f"setsid env -i {escapee(mark)} &")
            await trio.to_thread.run_sync(wait_processes_with_argv, mark, 1)
            # The host's side goes as if it died: the watchdog reads EOF with the sandbox
            # still watched (its stream stays open, so its own dead-man switch does not fire).
            await driver.aclose()
            assert processes_with_argv(mark) == []
            assert os.listdir(tmp_path) == []
            nursery.cancel_scope.cancel()
    finally:
        await handle.terminate()


def test_the_watchdog_kills_only_writers_of_the_pipe_and_what_is_below_them(
    tmp_path: Path,
) -> None:
    """Readers of a sandbox's liveness pipe (host, watchdog) are never counted as its processes."""
    read_end, write_end = os.pipe()
    writer = subprocess.Popen(
        ["bash", "-c", "sleep 600 & wait"], pass_fds=(write_end,), start_new_session=True
    )
    os.close(write_end)  # as the host does once the agent has it
    reader = subprocess.Popen(["sleep", "600"], pass_fds=(read_end,))
    try:
        pipe = _local_procs.pipe_name(read_end)
        assert wait_until(lambda: len(_local_procs.sandbox_processes(pipe)) == 2)
        found = _local_procs.sandbox_processes(pipe)
        assert writer.pid in found
        assert reader.pid not in found
        directory = tmp_path / "hermes-left"
        (directory / "ws").mkdir(parents=True)
        _local_procs.watchdog_clean_up(
            {"s": _local_procs.Watched(str(directory), os.dup(read_end))}, 0.2
        )
        assert _local_procs.sandbox_processes(pipe) == set()
        assert writer.wait(5) == -signal.SIGKILL
        assert reader.poll() is None
        assert not directory.exists()
    finally:
        for process in (writer, reader):
            process.kill()
            process.wait()
        os.close(read_end)


def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# -- reap: ownership from the owner record --------------------------------------------------------


def _leftover_directory(root: Path, host_start_ticks: int | None) -> Path:
    directory = root / "hermes-p-left"
    (directory / "ws").mkdir(parents=True)
    read_end, write_end = os.pipe()
    try:
        record = {
            "sandbox_id": "local-p-left",
            "host_pid": os.getpid(),
            "host_start_ticks": host_start_ticks,
            "pipe": _local_procs.pipe_name(read_end),
            "created_ticks": _local_procs.now_ticks(),
        }
    finally:
        os.close(read_end)
        os.close(write_end)
    (directory / _local.OWNER_FILE).write_text(json.dumps(record))
    return directory


def test_reap_spares_a_directory_whose_host_lives_and_takes_one_whose_pid_was_reused(
    tmp_path: Path,
) -> None:
    """A live host (pid and start time) keeps its directory; the same pid started later does not."""
    info = _local_procs.proc_info(os.getpid())
    assert info is not None
    directory = _leftover_directory(tmp_path, info.start_ticks)
    assert find_local_leftovers(str(tmp_path), min_age_s=0).empty
    _local_procs.remove_tree(str(directory))
    reused = _leftover_directory(tmp_path, info.start_ticks - 1)
    leftovers = find_local_leftovers(str(tmp_path), min_age_s=0)
    assert leftovers.directories == (str(reused),)
    assert leftovers.sandboxes == {}  # nothing holds its pipe any more
    assert reap_local(leftovers) == 0
    assert os.listdir(tmp_path) == []


def test_reap_takes_a_checkpoint_copies_directory_once_its_host_is_gone(tmp_path: Path) -> None:
    """A directory of checkpoint copies is kept while its host lives, reaped once it is gone."""
    info = _local_procs.proc_info(os.getpid())
    assert info is not None
    mine = tmp_path / f"{CHECKPOINT_COPIES_PREFIX}p-mine"
    mine.mkdir()
    write_host_record(mine)
    (mine / "ck-1.tar").write_bytes(b"tar")
    unrecorded = tmp_path / f"{CHECKPOINT_COPIES_PREFIX}p-new"  # being made: no record yet
    unrecorded.mkdir()
    assert find_local_leftovers(str(tmp_path), min_age_s=0).empty
    gone = tmp_path / f"{CHECKPOINT_COPIES_PREFIX}p-gone"
    gone.mkdir()
    record = {"host_pid": os.getpid(), "host_start_ticks": info.start_ticks - 1}
    (gone / _local.OWNER_FILE).write_text(json.dumps(record))
    (gone / "ck-2.tar").write_bytes(b"tar")
    leftovers = find_local_leftovers(str(tmp_path), min_age_s=0)
    assert leftovers.directories == (str(gone),)
    reap_local(leftovers)
    assert sorted(os.listdir(tmp_path)) == sorted([mine.name, unrecorded.name])


async def test_a_kept_directory_is_moved_out_when_the_sandbox_ends_even_killed(
    tmp_path: Path,
) -> None:
    """`keep_on_exit` moves a directory of the workspace root out as the sandbox ends (a
    SIGKILL included), files and modes kept; one forgotten again goes with the sandbox."""
    driver = LocalDriver(root_dir=str(tmp_path))
    handle = await driver.create(SandboxConfig(name="p", isolation="none"))
    try:
        root = Path(handle.directory) / "ws"
        for name in ("kept", "dropped"):
            (root / name / "sub").mkdir(parents=True)
            (root / name / "sub" / "f").write_text(name)
        os.chmod(root / "kept" / "sub" / "f", 0o640)
        with pytest.raises(ValueError, match="inside the workspace root"):
            handle.keep_on_exit("../escape", str(tmp_path / "x"))
        handle.keep_on_exit("kept", str(tmp_path / "kept.tree"))
        handle.keep_on_exit("dropped", str(tmp_path / "dropped.tree"))
        handle.keep_on_exit("missing", str(tmp_path / "missing.tree"))
        handle.forget_kept("dropped")
        os.killpg(handle.pid, signal.SIGKILL)
    finally:
        await handle.terminate()
        await driver.aclose()
    moved = tmp_path / "kept.tree" / "sub" / "f"
    assert moved.read_text() == "kept"
    assert stat.S_IMODE(moved.stat().st_mode) == 0o640
    assert sorted(os.listdir(tmp_path)) == ["kept.tree"]


async def test_a_sandbox_directory_records_its_owner_outside_the_workspaces(tmp_path: Path) -> None:
    """The owner record names the host and the liveness pipe, and no slot can see it."""
    driver = LocalDriver(root_dir=str(tmp_path))
    handle = await driver.create(SandboxConfig(name="p", isolation="none"))
    try:
        record = json.loads((Path(handle.directory) / _local.OWNER_FILE).read_text())
        assert record["host_pid"] == os.getpid()
        assert record["sandbox_id"] == handle.sandbox_id
        assert _local_procs.sandbox_processes(record["pipe"]) >= {handle.pid}
        assert find_local_leftovers(str(tmp_path), min_age_s=0).empty
    finally:
        await handle.terminate()
        await driver.aclose()
