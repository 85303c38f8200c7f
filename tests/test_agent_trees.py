"""The agent's tree ops: checkpoint, restore, fork, drop_checkpoint and tar streams."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
import typing
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
from tests.agent_harness import (
    AgentProcess,
    escapee,
    pid_alive,
    processes_with_argv,
    wait_no_processes_with_argv,
    wait_processes_with_argv,
)

from hermes_actors import _agent, _values

IS_ROOT = os.getuid() == 0


@pytest.fixture
def open_root() -> Iterator[Path]:
    """A workspace root other uids can traverse (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="hermes-trees-test-"))
    path.chmod(0o755)
    yield path
    subprocess.run(["chmod", "-R", "u+rwx", str(path)], check=False)
    shutil.rmtree(path)


@pytest.fixture(params=["plain", "slot_uids"])
def agent(request: pytest.FixtureRequest, open_root: Path) -> Iterator[AgentProcess]:
    if request.param == "slot_uids" and not IS_ROOT:
        pytest.skip("slot uids need root")
    config = {"slot_uid_base": 43000} if request.param == "slot_uids" else {}
    with AgentProcess(str(open_root / "slots"), **config) as process:
        yield process


def sh(agent: AgentProcess, slot: int, command: str) -> str:
    result = agent.call("exec", slot=slot, command=command)
    assert result["exit_code"] == 0, result
    return bytes(result["stdout"]).decode()


SETUP = (
    "mkdir -p src/pkg empty && printf 'one' > src/a.txt && printf 'v1' > src/pkg/b.txt "
    "&& ln -s a.txt src/link && ln src/a.txt hard && head -c 3000 /dev/urandom > blob "
    "&& chmod 0751 src/pkg && printf 'x' > .hidden"
)
LISTING = "find . -printf '%y %m %p %l\\n' | sort; cat src/a.txt src/pkg/b.txt; md5sum blob"


def test_fork_copies_the_workspace_into_each_target_independently(agent: AgentProcess) -> None:
    """Each fork target gets the source's files, modes, links and dotfiles; all stay separate."""
    sh(agent, 0, SETUP)
    before = sh(agent, 0, LISTING)
    agent.call("fork", slot=0, targets=[1, 2])
    assert sh(agent, 1, LISTING) == before
    assert sh(agent, 2, LISTING) == before
    assert sh(agent, 1, "stat -c %h hard") == "2\n"  # hard links stay links within the copy
    sh(agent, 1, "printf changed > src/a.txt && rm -rf src/pkg")
    assert sh(agent, 0, "cat src/a.txt") == "one"
    assert sh(agent, 2, "cat src/a.txt; ls src/pkg") == "oneb.txt\n"
    if "slot_uids" in agent.ready["result"]["features"]:
        assert sh(agent, 2, "stat -c %u src/a.txt").strip() == str(43000 + 2)


def test_checkpoint_then_restore_undoes_destructive_commands(agent: AgentProcess) -> None:
    """A restore after `rm -rf *` and a broken file brings back exactly the checkpointed tree."""
    sh(agent, 3, SETUP)
    before = sh(agent, 3, LISTING)
    result = agent.call("checkpoint", slot=3, checkpoint="ck1")
    assert result["bytes"] >= 3000
    assert result["entries"] >= 7
    sh(agent, 3, "rm -rf * .hidden && printf junk > new.txt")
    agent.call("restore", slot=3, checkpoint="ck1")
    assert sh(agent, 3, LISTING) == before
    # The checkpoint is still there: a second restore, into another slot, works too.
    agent.call("restore", slot=4, checkpoint="ck1")
    assert sh(agent, 4, LISTING) == before


