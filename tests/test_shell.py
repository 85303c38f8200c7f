"""The persistent shell of a slot (exec with ``shell="persistent"``).

Part one runs against every driver (local none, local bwrap, modal on the emulator) through the
client; part two drives the agent directly, where /proc can be inspected around it.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from agent_harness import AgentProcess, pid_alive, processes_with_env, wait_no_processes_with_env
from fault_support import wait_for
from hermes_actors._agent import (
    _HOOK_FIELD,
    _HOOK_PROBE,
    _has_hooks,
    _heredoc_delimiter,
    _inert,
)
from hermes_actors._client import SandboxClient
from proc_support import children_of, comm, descendants_of, eventually
from sandbox_support import ContractSandbox, open_local_sandbox

IS_ROOT = os.getuid() == 0


async def sh(client: SandboxClient, command: str, slot: int = 0, **options: object):  # type: ignore[no-untyped-def]
    return await client.exec(slot, command=command, shell="persistent", **options)


# -- every driver -----------------------------------------------------------------------------


async def test_state_persists_between_calls(contract_sandbox: ContractSandbox) -> None:
    """cd, exported and plain variables, functions, aliases and options survive to the next call."""
    client = contract_sandbox.client
    first = await sh(
        client,
        "mkdir -p repo/src && cd repo; export API=on; plain=kept; greet() { echo hi $1; }; "
        "alias ll='echo listing'; set -o pipefail",
    )
    assert (first.exit_code, first.stdout, first.stderr) == (0, b"", b"")
    second = await sh(
        client, 'cd src; pwd; echo "$API $plain"; greet you; ll; [[ -o pipefail ]] && echo opt'
    )
    lines = second.stdout.decode().splitlines()
    assert lines[0].endswith("/slot-0/repo/src")
    assert lines[1:] == ["on kept", "hi you", "listing", "opt"]
    third = await sh(client, "pwd")
    assert third.stdout.decode().strip().endswith("/slot-0/repo/src")


async def test_slots_and_fresh_calls_do_not_share_the_state(
    contract_sandbox: ContractSandbox,
) -> None:
    """Another slot has its own shell, and a fresh call starts from the workspace every time."""
    client = contract_sandbox.client
    await sh(client, "export SEEN=slot0; cd /tmp")
    other = await sh(client, 'echo "[$SEEN]"; pwd', slot=1)
    fresh = await client.exec(0, command='echo "[$SEEN]"; pwd', shell="fresh")
    again = await sh(client, 'echo "[$SEEN]"; pwd')
    assert other.stdout.decode().splitlines()[0] == "[]"
    assert other.stdout.decode().splitlines()[1].endswith("/slot-1")
    assert fresh.stdout.decode().splitlines()[0] == "[]"
    assert fresh.stdout.decode().splitlines()[1].endswith("/slot-0")
    assert again.stdout == b"[slot0]\n/tmp\n"


async def test_output_streams_and_interleaving(contract_sandbox: ContractSandbox) -> None:
    """stdout and stderr come apart, or merged in the order they were written; stdin is empty."""
    client = contract_sandbox.client
    command = "echo one; echo two >&2; echo three; echo four >&2"
    apart = await sh(client, command)
    merged = await sh(client, command, merge_stderr=True)
    fresh_merged = await client.exec(0, command=command, merge_stderr=True)
    stdin = await sh(client, 'read line; echo "read=$? [$line]"; cat; python3 -c "pass"; echo ok')
    assert (apart.stdout, apart.stderr) == (b"one\nthree\n", b"two\nfour\n")
    assert (merged.stdout, merged.stderr) == (b"one\ntwo\nthree\nfour\n", b"")
    assert (fresh_merged.stdout, fresh_merged.stderr) == (b"one\ntwo\nthree\nfour\n", b"")
    assert stdin.stdout == b"read=1 []\nok\n"


async def test_timeout_ends_the_line_and_keeps_the_shell(
    contract_sandbox: ContractSandbox,
) -> None:
    """A timeout kills the command's tree, skips the rest of its line, and keeps the state."""
    client = contract_sandbox.client
    resting = contract_sandbox.process_count()  # every slot's shell, started ahead of its calls
    await sh(client, "cd /tmp; kept=yes")
    slow = await sh(client, "echo partial; sleep 30 & sleep 30; echo never", timeout_s=0.5)
    loop = await sh(client, "while :; do :; done; echo never", timeout_s=0.5)
    after = await sh(client, 'echo "$kept"; pwd')
    assert (slow.exit_code, slow.timed_out, slow.stdout) == (124, True, b"partial\n")
    assert (loop.exit_code, loop.timed_out, b"never" in loop.stdout) == (124, True, False)
    assert not slow.shell_restarted
    assert after.stdout == b"yes\n/tmp\n"
    assert not after.shell_restarted
    # The shell itself stays: nothing else of the slot is left.
    await eventually(lambda: contract_sandbox.process_count() == resting)


async def test_exit_and_exec_replace_the_shell_with_its_state(
    contract_sandbox: ContractSandbox,
) -> None:
    """`exit 3` and `exec sleep 1` end the shell: flagged, and the next one has cwd and exports."""
    client = contract_sandbox.client
    await sh(client, "mkdir -p deep && cd deep; export KEEP=1; unset PAGER; local_only=1")
    exited = await sh(client, "exit 3")
    assert (exited.exit_code, exited.shell_restarted) == (3, True)
    restored = await sh(client, 'pwd; echo "${KEEP-} ${PAGER-unset} ${local_only-gone}"')
    assert not restored.shell_restarted
    lines = restored.stdout.decode().splitlines()
    assert lines[0].endswith("/slot-0/deep")
    assert lines[1] == "1 unset gone"
    # What the ending call itself changed was never reported: the last known state is older.
    replaced = await sh(client, "export LATER=2; exec sleep 1")
    assert (replaced.exit_code, replaced.shell_restarted) == (0, True)
    assert (await sh(client, 'echo "$KEEP${LATER-}"')).stdout == b"1\n"


