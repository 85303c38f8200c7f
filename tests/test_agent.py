"""The sandbox agent, run as a real subprocess exactly as a driver starts it (no sandbox driver).

Survivors of a kill are counted by scanning /proc for a tag each test puts in the command's
environment, independent of the agent's own markers.
"""

from __future__ import annotations

import ast
import contextlib
import glob
import os
import resource
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent_harness import (
    AgentProcess,
    escapee,
    pid_alive,
    processes_with_argv,
    processes_with_env,
    wait_no_processes_with_argv,
    wait_no_processes_with_env,
    wait_processes_with_argv,
)
from hermes_actors._agent import (
    BOOTSTRAP,
    PROTOCOL_VERSION,
    SPARE_KEEPERS,
    FrameDecoder,
    FrameError,
    agent_source,
    encode_frame,
)
from hermes_actors.drivers._local_procs import proc_info
from proc_support import comm, descendants_of

SYSTEM_PYTHON = "/usr/bin/python3"
IS_ROOT = os.getuid() == 0


@pytest.fixture
def open_root() -> Iterator[Path]:
    """A workspace root other uids can traverse (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="hermes-agent-test-"))
    path.chmod(0o755)
    yield path
    subprocess.run(["chmod", "-R", "u+rwx", str(path)], check=False)
    shutil.rmtree(path)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    with AgentProcess(str(tmp_path / "slots")) as process:
        yield process


def tag() -> str:
    return "HERMES_TEST_TAG=" + uuid.uuid4().hex


def tagged_env(marker: str) -> dict[str, str]:
    name, value = marker.split("=", 1)
    return {name: value}


def run(agent: AgentProcess, command: str, **args: object) -> dict[str, object]:
    args.setdefault("slot", 0)
    return agent.call("exec", command=command, **args)


def wait_until_file(agent: AgentProcess, slot: int, path: str, timeout: float = 10.0) -> None:
    """Poll the agent until a command has created `path` (how a test knows it got that far)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if agent.request("read_file", slot=slot, path=path)["ok"]:
            return
        time.sleep(0.01)
    raise AssertionError(f"{path} never appeared")


# -- codec ------------------------------------------------------------------------------------

json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(),
    st.binary(),
)
messages = st.dictionaries(
    st.text(),
    st.recursive(
        json_leaves,
        lambda children: st.lists(children) | st.dictionaries(st.text(), children),
        max_leaves=20,
    ),
)


@given(message=messages)
def test_codec_round_trips_nested_bytes(message: dict[str, object]) -> None:
    """A message with bytes at any depth decodes to an equal message, fed in any chunking."""
    frame = encode_frame(message) * 2
    decoder = FrameDecoder()
    decoded = []
    for index in range(0, len(frame), 7):
        decoder.feed(frame[index : index + 7])
        while True:
            complete, value = decoder.next_frame()
            if not complete:
                break
            decoded.append(value)
    assert decoded == [message, message]


def test_codec_keeps_bytes_out_of_the_json() -> None:
    """Binary values travel as raw blobs after the JSON, not inside it."""
    frame = encode_frame({"a": [b"\xff\x00", {"b": b"xyz"}]})
    text_length, blob_length = struct.unpack(">II", frame[:8])
    assert frame[8 : 8 + text_length] == b'{"a":[{"$b":2},{"b":{"$b":3}}]}'
    assert blob_length == 5
    assert frame[8 + text_length :] == b"\xff\x00xyz"


@pytest.mark.parametrize(
    ("text", "blobs"),
    [
        (b"{not json", b""),
        (b"[1, 2]", b""),
        (b"\xff\xfe", b""),
        (b'{"a": {"$b": 9}}', b"abc"),
        (b'{"a": {"$b": -1}}', b""),
        (b'{"a": 1}', b"unreferenced"),
    ],
)
def test_codec_rejects_a_malformed_body_and_stays_in_sync(text: bytes, blobs: bytes) -> None:
    """A malformed frame raises FrameError; the next frame still decodes and the stream is fine."""
    decoder = FrameDecoder()
    decoder.feed(struct.pack(">II", len(text), len(blobs)) + text + blobs)
    decoder.feed(encode_frame({"id": 5}))
    with pytest.raises(FrameError):
        decoder.next_frame()
    assert not decoder.broken
    assert decoder.next_frame() == (True, {"id": 5})


def test_codec_marks_an_oversized_header_broken() -> None:
    """A header announcing more than the limit breaks the stream before any body is buffered."""
    decoder = FrameDecoder(max_frame_bytes=1000)
    decoder.feed(struct.pack(">II", 600, 401))
    with pytest.raises(FrameError, match="exceeds"):
        decoder.next_frame()
    assert decoder.broken


def test_codec_waits_for_a_whole_frame() -> None:
    """A partial frame yields nothing until its last byte arrives."""
    frame = encode_frame({"id": 1, "data": b"x" * 100})
    decoder = FrameDecoder()
    decoder.feed(frame[:-1])
    assert decoder.next_frame() == (False, None)
    decoder.feed(frame[-1:])
    assert decoder.next_frame() == (True, {"id": 1, "data": b"x" * 100})


def test_agent_source_parses_as_python_38() -> None:
    """The agent's source uses no syntax newer than Python 3.8."""
    ast.parse(agent_source(), feature_version=(3, 8))
    ast.parse(BOOTSTRAP, feature_version=(3, 8))


def test_importing_the_agent_module_has_no_side_effects() -> None:
    """Importing the module (as the host does) prints nothing and starts nothing."""
    result = subprocess.run(
        [sys.executable, "-c", "import hermes_actors._agent"],
        capture_output=True,
        timeout=30,
        check=True,
    )
    assert (result.stdout, result.stderr) == (b"", b"")


# -- start-up ---------------------------------------------------------------------------------

# The venv's and the system's python, plus the oldest supported one when pyenv has it here.
PYTHONS = [
    sys.executable,
    *([SYSTEM_PYTHON] if os.path.exists(SYSTEM_PYTHON) else []),
    *sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.8*/bin/python3")))[:1],
]