def test_checkpoints_are_unreachable_from_slots_and_dropped_completely(
    agent: AgentProcess, open_root: Path
) -> None:
    """A checkpoint's files cannot be changed by the slot, and dropping it removes them all."""
    sh(agent, 0, SETUP)
    agent.call("checkpoint", slot=0, checkpoint="ck")
    checkpoints = open_root / "slots" / ".hermes-checkpoints"
    assert list(checkpoints.iterdir()) == [checkpoints / "ck"]
    if "slot_uids" in agent.ready["result"]["features"]:
        denied = agent.call("exec", slot=0, command=f"ls {checkpoints}/ck/w")
        assert denied["exit_code"] != 0
    assert agent.call("drop_checkpoint", checkpoint="ck") == {"dropped": True}
    assert list(checkpoints.iterdir()) == []
    assert agent.call("drop_checkpoint", checkpoint="ck") == {"dropped": False}
    assert agent.error("restore", slot=0, checkpoint="ck")["code"] == "not_found"
    assert not [p for p in (open_root / "slots").iterdir() if p.name.startswith(".hermes-stage")]


def test_tree_ops_refuse_bad_arguments(agent: AgentProcess) -> None:
    """Bad names, targets, shell states, data and sizes, and unknown streams are refused."""
    assert agent.error("checkpoint", slot=0, checkpoint="../x")["code"] == "bad_request"
    assert agent.error("fork", slot=0, targets=[0])["code"] == "bad_request"
    assert agent.error("fork", slot=0, targets=[1, 1])["code"] == "bad_request"
    assert agent.error("fork", slot=-1, targets=[1])["code"] == "bad_request"
    assert agent.error("restore", slot=0, checkpoint="ck", shell="x")["code"] == "bad_request"
    assert agent.error("tar_out", slot=0, checkpoint="")["code"] == "bad_request"
    assert agent.error("tar_in", slot=0, data="text")["code"] == "bad_request"
    assert agent.error("tar_in", slot=0, last=1)["code"] == "bad_request"
    assert agent.error("stream_read", stream=1, max_bytes=0)["code"] == "bad_request"
    assert agent.error("stream_write", stream="1", data=b"")["code"] == "bad_request"
    assert agent.error("stream_read", stream=99)["code"] == "not_found"
    agent.call("checkpoint", slot=0, checkpoint="twice")
    assert agent.error("checkpoint", slot=0, checkpoint="twice")["code"] == "exists"


def read_stream(agent: AgentProcess, stream: int) -> bytes:
    chunks = []
    while True:
        result = agent.call("stream_read", stream=stream, max_bytes=4096)
        if result.get("eof"):
            return b"".join(chunks)
        chunks.append(result["data"])


def test_tar_out_streams_a_directory_in_chunks(agent: AgentProcess) -> None:
    """tar_out + stream_read give a tar of the directory, chunk by chunk, then eof."""
    sh(agent, 0, SETUP)
    stream = agent.call("tar_out", slot=0, path="src")["stream"]
    data = read_stream(agent, stream)
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        names = sorted(archive.getnames())
    assert names == [".", "./a.txt", "./link", "./pkg", "./pkg/b.txt"]


def test_tar_in_extracts_a_stream_written_in_chunks(agent: AgentProcess) -> None:
    """tar_in + stream_write + stream_close unpack a tar into the slot."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        body = os.urandom(100_000)
        info = tarfile.TarInfo("dir/data.bin")
        info.size = len(body)
        archive.addfile(info, io.BytesIO(body))
    data = buffer.getvalue()
    stream = agent.call("tar_in", slot=5, path="in")["stream"]
    for start in range(0, len(data), 30_000):
        agent.call("stream_write", stream=stream, data=data[start : start + 30_000])
    assert agent.call("stream_close", stream=stream)["eof"] is True
    out = agent.call("read_file", slot=5, path="in/dir/data.bin")
    assert out["data"] == body


def test_tar_in_of_garbage_fails_with_tar_s_message(agent: AgentProcess) -> None:
    """A stream that is not a tar fails at close with tar's own complaint."""
    stream = agent.call("tar_in", slot=0, path=".")["stream"]
    reply = agent.request("stream_write", stream=stream, data=b"not a tar" * 200)
    close = agent.request("stream_close", stream=stream)
    errors = [r for r in (reply, close) if not r["ok"]]
    assert errors
    assert errors[-1]["error"]["code"] == "tar_failed"


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read()
    except OSError:
        return b""