async def test_background_job_outlives_its_call_without_leaking(
    contract_sandbox: ContractSandbox,
) -> None:
    """A background job keeps running and writing; its later output is in no other result."""
    client = contract_sandbox.client
    started = await sh(
        client,
        "(sleep 0.2; for i in 1 2 3 4 5 6; do echo late$i; echo err$i >&2; sleep 0.1; done; "
        "touch survived) & echo started",
    )
    assert started.stdout == b"started\n"
    outputs = []
    for _ in range(12):
        result = await sh(client, "echo tick")
        outputs.append(result.stdout + result.stderr)
        await trio.sleep(0.06)
    assert all(output == b"tick\n" for output in outputs), outputs
    with trio.fail_after(5):
        while (await sh(client, "test -e survived")).exit_code != 0:  # noqa: ASYNC110
            await trio.sleep(0.05)


async def test_reset_ends_the_shell_and_its_jobs(contract_sandbox: ContractSandbox) -> None:
    """Reset kills the shell and its background jobs; the next call starts clean."""
    client = contract_sandbox.client
    resting = contract_sandbox.process_count()  # every slot's shell, started ahead of its calls
    first = int((await sh(client, "echo $$")).stdout)
    await sh(client, "export DIRTY=1; cd /tmp; sleep 300 & sleep 300 &")
    # The jobs are forked when the call ends; each is counted once it has exec'd `sleep`.
    await eventually(lambda: contract_sandbox.process_count() >= resting + 2)
    await client.reset_slot(0)
    # The jobs and the shell are gone; a new shell waits for the slot's next call.
    await eventually(lambda: contract_sandbox.process_count() == resting)
    assert int((await sh(client, "echo $$")).stdout) != first
    clean = await sh(client, 'echo "[${DIRTY-}]"; pwd')
    assert clean.stdout.decode().splitlines()[0] == "[]"
    assert clean.stdout.decode().splitlines()[1].endswith("/slot-0")
    assert not clean.shell_restarted


async def test_a_reset_sets_an_idle_shell_back(contract_sandbox: ContractSandbox) -> None:
    """A reset keeps an idle shell (the same process) and the next lease sees none of the last
    one's state: variables, functions, aliases, options, cwd, files."""
    client = contract_sandbox.client
    first = await sh(
        client,
        "echo $$; export DIRTY=1; plain=1; cd /tmp; f() { :; }; alias a=b; set -o pipefail; "
        "touch $HOME/.left",
    )
    await client.reset_slot(0, keep_shell=True)
    clean = await sh(
        client,
        'echo $$; echo "[${DIRTY-}${plain-}]"; pwd; type -t f a; [[ -o pipefail ]]; echo $?; ls -A',
    )
    lines = clean.stdout.decode().splitlines()
    assert lines[0] == first.stdout.decode().splitlines()[0]
    assert lines[1] == "[]"
    assert lines[2].endswith("/slot-0")
    assert lines[3:] == ["1"]
    assert not clean.shell_restarted


async def test_fake_markers_and_random_bytes_are_just_output(
    contract_sandbox: ContractSandbox,
) -> None:
    """Whatever a command prints (binary, NULs, record-like text) comes back exactly."""
    client = contract_sandbox.client
    noise = os.urandom(20000) + b"\0\0\3E1\0\3\0\n0\0/\0E2\0\3"
    await client.write_file(0, "noise.bin", noise)
    result = await sh(
        client, "cat noise.bin; cat noise.bin >&2; printf 'x\\0\\3' >&3; echo $?", timeout_s=10
    )
    assert result.stdout == noise + b"1\n"
    assert result.stderr.startswith(noise)
    assert result.exit_code == 0
    assert (await sh(client, "echo next")).stdout == b"next\n"


async def test_commands_of_any_text_run_as_written(contract_sandbox: ContractSandbox) -> None:
    """Delimiter-like lines, a here-document, 200 KiB of text: run as written, stdin at EOF."""
    client = contract_sandbox.client
    nested = "cat <<'HERMES_END'\nHERMES_1\nEOF\nHERMES_END\nread line || echo eof"
    result = await sh(client, nested, timeout_s=10)
    assert (result.stdout, result.exit_code) == (b"HERMES_1\nEOF\neof\n", 0)
    big = "x='%s'\necho ${#x}" % ("a" * 200 * 1024)
    assert (await sh(client, big, timeout_s=30)).stdout == b"204800\n"
    assert (await sh(client, "echo next \\")).stdout == b"next\n"


def test_the_here_document_delimiter_is_no_line_of_the_command() -> None:
    """A command holding the delimiter as a line gets a longer one that none of its lines is."""
    body = b"echo a\nHERMES_n_7\nHERMES_n_7_x\n"
    delimiter = _heredoc_delimiter(body, "HERMES_n_7")
    assert delimiter.startswith("HERMES_n_7_")
    assert delimiter.encode() not in body.split(b"\n")
    assert _heredoc_delimiter(b"echo a\n", "HERMES_n_8") == "HERMES_n_8"


