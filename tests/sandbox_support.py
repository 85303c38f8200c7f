"""Test support: one sandbox of a given driver, with its client running, and ways to inspect it."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import attrs
import trio
import trio._core._thread_cache

from hermes_actors._client import SandboxClient
from hermes_actors._config import SandboxConfig
from hermes_actors.drivers._local import (
    SANDBOX_MARKER_VAR,
    LocalDriver,
    LocalSandbox,
)
from proc_support import (
    argv,
    comm,
    kill_with_env,
    parent_of,
    pids_with_argv,
    pids_with_env,
    process_table,
    with_descendants,
)

if TYPE_CHECKING:
    from hermes_actors.drivers._modal import ModalSandbox
    from hermes_actors.testing.modal_emulator import ModalEmulator


@attrs.define
class ContractSandbox:
    """A running local sandbox for a contract test; the client runs in the fixture's nursery.

    `ModalContractSandbox` answers the same questions for a modal sandbox on the emulator.
    """

    handle: LocalSandbox
    client: SandboxClient
    isolation: str

    def process_count(self) -> int:
        """Processes of this sandbox other than the agent itself (and bwrap's own)."""
        marker = f"{SANDBOX_MARKER_VAR}={self.handle.sandbox_id}"
        own = {self.handle.pid, self.client.agent_info.get("host_pid")}
        return len(_commands(pids_with_env(marker)) - own)

    def resources_left(self) -> bool:
        return os.path.exists(self.handle.directory)

    async def kill_agent_after(self, delay_s: float) -> None:
        await trio.sleep(delay_s)
        os.killpg(self.handle.pid, signal.SIGKILL)


@attrs.define
class ModalContractSandbox:
    """A running modal sandbox (on the emulator) for a contract test."""

    handle: ModalSandbox
    client: SandboxClient
    emulator: ModalEmulator
    isolation: str = "modal"

    def process_count(self) -> int:
        """Processes the sandbox's commands started (the agent itself not counted)."""
        return len(_commands(self._marked()))

    def resources_left(self) -> bool:
        """Whether the emulated sandbox still runs or still has a live process."""
        for state in self.emulator.sandboxes():
            if state.sandbox_id == self.handle.sandbox_id:
                return state.returncode is None or bool(state.live_pids)
        return False

    async def kill_agent_after(self, delay_s: float) -> None:
        await trio.sleep(delay_s)
        for pid in self._marked():
            if _is_sandbox_plumbing(pid):
                # Killing the agent first makes its keepers exit on their own: one may be gone.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def _marked(self) -> list[int]:
        return pids_with_env(f"{SANDBOX_MARKER_VAR}={self.handle.sandbox_id}")


def _commands(marked: list[int]) -> set[int]:
    """The commands among a sandbox's `marked` processes: those not `_is_sandbox_plumbing`,
    and every process below its keepers. The second part counts a process in the middle of
    its exec too, whose environment and argv read empty for a moment (a warm shell just
    started, say): its parent says what it is."""
    keepers = {
        pid
        for pid in marked
        if comm(pid) == "hermes-keeper" and comm(parent_of(pid)) != "hermes-keeper"
    }
    below = with_descendants(keepers, process_table()) - keepers
    return below | {pid for pid in marked if not _is_sandbox_plumbing(pid)}


def _is_sandbox_plumbing(pid: int) -> bool:
    """bwrap, the agent and its zygote and keepers carry the marker too; they are not the
    commands we count. A keeper's child that has not reached its exec yet still looks like
    its keeper: it is a command (a slot's shell just started, say)."""
    words = argv(pid)
    if not words:
        return True
    program = os.path.basename(words[0])
    if program == b"bwrap":
        return True
    looks_like_the_agent = len(words) > 2 and words[1] == b"-c" and b"hermes_agent" in words[2]
    return looks_like_the_agent and comm(parent_of(pid)) != "hermes-keeper"


@asynccontextmanager
async def open_local_sandbox(
    isolation: str, **spec_changes: object
) -> AsyncIterator[ContractSandbox]:
    driver = LocalDriver()
    spec_changes = {"slots_per_sandbox": 4, **spec_changes}
    spec = SandboxConfig(name="contract", backend="local", isolation=isolation, **spec_changes)  # type: ignore[arg-type]
    handle = await driver.create(spec)
    try:
        async with trio.open_nursery() as nursery:
            client = SandboxClient(handle)
            await nursery.start(client.run)
            yield ContractSandbox(handle=handle, client=client, isolation=handle.isolation)
            nursery.cancel_scope.cancel()
    finally:
        await handle.terminate()


@asynccontextmanager
async def open_modal_sandbox(
    emulator: ModalEmulator, **spec_changes: object
) -> AsyncIterator[ModalContractSandbox]:
    """A sandbox of the modal driver on the emulator, with its client running."""
    from hermes_actors.drivers._modal import ModalDriver

    driver = ModalDriver(run_id="contract")
    spec = SandboxConfig(name="contract", backend="modal", slots_per_sandbox=4, **spec_changes)  # type: ignore[arg-type]
    handle = await driver.create(spec)
    try:
        async with trio.open_nursery() as nursery:
            client = SandboxClient(handle)
            await nursery.start(client.run)
            yield ModalContractSandbox(handle=handle, client=client, emulator=emulator)
            nursery.cancel_scope.cancel()
    finally:
        await handle.terminate()
        await driver.aclose()
        # After a killed agent its orphans leave its process tree; the emulator still finds them
        # by its marker unless a command changed its environment, so sweep ours too.
        # (Sync on purpose: a trio worker thread would outlive the test's thread check.)
        kill_with_env(f"{SANDBOX_MARKER_VAR}={handle.sandbox_id}")


def processes_with(token: str) -> list[int]:
    """Live pids whose command line contains `token` (commands started as `exec -a TOKEN ...`)."""
    return pids_with_argv(token)


def trio_worker_threads() -> list[threading.Thread]:
    """trio's cached worker threads that are idle (a busy one carries its job's name)."""
    return [thread for thread in threading.enumerate() if thread.name.startswith("Trio thread")]


@contextlib.contextmanager
def short_worker_idle_time(seconds: float = 0.2) -> Iterator[None]:
    """Within: trio retires an idle worker thread after `seconds`, not after its 10 s."""
    saved = trio._core._thread_cache.IDLE_TIMEOUT
    trio._core._thread_cache.IDLE_TIMEOUT = seconds  # type: ignore[assignment]
    try:
        yield
    finally:
        trio._core._thread_cache.IDLE_TIMEOUT = saved


async def retire_trio_worker_threads(timeout_s: float = 30.0) -> None:
    """Wait until trio has retired every idle worker thread (under `short_worker_idle_time`).

    A worker already waiting for work keeps the idle time it started waiting with (up to
    10 s); a no-op job wakes it, and it then waits again with the short one.
    """
    with trio.fail_after(timeout_s):
        while workers := trio_worker_threads():
            for _ in workers:
                trio.lowlevel.start_thread_soon(lambda: None, lambda _: None)
            await trio.sleep(trio._core._thread_cache.IDLE_TIMEOUT + 0.1)
