"""The driver contract: what every driver + agent pair must do, run against each driver.

Each test gets a fresh sandbox from the `contract_sandbox` fixture (see conftest.py), which is
parametrized over every driver: local without isolation, local under bubblewrap, and modal
through the emulator. `isolated_sandbox` covers the modes that promise isolation.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import trio

from hermes_actors._errors import AgentError, SandboxLost
from proc_support import eventually
from sandbox_support import ContractSandbox


async def test_exit_codes_and_signals(contract_sandbox: ContractSandbox) -> None:
    """Exit statuses come back as given, and a signal death reports the signal."""
    client = contract_sandbox.client
    ok = await client.exec(0, command="true")
    failed = await client.exec(0, command="exit 7")
    killed = await client.exec(0, command="kill -TERM $$")
    assert (ok.exit_code, failed.exit_code) == (0, 7)
    assert killed.signal == signal.SIGTERM
    assert killed.exit_code == -signal.SIGTERM
    assert [ok.timed_out, failed.timed_out, killed.timed_out] == [False, False, False]


async def test_stderr_is_kept_apart(contract_sandbox: ContractSandbox) -> None:
    """stdout and stderr arrive separately and intact."""
    result = await contract_sandbox.client.exec(0, command="echo out; echo err >&2; echo out2")
    assert result.stdout == b"out\nout2\n"
    assert result.stderr == b"err\n"


async def test_env_and_cwd(contract_sandbox: ContractSandbox) -> None:
    """Per-command env is visible, cwd is relative to the slot workspace, and escaping it fails."""
    client = contract_sandbox.client
    await client.exec(0, command="mkdir -p sub/dir")
    result = await client.exec(
        0, command='echo "$GREETING"; pwd; echo "$PAGER"', cwd="sub/dir", env={"GREETING": "hi"}
    )
    lines = result.stdout.decode().splitlines()
    assert lines[0] == "hi"
    assert lines[1].endswith("/slot-0/sub/dir")
    assert lines[2] == "cat"
    with pytest.raises(AgentError) as refused:
        await client.exec(0, command="pwd", cwd="../..")
    assert refused.value.code == "path_escape"


async def test_fifty_concurrent_execs(contract_sandbox: ContractSandbox) -> None:
    """Fifty commands in flight at once all complete with their own output."""
    client = contract_sandbox.client
    results: dict[int, bytes] = {}

    async def run_one(index: int) -> None:
        result = await client.exec(index % 4, command=f"sleep 0.2; echo {index}")
        results[index] = result.stdout

    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        for index in range(50):
            nursery.start_soon(run_one, index)
    elapsed = time.monotonic() - started
    assert results == {index: f"{index}\n".encode() for index in range(50)}
    # Serial execution would take 10 s; concurrency is what is asserted, with generous slack.
    assert elapsed < 8


@pytest.mark.parametrize(
    "command",
    [
        "sleep 1000 & sleep 1000 & wait",
        "setsid sleep 1000 & echo started; wait",
        "( (nohup sleep 1000 >/dev/null 2>&1 &) & ); echo forked; sleep 1000",
    ],
    ids=["background", "setsid", "double-fork"],
)
async def test_timeout_kills_the_whole_tree(
    contract_sandbox: ContractSandbox, command: str
) -> None:
    """A timeout returns the partial output with exit 124 and leaves no process behind."""
    client = contract_sandbox.client
    before = contract_sandbox.process_count()
    started = time.monotonic()
    result = await client.exec(0, command=command, timeout_s=1.0)
    assert time.monotonic() - started < 5
    assert result.timed_out
    assert result.exit_code == 124
    if "echo" in command:
        assert result.stdout.endswith(b"\n")
        assert result.stdout.strip() in (b"started", b"forked")
    # (The killed processes leave the table as they are reaped: a moment on a busy machine.)
    await eventually(lambda: contract_sandbox.process_count() == before)


async def test_big_output_is_capped_with_exact_counts(contract_sandbox: ContractSandbox) -> None:
    """10 MB of output keeps its head and tail within the cap and counts what was dropped."""
    command = "python3 -c \"import sys; sys.stdout.write('a'*5000000 + 'b'*5000000)\""
    result = await contract_sandbox.client.exec(0, command=command, max_output_bytes=100_000)
    assert len(result.stdout) == 100_000
    assert result.stdout_dropped == 10_000_000 - 100_000
    assert result.stdout[:50_000] == b"a" * 50_000
    assert result.stdout[-50_000:] == b"b" * 50_000


async def test_binary_output_is_safe(contract_sandbox: ContractSandbox) -> None:
    """Arbitrary bytes, including invalid UTF-8 and NULs, come back unchanged."""
    result = await contract_sandbox.client.exec(0, command=r"printf '\377\376\000abc\200'")
    assert result.stdout == b"\xff\xfe\x00abc\x80"


async def test_file_round_trip(contract_sandbox: ContractSandbox) -> None:
    """Random bytes written to a nested path read back identically, and commands see them."""
    client = contract_sandbox.client
    data = os.urandom(300_000)
    await client.write_file(0, "deep/er/blob.bin", data)
    assert await client.read_file(0, "deep/er/blob.bin") == data
    listed = await client.exec(0, command="wc -c < deep/er/blob.bin")
    assert listed.stdout.strip() == b"300000"
    entries = await client.list_files(0, "deep", recursive=True)
    assert {entry["path"] for entry in entries} >= {"deep/er", "deep/er/blob.bin"} or {
        entry["path"] for entry in entries
    } >= {"er", "er/blob.bin"}


@pytest.mark.parametrize("path", ["../escape.txt", "a/../../escape.txt", "/etc/passwd"])
async def test_path_traversal_is_refused(contract_sandbox: ContractSandbox, path: str) -> None:
    """Paths leaving the slot workspace are refused for reads and writes."""
    client = contract_sandbox.client
    for operation in (client.read_file(0, path), client.write_file(0, path, b"x")):
        with pytest.raises(AgentError) as refused:
            await operation
        assert refused.value.code == "path_escape"


async def test_symlink_escape_is_refused(contract_sandbox: ContractSandbox) -> None:
    """A symlink pointing out of the workspace cannot be used to read or write outside it."""
    client = contract_sandbox.client
    await client.exec(0, command="ln -s /etc link && ln -s / root")
    with pytest.raises(AgentError) as read_refused:
        await client.read_file(0, "link/hostname")
    with pytest.raises(AgentError) as write_refused:
        await client.write_file(0, "root/tmp/owned", b"x")
    assert read_refused.value.code == write_refused.value.code == "path_escape"


async def test_reset_kills_processes_and_wipes_dotfiles(
    contract_sandbox: ContractSandbox,
) -> None:
    """reset_slot leaves an empty workspace and no process the slot started."""
    client = contract_sandbox.client
    before = contract_sandbox.process_count()
    await client.exec(
        0,
        command="touch .hidden visible; mkdir -p ro/sub; chmod 500 ro; "
        "(setsid sleep 1000 &); nohup sleep 1000 >/dev/null 2>&1 &",
    )
    # The command returns once both are forked; each counts once it has exec'd its program.
    with trio.fail_after(10):
        while True:
            if contract_sandbox.process_count() >= before + 2:
                break
            await trio.sleep(0.01)
    await client.reset_slot(0)
    # (The slot's shell, started ahead of its calls, was killed too and is started again.)
    await eventually(lambda: contract_sandbox.process_count() == before)
    assert await client.list_files(0, ".") == []
    listing = await client.exec(0, command="ls -A")
    assert listing.stdout == b""


async def test_agent_killed_fails_pending_calls(contract_sandbox: ContractSandbox) -> None:
    """Killing the agent mid-command fails the call with the typed, retryable SandboxLost."""
    client = contract_sandbox.client
    async with trio.open_nursery() as nursery:
        nursery.start_soon(contract_sandbox.kill_agent_after, 0.3)
        with pytest.raises(SandboxLost) as lost:
            await client.exec(0, command="sleep 30")
    assert lost.value.retryable
    with pytest.raises(SandboxLost):
        await client.exec(0, command="true")


async def test_closing_the_stream_ends_agent_and_children(
    contract_sandbox: ContractSandbox,
) -> None:
    """When the host end of the stream closes, the agent kills its commands and exits."""
    client = contract_sandbox.client
    await client.exec(0, command="(setsid sleep 1000 &); sleep 1000 >/dev/null 2>&1 &")
    assert contract_sandbox.process_count() > 0
    await contract_sandbox.handle.stream.send_stream.aclose()
    with trio.fail_after(10):
        await contract_sandbox.handle.wait_exited()
    assert contract_sandbox.process_count() == 0


async def test_terminate_leaves_nothing_behind(contract_sandbox: ContractSandbox) -> None:
    """terminate() ends every process of the sandbox and deletes its directory."""
    client = contract_sandbox.client
    await client.exec(0, command="(setsid sleep 1000 &); sleep 1000 >/dev/null 2>&1 &")
    await contract_sandbox.handle.terminate()
    assert not contract_sandbox.handle.is_alive()
    assert contract_sandbox.process_count() == 0
    assert not contract_sandbox.resources_left()


async def test_slots_cannot_see_each_other(isolated_sandbox: ContractSandbox) -> None:
    """Under isolation, one slot can neither read nor write another slot's workspace."""
    client = isolated_sandbox.client
    await client.write_file(1, "secret.txt", b"slot one")
    peek = await client.exec(0, command="cat ../slot-1/secret.txt; ls ../slot-1")
    assert peek.exit_code != 0
    assert b"slot one" not in peek.stdout
    write = await client.exec(0, command="echo x > ../slot-1/planted")
    assert write.exit_code != 0
    assert await client.read_file(1, "secret.txt") == b"slot one"