async def test_output_caps_keep_head_and_tail(contract_sandbox: ContractSandbox) -> None:
    """Big output keeps its head and tail, with the exact number of bytes dropped."""
    result = await sh(
        contract_sandbox.client,
        "head -c 100000 /dev/zero | tr '\\0' a; echo; echo end",
        max_output_bytes=1000,
    )
    assert len(result.stdout) == 1000
    assert result.stdout_dropped == 100005 - 1000
    assert result.stdout.startswith(b"a" * 500)
    assert result.stdout.endswith(b"a\nend\n")


# -- the agent, directly ----------------------------------------------------------------------


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    with AgentProcess(str(tmp_path / "slots")) as process:
        yield process


def run(agent: AgentProcess, command: str, **args: object) -> dict[str, object]:
    args.setdefault("slot", 0)
    args.setdefault("shell", "persistent")
    return agent.call("exec", command=command, **args)


def shell_pid(agent: AgentProcess, slot: int = 0) -> int:
    return int(str(run(agent, "echo $$", slot=slot)["stdout"]).strip("b'\\n"))


def _kill_shell(pid: int) -> None:
    """SIGKILL a shell and give the agent a moment to learn of it: a call sent before that
    goes to the dead shell and reports its death instead of running in a new one."""
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: not os.path.exists(f"/proc/{pid}"), timeout_s=10)
    time.sleep(0.05)


def test_cancel_kills_the_command_and_keeps_the_shell(agent: AgentProcess) -> None:
    """A cancelled call reports cancelled; its processes are gone; the shell keeps its state."""
    marker = "HERMES_TEST_TAG=" + uuid.uuid4().hex
    run(agent, "kept=1; export " + marker)
    pid = shell_pid(agent)
    request = agent.send(
        "exec", slot=0, shell="persistent", command="sleep 300 & sleep 300; echo never"
    )
    deadline = time.monotonic() + 10
    while len(processes_with_env(marker)) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert agent.call("cancel", target=request) == {"found": True}
    result = agent.wait_reply(request)["result"]
    assert result["cancelled"]
    assert b"never" not in result["stdout"]
    assert wait_no_processes_with_env(marker) == []
    assert pid_alive(pid)
    assert run(agent, 'echo "$kept $$"')["stdout"] == f"1 {pid}\n".encode()


def test_a_killed_shell_is_replaced_and_the_next_result_says_so(agent: AgentProcess) -> None:
    """A shell killed between calls comes back with its cwd and exports, flagged once."""
    run(agent, "cd /tmp; export KEEP=yes")
    _kill_shell(shell_pid(agent))
    replaced = run(agent, 'echo "$KEEP"; pwd')
    assert replaced["shell_restarted"] is True
    assert replaced["stdout"] == b"yes\n/tmp\n"
    assert run(agent, "true")["shell_restarted"] is False


def test_a_trapped_interrupt_falls_back_to_a_new_shell(agent: AgentProcess) -> None:
    """A shell that ignores the interrupt past its timeout is replaced, flagged, state restored."""
    run(agent, "export KEEP=yes; trap '' INT")
    result = run(agent, "while :; do :; done", timeout_s=0.3)
    assert (result["exit_code"], result["timed_out"], result["shell_restarted"]) == (
        124,
        True,
        True,
    )
    assert run(agent, 'echo "$KEEP"')["stdout"] == b"yes\n"


def test_shell_and_jobs_die_with_the_agent(tmp_path: Path) -> None:
    """When the agent exits, the persistent shells and their background jobs are gone."""
    marker = "HERMES_TEST_TAG=" + uuid.uuid4().hex
    with AgentProcess(str(tmp_path / "slots")) as agent:
        run(agent, f"export {marker}; sleep 300 & sleep 300 &")
        shells = [shell_pid(agent), shell_pid(agent, slot=3)]
        assert len(processes_with_env(marker)) == 2
    assert wait_no_processes_with_env(marker) == []
    assert not any(pid_alive(pid) for pid in shells)
    assert not any(name.startswith(".hermes-shells") for name in os.listdir(tmp_path / "slots"))


def test_persistent_calls_wait_their_turn(agent: AgentProcess) -> None:
    """Persistent calls for one slot run one after another, even when not sent as serial."""
    first = agent.send("exec", slot=0, shell="persistent", command="sleep 0.3; echo a")
    second = agent.send("exec", slot=0, shell="persistent", command="echo b")
    assert agent.wait_reply(first)["result"]["stdout"] == b"a\n"
    assert agent.wait_reply(second)["result"]["stdout"] == b"b\n"


def test_bad_shell_arguments_are_refused(agent: AgentProcess) -> None:
    """Unknown modes, stdin data and bad env names get a clear bad_request."""
    bad_mode = agent.error("exec", slot=0, command="true", shell="sticky")
    with_stdin = agent.error("exec", slot=0, command="cat", shell="persistent", stdin=b"x")
    bad_name = agent.error("exec", slot=0, command="true", shell="persistent", env={"A B": "1"})
    assert bad_mode["code"] == with_stdin["code"] == bad_name["code"] == "bad_request"
    assert "fresh" in with_stdin["message"]


@pytest.mark.skipif(not IS_ROOT, reason="slot uids need root")
def test_the_shell_runs_as_the_slot_uid(open_root: Path) -> None:
    """With slot uids, the shell and its commands run as the slot's uid, HOME its workspace."""
    with AgentProcess(str(open_root / "slots"), slot_uid_base=47100) as agent:
        result = run(agent, 'id -u; echo "$HOME"; cd /tmp; touch "$HOME/mine"', slot=2)
        lines = result["stdout"].decode().splitlines()  # type: ignore[attr-defined]
        assert lines[:1] == ["47102"], repr(result)
        assert lines[1].endswith("/slot-2")
        assert (open_root / "slots" / "slot-2" / "mine").stat().st_uid == 47102
        assert run(agent, "pwd", slot=2)["stdout"] == b"/tmp\n"