def helpers_of(pid: int) -> list[int]:
    """The agent's children other than its slot keepers (forks of the agent: same argv)."""
    own = _cmdline(pid)
    return [child for child in children_of(pid) if _cmdline(child) != own]


def children_of(pid: int) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as handle:
                    fields = handle.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and pid_alive(int(name)):
                found.append(int(name))
    return found


def test_closing_an_unread_stream_kills_its_tar(agent: AgentProcess) -> None:
    """Closing an unread tar_out stream stops tar; no helper is left running."""
    sh(agent, 0, "head -c 5000000 /dev/urandom > big")
    stream = agent.call("tar_out", slot=0, path=".")["stream"]
    agent.call("stream_read", stream=stream, max_bytes=1000)
    assert agent.call("stream_close", stream=stream) == {"closed": True}
    assert agent.error("stream_read", stream=stream)["code"] == "not_found"
    deadline = time.monotonic() + 5.0
    while helpers_of(agent.process.pid) and time.monotonic() < deadline:
        agent.call("ping")  # the agent reaps on its loop turns
        time.sleep(0.01)
    assert helpers_of(agent.process.pid) == []


def shell(agent: AgentProcess, slot: int, command: str) -> str:
    result = agent.call("exec", slot=slot, command=command, shell="persistent")
    assert result["exit_code"] == 0, result
    assert not result.get("shell_restarted"), result
    return bytes(result["stdout"]).decode()


STATE = 'pwd; echo "$FOO"; echo "$HOME"'


def test_checkpoint_and_restore_carry_the_shell_cwd_and_exports(
    agent: AgentProcess, open_root: Path
) -> None:
    """A restore puts the shell back in the checkpoint's directory with its exported variables."""
    workspace = open_root / "slots" / "slot-0"
    shell(agent, 0, "mkdir -p a/b && cd a/b && export FOO=bar")
    checkpoint = agent.call("checkpoint", slot=0, checkpoint="ck")
    assert checkpoint["shell"]["cwd"] == "a/b"
    shell(agent, 0, "cd / && export FOO=changed && rm -rf $HOME/a")
    agent.call("restore", slot=0, checkpoint="ck", shell=checkpoint["shell"])
    assert shell(agent, 0, STATE) == f"{workspace}/a/b\nbar\n{workspace}\n"


def test_forks_get_the_shell_state_moved_to_their_own_slot(
    agent: AgentProcess, open_root: Path
) -> None:
    """A fork's shell starts in the same relative directory with the same exports, as itself."""
    shell(agent, 0, "mkdir -p a/b && cd a/b && export FOO=bar && export WHERE=$PWD")
    agent.call("fork", slot=0, targets=[1])
    slot_1 = open_root / "slots" / "slot-1"
    assert shell(agent, 1, STATE + '; echo "$WHERE"') == (
        f"{slot_1}/a/b\nbar\n{slot_1}\n{slot_1}/a/b\n"
    )
    # Through the host (another sandbox): tar_out gives the tree and the state, tar_in takes both.
    opened = agent.call("tar_out", slot=0, path=".")
    tree = read_stream(agent, opened["stream"])
    agent.call("tar_in", slot=2, path=".", data=tree, last=True, shell=opened["shell"])
    slot_2 = open_root / "slots" / "slot-2"
    assert shell(agent, 2, STATE) == f"{slot_2}/a/b\nbar\n{slot_2}\n"
    assert shell(agent, 0, "pwd") == f"{open_root / 'slots' / 'slot-0'}/a/b\n"  # unchanged


def test_host_tree_values_send_exactly_what_the_agent_reads() -> None:
    """Every tree op value of the host sends the arguments its agent op checks, and no other."""
    values = {cls.op: cls for cls in typing.get_args(_values.TreeOperation)}
    assert sorted(values) == sorted(_agent.TREE_OPS)
    for op, cls in values.items():
        read = {name for name, _ in _agent.TREE_OP_ARGS[op]}
        sent = {field.name for field in attrs.fields(cls)}
        # The slot travels beside the fields; ops on streams or checkpoints ignore it.
        assert sent | {"slot"} == read | {"slot"}, op


