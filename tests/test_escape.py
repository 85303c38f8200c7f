"""Escape matrix: every way a command tries to outlive its cleanup, on every exit path.

{background, nohup, setsid, double fork, trap '' TERM, setsid env -i, env -u of every variable
the runtime sets, a 200-process burst} x {timeout, cancel, release, cleanup_vm, shutdown, host
SIGKILL} x {none, bwrap}. Each pattern runs in a slot of its own and tags its escapees with a
unique argv[0] (``exec -a``), which no cleanup path looks at: survivors are counted from /proc
by that tag. Timeout and cancel run through the sandbox's client; release
(`ToolBackend.release(slot, reset_workspace=True)`) and shutdown (`ToolBackend` leaving its
`async with`) through the trio facade (they run the agent's reset_slot and the sandbox's
terminate), `cleanup_vm` through the sync one, and host SIGKILL kills a host process holding a
sandbox. Deterministic paths must leave zero survivors by the time they return; a host SIGKILL
(the agent's dead-man switch, then the driver's watchdog) within 5 s, directories included.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import trio

from agent_harness import processes_with_argv, wait_no_processes_with_argv
from hermes_actors import SandboxConfig, Slot, ToolBackend
from hermes_actors._agent import DEFAULT_ENV
from hermes_actors._values import Command
from hermes_actors.drivers._local import HOST_PID_VAR, SANDBOX_MARKER_VAR
from hermes_actors.terminal_tool import cleanup_vm, shutdown_terminal_backend, terminal_tool
from sandbox_support import ContractSandbox, open_local_sandbox

BURST = 200
#: Every variable the runtime puts into a command's environment (checked by
#: `test_env_u_unsets_every_variable_the_runtime_sets`).
RUNTIME_VARIABLES = sorted({*DEFAULT_ENV, "HOME", "LANG", "PATH", SANDBOX_MARKER_VAR, HOST_PID_VAR})
#: Variables bash exports by itself.
SHELL_VARIABLES = {"PWD", "OLDPWD", "SHLVL", "_"}
_UNSET = " ".join(f"-u {name}" for name in RUNTIME_VARIABLES)

#: name -> (shell snippet starting escapees tagged {t}, how many it starts)
PATTERNS: dict[str, tuple[str, int]] = {
    "background": ("(exec -a {t} sleep 1000) &", 1),
    "nohup": ("nohup bash -c 'exec -a {t} sleep 1000' >/dev/null 2>&1 &", 1),
    "setsid": ("setsid bash -c 'exec -a {t} sleep 1000' &", 1),
    "double fork": ("( (bash -c 'exec -a {t} sleep 1000' &) & )", 1),
    "trap TERM": ("(trap '' TERM HUP INT; exec -a {t} sleep 1000) &", 1),
    "setsid env -i": ("setsid env -i /bin/bash -c 'exec -a {t} /bin/sleep 1000' &", 1),
    "env -u": (f"env {_UNSET} /usr/bin/setsid -f /bin/bash -c 'exec -a {{t}} /bin/sleep 1000'", 1),
    "burst": (f"for i in $(seq {BURST}); do (exec -a {{t}} sleep 1000) & done", BURST),
}
ISOLATIONS = ["none", "bwrap"]


def tags() -> dict[str, str]:
    run = uuid.uuid4().hex[:12]
    return {name: f"hermes-escape-{run}-{index}" for index, name in enumerate(PATTERNS)}


def command_for(name: str, tag: str, foreground: bool) -> str:
    snippet = PATTERNS[name][0].format(t=tag)
    # The ready file says every escapee was started before the command could be killed.
    tail = f"\nexec -a {tag} sleep 1000" if foreground else ""
    return f"{snippet}\ntouch .ready{tail}"


def wait_started(tag_of: dict[str, str], foreground: bool) -> None:
    deadline = time.monotonic() + 30
    for name, tag in tag_of.items():
        expected = PATTERNS[name][1] + (1 if foreground else 0)
        while len(processes_with_argv(tag)) < expected:
            assert time.monotonic() < deadline, f"{name}: escapees did not start"
            time.sleep(0.02)


def survivors(tag_of: dict[str, str]) -> dict[str, int]:
    counts = {name: len(processes_with_argv(tag)) for name, tag in tag_of.items()}
    return {name: count for name, count in counts.items() if count}


async def assert_ready(sandbox: ContractSandbox) -> None:
    for slot in range(len(PATTERNS)):
        assert await sandbox.client.read_file(slot, ".ready") == b""


async def wait_ready(sandbox: ContractSandbox) -> None:
    """Wait until every slot's command has started all its escapees (its ready file exists).

    Counting tagged processes is not enough on its own: an intermediate shell whose command
    line holds the tag counts too before it has started what it runs.
    """
    with trio.fail_after(30):
        for slot in range(len(PATTERNS)):
            while True:
                entries = await sandbox.client.list_files(slot)
                if any(entry["path"].endswith(".ready") for entry in entries):
                    break
                await trio.sleep(0.02)


@pytest.mark.parametrize("isolation", ISOLATIONS)
async def test_env_u_unsets_every_variable_the_runtime_sets(isolation: str) -> None:
    """The env -u pattern unsets every variable a command starts with (bash's own aside)."""
    async with open_local_sandbox(isolation) as sandbox:
        result = await sandbox.client.exec(0, command="compgen -e")
    names = set(result.stdout.decode().split())
    assert SANDBOX_MARKER_VAR in names
    assert names - SHELL_VARIABLES <= set(RUNTIME_VARIABLES)


@pytest.mark.parametrize("isolation", ISOLATIONS)
async def test_timeout_leaves_no_escapee(isolation: str) -> None:
    """A command's timeout kills all its escapees, whatever they did, before it replies."""
    tag_of = tags()
    async with open_local_sandbox(isolation, slots_per_sandbox=len(PATTERNS)) as sandbox:
        results = {}

        async def run(slot: int, name: str) -> None:
            results[name] = await sandbox.client.exec(
                slot, command=command_for(name, tag_of[name], True), timeout_s=4.0
            )

        async with trio.open_nursery() as nursery:
            for slot, name in enumerate(PATTERNS):
                nursery.start_soon(run, slot, name)
        assert survivors(tag_of) == {}
        assert all(result.timed_out for result in results.values())
        await assert_ready(sandbox)


@pytest.mark.parametrize("isolation", ISOLATIONS)
async def test_cancel_leaves_no_escapee(isolation: str) -> None:
    """A cancelled exec answers cancelled only once all its escapees are dead."""
    tag_of = tags()
    async with open_local_sandbox(isolation, slots_per_sandbox=len(PATTERNS)) as sandbox:
        client = sandbox.client
        requests = [
            client.submit(
                "exec", Command(command=command_for(name, tag_of[name], True)).to_wire(slot)
            )
            for slot, name in enumerate(PATTERNS)
        ]
        await trio.to_thread.run_sync(wait_started, tag_of, True)
        await wait_ready(sandbox)
        for request in requests:
            client.cancel(request)
        replies = [await client.wait(request) for request in requests]
        assert survivors(tag_of) == {}
        assert all(reply["cancelled"] for reply in replies)
        await assert_ready(sandbox)


def _facade_config(isolation: str) -> SandboxConfig:
    return SandboxConfig(
        name="escape", isolation=isolation, slots_per_sandbox=len(PATTERNS), max_sandboxes=1
    )


async def _start_patterns_through(backend: ToolBackend, tag_of: dict[str, str]) -> list[Slot]:
    """One slot per pattern, its escapees started in the background; returns the slots."""
    slots = [await backend.acquire(f"escape-{index}") for index in range(len(PATTERNS))]
    batch = [
        (slot, "bash", {"command": command_for(name, tag_of[name], False)})
        for slot, name in zip(slots, PATTERNS, strict=True)
    ]
    results = await backend.execute_batch(batch)
    assert all(result.success for result in results), results
    await trio.to_thread.run_sync(wait_started, tag_of, False)
    return slots


@pytest.mark.parametrize("isolation", ISOLATIONS)
async def test_release_leaves_no_escapee(isolation: str) -> None:
    """`release(slot, reset_workspace=True)` returns only once every escapee of the slot is dead."""
    tag_of = tags()
    async with ToolBackend(_facade_config(isolation)) as backend:
        slots = await _start_patterns_through(backend, tag_of)
        for slot in slots:
            await backend.release(slot, reset_workspace=True)
        assert survivors(tag_of) == {}


@pytest.mark.parametrize("isolation", ISOLATIONS)
async def test_shutdown_leaves_no_escapee(isolation: str) -> None:
    """A backend's shutdown (leaving `async with`) leaves no escapee of any slot it held."""
    tag_of = tags()
    async with ToolBackend(_facade_config(isolation)) as backend:
        await _start_patterns_through(backend, tag_of)
    assert survivors(tag_of) == {}


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_cleanup_vm_leaves_no_escapee(
    isolation: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`cleanup_vm(task_id)` returns only once every escapee the task started is dead."""
    profiles = tmp_path / "profiles.yaml"
    profiles.write_text(
        "profiles:\n  default:\n    backend: local\n"
        f"    isolation: {isolation}\n    slots_per_sandbox: {len(PATTERNS)}\n"
    )
    monkeypatch.setenv("TERMINAL_MODAL_PROFILES_FILE", str(profiles))
    tag_of = tags()
    shutdown_terminal_backend()
    try:
        for name in PATTERNS:
            reply = json.loads(terminal_tool(command_for(name, tag_of[name], False), task_id=name))
            assert reply["exit_code"] == 0, reply
        wait_started(tag_of, False)
        for name in PATTERNS:
            cleanup_vm(name)
        assert survivors(tag_of) == {}
    finally:
        shutdown_terminal_backend()


_HOST = textwrap.dedent(
    """
    import sys, trio
    from hermes_actors._client import SandboxClient
    from hermes_actors._config import SandboxConfig
    from hermes_actors.drivers._local import LocalDriver

    async def main(isolation, root, commands):
        driver = LocalDriver(root_dir=root)
        handle = await driver.create(SandboxConfig(name="escape", isolation=isolation))
        async with trio.open_nursery() as nursery:
            client = SandboxClient(handle)
            await nursery.start(client.run)
            for slot, command in enumerate(commands):
                await client.exec(slot, command=command)
            for slot, command in enumerate(commands):
                in_flight = command + "\\nsleep 1000"
                nursery.start_soon(lambda s=slot, c=in_flight: client.exec(s, command=c))
            print("ready", flush=True)
            await trio.sleep_forever()

    trio.run(main, sys.argv[1], sys.argv[2], sys.argv[3:])
    """
)


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_host_sigkill_leaves_no_escapee(isolation: str, tmp_path: Path) -> None:
    """A SIGKILLed host leaves no escapee (dead-man switch) and no directory (watchdog) in 5 s."""
    tag_of = tags()
    commands = [command_for(name, tag_of[name], False) for name in PATTERNS]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    host = subprocess.Popen(
        [sys.executable, "-c", _HOST, isolation, str(tmp_path), *commands],
        stdout=subprocess.PIPE,
        env=env,
    )
    try:
        assert host.stdout is not None
        assert host.stdout.readline() == b"ready\n"
        # Each pattern ran twice: once to completion, once still in flight.
        deadline = time.monotonic() + 30
        for name, tag in tag_of.items():
            while len(processes_with_argv(tag)) < 2 * PATTERNS[name][1]:
                assert time.monotonic() < deadline, f"{name}: escapees did not start"
                time.sleep(0.02)
        killed_at = time.monotonic()
        host.send_signal(signal.SIGKILL)
        host.wait()
        for tag in tag_of.values():
            wait_no_processes_with_argv(tag, timeout=5.0)
        assert survivors(tag_of) == {}
        # The driver's watchdog removes the sandbox's directory, then exits.
        while os.listdir(tmp_path) and time.monotonic() < killed_at + 5.0:
            time.sleep(0.05)
        assert os.listdir(tmp_path) == []
    finally:
        if host.poll() is None:
            host.kill()
            host.wait()
        if host.stdout is not None:
            host.stdout.close()