@pytest.mark.skipif(not IS_ROOT, reason="slot uids need root")
def test_no_command_can_reach_into_its_shell(open_root: Path) -> None:
    """A slot's command cannot ptrace its shell nor write its memory, which a reset may keep."""
    probe = (
        "import os, sys\n"
        "shell = os.getppid()\n"
        "try:\n"
        "    open('/proc/%d/mem' % shell, 'r+b')\n"
        "except PermissionError:\n"
        "    sys.exit(0)\n"
        "sys.exit(1)\n"
    )
    with AgentProcess(str(open_root / "slots"), slot_uid_base=47200) as agent:
        result = run(agent, f"python3 -c {shlex.quote(probe)}; echo $?; id -u", slot=1)
        assert result["stdout"] == b"0\n47201\n", result


@pytest.mark.skipif(not IS_ROOT, reason="slot uids need root")
def test_the_shell_keeps_the_loader_and_library_variables(open_root: Path) -> None:
    """Variables a secure-mode start drops (LD_*, TMPDIR, CDPATH) reach the shell's commands."""
    env = {"LD_LIBRARY_PATH": "/opt/lib:/x y", "TMPDIR": "/tmp", "CDPATH": ".:/", "KEEP": "it's"}
    with AgentProcess(str(open_root / "slots"), slot_uid_base=47300, env=env) as agent:
        command = 'printf "%s|" "$LD_LIBRARY_PATH" "$TMPDIR" "$CDPATH" "$KEEP"; env | grep -c ^LD_'
        result = run(agent, command, slot=0)
        fresh = run(agent, command, slot=0, shell="fresh")
        assert result["stdout"] == b"/opt/lib:/x y|/tmp|.:/|it's|1\n", result
        assert fresh["stdout"] == result["stdout"]
        # A shell that ended in its first call (no exports reported yet) is replaced by one
        # that has them too.
        assert run(agent, "exit 3", slot=1)["shell_restarted"] is True
        assert run(agent, command, slot=1)["stdout"] == result["stdout"]


@pytest.fixture
def open_root() -> Iterator[Path]:
    """A workspace root other uids can traverse (pytest's tmp_path is private to root)."""
    import shutil
    import subprocess
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="hermes-shell-test-"))
    path.chmod(0o755)
    yield path
    subprocess.run(["chmod", "-R", "u+rwx", str(path)], check=False)
    shutil.rmtree(path)


def test_end_shell_forgets_the_state_but_keeps_files_and_jobs(agent: AgentProcess) -> None:
    """end_shell (a release that keeps the slot) ends only the shell: the next call is clean."""
    marker = "HERMES_TEST_TAG=" + uuid.uuid4().hex
    run(agent, f"export KEEP=1; cd /tmp; echo data > $HOME/kept; {marker} sleep 300 &")
    pid = shell_pid(agent)
    assert agent.call("end_shell", slot=0, serial=True) == {"ended": True}
    clean = run(agent, 'echo "[${KEEP-}]"; pwd; cat kept')
    assert clean["stdout"].decode().splitlines()[0] == "[]"  # type: ignore[attr-defined]
    assert clean["stdout"].decode().splitlines()[2] == "data"  # type: ignore[attr-defined]
    assert clean["shell_restarted"] is False
    assert not pid_alive(pid)
    # The job carries the marker once it has exec'd `sleep` (its fork may not have yet).
    assert wait_for(lambda: len(processes_with_env(marker)) == 1, timeout_s=5)
    assert agent.call("end_shell", slot=5) == {"ended": False}
    agent.call("reset_slot", slot=0)
    assert wait_no_processes_with_env(marker) == []


def test_the_shells_directory_removed_by_a_command_is_made_again(agent: AgentProcess) -> None:
    """A command deleting the agent's FIFO directory (same uid, no isolation) breaks nothing."""
    run(agent, "export KEEP=1")
    removed = run(agent, "rm -rf ../.hermes-shells-*; echo gone")
    assert removed["stdout"] == b"gone\n"
    after = run(agent, 'echo "$KEEP"; echo err >&2')
    assert (after["stdout"], after["stderr"], after["exit_code"]) == (b"1\n", b"err\n", 0)


# -- a reset that keeps the shell -------------------------------------------------------------

#: What a lease can see of its shell, with builtins only (an external command would fill the
#: hash table): every variable with its attributes (bash's own changing ones without values),
#: functions, aliases, options, traps, umask, limits, dir stack, completions, disabled
#: builtins, jobs, history, hashed commands, special parameters, cwd, fds, the workspace.
STATE_PROBE = (
    "declare -p; declare -f; alias -p; shopt -p; set +o; trap -p; umask; ulimit -a; "
    "ulimit -Ha; dirs -l -p; complete -p; enable -n; jobs -l; history; hash -l 2>&1; "
    'echo "$0|$!|$#|$-"; pwd; printf "%s\\n" /proc/self/fd/*; shopt -s dotglob nullglob; '
    'printf "%s\\n" "$HOME"/*; shopt -u dotglob nullglob'
)
#: Variables whose values change by themselves from one call to the next. (BASH_LINENO, in a
#: call, counts the lines the shell has read: a kept shell shows that it read earlier calls,
#: as its pid and CPU times do; not what they were.)
CHANGING = {
    "_",
    "BASH_ARGC",
    "BASH_ARGV",
    "BASH_COMMAND",
    "BASH_LINENO",
    "BASHPID",
    "EPOCHREALTIME",
    "EPOCHSECONDS",
    "HISTCMD",
    "LINENO",
    "PIPESTATUS",
    "RANDOM",
    "SECONDS",
    "SRANDOM",
}


