"""Test support: one sandbox of a given driver, with its client running, and ways to inspect it."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import trio

from hermes_actors._client import SandboxClient
from hermes_actors.drivers._base import SandboxSpec
from hermes_actors.drivers._local import SANDBOX_MARKER_VAR, LocalDriver, LocalSandbox, marked_pids


@attrs.define
class ContractSandbox:
    """A running sandbox for a contract test; the client runs in the fixture's nursery."""

    handle: LocalSandbox
    client: SandboxClient
    isolation: str

    def process_count(self) -> int:
        """Processes of this sandbox other than the agent itself (and bwrap's own)."""
        marker = f"{SANDBOX_MARKER_VAR}={self.handle.sandbox_id}".encode()
        own = {self.handle.pid, self.client.agent_info.get("host_pid")}
        return sum(
            1 for pid in marked_pids(marker) if pid not in own and not _is_sandbox_plumbing(pid)
        )

    def resources_left(self) -> bool:
        return os.path.exists(self.handle.directory)

    async def kill_agent_after(self, delay_s: float) -> None:
        await trio.sleep(delay_s)
        os.killpg(self.handle.pid, signal.SIGKILL)


def _is_sandbox_plumbing(pid: int) -> bool:
    """bwrap and the agent itself carry the marker too; they are not the commands we count."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            argv = handle.read().split(b"\0")
    except OSError:
        return True
    program = os.path.basename(argv[0]) if argv else b""
    return program == b"bwrap" or (
        len(argv) > 2 and argv[1] == b"-c" and b"hermes_agent" in argv[2]
    )


@asynccontextmanager
async def open_local_sandbox(
    isolation: str, **spec_changes: object
) -> AsyncIterator[ContractSandbox]:
    driver = LocalDriver()
    spec = SandboxSpec(profile="contract", isolation=isolation, slots=4, **spec_changes)  # type: ignore[arg-type]
    handle = await driver.create(spec)
    try:
        async with trio.open_nursery() as nursery:
            client = SandboxClient(handle)
            await nursery.start(client.run)
            yield ContractSandbox(handle=handle, client=client, isolation=handle.isolation)
            nursery.cancel_scope.cancel()
    finally:
        await handle.terminate()