async def test_commands_are_not_host_root(isolated_sandbox: ContractSandbox) -> None:
    """Under isolation, commands run without host uid 0 and cannot write protected host paths."""
    client = isolated_sandbox.client
    result = await client.exec(
        0, command="id -u; cat /etc/shadow; echo 1 > /proc/sys/vm/overcommit_memory"
    )
    assert result.stdout.split(b"\n")[0] != b"0"
    assert result.exit_code != 0
    status = await client.exec(
        0, command="grep -E '^(Cap(Inh|Prm|Eff|Amb)|NoNewPrivs):' /proc/self/status"
    )
    fields = dict(line.split(":\t") for line in status.stdout.decode().splitlines())
    assert fields == {
        "CapInh": fields["CapInh"],  # inheritable alone grants nothing without file capabilities
        "CapPrm": "0000000000000000",
        "CapEff": "0000000000000000",
        "CapAmb": "0000000000000000",
        "NoNewPrivs": "1",
    }


async def test_no_network_under_isolation(isolated_sandbox: ContractSandbox) -> None:
    """With network off, a sandbox cannot reach even the host's loopback services."""
    with trio.socket.socket() as listener:
        await listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        connect = f"import socket; socket.create_connection(('127.0.0.1', {port}), 2)"
        result = await isolated_sandbox.client.exec(0, argv=["python3", "-c", connect])
    assert result.exit_code != 0
    assert b"Error" in result.stderr


async def test_malformed_frame_gets_error_and_agent_keeps_serving(
    contract_sandbox: ContractSandbox,
) -> None:
    """A frame the agent cannot decode is answered with an error; later requests still work."""
    await contract_sandbox.handle.stream.send_all(b"\x00\x00\x00\x05\x00\x00\x00\x00{oops")
    result = await contract_sandbox.client.exec(0, command="echo still here")
    assert result.stdout == b"still here\n"


async def test_commands_get_a_clean_noninteractive_environment(
    contract_sandbox: ContractSandbox,
) -> None:
    """Commands see PATH, non-interactive settings and HOME, never the host's own variables."""
    client = contract_sandbox.client
    # pytest sets PYTEST_CURRENT_TEST in the host's environment while the sandbox starts.
    result = await client.exec(
        0, command='echo "$PAGER|$GIT_TERMINAL_PROMPT|$HOME|${PYTEST_CURRENT_TEST-unset}"'
    )
    pager, prompt, home, secret = result.stdout.decode().strip().split("|")
    assert (pager, prompt, secret) == ("cat", "0", "unset")
    assert home.endswith("/slot-0")