def probe_state(agent: AgentProcess, slot: int = 0) -> tuple[int, list[str]]:
    """The slot's shell pid and what a call sees of its state (changing values left out)."""
    result = run(agent, "echo $$; " + STATE_PROBE, slot=slot)
    assert result["exit_code"] == 0, result
    pid, *lines = result["stdout"].decode().splitlines()  # type: ignore[attr-defined]
    kept = []
    for line in lines:
        words = line.split(" ", 2)
        if len(words) == 3 and words[0] == "declare" and words[2].split("=")[0] in CHANGING:
            line = " ".join([*words[:2], words[2].split("=")[0]])
        kept.append(line)
    return int(pid), kept


#: One lease that changes every part of its shell's state that can be set back.
DIRTY_LEASE = (
    "mkdir -p repo/sub && cd repo/sub; export API=on; plain=1; declare -i counter=3; "
    "declare -a list=(a b); declare -A map=([k]=v); declare -n ref=plain; IFS=:; OPTIND=4; "
    "PATH=/nowhere:$PATH; PS1='$ '; HISTFILE=/tmp/h; BASH_XTRACEFD=2; TMOUT=9; CDPATH=/tmp; "
    "greet() { echo hi; }; cd() { builtin cd \"$@\"; }; export -f greet; alias ll='ls -l'; "
    "set -o pipefail -o nounset -o noglob -o allexport; set +o hashall; shopt -s extglob "
    "nullglob; trap 'echo trapped' USR1 EXIT; trap '' TERM; umask 077; pushd /usr >/dev/null; "
    "ulimit -S -c 0; complete -W 'a b' greet; ls >/dev/null; set -- x y z; touch .hidden file; "
    "true"
)


def test_a_reset_replaces_even_a_pristine_shell_unless_asked_to_keep_it(
    agent: AgentProcess,
) -> None:
    """Without keep_shell a reset ends the slot's shell, idle and pristine as it may be."""
    first = shell_pid(agent)
    assert agent.call("reset_slot", slot=0) == {"killed": 0, "shell_kept": False}
    second = shell_pid(agent)
    assert second != first
    assert agent.call("end_shell", slot=0) == {"ended": True}
    assert shell_pid(agent) != second


def test_warm_shells_wait_in_every_slot_and_come_back_after_a_reset(tmp_path: Path) -> None:
    """With ``warm_shells`` every slot's shell runs before the ready frame, so a first call
    finds its shell; a reset or end_shell starts the next one at once, clean."""
    with AgentProcess(str(tmp_path / "slots"), slots=3, warm_shells=True) as agent:
        assert agent.ready["ok"], agent.ready
        waiting = pids_under_keepers(agent)
        assert len(waiting) == 3  # one per slot, before any call
        firsts = [shell_pid(agent, slot) for slot in range(3)]
        assert set(firsts) == waiting
        run(agent, "export DIRTY=1; sleep 300 &")
        assert agent.call("reset_slot", slot=0)["killed"] == 1  # the job, not the shell
        assert wait_for(lambda: len(pids_under_keepers(agent) - set(firsts)) == 1, 10)
        [warm] = pids_under_keepers(agent) - set(firsts)
        after = run(agent, 'echo "$$ [${DIRTY-}]"')
        assert after["stdout"] == f"{warm} []\n".encode()
        assert after["shell_restarted"] is False
        assert agent.call("end_shell", slot=1) == {"ended": True}
        assert wait_for(lambda: firsts[1] not in pids_under_keepers(agent), 10)
        assert wait_for(lambda: len(pids_under_keepers(agent)) == 3, 10)
        assert shell_pid(agent, 1) not in firsts


async def test_a_sandbox_keeps_shells_ahead_only_for_a_persistent_profile() -> None:
    """Each slot of a persistent profile's sandbox has its shell before any call; a fresh
    profile's sandbox starts nothing until a call."""
    async with open_local_sandbox("none", slots_per_sandbox=3) as persistent:
        assert persistent.process_count() == 3
    async with open_local_sandbox("none", slots_per_sandbox=3, shell="fresh") as fresh:
        assert fresh.process_count() == 0
        await fresh.client.exec(0, command="true")
        assert fresh.process_count() == 0


def test_warm_shells_must_be_a_boolean(tmp_path: Path) -> None:
    with AgentProcess(str(tmp_path / "slots"), slots=1, warm_shells="yes") as agent:
        assert agent.ready["error"]["code"] == "bad_config"
        assert "'warm_shells' must be true or false" in agent.ready["error"]["message"]


def pids_under_keepers(agent: AgentProcess) -> set[int]:
    """The shells of the agent's slots: its keepers' bash children."""
    pids = set()
    for keeper in descendants_of(agent.process.pid):
        if comm(keeper) == "hermes-keeper":
            pids.update(pid for pid in children_of(keeper) if comm(pid) == "bash")
    return pids


