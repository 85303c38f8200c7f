"""Escape matrix: every way a command tries to outlive its cleanup, on every exit path.

{background, nohup, setsid, double fork, trap '' TERM, setsid env -i, env -u of every variable
the runtime sets, a 200-process burst} x {timeout, cancel, reset, terminate, host SIGKILL} x
{none, bwrap}. Each pattern runs in a slot of its own and tags its escapees with a unique
argv[0] (``exec -a``), which no cleanup path looks at: survivors are counted from /proc by
that tag. Deterministic paths (timeout, cancel, reset, terminate) must leave zero survivors by
the time they return; a host SIGKILL (the agent's dead-man switch) within a few seconds.
"""

from __future__ import annotations

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
from hermes_actors._agent import DEFAULT_ENV
from hermes_actors._values import Command
from hermes_actors.drivers._local import SANDBOX_MARKER_VAR
from sandbox_support import ContractSandbox, open_local_sandbox

BURST = 200
#: Every variable the runtime puts into a command's environment.
RUNTIME_VARIABLES = sorted({*DEFAULT_ENV, "HOME", "LANG", "PATH", SANDBOX_MARKER_VAR})
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


@pytest.mark.parametrize("isolation", ISOLATIONS)
async def test_timeout_leaves_no_escapee(isolation: str) -> None:
    """A command's timeout kills all its escapees, whatever they did, before it replies."""
    tag_of = tags()
    async with open_local_sandbox(isolation) as sandbox:
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
    async with open_local_sandbox(isolation) as sandbox:
        client = sandbox.client
        requests = [
            client.submit(
                "exec", Command(command=command_for(name, tag_of[name], True)).to_wire(slot)
            )
            for slot, name in enumerate(PATTERNS)
        ]
        await trio.to_thread.run_sync(wait_started, tag_of, True)
        for request in requests:
            client.cancel(request)
        replies = [await client.wait(request) for request in requests]
        assert survivors(tag_of) == {}
        assert all(reply["cancelled"] for reply in replies)
        await assert_ready(sandbox)


@pytest.mark.parametrize("isolation", ISOLATIONS)
async def test_reset_leaves_no_escapee(isolation: str) -> None:
    """reset_slot (release) kills everything the slot started, escapees included."""
    tag_of = tags()
    async with open_local_sandbox(isolation) as sandbox:
        for slot, name in enumerate(PATTERNS):
            await sandbox.client.exec(slot, command=command_for(name, tag_of[name], False))
        await trio.to_thread.run_sync(wait_started, tag_of, False)
        for slot in range(len(PATTERNS)):
            await sandbox.client.reset_slot(slot)
        assert survivors(tag_of) == {}


@pytest.mark.parametrize("isolation", ISOLATIONS)
async def test_terminate_leaves_no_escapee(isolation: str) -> None:
    """Terminating the sandbox (backend shutdown) leaves no escapee, in flight or background."""
    tag_of = tags()
    async with open_local_sandbox(isolation) as sandbox:
        for slot, name in enumerate(PATTERNS):
            await sandbox.client.exec(slot, command=command_for(name, tag_of[name], False))
        await trio.to_thread.run_sync(wait_started, tag_of, False)
    assert survivors(tag_of) == {}


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
    """When the host process is SIGKILLed, the dead-man switch kills every escapee."""
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
        host.send_signal(signal.SIGKILL)
        host.wait()
        for tag in tag_of.values():
            wait_no_processes_with_argv(tag, timeout=5.0)
        assert survivors(tag_of) == {}
    finally:
        if host.poll() is None:
            host.kill()
            host.wait()
        if host.stdout is not None:
            host.stdout.close()
        subprocess.run(["chmod", "-R", "u+rwx", str(tmp_path)], check=False)