def overlay_mounts(pid: int) -> list[str]:
    """Mount points of the overlays in the mount namespace of process `pid`."""
    with open(f"/proc/{pid}/mountinfo", encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    return sorted(line.split()[4] for line in lines if " - overlay " in line)


def leftovers(root: Path) -> list[str]:
    """What the tree ops keep under the workspace root, once the agent's removals are done."""
    layers = root / ".hermes-layers"
    checkpoints = root / ".hermes-checkpoints"
    found: list[str] = []
    for directory in (layers, checkpoints):
        if directory.is_dir():
            found += sorted(p.name for p in directory.iterdir())
    return found


def wait_for_no_leftovers(agent: AgentProcess, root: Path) -> list[str]:
    deadline = time.monotonic() + 5.0
    while leftovers(root) and time.monotonic() < deadline:
        agent.call("ping")  # removal helpers are reaped on the agent's loop turns
        time.sleep(0.01)
    return leftovers(root)


needs_root = pytest.mark.skipif(not IS_ROOT, reason="overlay mounts need root")


@needs_root
def test_fork_targets_are_overlays_seen_only_inside_and_gone_after_reset(
    agent: AgentProcess, open_root: Path
) -> None:
    """Fork targets are overlay mounts in the agent's own namespace; resets remove every trace."""
    slots = open_root / "slots"
    sh(agent, 0, SETUP)
    agent.call("fork", slot=0, targets=[1, 2])
    pid = agent.process.pid
    # The source's tree became the shared layer; the source goes on in an overlay on it too.
    assert overlay_mounts(pid) == [str(slots / f"slot-{n}") for n in (0, 1, 2)]
    assert not [m for m in overlay_mounts(os.getpid()) if m.startswith(str(open_root))]
    # A target owns what it sees (the source's files are shown as its own) and writes there.
    uid = sh(agent, 1, "stat -c %u src/pkg/b.txt; printf mine > src/pkg/b.txt; id -u").split()
    assert uid[0] == uid[1]
    assert sh(agent, 2, "cat src/pkg/b.txt") == "v1"
    sh(agent, 0, "printf source > src/a.txt")
    assert sh(agent, 1, "cat src/a.txt") == "one"
    for slot in (1, 2):
        agent.call("reset_slot", slot=slot)
    assert overlay_mounts(pid) == [str(slots / "slot-0")]
    assert sh(agent, 1, "ls -A") == ""
    assert sh(agent, 0, "cat src/pkg/b.txt src/a.txt") == "v1source"
    agent.call("reset_slot", slot=0)
    assert overlay_mounts(pid) == []
    assert wait_for_no_leftovers(agent, slots) == []


@needs_root
def test_a_forked_source_shell_goes_on_where_it_was_and_writes_only_its_own_files(
    agent: AgentProcess, open_root: Path
) -> None:
    """After a fork in place, the source's shell keeps its directory, OLDPWD and variables."""
    shell(agent, 0, "mkdir -p a/b c && cd c && cd ../a/b && unexported=kept && export FOO=bar")
    agent.call("fork", slot=0, targets=[1])
    assert shell(agent, 0, 'printf new > here; echo "$OLDPWD $unexported"') == (
        f"{open_root / 'slots' / 'slot-0'}/c kept\n"
    )
    assert shell(agent, 0, "cat here") == "new"
    assert sh(agent, 1, "ls a/b") == ""  # the source's new file is its own


@needs_root
def test_a_source_with_a_running_process_is_copied_not_moved(
    agent: AgentProcess, open_root: Path
) -> None:
    """A source slot with a background process gets its tree copied; nothing of it moves."""
    slots = open_root / "slots"
    sh(agent, 0, SETUP)
    shell(agent, 0, "sleep 60 >/dev/null 2>&1 &")
    agent.call("fork", slot=0, targets=[1])
    assert overlay_mounts(agent.process.pid) == [str(slots / "slot-1")]
    assert sh(agent, 1, LISTING) == sh(agent, 0, LISTING)
    for slot in (0, 1):
        agent.call("reset_slot", slot=slot)
    assert overlay_mounts(agent.process.pid) == []
    assert wait_for_no_leftovers(agent, slots) == []


@needs_root
def test_a_dropped_checkpoint_stays_under_its_restored_slot_until_that_slot_resets(
    agent: AgentProcess, open_root: Path
) -> None:
    """Dropping a checkpoint a slot was restored from keeps that slot's files, then frees all."""
    slots = open_root / "slots"
    sh(agent, 0, SETUP)
    before = sh(agent, 0, LISTING)
    agent.call("checkpoint", slot=0, checkpoint="ck")
    agent.call("restore", slot=3, checkpoint="ck")
    agent.call("restore", slot=3, checkpoint="ck")  # again: the first overlay goes
    # The checkpoint froze slot 0's tree in place: slot 0 goes on in an overlay on it.
    assert overlay_mounts(agent.process.pid) == [str(slots / "slot-0"), str(slots / "slot-3")]
    assert agent.call("drop_checkpoint", checkpoint="ck") == {"dropped": True}
    assert agent.error("restore", slot=4, checkpoint="ck")["code"] == "not_found"
    assert sh(agent, 3, LISTING) == before
    assert sh(agent, 0, LISTING) == before
    agent.call("reset_slot", slot=3)
    agent.call("reset_slot", slot=0)
    assert overlay_mounts(agent.process.pid) == []
    assert wait_for_no_leftovers(agent, slots) == []


@needs_root
def test_forks_of_forks_stack_layers_and_stay_independent(
    agent: AgentProcess, open_root: Path
) -> None:
    """Forking a fork, and the source again, keeps every workspace its own; resets free all."""
    slots = open_root / "slots"
    sh(agent, 0, SETUP)
    agent.call("fork", slot=0, targets=[1])
    sh(agent, 1, "printf one-1 > src/a.txt && rm blob")
    agent.call("fork", slot=1, targets=[2])  # slot 1 is an overlay: its upper becomes a layer
    sh(agent, 0, "printf zero > src/a.txt")
    agent.call("fork", slot=0, targets=[3])
    sh(agent, 2, "printf two > new")
    probe = "cat src/a.txt; for f in blob new; do [ -e $f ] && printf ' %s' $f; done; true"
    contents = {n: sh(agent, n, probe) for n in range(4)}
    assert contents == {0: "zero blob", 1: "one-1", 2: "one-1 new", 3: "zero blob"}
    if "slot_uids" in agent.ready["result"]["features"]:
        assert sh(agent, 2, "stat -c %u src/pkg/b.txt").strip() == str(43000 + 2)
    for slot in (1, 0, 3, 2):
        agent.call("reset_slot", slot=slot)
    assert overlay_mounts(agent.process.pid) == []
    assert wait_for_no_leftovers(agent, slots) == []


@needs_root
def test_tar_of_a_stacked_checkpoint_holds_the_whole_tree(
    agent: AgentProcess, open_root: Path
) -> None:
    """A checkpoint whose layer lies on another streams the merged tree, deletions applied."""
    sh(agent, 0, SETUP)
    agent.call("fork", slot=0, targets=[1])  # slot 0's tree becomes a layer
    sh(agent, 0, "rm blob && printf two > src/a.txt")
    agent.call("checkpoint", slot=0, checkpoint="ck")  # its changes: a layer on that one
    stream = agent.call("tar_out", slot=0, checkpoint="ck")["stream"]
    with tarfile.open(fileobj=io.BytesIO(read_stream(agent, stream))) as archive:
        names = sorted(archive.getnames())
        text = archive.extractfile("./src/a.txt")
        assert text is not None
        assert text.read() == b"two"
    assert "./blob" not in names
    assert {"./src/pkg/b.txt", "./hard", "./.hidden"} <= set(names)
    assert overlay_mounts(agent.process.pid) == [
        str(open_root / "slots" / f"slot-{n}") for n in (0, 1)
    ]
    agent.call("drop_checkpoint", checkpoint="ck")
    for slot in (0, 1):
        agent.call("reset_slot", slot=slot)
    assert wait_for_no_leftovers(agent, open_root / "slots") == []


def on_unmounted_filesystems(agent_pid: int) -> list[int]:
    """Processes in the agent's mount namespace whose working directory is on a filesystem
    no longer mounted there: a detached overlay they keep alive."""
    namespace = os.readlink(f"/proc/{agent_pid}/ns/mnt")
    with open(f"/proc/{agent_pid}/mountinfo", encoding="utf-8") as handle:
        mounted = {line.split()[2] for line in handle}
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or not pid_alive(int(name)):
            continue
        try:
            if os.readlink(f"/proc/{name}/ns/mnt") != namespace:
                continue
            device = os.stat(f"/proc/{name}/cwd").st_dev
        except OSError:
            continue
        if f"{os.major(device)}:{os.minor(device)}" not in mounted:
            found.append(int(name))
    return found


def lower_layers(agent_pid: int, mount_point: Path) -> int:
    """How many lower layers the overlay at `mount_point` has (in the agent's namespace)."""
    with open(f"/proc/{agent_pid}/mountinfo", encoding="utf-8") as handle:
        for line in handle:
            if line.split()[4] == str(mount_point) and " - overlay " in line:
                options = line.split(" - ")[1].split()[2].split(",")
                [lowers] = [o for o in options if o.startswith("lowerdir=")]
                return lowers.count(":") + 1
    raise AssertionError(f"no overlay at {mount_point}")


@needs_root
def test_forking_an_overlay_unmounts_it_and_the_idle_shell_comes_back_as_it_was(
    agent: AgentProcess, open_root: Path
) -> None:
    """A fork of a forked slot unmounts its old overlay: no process keeps it; the source's
    shell steps out meanwhile and its next call is where it was, OLDPWD and variables kept."""
    slot_0 = open_root / "slots" / "slot-0"
    shell(agent, 0, "mkdir -p a/b c && cd c && cd ../a/b && kept=1")
    agent.call("fork", slot=0, targets=[1])  # frozen in place: slot 0 is an overlay now
    shell(agent, 0, "printf one > f")  # its shell re-enters by path, into the overlay
    agent.call("fork", slot=0, targets=[2])  # that overlay's upper becomes a layer
    assert on_unmounted_filesystems(agent.process.pid) == []
    assert lower_layers(agent.process.pid, slot_0) == 2  # stacked, not copied
    assert shell(agent, 0, 'pwd; echo "$OLDPWD $kept $#"; cat f; printf two > f') == (
        f"{slot_0}/a/b\n{slot_0}/c 1 0\none"
    )
    assert sh(agent, 2, "cat a/b/f") == "one"
    assert sh(agent, 1, "ls a/b") == ""
    agent.call("checkpoint", slot=0, checkpoint="ck")  # the same for a checkpoint in place
    assert on_unmounted_filesystems(agent.process.pid) == []
    assert shell(agent, 0, "cd - >/dev/null; pwd; cat ../a/b/f") == f"{slot_0}/c\ntwo"


@needs_root
def test_a_fork_ends_what_still_runs_in_its_targets_before_replacing_their_trees(
    agent: AgentProcess, open_root: Path
) -> None:
    """Processes a target slot still runs (its last holder released it without reset) are
    killed before the fork replaces its workspace: none keeps or writes the old tree."""
    token = f"hermes-fork-target-{os.getpid()}"
    sh(agent, 0, SETUP)
    agent.call("fork", slot=0, targets=[1])
    agent.call("exec", slot=1, command=f"cd src && ({escapee(token)} &)")
    wait_processes_with_argv(token, 1)
    agent.call("fork", slot=0, targets=[1])
    assert processes_with_argv(token) == []
    assert on_unmounted_filesystems(agent.process.pid) == []
    assert sh(agent, 1, LISTING) == sh(agent, 0, LISTING)
    for slot in (0, 1):
        agent.call("reset_slot", slot=slot)
    assert wait_no_processes_with_argv(token) == []
    assert wait_for_no_leftovers(agent, open_root / "slots") == []