def test_a_reset_does_not_count_a_shell_still_starting_as_a_process_it_killed(
    agent: AgentProcess,
) -> None:
    """A reset that comes while the slot's first shell starts (its keeper has not said its pid
    yet) kills it too, and counts only what else of the slot it killed: nothing here."""
    for _ in range(5):
        call = agent.send("exec", slot=0, shell="persistent", command="echo started")
        reset = agent.send("reset_slot", slot=0)
        assert agent.wait_reply(call)["ok"]
        assert agent.wait_reply(reset)["result"] == {"killed": 0, "shell_kept": False}
    assert run(agent, "echo $$")["exit_code"] == 0


def test_a_reset_keeps_the_idle_shell_and_the_next_lease_sees_a_new_one(
    agent: AgentProcess,
) -> None:
    """A reset sets an idle shell back: same process, and the next lease sees what a new shell
    shows (variables, functions, aliases, options, traps, umask, limits, cwd, fds, files)."""
    pid, before = probe_state(agent)
    dirty = run(agent, DIRTY_LEASE)
    assert dirty["exit_code"] == 0, dirty
    assert (
        run(agent, "echo $$; echo $API; type -t greet")["stdout"]
        == f"{pid}\non\nfunction\n".encode()
    )
    assert agent.call("reset_slot", slot=0, keep_shell=True) == {"killed": 0, "shell_kept": True}
    kept, after = probe_state(agent)
    assert kept == pid
    assert after == before
    again = run(agent, 'echo "[${API-}${plain-}]"; pwd; ls -A; type -t greet ll || true')
    assert again["stdout"] == f"[]\n{agent.config['workspace_root']}/slot-0\n".encode()
    assert again["shell_restarted"] is False


@pytest.mark.parametrize(
    "lease",
    [
        "readonly LOCKED=1",
        "sleep 0 & wait",
        "exec 7>/dev/null",
        "ulimit -H -c 0",
        "enable -n echo",
        "unset RANDOM; declare -i RANDOM=4",
        "unset LINENO",
        "BASH_ARGV0=other",
        "set -o history",
    ],
)
def test_a_reset_replaces_a_shell_it_cannot_set_back(agent: AgentProcess, lease: str) -> None:
    """What a reset cannot undo in place (a readonly variable, ``$!``, an open fd, a lowered
    hard limit, a disabled builtin, a lost dynamic variable, $0, history) gets a new shell."""
    pid, before = probe_state(agent)
    run(agent, lease)
    assert agent.call("reset_slot", slot=0, keep_shell=True)["shell_kept"] is False
    new_pid, after = probe_state(agent)
    assert new_pid != pid
    assert not pid_alive(pid)
    assert after == before
    # The new shell dumped only its own part at its start; it is kept at the next reset.
    assert agent.call("reset_slot", slot=0, keep_shell=True)["shell_kept"] is True
    assert probe_state(agent) == (new_pid, before)


def test_a_kept_shell_outlives_none_of_the_leases_processes(agent: AgentProcess) -> None:
    """Background processes that left the shell (double fork, setsid) die at a reset that
    keeps the shell; what the shell itself started (``$!``) makes it be replaced."""
    marker = "HERMES_TEST_TAG=" + uuid.uuid4().hex
    pid = shell_pid(agent)
    run(
        agent, f"( {marker} sleep 300 & ); {marker} setsid -f sleep 300 >/dev/null 2>&1 < /dev/null"
    )
    assert wait_for(lambda: len(processes_with_env(marker)) == 2, timeout_s=5)
    reset = agent.call("reset_slot", slot=0, keep_shell=True)
    assert reset == {"killed": 2, "shell_kept": True}
    assert processes_with_env(marker) == []
    assert shell_pid(agent) == pid
    run(agent, f"{marker} sleep 300 &")
    assert wait_for(lambda: len(processes_with_env(marker)) == 1, timeout_s=5)
    assert agent.call("reset_slot", slot=0, keep_shell=True)["shell_kept"] is False
    assert wait_no_processes_with_env(marker) == []
    assert not pid_alive(pid)


def test_a_kept_shells_directory_keeps_only_its_fifos(agent: AgentProcess) -> None:
    """A file a command leaves in the shell's FIFO directory is gone after a kept reset."""
    run(agent, "echo first")
    directory = next(Path(agent.config["workspace_root"]).glob(".hermes-shells-*/slot-0"))
    fifos = sorted(path.name for path in directory.iterdir())
    run(agent, f"touch {directory}/planted; mkdir {directory}/dir")
    assert agent.call("reset_slot", slot=0, keep_shell=True)["shell_kept"] is True
    assert sorted(path.name for path in directory.iterdir()) == fifos
    assert run(agent, "echo again")["stdout"] == b"again\n"


def test_a_trap_that_starts_processes_during_the_check_gets_a_new_shell(
    agent: AgentProcess,
) -> None:
    """A DEBUG trap that starts daemons while the reset checks the shell: the shell is not
    kept, and nothing the trap started survives the reset."""
    marker = "HERMES_TEST_TAG=" + uuid.uuid4().hex
    pid = shell_pid(agent)
    run(agent, f"trap '{marker} setsid -f sleep 300 >/dev/null 2>&1 </dev/null' DEBUG")
    assert agent.call("reset_slot", slot=0, keep_shell=True)["shell_kept"] is False
    assert wait_no_processes_with_env(marker) == []
    assert not pid_alive(pid)
    assert run(agent, "trap -p; echo clean")["stdout"] == b"clean\n"


def test_a_shell_too_slow_to_show_its_state_is_replaced(agent: AgentProcess) -> None:
    """A shell that does not dump its state within the reset's limit (a slow trap) is
    replaced; the reset still replies, and what the trap started is gone."""
    marker = "HERMES_TEST_TAG=" + uuid.uuid4().hex
    pid = shell_pid(agent)
    run(agent, f"trap '{marker} sleep 1' DEBUG; true")
    started = time.monotonic()
    assert agent.call("reset_slot", slot=0, keep_shell=True)["shell_kept"] is False
    assert time.monotonic() - started < 10
    assert wait_no_processes_with_env(marker) == []
    assert not pid_alive(pid)


