"""What the in-process sandboxes of the test support share (the fake driver's and the
simulator's): the `SandboxHandle` surface over an exit event, and the agent's bootstrap.

Their agents are trio tasks or plain objects of this process that speak the real agent
protocol; the host's client, actors and pools on the other side of `stream` are the real ones.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

import trio

from hermes_actors._agent import PROTOCOL_VERSION
from hermes_actors._config import SandboxConfig

_U32 = struct.Struct(">I")

#: The agent's first frame: ready, and the protocol it speaks.
READY: dict[str, Any] = {
    "id": 0,
    "ok": True,
    "result": {"ready": True, "protocol": PROTOCOL_VERSION},
}


def split_bootstrap(buffer: bytes | bytearray) -> tuple[bytes, bytes] | None:
    """The agent's config in the bootstrap payload (u32 + source, u32 + config) and what
    follows it, in what the host sent so far, once the payload is whole (None before)."""
    if len(buffer) < 4:
        return None
    (source_len,) = _U32.unpack_from(buffer)
    config_at = 4 + source_len
    if len(buffer) < config_at + 4:
        return None
    (config_len,) = _U32.unpack_from(buffer, config_at)
    end = config_at + 4 + config_len
    if len(buffer) < end:
        return None
    return bytes(buffer[config_at + 4 : end]), bytes(buffer[end:])


def command_result(
    scope: trio.CancelScope, started: float, exit_code: int, stdout: bytes
) -> dict[str, Any]:
    """The agent's answer to an `exec` that ran in `scope` from `started`: its deadline passed
    (timed out, 124), it was cancelled (-9), or it ended with `exit_code`."""
    timed_out = scope.cancelled_caught and trio.current_time() >= scope.deadline
    cancelled = scope.cancelled_caught and not timed_out
    return {
        "exit_code": 124 if timed_out else (-9 if cancelled else exit_code),
        "signal": 9 if scope.cancelled_caught else None,
        "timed_out": timed_out,
        "cancelled": cancelled,
        "duration_s": trio.current_time() - started,
        "stdout": stdout,
        "stderr": b"",
        "stdout_dropped": 0,
        "stderr_dropped": 0,
    }


class InProcessHandle:
    """A `SandboxHandle` whose sandbox lives in this process: the subclass provides the host's
    end of the agent stream (`_stream`) and ends the sandbox with `_mark_exited`."""

    #: The agent's workspace root, as it reports it.
    workspace_root = "."

    def __init__(self, sandbox_id: str, spec: SandboxConfig) -> None:
        self._sandbox_id = sandbox_id
        self.spec = spec
        self.isolated = True
        self.network = spec.network
        self._stream: trio.abc.HalfCloseableStream
        self._exited = trio.Event()
        self.exit_status: int | None = None

    @property
    def sandbox_id(self) -> str:
        return self._sandbox_id

    @property
    def stream(self) -> trio.abc.HalfCloseableStream:
        return self._stream

    @property
    def agent_config(self) -> Mapping[str, object]:
        return {
            "workspace_root": self.workspace_root,
            "slot_uid_base": None,
            "slots": self.spec.slots_per_sandbox,
        }

    def is_alive(self) -> bool:
        return not self._exited.is_set()

    async def wait_exited(self) -> int | None:
        await self._exited.wait()
        return self.exit_status

    def _mark_exited(self, status: int) -> bool:
        """Record the exit; False when the sandbox had already exited."""
        if self._exited.is_set():
            return False
        self.exit_status = status
        self._exited.set()
        return True