@pytest.mark.parametrize("python", PYTHONS)
def test_agent_starts_and_serves_on_each_python(tmp_path: Path, python: str) -> None:
    """The agent starts on each python and reports readiness, pid, uid and its workspace root."""
    with AgentProcess(str(tmp_path / "slots"), python=python) as agent:
        ready = agent.ready
        assert ready["ok"]
        assert ready["result"]["ready"] is True
        assert ready["result"]["protocol"] == PROTOCOL_VERSION
        assert ready["result"]["pid"] == agent.process.pid
        assert ready["result"]["uid"] == os.getuid()
        assert ready["result"]["workspace_root"] == str(tmp_path / "slots")
        assert "exec" in ready["result"]["features"]
        result = run(agent, "echo $((6 * 7))")
        assert result["stdout"] == b"42\n"
        marker = tag()
        result = run(agent, "setsid sleep 1000 & wait", timeout_s=0.2, env=tagged_env(marker))
        assert result["timed_out"] is True
        assert processes_with_env(marker) == []
        agent.call("write_file", slot=0, path="d/f", data=b"\xff")
        assert agent.call("read_file", slot=0, path="d/f")["data"] == b"\xff"
        version = subprocess.run(
            [python, "-c", "import platform; print(platform.python_version())"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert ready["result"]["python"] == version


def test_requests_sent_with_the_payload_are_not_lost(tmp_path: Path) -> None:
    """A request written right behind the bootstrap payload (one write) is served."""
    from hermes_actors._agent import bootstrap_payload

    process = subprocess.Popen(
        [sys.executable, "-c", BOOTSTRAP],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    payload = bootstrap_payload({"workspace_root": str(tmp_path)})
    request = encode_frame({"id": 7, "op": "ping", "args": {}})
    shutdown = encode_frame({"id": 8, "op": "shutdown", "args": {}})
    stdout, _ = process.communicate(payload + request + shutdown, timeout=30)
    decoder = FrameDecoder()
    decoder.feed(stdout)
    ids = []
    while True:
        complete, message = decoder.next_frame()
        if not complete:
            break
        ids.append(message["id"])
    assert ids == [0, 7, 8]
    assert process.returncode == 0


def test_bad_config_is_reported_and_the_agent_exits(tmp_path: Path) -> None:
    """A config without a workspace root gets a bad_config frame and exit status 2."""
    from hermes_actors._agent import bootstrap_payload

    payload = bootstrap_payload({"ttl_s": 5})
    result = subprocess.run(
        [sys.executable, "-c", BOOTSTRAP], input=payload, capture_output=True, timeout=30
    )
    decoder = FrameDecoder()
    decoder.feed(result.stdout)
    complete, message = decoder.next_frame()
    assert complete
    assert message["error"]["code"] == "bad_config"
    assert result.returncode == 2


# -- exec -------------------------------------------------------------------------------------


def test_exec_reports_exit_codes_and_keeps_stderr_apart(agent: AgentProcess) -> None:
    """stdout and stderr come back separately with the command's exit code."""
    result = run(agent, "echo out; echo err >&2; exit 3")
    assert result["exit_code"] == 3
    assert result["signal"] is None
    assert result["stdout"] == b"out\n"
    assert result["stderr"] == b"err\n"
    assert result["timed_out"] is False
    assert result["cancelled"] is False
    assert result["stdout_dropped"] == result["stderr_dropped"] == 0
    assert isinstance(result["duration_s"], float)


def test_exec_reports_death_by_signal_as_a_negative_code(agent: AgentProcess) -> None:
    """A command killed by a signal gives exit_code -N and signal N (no 128+N)."""
    result = run(agent, "kill -TERM $$")
    assert (result["exit_code"], result["signal"]) == (-signal.SIGTERM, signal.SIGTERM)
    result = run(agent, "kill -KILL $$")
    assert (result["exit_code"], result["signal"]) == (-signal.SIGKILL, signal.SIGKILL)


def test_exec_runs_argv_without_a_shell(agent: AgentProcess) -> None:
    """argv is executed as given, with no shell splitting or expansion."""
    result = agent.call("exec", slot=0, argv=["printf", "%s|", "a b", "$HOME", "*"])
    assert result["stdout"] == b"a b|$HOME|*|"


def test_exec_of_a_missing_program_reports_127(agent: AgentProcess) -> None:
    """A program that does not exist gives exit code 127 and a message, like a shell."""
    result = agent.call("exec", slot=0, argv=["/nonexistent/program"])
    assert result["exit_code"] == 127
    assert b"/nonexistent/program" in result["stderr"]
    assert run(agent, "no-such-command-here")["exit_code"] == 127


def test_exec_environment_layers_defaults_host_env_and_exec_env(tmp_path: Path) -> None:
    """Defaults < config env < exec env; HOME is the slot workspace; stdin is /dev/null."""
    root = tmp_path / "slots"
    with AgentProcess(str(root), env={"TERM": "xterm", "FROM_HOST": "h", "LAYER": "host"}) as agent:
        command = "echo $PAGER $GIT_PAGER $GIT_TERMINAL_PROMPT $DEBIAN_FRONTEND $TERM $FROM_HOST"
        result = run(agent, command + " $LAYER; echo $HOME; readlink /proc/self/fd/0")
        lines = result["stdout"].decode().splitlines()
        assert lines[0] == "cat cat 0 noninteractive xterm h host"
        assert lines[1] == str(root / "slot-0")
        assert lines[2] == "/dev/null"
        result = run(agent, "echo $LAYER $PAGER", env={"LAYER": "exec", "PAGER": "less"})
        assert result["stdout"] == b"exec less\n"


def test_exec_runs_each_command_in_its_own_session(agent: AgentProcess) -> None:
    """Every command leads its own session and process group."""
    result = run(agent, "cut -d' ' -f5,6 /proc/$$/stat; echo $$")
    session_line, pid_line = result["stdout"].decode().splitlines()
    assert session_line.split() == [pid_line, pid_line]


def test_exec_stdin_data_reaches_the_command(agent: AgentProcess) -> None:
    """Given stdin bytes (large ones included) are fed to the command, then EOF."""
    data = os.urandom(3 * 1024 * 1024)
    result = run(agent, "cat", stdin=data, max_output_bytes=len(data))
    assert result["stdout"] == data
    assert run(agent, "wc -c", stdin=b"")["stdout"].strip() == b"0"


def test_exec_stdin_not_read_by_the_command_is_dropped(agent: AgentProcess) -> None:
    """A command that exits without reading a big stdin still completes normally."""
    result = run(agent, "exit 0", stdin=b"x" * (4 * 1024 * 1024))
    assert result["exit_code"] == 0


def test_exec_cwd_is_relative_to_the_workspace(agent: AgentProcess, tmp_path: Path) -> None:
    """cwd names a directory inside the slot workspace; it defaults to the workspace."""
    run(agent, "mkdir -p sub/dir")
    assert run(agent, "pwd", cwd="sub/dir")["stdout"].decode().strip() == str(
        tmp_path / "slots" / "slot-0" / "sub" / "dir"
    )
    assert run(agent, "pwd")["stdout"].decode().strip() == str(tmp_path / "slots" / "slot-0")


@pytest.mark.parametrize(
    ("cwd", "code"),
    [
        ("..", "path_escape"),
        ("/", "path_escape"),
        ("missing", "not_found"),
        ("f", "not_a_directory"),
    ],
)
def test_exec_cwd_outside_or_missing_is_refused(agent: AgentProcess, cwd: str, code: str) -> None:
    """A cwd that leaves the workspace, is missing, or is a file is refused before running."""
    run(agent, "touch f")
    error = agent.error("exec", slot=0, command="touch ran", cwd=cwd)
    assert error["code"] == code
    assert cwd in error["message"] or code == "path_escape"
    assert not agent.request("read_file", slot=0, path="ran")["ok"]


def test_exec_output_is_bytes_even_when_binary(agent: AgentProcess) -> None:
    """Binary and invalid UTF-8 output arrives byte for byte."""
    result = run(agent, r"printf '\xff\xfe\x00\x80ok'; printf '\xc3\x28' >&2")
    assert result["stdout"] == b"\xff\xfe\x00\x80ok"
    assert result["stderr"] == b"\xc3\x28"


def test_exec_caps_large_output_keeping_head_and_tail(agent: AgentProcess) -> None:
    """10 MB per stream is cut to the first and last halves of the cap; drops are exact."""
    script = (
        "import sys\n"
        "sys.stdout.buffer.write(bytes(range(256)) * 40960)\n"
        "sys.stderr.buffer.write(b''.join(b'%07d\\n' % i for i in range(1250000)))\n"
    )
    result = agent.call("exec", slot=0, argv=[sys.executable, "-c", script], max_output_bytes=1001)
    stdout = bytes(range(256)) * 40960
    stderr = b"".join(b"%07d\n" % i for i in range(1250000))
    assert result["exit_code"] == 0
    assert result["stdout"] == stdout[:500] + stdout[-501:]
    assert result["stdout_dropped"] == len(stdout) - 1001
    assert result["stderr"] == stderr[:500] + stderr[-501:]
    assert result["stderr_dropped"] == len(stderr) - 1001


def test_exec_cap_defaults_to_the_config_value(tmp_path: Path) -> None:
    """Without a per-exec cap the config's max_output_bytes applies; a cap of 0 keeps nothing."""
    with AgentProcess(str(tmp_path), max_output_bytes=10) as agent:
        result = run(agent, "printf 0123456789abcdefghij")
        assert result["stdout"] == b"01234fghij"
        assert result["stdout_dropped"] == 10
        result = run(agent, "printf abc", max_output_bytes=0)
        assert (result["stdout"], result["stdout_dropped"]) == (b"", 3)


def test_fifty_concurrent_execs_all_complete(agent: AgentProcess) -> None:
    """50 execs in flight at once run concurrently, each with its own result."""
    started = time.monotonic()
    ids = {
        agent.send(
            "exec", slot=index % 5, command=f"sleep 0.3; echo {index}; exit {index % 7}"
        ): index
        for index in range(50)
    }
    for request_id, index in ids.items():
        result = agent.wait_reply(request_id)["result"]
        assert result["stdout"] == f"{index}\n".encode()
        assert result["exit_code"] == index % 7
    # Run one after another they would take 15 s.
    assert time.monotonic() - started < 6.0
    assert agent.call("ping")["execs"] == 0


def test_background_child_holding_the_pipe_does_not_delay_the_reply(agent: AgentProcess) -> None:
    """Once the command exits, its reply comes at once even if a background child keeps stdout."""
    marker = tag()
    started = time.monotonic()
    result = run(agent, "sleep 30 & echo hi", env=tagged_env(marker))
    assert time.monotonic() - started < 2.0
    assert result["stdout"] == b"hi\n"
    assert result["exit_code"] == 0
    assert len(processes_with_env(marker)) == 1  # it keeps running until reset or timeout
    assert agent.call("reset_slot", slot=0)["killed"] >= 1
    assert wait_no_processes_with_env(marker) == []


# -- timeouts and cancel ----------------------------------------------------------------------

ESCAPING_TREES = {
    "background children": "sleep 1000 & sleep 1000 & echo partial; wait",
    "setsid escapee": "echo partial; setsid sleep 1000 & setsid -f sleep 1000; wait",
    "nohup escapee": "echo partial; nohup sleep 1000 >/dev/null 2>&1 & wait",
    "double fork": "echo partial; ( (sleep 1000 &) & ); sleep 1000",
    "new process group": "echo partial; set -m; sleep 1000 & wait",
}


@pytest.mark.parametrize("command", ESCAPING_TREES.values(), ids=ESCAPING_TREES.keys())
def test_timeout_kills_the_whole_tree_promptly(agent: AgentProcess, command: str) -> None:
    """A timeout kills every process the command started, escapees included, within a second."""
    marker = tag()
    started = time.monotonic()
    result = run(agent, command, env=tagged_env(marker), timeout_s=0.5)
    elapsed = time.monotonic() - started
    assert 0.5 <= elapsed < 1.3
    assert result["timed_out"] is True
    assert result["cancelled"] is False
    assert result["exit_code"] == 124
    assert result["stdout"] == b"partial\n"
    assert processes_with_env(marker) == []


def token() -> str:
    return "hermes-test-" + uuid.uuid4().hex


def test_timeout_kills_escapees_that_left_session_and_environment(agent: AgentProcess) -> None:
    """Escapees with a new session and an empty environment die with their command's timeout."""
    mark = token()
    command = f"setsid env -i {escapee(mark)} & setsid -f env -i {escapee(mark)}; sleep 1000"
    exec_id = agent.send("exec", slot=0, command=command, timeout_s=3.0)
    wait_processes_with_argv(mark, 2)
    result = agent.wait_reply(exec_id)["result"]
    assert result["timed_out"] is True
    assert processes_with_argv(mark) == []


def test_timeout_of_a_fork_storm_leaves_no_survivor(agent: AgentProcess) -> None:
    """A command that keeps double-forking escapees until killed leaves none behind."""
    mark = token()
    command = f"while :; do ( (setsid env -i {escapee(mark)} &) & ); sleep 0.01; done"
    exec_id = agent.send("exec", slot=0, command=command, timeout_s=3.0)
    wait_processes_with_argv(mark, 20)
    assert agent.wait_reply(exec_id)["result"]["timed_out"] is True
    assert processes_with_argv(mark) == []


def test_escapees_of_earlier_commands_survive_a_later_timeout(agent: AgentProcess) -> None:
    """A timeout kills what its own command started, not an earlier command's daemon."""
    earlier = token()
    run(agent, f"setsid {escapee(earlier)} &")
    wait_processes_with_argv(earlier, 1)
    time.sleep(0.05)  # start times are counted in clock ticks
    later = token()
    result = run(agent, f"setsid {escapee(later)} & sleep 1000", timeout_s=1.0)
    assert result["timed_out"] is True
    assert processes_with_argv(later) == []
    assert len(processes_with_argv(earlier)) == 1
    assert agent.call("reset_slot", slot=0)["killed"] == 1
    assert processes_with_argv(earlier) == []


def test_reset_kills_escapees_without_markers_or_session(agent: AgentProcess) -> None:
    """reset_slot kills a slot's setsid env -i escapees and leaves other slots' alone."""
    mark, other = token(), token()
    run(agent, f"setsid env -i {escapee(mark)} & env -i setsid -f {escapee(mark)}")
    run(agent, f"setsid env -i {escapee(other)} &", slot=1)
    wait_processes_with_argv(mark, 2)
    wait_processes_with_argv(other, 1)
    assert agent.call("reset_slot", slot=0)["killed"] >= 2
    assert processes_with_argv(mark) == []
    assert len(processes_with_argv(other)) == 1


def test_stdin_eof_kills_escapees_without_markers_or_session(agent: AgentProcess) -> None:
    """The dead-man switch kills escapees that dropped their environment and session."""
    mark = token()
    run(agent, f"setsid env -i {escapee(mark)} &")
    run(agent, f"(setsid env -i {escapee(mark)} &) &", slot=5)
    wait_processes_with_argv(mark, 2)
    agent.close_stdin()
    assert agent.wait_exit(5.0) == 0
    assert processes_with_argv(mark) == []


def test_a_killed_keeper_takes_its_slots_processes_along(agent: AgentProcess) -> None:
    """A command that kills its slot's keeper loses its slot's processes; the agent serves on."""
    mark = token()
    run(agent, f"setsid env -i {escapee(mark)} &")
    wait_processes_with_argv(mark, 1)
    result = run(agent, f"setsid env -i {escapee(mark)} & sleep 0.2; kill -9 $PPID; sleep 1000")
    assert result["cancelled"] is True
    assert wait_no_processes_with_argv(mark) == []
    assert run(agent, "echo again")["stdout"] == b"again\n"


def keepers_of(agent: AgentProcess) -> list[int]:
    """The agent's live keepers (they name themselves ``hermes-keeper``)."""
    return [pid for pid in descendants_of(agent.process.pid) if comm(pid) == "hermes-keeper"]


def wait_keepers_at_most(agent: AgentProcess, count: int, timeout: float = 5.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(found := keepers_of(agent)) > count and time.monotonic() < deadline:
        time.sleep(0.01)
    return found


def test_slots_with_nothing_alive_keep_no_keeper_each(agent: AgentProcess) -> None:
    """A keeper stays with its slot while the slot has a process; idle slots share a few spares."""
    mark = token()
    slots = range(SPARE_KEEPERS + 4)
    for slot in slots:
        run(agent, f"setsid {escapee(mark)} &", slot=slot)
    wait_processes_with_argv(mark, len(slots))
    assert len(keepers_of(agent)) == len(slots)
    for slot in slots:
        assert agent.call("reset_slot", slot=slot)["killed"] == 1
    assert processes_with_argv(mark) == []
    assert len(wait_keepers_at_most(agent, SPARE_KEEPERS)) <= SPARE_KEEPERS
    for slot in slots:
        assert run(agent, "echo fine", slot=slot)["stdout"] == b"fine\n"
    assert len(wait_keepers_at_most(agent, SPARE_KEEPERS)) <= SPARE_KEEPERS


def test_a_keeper_with_a_slots_process_is_never_lent_to_another_slot(agent: AgentProcess) -> None:
    """Slots with live processes have distinct keepers; an idle slot's keeper serves the next."""
    busy, sleeper = map(int, run(agent, "sleep 1000 & echo $PPID $!", slot=0)["stdout"].split())
    other = int(run(agent, "echo $PPID", slot=1)["stdout"])
    assert other != busy
    assert int(run(agent, "echo $PPID", slot=2)["stdout"]) == other  # slot 1's, now spare
    assert int(run(agent, "echo $PPID", slot=0)["stdout"]) == busy
    assert agent.call("reset_slot", slot=0)["killed"] == 1
    assert not pid_alive(sleeper)


def _parent_and_comm(pid: int) -> tuple[int, str]:
    info = proc_info(pid)
    assert info is not None
    return info.ppid, comm(pid)


def test_keepers_are_forked_by_a_zygote_and_the_agent_serves_without_it(
    agent: AgentProcess,
) -> None:
    """Keepers come from one small zygote child of the agent; without it, the agent forks them."""
    run(agent, "sleep 1000 &", slot=0)
    first = int(run(agent, "echo $PPID", slot=1)["stdout"])
    zygote, comm = _parent_and_comm(first)
    assert comm == "hermes-keeper"
    assert _parent_and_comm(zygote) == (agent.process.pid, "hermes-zygote")
    os.kill(zygote, signal.SIGKILL)
    # Slot 1's keeper lives on; slot 2 needs a new one, forked by the agent itself.
    assert int(run(agent, "echo $PPID", slot=1)["stdout"]) == first
    run(agent, "sleep 1000 &", slot=1)
    second = int(run(agent, "echo $PPID", slot=2)["stdout"])
    assert _parent_and_comm(second) == (agent.process.pid, "hermes-keeper")
    for slot in (0, 1, 2):
        agent.call("reset_slot", slot=slot)
    assert run(agent, "echo fine", slot=3)["stdout"] == b"fine\n"


def test_a_reset_waits_for_its_keeper_while_other_slots_are_served(agent: AgentProcess) -> None:
    """A reset replies once its slot's keeper has killed everything; other slots run meanwhile."""
    mark = token()
    command = f'setsid bash -c "({escapee(mark)} &); {escapee(mark)}" & echo $PPID'
    keeper = int(run(agent, command, slot=0)["stdout"])
    long_call = agent.send("exec", slot=0, command="sleep 1000")
    wait_processes_with_argv(mark, 2)
    os.kill(keeper, signal.SIGSTOP)
    try:
        reset = agent.send("reset_slot", slot=0)
        assert run(agent, "echo served", slot=1)["stdout"] == b"served\n"
        assert len(processes_with_argv(mark)) == 2  # the stopped keeper has not killed yet
    finally:
        os.kill(keeper, signal.SIGCONT)
    assert agent.wait_reply(reset)["result"]["killed"] == 3  # two escapees, one leader
    assert agent.wait_reply(long_call)["result"]["cancelled"] is True
    assert processes_with_argv(mark) == []
    assert agent.call("list_files", slot=0, path=".")["entries"] == []


def test_a_call_whose_shell_is_starting_can_be_cancelled(agent: AgentProcess) -> None:
    """A persistent call sent while its keeper has not started the shell yet is cancellable, and
    the slot's next call gets a working shell."""
    keeper = int(run(agent, "sleep 1000 & echo $PPID", slot=0)["stdout"])
    os.kill(keeper, signal.SIGSTOP)
    try:
        call = agent.send("exec", slot=0, shell="persistent", command="echo never")
        assert run(agent, "echo served", slot=1)["stdout"] == b"served\n"
        assert agent.call("cancel", target=call) == {"found": True}
    finally:
        os.kill(keeper, signal.SIGCONT)
    assert agent.wait_reply(call)["result"]["cancelled"] is True
    again = agent.call("exec", slot=0, shell="persistent", command="cd /tmp; echo $PWD")
    assert again["stdout"] == b"/tmp\n"
    assert agent.call("exec", slot=0, shell="persistent", command="pwd")["stdout"] == b"/tmp\n"


@pytest.mark.skipif(not IS_ROOT, reason="slot uids need the agent to run as root")
def test_a_spare_keeper_runs_each_slots_commands_as_that_slots_uid(open_root: Path) -> None:
    """A keeper passed from slot to slot starts every command as its current slot's uid."""
    with AgentProcess(str(open_root / "slots"), slot_uid_base=43000) as agent:
        first = run(agent, "echo $PPID; id -u", slot=0)["stdout"].split()
        second = run(agent, "echo $PPID; id -u", slot=1)["stdout"].split()
        assert first[0] == second[0]
        assert (first[1], second[1]) == (b"43000", b"43001")


@pytest.mark.parametrize("shell", ["fresh", "persistent"])
@pytest.mark.parametrize("size", [200 * 1024, 3 * 1024 * 1024])
def test_a_command_longer_than_argv_allows_runs(agent: AgentProcess, size: int, shell: str) -> None:
    """A command past the kernel's argument limit runs whole, heredocs included, stdin empty,
    and leaves no open file or memfd behind in the agent."""
    body = "x" * 100 + "\n"
    lines = size // len(body)
    command = "cat <<'EOF' | wc -l\n" + body * lines + 'EOF\ncat; echo "stdin done $#"'
    command += "; [ -e /dev/fd/3 ] && echo fd3 open; echo $LINENO"
    run(agent, "true", shell=shell)  # the slot's keeper (and shell) are up: their fds too
    fds_before = open_files(agent.process.pid)
    result = run(agent, command, shell=shell)
    assert result["exit_code"] == 0, result
    assert result["stdout"] == f"{lines}\nstdin done 0\n{lines + 3}\n".encode()
    assert open_files(agent.process.pid) == fds_before


@pytest.mark.parametrize("shell", ["fresh", "persistent"])
def test_a_long_command_past_its_timeout_is_killed_and_leaves_nothing_open(
    agent: AgentProcess, shell: str
) -> None:
    """A command past argv's limit that times out is killed whole; no fd of it stays open."""
    marker = tag()
    run(agent, "true", shell=shell)
    fds_before = open_files(agent.process.pid)
    command = "#" * (300 * 1024) + "\necho started; sleep 1000 & sleep 1000"
    result = run(agent, command, shell=shell, timeout_s=0.5, env=tagged_env(marker))
    assert (result["timed_out"], result["stdout"]) == (True, b"started\n")
    assert wait_no_processes_with_env(marker) == []
    assert open_files(agent.process.pid) == fds_before


def open_files(pid: int) -> list[str]:
    """What the process's open fds other than sockets point at (sorted)."""
    directory = f"/proc/{pid}/fd"
    targets = []
    for name in os.listdir(directory):
        with contextlib.suppress(FileNotFoundError):
            targets.append(os.readlink(f"{directory}/{name}"))
    return sorted(target for target in targets if not target.startswith("socket:"))


@pytest.mark.skipif(not IS_ROOT, reason="slot uids need the agent to run as root")
@pytest.mark.parametrize("shell", ["fresh", "persistent"])
def test_a_long_command_runs_as_its_slots_uid(open_root: Path, shell: str) -> None:
    """A command past argv's limit runs as its slot's uid, which cannot read another slot."""
    with AgentProcess(str(open_root / "slots"), slot_uid_base=43100, slots=2) as agent:
        run(agent, "echo secret > mine; chmod 600 mine", slot=1)
        command = "#" * (200 * 1024) + "\nid -u; cat ../slot-1/mine 2>/dev/null || echo denied"
        result = run(agent, command, slot=0, shell=shell)
        assert result["stdout"] == b"43100\ndenied\n", result


def test_a_slot_outside_the_sandbox_is_refused(tmp_path: Path) -> None:
    """A slot or fork target past the sandbox's slot count gets a bad_request that says why."""
    with AgentProcess(str(tmp_path / "slots"), slots=4) as agent:
        assert run(agent, "echo ok", slot=3)["stdout"] == b"ok\n"
        error = agent.error("exec", slot=4, command="echo never")
        assert error["code"] == "bad_request"
        assert "slot 4 is outside this sandbox's 4 slots (0 to 3)" in error["message"]
        assert "slots_per_sandbox" in error["message"]
        assert agent.error("read_file", slot=97, path="x")["code"] == "bad_request"
        fork = agent.error("fork", slot=0, targets=[1, 4])
        assert "slot 4 is outside" in fork["message"]
        assert not os.path.exists(tmp_path / "slots" / "slot-4")


def test_a_bad_slot_count_is_a_config_error(tmp_path: Path) -> None:
    """A slot count that is not an int >= 1 stops the agent with bad_config."""
    with AgentProcess(str(tmp_path / "slots"), slots=0) as agent:
        assert agent.ready["ok"] is False
        assert agent.ready["error"]["code"] == "bad_config"
        assert "'slots'" in agent.ready["error"]["message"]


def test_timeout_zero_kills_at_once(agent: AgentProcess) -> None:
    """A timeout of 0 kills the command on the next turn of the loop."""
    result = run(agent, "sleep 1000", timeout_s=0)
    assert result["timed_out"] is True
    assert result["duration_s"] < 1.0


def test_a_command_finishing_before_its_timeout_is_not_timed_out(agent: AgentProcess) -> None:
    """A command that ends in time reports its own exit code and timed_out false."""
    result = run(agent, "exit 5", timeout_s=30)
    assert (result["exit_code"], result["timed_out"]) == (5, False)


def test_cancel_kills_the_tree_and_returns_partial_output(agent: AgentProcess) -> None:
    """cancel finds the exec, kills its whole tree and the exec replies cancelled with output."""
    marker = tag()
    exec_id = agent.send(
        "exec",
        slot=0,
        command="echo partial; setsid sleep 1000 & touch started; sleep 1000",
        env=tagged_env(marker),
    )
    wait_until_file(agent, 0, "started")
    assert agent.call("cancel", target=exec_id) == {"found": True}
    result = agent.wait_reply(exec_id, timeout=2.0)["result"]
    assert result["cancelled"] is True
    assert result["timed_out"] is False
    assert result["stdout"] == b"partial\n"
    assert result["signal"] == signal.SIGKILL
    assert processes_with_env(marker) == []
    assert agent.call("cancel", target=exec_id) == {"found": False}


def test_cancel_of_an_unknown_request_finds_nothing(agent: AgentProcess) -> None:
    """Cancelling an id that is not an exec in flight is harmless."""
    assert agent.call("cancel", target=12345) == {"found": False}


def test_timeouts_of_other_execs_leave_the_rest_running(agent: AgentProcess) -> None:
    """Killing one exec's tree does not touch another exec of the same slot."""
    survivor = tag()
    long_id = agent.send("exec", slot=0, command="sleep 2; echo done", env=tagged_env(survivor))
    short = run(agent, "sleep 1000", timeout_s=0.2)
    assert short["timed_out"] is True
    assert processes_with_env(survivor) != []
    assert agent.wait_reply(long_id)["result"]["stdout"] == b"done\n"


# -- files ------------------------------------------------------------------------------------


def test_file_round_trip_of_random_bytes(tmp_path: Path) -> None:
    """Any bytes written to any nested path read back identical, with the size reported."""
    with AgentProcess(str(tmp_path)) as agent:

        @settings(
            max_examples=40,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture],
        )
        @given(
            data=st.binary(max_size=200_000),
            parts=st.lists(
                st.text("abcxyz._-", min_size=1, max_size=8).filter(lambda p: p not in (".", "..")),
                min_size=1,
                max_size=3,
            ),
        )
        def round_trip(data: bytes, parts: list[str]) -> None:
            path = "/".join(parts)
            reply = agent.request("write_file", slot=1, path=path, data=data)
            if not reply["ok"]:
                # A path whose prefix is a file written by an earlier example.
                assert reply["error"]["code"] in ("not_a_directory", "is_a_directory", "exists")
                return
            assert reply["result"] == {"size": len(data)}
            read = agent.call("read_file", slot=1, path=path)
            assert read == {"data": data, "size": len(data), "truncated": False}

        round_trip()


def test_write_file_is_atomic_and_sets_the_mode(agent: AgentProcess, tmp_path: Path) -> None:
    """write_file creates parents, replaces atomically, applies the mode, leaves no temp file."""
    agent.call("write_file", slot=0, path="a/b/c.sh", data=b"#!/bin/sh\necho run\n", mode=0o755)
    agent.call("write_file", slot=0, path="a/b/c.sh", data=b"#!/bin/sh\necho new\n", mode=0o755)
    target = tmp_path / "slots" / "slot-0" / "a" / "b" / "c.sh"
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    assert run(agent, "./a/b/c.sh")["stdout"] == b"new\n"
    assert sorted(os.listdir(target.parent)) == ["c.sh"]
    agent.call("write_file", slot=0, path="plain", data=b"")
    assert stat.S_IMODE((target.parents[2] / "plain").stat().st_mode) == 0o644


def test_read_file_truncates_at_max_bytes(agent: AgentProcess) -> None:
    """max_bytes limits the data returned; size is the whole file and truncated is set."""
    agent.call("write_file", slot=0, path="f", data=b"0123456789")
    assert agent.call("read_file", slot=0, path="f", max_bytes=4) == {
        "data": b"0123",
        "size": 10,
        "truncated": True,
    }
    assert agent.call("read_file", slot=0, path="f", max_bytes=10)["truncated"] is False


def test_file_errors_have_stable_codes(agent: AgentProcess) -> None:
    """Missing files, directories and non-regular files give distinct codes."""
    run(agent, "mkdir d; mkfifo fifo; touch file")
    assert agent.error("read_file", slot=0, path="missing")["code"] == "not_found"
    assert agent.error("read_file", slot=0, path="d")["code"] == "is_a_directory"
    assert agent.error("read_file", slot=0, path="fifo")["code"] == "not_a_file"
    assert agent.error("write_file", slot=0, path="d", data=b"x")["code"] == "is_a_directory"
    assert agent.error("write_file", slot=0, path=".", data=b"x")["code"] == "is_a_directory"
    assert agent.error("write_file", slot=0, path="file/x", data=b"x")["code"] == "not_a_directory"
    assert agent.error("list_files", slot=0, path="file")["code"] == "not_a_directory"
    assert agent.error("list_files", slot=0, path="missing")["code"] == "not_found"


@pytest.mark.parametrize("op", ["read_file", "write_file", "list_files"])
@pytest.mark.parametrize(
    "path",
    ["../outside", "sub/../../outside", "/etc/passwd", "link_out/passwd", "link_out", "dangling"],
)
def test_file_ops_refuse_paths_leaving_the_workspace(
    agent: AgentProcess, tmp_path: Path, op: str, path: str
) -> None:
    """`..`, absolute paths and symlinks that resolve outside the workspace are refused."""
    (tmp_path / "slots" / "outside").write_bytes(b"secret")
    run(agent, "mkdir sub; ln -s /etc link_out; ln -s ../../outside_new dangling")
    args = {"data": b"x"} if op == "write_file" else {}
    error = agent.error(op, slot=0, path=path, **args)
    assert error["code"] == "path_escape"
    assert "outside the workspace" in error["message"]
    assert not (tmp_path / "outside_new").exists()
    assert (tmp_path / "slots" / "outside").read_bytes() == b"secret"


def test_paths_inside_the_workspace_are_accepted_in_any_spelling(
    agent: AgentProcess, tmp_path: Path
) -> None:
    """Absolute paths inside the workspace and symlinks staying inside are fine."""
    workspace = tmp_path / "slots" / "slot-0"
    agent.call("write_file", slot=0, path=str(workspace / "x" / "f"), data=b"abs")
    run(agent, "ln -s x inner")
    assert agent.call("read_file", slot=0, path="inner/f")["data"] == b"abs"
    assert agent.call("read_file", slot=0, path="x/../x/./f")["data"] == b"abs"


def test_list_files_lists_sorted_entries(agent: AgentProcess) -> None:
    """list_files gives types, sizes, mtimes, recursively on request, truncated at max_entries."""
    run(agent, "mkdir -p d/e; printf abc > d/f; printf 12345 > .hidden; ln -s d l; mkfifo p")
    top = agent.call("list_files", slot=0)
    for entry in top["entries"]:
        assert abs(entry.pop("mtime") - time.time()) < 60
    assert top == {
        "entries": [
            {"path": ".hidden", "type": "file", "size": 5},
            {"path": "d", "type": "dir", "size": top["entries"][1]["size"]},
            {"path": "l", "type": "symlink", "size": 1},
            {"path": "p", "type": "other", "size": 0},
        ],
        "truncated": False,
    }
    everything = agent.call("list_files", slot=0, recursive=True)
    assert [entry["path"] for entry in everything["entries"]] == [
        ".hidden",
        "d",
        "d/e",
        "d/f",
        "l",
        "p",
    ]
    sub = agent.call("list_files", slot=0, path="d", recursive=True)
    assert [entry["path"] for entry in sub["entries"]] == ["d/e", "d/f"]
    cut = agent.call("list_files", slot=0, recursive=True, max_entries=3)
    assert [entry["path"] for entry in cut["entries"]] == [".hidden", "d", "d/e"]
    assert cut["truncated"] is True


def test_slots_have_separate_workspaces(agent: AgentProcess, tmp_path: Path) -> None:
    """Each slot works in its own 0700 directory under the workspace root."""
    agent.call("write_file", slot=0, path="f", data=b"zero")
    agent.call("write_file", slot=3, path="f", data=b"three")
    assert agent.call("read_file", slot=3, path="f")["data"] == b"three"
    assert run(agent, "cat f", slot=3)["stdout"] == b"three"
    workspace = tmp_path / "slots" / "slot-3"
    assert stat.S_IMODE(workspace.stat().st_mode) == 0o700


def test_a_workspace_replaced_by_a_symlink_is_not_followed(
    agent: AgentProcess, tmp_path: Path
) -> None:
    """A command that swaps its workspace for a symlink cannot steer file ops or a reset there."""
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "keep").write_bytes(b"data")
    run(agent, f"cd .. && rm -rf slot-0 && ln -s {outside} slot-0")
    assert agent.error("read_file", slot=0, path="keep")["code"] == "not_found"
    agent.call("reset_slot", slot=0)
    assert (outside / "keep").read_bytes() == b"data"
    assert not (tmp_path / "slots" / "slot-0").is_symlink()


# -- reset ------------------------------------------------------------------------------------


def test_reset_kills_background_processes_and_wipes_the_workspace(
    agent: AgentProcess, tmp_path: Path
) -> None:
    """reset_slot kills escaped background processes, wipes dotfiles and read-only trees."""
    marker = tag()
    run(
        agent,
        "setsid sleep 1000 & nohup sleep 1000 >/dev/null 2>&1 & (sleep 1000 &);"
        "mkdir -p .cache/ro/deep && touch .dot .cache/ro/deep/f && chmod -R a-w .cache",
        env=tagged_env(marker),
    )
    other = tag()
    run(agent, "sleep 1000 &", slot=1, env=tagged_env(other))
    assert len(processes_with_env(marker)) == 3
    assert agent.call("reset_slot", slot=0)["killed"] == 3
    assert processes_with_env(marker) == []
    assert agent.call("list_files", slot=0) == {"entries": [], "truncated": False}
    assert stat.S_IMODE((tmp_path / "slots" / "slot-0").stat().st_mode) == 0o700
    assert len(processes_with_env(other)) == 1  # other slots are untouched
    agent.call("reset_slot", slot=1)
    assert processes_with_env(other) == []


def test_reset_cancels_execs_in_flight(agent: AgentProcess) -> None:
    """An exec still running in the slot being reset replies cancelled."""
    exec_id = agent.send("exec", slot=2, command="echo x; touch started; sleep 1000")
    wait_until_file(agent, 2, "started")
    assert agent.call("reset_slot", slot=2)["killed"] >= 1
    result = agent.wait_reply(exec_id, timeout=2.0)["result"]
    assert result["cancelled"] is True
    assert result["stdout"] == b"x\n"
    assert agent.call("ping")["execs"] == 0


@pytest.mark.skipif(not IS_ROOT, reason="needs root to start the agent as another uid")
def test_reset_by_an_unprivileged_agent_wipes_read_only_trees(open_root: Path) -> None:
    """Without root's powers, read-only and unreadable directories are still wiped."""
    root = open_root / "slots"
    root.mkdir()
    os.chown(root, 65534, 65534)
    with AgentProcess(str(root), python=SYSTEM_PYTHON, user=65534) as agent:
        assert agent.ready["result"]["uid"] == 65534
        run(agent, "mkdir -p a/b/c && touch a/b/c/f .x && chmod 500 a/b/c && chmod 000 a/b a")
        assert run(agent, "rm -rf a")["exit_code"] != 0  # the tree really resists
        agent.call("reset_slot", slot=0)
        assert agent.call("list_files", slot=0)["entries"] == []


# -- slot users -------------------------------------------------------------------------------


@pytest.mark.skipif(not IS_ROOT, reason="slot uids need the agent to run as root")
def test_slots_run_as_their_own_uid_and_cannot_read_each_other(open_root: Path) -> None:
    """With slot_uid_base, slot N runs as base+N without groups, owns its files, is confined."""
    base = 41000
    root = open_root / "slots"
    with AgentProcess(str(root), slot_uid_base=base) as agent:
        assert "slot_uids" in agent.ready["result"]["features"]
        assert run(agent, "id -u; id -g; id -G", slot=1)["stdout"] == b"41001\n41001\n41001\n"
        assert run(agent, "grep CapEff /proc/self/status", slot=1)["stdout"].split()[1] == (
            b"0000000000000000"
        )
        agent.call("write_file", slot=0, path="dir/secret", data=b"zero's", mode=0o644)
        secret = root / "slot-0" / "dir" / "secret"
        assert (secret.stat().st_uid, secret.parent.stat().st_uid) == (base, base)
        assert (root / "slot-0").stat().st_uid == base
        peek = run(agent, "cat ../slot-0/dir/secret", slot=1)
        assert peek["exit_code"] != 0
        assert peek["stdout"] == b""
        # The agent's own file ops refuse a symlink into another slot.
        run(agent, "ln -s ../slot-0 peer", slot=1)
        assert agent.error("read_file", slot=1, path="peer/dir/secret")["code"] == "path_escape"
        run(agent, "touch mine", slot=1)
        assert (root / "slot-1" / "mine").stat().st_uid == base + 1


@pytest.mark.skipif(not IS_ROOT, reason="slot uids need the agent to run as root")
def test_a_shell_call_cannot_make_the_agent_open_what_replaced_its_fifo(open_root: Path) -> None:
    """A command that swaps its output FIFO for a symlink to a root-only file does not get the
    agent to read that file into a later result; the next call gets new FIFOs."""
    secret = open_root / "secret"
    secret.write_bytes(b"root's secret\n")
    secret.chmod(0o600)
    with AgentProcess(str(open_root / "slots"), slot_uid_base=44000) as agent:
        swap = (
            f"p=$(readlink /proc/$$/fd/1); ln -sf {secret} $p.new && mv -f $p.new $p; "
            f"q=$(readlink /proc/$$/fd/2); ln -sf {secret} $q.new && mv -f $q.new $q; echo swapped"
        )
        first = agent.call("exec", slot=0, shell="persistent", command=swap)
        assert first["stdout"] == b"swapped\n"
        for _ in range(2):
            command = "echo out; echo err >&2"
            result = agent.call("exec", slot=0, shell="persistent", command=command)
            assert (result["stdout"], result["stderr"]) == (b"out\n", b"err\n")
        assert secret.read_bytes() == b"root's secret\n"
        assert secret.stat().st_uid == 0


@pytest.mark.skipif(not IS_ROOT, reason="slot uids need the agent to run as root")
def test_reset_with_slot_uids_kills_escapees_without_markers(open_root: Path) -> None:
    """A process that dropped its environment and session still dies on reset (by uid)."""
    with AgentProcess(str(open_root / "slots"), slot_uid_base=42000) as agent:
        run(agent, "setsid env -i /bin/sleep 1000 & echo $! > pid", slot=0)
        pid = int(agent.call("read_file", slot=0, path="pid")["data"])
        assert pid_alive(pid)
        assert agent.call("reset_slot", slot=0)["killed"] >= 1
        deadline = time.monotonic() + 2.0
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not pid_alive(pid)


# -- protocol errors --------------------------------------------------------------------------


def test_malformed_frames_get_bad_frame_and_the_agent_keeps_serving(agent: AgentProcess) -> None:
    """Undecodable frames are answered with id 0 bad_frame; later requests work."""
    for text, blobs in [(b"{oops", b""), (b"[]", b""), (b'{"id": 1}', b"extra"), (b"{}", b"")]:
        agent.write_raw(struct.pack(">II", len(text), len(blobs)) + text + blobs)
        reply = agent.wait_reply(0)
        assert reply["ok"] is False
        assert reply["error"]["code"] == "bad_frame"
    assert run(agent, "echo alive")["stdout"] == b"alive\n"


@pytest.mark.parametrize(
    ("op", "args"),
    [
        ("exec", {}),
        ("exec", {"slot": 0}),
        ("exec", {"slot": -1, "command": "true"}),
        ("exec", {"slot": True, "command": "true"}),
        ("exec", {"slot": "0", "command": "true"}),
        ("exec", {"slot": 0, "command": "true", "argv": ["true"]}),
        ("exec", {"slot": 0, "argv": []}),
        ("exec", {"slot": 0, "argv": ["echo", 1]}),
        ("exec", {"slot": 0, "command": "true", "timeout_s": "soon"}),
        ("exec", {"slot": 0, "command": "true", "timeout_s": -1}),
        ("exec", {"slot": 0, "command": "true", "timeout_s": float("nan")}),
        ("exec", {"slot": 0, "command": "true", "env": {"A": 1}}),
        ("exec", {"slot": 0, "command": "true", "env": {"A=B": "c"}}),
        ("exec", {"slot": 0, "command": "true", "stdin": "text"}),
        ("exec", {"slot": 0, "command": "true", "max_output_bytes": -1}),
        ("exec", {"slot": 0, "command": "a\0b"}),
        ("read_file", {"slot": 0}),
        ("read_file", {"slot": 0, "path": "x", "max_bytes": "all"}),
        ("write_file", {"slot": 0, "path": "x", "data": "text"}),
        ("write_file", {"slot": 0, "path": "x", "data": b"", "mode": 0o70000}),
        ("list_files", {"slot": 0, "recursive": "yes"}),
        ("cancel", {"target": "7"}),
        ("reset_slot", {}),
    ],
)
def test_bad_arguments_get_bad_request(agent: AgentProcess, op: str, args: dict) -> None:
    """Missing or mistyped arguments are refused with bad_request, never a crash."""
    assert agent.error(op, **args)["code"] == "bad_request"
    assert agent.call("ping")["execs"] == 0


def test_unknown_op_is_refused(agent: AgentProcess) -> None:
    """An op the agent does not know gets unknown_op with the request's id."""
    error = agent.error("format_disk")
    assert error["code"] == "unknown_op"
    assert "format_disk" in error["message"]


def test_an_impossible_header_makes_the_agent_exit(agent: AgentProcess) -> None:
    """A header announcing a frame beyond the limit ends the agent and its commands."""
    marker = tag()
    agent.send("exec", slot=0, command="sleep 1000", env=tagged_env(marker))
    while not processes_with_env(marker):
        time.sleep(0.01)
    agent.write_raw(struct.pack(">II", 2**31, 2**31))
    assert agent.wait_exit(5.0) == 5
    assert processes_with_env(marker) == []


def test_a_host_that_stops_reading_loses_no_replies(tmp_path: Path) -> None:
    """Replies for a host that does not read are buffered; requests wait, then all are served."""
    with AgentProcess(str(tmp_path), outbox_high_water=100_000) as agent:
        ids = [
            agent.send("exec", slot=0, command=f"head -c 200000 /dev/zero; echo {index} >&2")
            for index in range(20)
        ]
        time.sleep(0.5)  # the agent fills the pipe and its buffer while nobody reads
        ping_ids = [agent.send("ping") for _ in range(5)]  # taken in only as the host reads
        for index, request_id in enumerate(ids):
            result = agent.wait_reply(request_id)["result"]
            assert result["stdout"] == bytes(200000)
            assert result["stderr"] == f"{index}\n".encode()
        for ping_id in ping_ids:
            assert agent.wait_reply(ping_id)["result"]["execs"] == 0


# -- lifecycle --------------------------------------------------------------------------------


def start_background(agent: AgentProcess, marker: str) -> None:
    run(agent, "setsid sleep 1000 & (sleep 1000 &)", env=tagged_env(marker))
    inflight = agent.send("exec", slot=1, command="sleep 1000", env=tagged_env(marker))
    while len(processes_with_env(marker)) < 3:
        time.sleep(0.01)
    assert inflight > 0


def test_stdin_eof_kills_everything_and_exits(agent: AgentProcess) -> None:
    """When the host closes the stream, the agent kills all it started and exits 0."""
    marker = tag()
    start_background(agent, marker)
    agent.close_stdin()
    assert agent.wait_exit(5.0) == 0
    assert processes_with_env(marker) == []


def test_ttl_expiry_kills_everything_and_exits(tmp_path: Path) -> None:
    """With no frame for ttl_s the agent kills all it started and exits; pings keep it alive."""
    with AgentProcess(str(tmp_path), ttl_s=0.5) as agent:
        marker = tag()
        start_background(agent, marker)
        for _ in range(6):  # 1.2 s of pings, each inside the ttl
            time.sleep(0.2)
            agent.call("ping")
        assert agent.process.poll() is None
        started = time.monotonic()
        assert agent.wait_exit(5.0) == 4
        assert time.monotonic() - started < 1.5
        assert processes_with_env(marker) == []
        assert "ttl" in agent.stderr_text()


def test_sigterm_kills_everything_and_exits(agent: AgentProcess) -> None:
    """SIGTERM to the agent has it kill everything it started before exiting."""
    marker = tag()
    start_background(agent, marker)
    agent.process.send_signal(signal.SIGTERM)
    assert agent.wait_exit(5.0) == 128 + signal.SIGTERM
    assert processes_with_env(marker) == []


def test_shutdown_replies_then_kills_everything(agent: AgentProcess) -> None:
    """shutdown answers, in-flight execs reply cancelled, processes die, the agent exits 0."""
    marker = tag()
    exec_id = agent.send("exec", slot=0, command="echo x; sleep 1000", env=tagged_env(marker))
    while not processes_with_env(marker):
        time.sleep(0.01)
    shutdown_id = agent.send("shutdown")
    assert agent.wait_reply(shutdown_id)["result"] == {}
    assert agent.wait_reply(exec_id)["result"]["cancelled"] is True
    assert agent.wait_exit(5.0) == 0
    assert processes_with_env(marker) == []


def test_orphans_are_reaped(agent: AgentProcess) -> None:
    """Double-forked children that exit are reaped by the agent, leaving no zombies."""
    run(agent, "for i in 1 2 3 4 5; do (true &) ; done; sleep 0.2")
    run(agent, "sleep 0.1")
    rows = subprocess.run(
        ["ps", "-e", "-o", "pid=,ppid=,stat="], capture_output=True, text=True, check=True
    ).stdout.split("\n")
    table = [row.split() for row in rows if row.strip()]
    below = {agent.process.pid}
    for _ in range(3):  # the agent, its keepers, their adopted orphans
        below |= {int(pid) for pid, ppid, _ in table if int(ppid) in below}
    assert [pid for pid, _, state in table if int(pid) in below and state.startswith("Z")] == []


def test_ping_reports_time_and_execs_in_flight(agent: AgentProcess) -> None:
    """ping gives the agent's wall time and how many execs are running."""
    exec_id = agent.send("exec", slot=0, command="sleep 1000")
    before = time.time()
    pong = agent.call("ping")
    assert pong["execs"] == 1
    assert abs(pong["time"] - before) < 5
    agent.call("cancel", target=exec_id)
    agent.wait_reply(exec_id)


def test_bursts_of_execs_cancels_and_resets_keep_the_agent_alive(agent: AgentProcess) -> None:
    """Cancels and resets landing as commands finish never confuse the agent.

    A kill triggered by a request closes the command's pipes at once; an event for those fds
    already returned by the same select() must then be ignored, even if a new command got the
    same fd numbers meanwhile.
    """
    for round_number in range(30):
        ids = [agent.send("exec", slot=n % 4, command="echo out; echo err >&2") for n in range(30)]
        time.sleep(0.002 * (round_number % 5))
        cancels = [agent.send("cancel", target=request_id) for request_id in ids]
        resets = [agent.send("reset_slot", slot=slot) for slot in range(0, 4, 2)]
        more = [agent.send("exec", slot=n % 4, command="true") for n in range(10)]
        for request_id in ids + cancels + resets + more:
            reply = agent.wait_reply(request_id)
            assert reply["ok"], (round_number, reply)
    assert agent.call("ping")["execs"] == 0


def test_serial_requests_of_a_slot_run_one_at_a_time_in_order(agent: AgentProcess) -> None:
    """Serial requests sent together run in arrival order; other slots are not held up."""
    ids = [
        agent.send("exec", slot=0, serial=True, command="sleep 0.3; echo first >> log"),
        agent.send("write_file", slot=0, serial=True, path="note", data=b"after first"),
        agent.send("exec", slot=0, serial=True, command="cat note; echo second >> log; cat log"),
        agent.send("exec", slot=1, serial=True, command="echo other slot"),
    ]
    other = agent.wait_reply(ids[3])
    assert other["result"]["stdout"] == b"other slot\n"
    assert agent.call("ping")["execs"] == 1  # slot 0's second exec is still queued
    replies = [agent.wait_reply(request_id) for request_id in ids[:3]]
    assert all(reply["ok"] for reply in replies)
    assert replies[2]["result"]["stdout"] == b"after firstfirst\nsecond\n"


def test_a_queued_serial_exec_can_be_cancelled_before_it_runs(agent: AgentProcess) -> None:
    """Cancelling a queued serial exec answers it as cancelled; it never runs."""
    running = agent.send("exec", slot=0, serial=True, command="sleep 0.3")
    queued = agent.send("exec", slot=0, serial=True, command="touch ran")
    assert agent.call("cancel", target=queued) == {"found": True}
    result = agent.wait_reply(queued)["result"]
    assert result["cancelled"]
    assert result["stdout"] == b""
    assert agent.wait_reply(running)["result"]["exit_code"] == 0
    assert agent.error("read_file", slot=0, path="ran")["code"] == "not_found"


def test_reset_drops_queued_serial_requests_and_kills_the_running_one(
    agent: AgentProcess,
) -> None:
    """reset_slot answers queued serial requests as cancelled and runs none of them."""
    running = agent.send("exec", slot=0, serial=True, command="sleep 30")
    queued_exec = agent.send("exec", slot=0, serial=True, command="touch ran")
    queued_write = agent.send("write_file", slot=0, serial=True, path="w", data=b"x")
    agent.call("reset_slot", slot=0)
    assert agent.wait_reply(running)["result"]["cancelled"]
    assert agent.wait_reply(queued_exec)["result"]["cancelled"]
    assert agent.wait_reply(queued_write)["error"]["code"] == "cancelled"
    assert agent.call("list_files", slot=0)["entries"] == []


def test_a_serial_exec_timeout_counts_from_its_start(agent: AgentProcess) -> None:
    """A queued exec's timeout starts when it runs, not when it arrived."""
    first = agent.send("exec", slot=0, serial=True, command="sleep 0.5")
    second = agent.send("exec", slot=0, serial=True, command="sleep 0.2; echo done", timeout_s=0.4)
    assert agent.wait_reply(first)["result"]["exit_code"] == 0
    result = agent.wait_reply(second)["result"]
    assert (result["timed_out"], result["stdout"]) == (False, b"done\n")


def test_the_agent_raises_its_open_files_limit_and_commands_keep_theirs(tmp_path: Path) -> None:
    """The agent lifts its soft fd limit to the hard one; its commands keep the soft one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(soft, 512)
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    try:
        agent = AgentProcess(str(tmp_path / "slots"))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    with agent:
        own = agent_open_files_limit(agent.process.pid)
        fresh = run(agent, "ulimit -Sn; ulimit -Hn")
        persistent = run(agent, "ulimit -Sn; ulimit -Hn", shell="persistent")
    assert own == (hard, hard)
    assert fresh["stdout"] == persistent["stdout"] == f"{low}\n{hard}\n".encode()


def agent_open_files_limit(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open files line")