def test_end_shell_sets_an_idle_shell_back_and_leaves_the_rest(agent: AgentProcess) -> None:
    """end_shell keeps an idle shell, set back as at a reset, while the slot's files and a
    detached process stay; the next call sees a new shell's state."""
    marker = "HERMES_TEST_TAG=" + uuid.uuid4().hex
    pid, before = probe_state(agent)
    run(
        agent,
        f"export KEEP=1; cd /tmp; f() {{ :; }}; echo data > $HOME/kept; ( {marker} sleep 300 & )",
    )
    assert wait_for(lambda: len(processes_with_env(marker)) == 1, timeout_s=5)
    assert agent.call("end_shell", slot=0, keep_shell=True, serial=True) == {"ended": True}
    assert shell_pid(agent) == pid
    assert len(processes_with_env(marker)) == 1
    assert (Path(agent.config["workspace_root"]) / "slot-0" / "kept").read_text() == "data\n"
    agent.call("end_shell", slot=0, keep_shell=True)
    (Path(agent.config["workspace_root"]) / "slot-0" / "kept").unlink()
    kept, after = probe_state(agent)
    assert kept == pid
    assert after == before
    agent.call("reset_slot", slot=0, keep_shell=True)
    assert wait_no_processes_with_env(marker) == []


def fifo_fds(agent: AgentProcess) -> list[str]:
    """The shells' FIFOs the agent holds open (a path per fd)."""
    directory = f"/proc/{agent.process.pid}/fd"
    targets = []
    for name in os.listdir(directory):
        with contextlib.suppress(OSError):
            targets.append(os.readlink(os.path.join(directory, name)))
    return sorted(target for target in targets if ".hermes-shells-" in target)


def test_a_fifo_serves_call_after_call_until_a_background_job_holds_it(
    agent: AgentProcess,
) -> None:
    """Calls reuse their open FIFO; one a job still holds is left to it, and closed once it ends."""
    path = run(agent, "readlink /proc/$$/fd/1")["stdout"]
    held = fifo_fds(agent)
    assert len(held) == 4  # stdout and stderr: a reader and the agent's own writer each
    assert run(agent, "readlink /proc/$$/fd/1")["stdout"] == path
    assert fifo_fds(agent) == held
    started = run(agent, "(sleep 0.3; echo late; echo late >&2) & echo started")
    assert started["stdout"] == b"started\n"
    moved = run(agent, "readlink /proc/$$/fd/1")
    assert moved["stdout"] not in (b"", path)
    assert wait_for(lambda: len(fifo_fds(agent)) == 4, timeout_s=5)
    assert b"late" not in run(agent, "sleep 0.4; echo done")["stdout"]


def test_a_command_moving_the_shells_own_descriptors_still_ends(agent: AgentProcess) -> None:
    """`exec >file`, `exec 1>&-` or `exec 3>file` in a command end its call, harming no other."""
    for command in ("exec >out 2>&1 3>three; echo hidden", "exec 1>&- 2>&- 3>&-"):
        result = run(agent, command)
        assert (result["stdout"], result["exit_code"]) == (b"", 0)
        after = run(agent, 'export KEPT=1; echo "visible $KEPT"; echo err >&2')
        assert (after["stdout"], after["stderr"]) == (b"visible 1\n", b"err\n")
        assert after["shell_restarted"] is False
    workspace = Path(str(run(agent, "pwd")["stdout"], "utf-8").strip())
    assert (workspace / "out").read_bytes() == b"hidden\n"
    assert (workspace / "three").read_bytes() == b""


# -- calls that cannot change the exported environment ------------------------------------------


@pytest.mark.parametrize(
    ("command", "inert"),
    [
        ("echo t1c2", True),
        ("/bin/echo hello world; ls -la src | grep -c py > count", True),
        ("git status && python3 -m pytest -q tests/test_x.py 2>&1 | tail -n 3", True),
        ("if true; then echo yes; else false; fi", True),
        ("cat <<'EOF'\nplain text\nEOF", True),
        ("cd /tmp", False),
        ("export A=1", False),
        ("A=1", False),
        ("echo $HOME", False),
        ("echo `date`", False),
        ("ex\\port A", False),
        ("e'x'p\"o\"rt A", False),
        ("ex\\\nport A", False),
        ("{ex,}port A", False),
        ("expor? A", False),
        ("~- A", False),
        ("f() { echo; }", False),
        ("source venv/bin/activate", False),
        (". venv/bin/activate", False),
        ("echo x | read line", False),
        ("for name in a b; do echo; done", False),
        ("echo ok;unset PATH", False),
        ("echo ok>/dev/null declare", False),
        ("echo the word set is enough", False),
        ("git add . && git commit -q -m msg", True),
        ("grep -rn needle . | head -n 3", True),
        ("echo x >out . x", True),
        ("time true", False),
        ("echo 'unclosed", False),
    ],
)
def test_only_a_command_that_can_set_no_variable_is_inert(command: str, inert: bool) -> None:
    """A command is inert only when no expansion, assignment or state-changing builtin can run."""
    assert _inert(command) is inert


#: Texts where ``.`` stands as a word, and whether bash sources x there (in the shell itself).
DOT_COMMANDS = [
    (". x", True),
    (" \t. x", True),
    ("true; . x", True),
    ("true && . x", True),
    ("false || . x", True),
    ("echo | . x", False),  # (in the pipeline's subshell)
    ("true & . x", True),
    ("true\n. x", True),
    ("echo hi # a comment\n. x", True),
    (">out . x", True),
    ("2>err . x", True),
    (">&2 . x", True),
    ("2>&1 . x", True),
    (">|out . x", True),
    ("&>out . x", True),
    ("<x . x", True),
    ("<<<hi . x", True),
    ("if . x; then :; fi", True),
    ("! . x", True),
    ("while false; do :; done; . x", True),
    ("'.' x", True),
    ('"." x', True),
    ("\\. x", True),
    ("echo . x", False),
    ("ls . > /dev/null", False),
    ("echo x >out . x", False),
    (">out echo . x", False),
    ("echo x 2>&1 . x", False),
]


@pytest.mark.parametrize(("command", "sourced"), DOT_COMMANDS)
def test_a_dot_that_bash_runs_as_a_command_is_never_inert(
    tmp_path: Path, command: str, sourced: bool
) -> None:
    """Where bash sources the file named after a ``.``, the command is not inert: bash says."""
    import subprocess

    (tmp_path / "x").write_text("SOURCED=yes\n")
    verdict = tmp_path / "verdict"
    script = command + '\necho "${SOURCED-no}" >"$1"'
    subprocess.run(
        ["bash", "--noprofile", "--norc", "-c", script, "bash", str(verdict)],
        cwd=tmp_path,
        capture_output=True,
        stdin=subprocess.DEVNULL,
        env={"PATH": os.environ["PATH"]},
        timeout=30,
        check=False,
    )
    assert (verdict.read_text() == "yes\n") is sourced
    if sourced:
        assert not _inert(command)


def _probe_output(setup: str) -> bytes:
    """What `_HOOK_PROBE` and `_HOOK_FIELD` print in a bash started as the agent starts one,
    after `setup`."""
    import subprocess

    script = (
        "\\command set +H +o history; PS1=; PS2=; PS0=; PROMPT_COMMAND=; unset HISTFILE\n"
        f"{setup}\n{_HOOK_PROBE} \\command printf '%s\\0' {_HOOK_FIELD}\n"
    )
    done = subprocess.run(
        ["bash", "--noediting", "--noprofile", "--norc", "-i"],
        input=script.encode(),
        capture_output=True,
        env={"PATH": os.environ["PATH"]},
        timeout=30,
        check=True,
    )
    return done.stdout.split(b"\0")[0]


@pytest.mark.parametrize(
    "setup",
    [
        "f() { :; }",
        "alias ll='ls -l'",
        "trap : USR1",
        "trap : DEBUG",
        "PROMPT_COMMAND=:",
        "PS0=x",
        "PS1=x",
        "PS2=x",
        "MAILPATH=/tmp/mail",
        "set -x",
        "set -H",
    ],
)
def test_the_hook_probe_sees_every_way_a_shell_runs_code_unasked(setup: str) -> None:
    """Functions, aliases, traps, prompt strings, MAILPATH, xtrace and history expansion show."""
    assert not _has_hooks(_probe_output("true"))
    assert _has_hooks(_probe_output(setup))


def _dumps(pid: int) -> int:
    """How many ``export -p`` texts the shell wrote into its memfd (its fd 3), each ended by NUL."""
    with open(f"/proc/{pid}/fd/3", "rb") as memfd:
        return memfd.read().count(b"\0")


def test_inert_calls_keep_the_last_exports_and_a_replacement_still_has_them(
    agent: AgentProcess,
) -> None:
    """Inert calls write no export text; a shell killed after them comes back with its exports."""
    run(agent, "cd /tmp; export KEEP=yes")
    pid = shell_pid(agent)
    assert wait_for(lambda: _dumps(pid) == 2, timeout_s=10)
    for command in ("echo one", "/bin/true", "ls -d /tmp > /dev/null"):
        assert run(agent, command)["exit_code"] == 0
    # (A reply comes once the shell read its call: every earlier text is written by then.)
    assert _dumps(pid) == 2
    run(agent, "export LATER=1")
    assert wait_for(lambda: _dumps(pid) == 3, timeout_s=10)
    _kill_shell(pid)
    replaced = run(agent, 'echo "$KEEP $LATER"; pwd')
    assert replaced["shell_restarted"] is True
    assert replaced["stdout"] == b"yes 1\n/tmp\n"


@pytest.mark.parametrize(
    ("setup", "trigger"),
    [
        ("f() { export HOOKED=1; }", "f"),
        ("alias g='export HOOKED=1'", "g"),
        ("trap '[ -e flag ] && export HOOKED=1' DEBUG", "touch flag"),
        ("PROMPT_COMMAND='[ -e flag ] && export HOOKED=1'", "touch flag"),
    ],
    ids=["function", "alias", "trap", "prompt-command"],
)
def test_a_shell_that_runs_code_unasked_reports_its_exports_after_every_call(
    agent: AgentProcess, setup: str, trigger: str
) -> None:
    """A call that looks inert still reports exports when a hook of the shell could change them."""
    pid = shell_pid(agent)
    run(agent, setup)
    assert wait_for(lambda: _dumps(pid) == 2, timeout_s=10)
    assert run(agent, trigger)["exit_code"] == 0
    assert wait_for(lambda: _dumps(pid) == 3, timeout_s=10)
    _kill_shell(pid)
    assert run(agent, 'echo "${HOOKED-lost}"')["stdout"] == b"1\n"
