"""terminal_tool / cleanup_vm: the agent-facing sync facade.

An agent (an LLM calling a `terminal` tool) runs one shell command at a time and gets a JSON
string back: `{"output": str, "exit_code": int | null, "error": str | null}`. It never raises:
an unknown profile, a bad configuration, a command timeout or a lost sandbox are reported in
`error`.

All calls go through one process-wide `ToolBackend` whose runtime runs on a portal thread,
built on first use from `load_profiles()` (`TERMINAL_MODAL_PROFILES_FILE`, `TERMINAL_ENV`, ...).
A `task_id` keeps its slot, and so its files and background processes, from its first command
until `cleanup_vm(task_id)`; a call without `task_id` borrows a fresh slot for one command.
Calls may come from several threads at once; calls for one task run one after the other.
The portal stops at interpreter exit, terminating every sandbox.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from hermes_actors._errors import HermesError, InfrastructureError
from hermes_actors.facades._backend import Slot, ToolBackend

__all__ = ["MAX_OUTPUT_CHARS", "cleanup_vm", "shutdown_terminal_backend", "terminal_tool"]

logger = logging.getLogger("hermes_actors.terminal")

#: Output longer than this many characters keeps its head and tail, with a note in between.
MAX_OUTPUT_CHARS = 50_000

_lock = threading.Lock()
_backend: ToolBackend | None = None
# task_id -> its slot, and a lock per task so one task's commands run one at a time.
_task_slots: dict[str, Slot] = {}
_task_locks: dict[str, threading.Lock] = {}


def _get_backend() -> ToolBackend:
    global _backend
    with _lock:
        if _backend is None:
            _backend = ToolBackend.with_profiles()
        return _backend


def _task_lock(task_id: str) -> threading.Lock:
    with _lock:
        return _task_locks.setdefault(task_id, threading.Lock())


def _cap(text: str, limit: int = MAX_OUTPUT_CHARS) -> str:
    if len(text) <= limit:
        return text
    head = limit * 2 // 5
    tail = limit - head
    omitted = len(text) - head - tail
    return f"{text[:head]}\n\n... [{omitted} characters omitted] ...\n\n{text[-tail:]}"


def _reply(output: str, exit_code: int | None, error: str | None) -> str:
    return json.dumps({"output": _cap(output), "exit_code": exit_code, "error": error})


def terminal_tool(
    command: str,
    task_id: str | None = None,
    profile: str | None = None,
    timeout: float | None = None,
) -> str:
    """Run `command` with bash in a sandbox and return `{"output", "exit_code", "error"}` JSON.

    `output` is stdout then stderr, capped (head and tail kept) at `MAX_OUTPUT_CHARS`.
    `exit_code` is the command's status (124 after a timeout, null when it did not run).
    `task_id` keeps one slot (files, background processes) until `cleanup_vm(task_id)`;
    `profile` picks the sandbox profile for a task's first command (default profile when
    None); `timeout` bounds the command in seconds (default: the profile's
    `execution_timeout_s`). Blocks the calling thread; never raises for a failure.
    """
    try:
        backend = _get_backend()
    except HermesError as exc:
        return _reply("", None, f"the sandbox configuration is invalid: {exc}")
    if task_id is None:
        return _run_once(backend, command, profile, timeout)
    with _task_lock(task_id):
        slot = _task_slots.get(task_id)
        if slot is not None and profile is not None and profile != slot.profile:
            return _reply(
                "",
                None,
                f"task {task_id!r} already runs in profile {slot.profile!r}; call "
                f"cleanup_vm({task_id!r}) before using profile {profile!r}",
            )
        if slot is None:
            try:
                slot = backend.call_blocking(backend.acquire, task_id, profile)
            except HermesError as exc:
                return _reply("", None, _describe_failure(exc))
            _task_slots[task_id] = slot
        reply, lost = _run_in(backend, slot, command, timeout)
        if lost:
            # The sandbox is gone, and the task's files with it: the next call starts afresh
            # (releasing only forgets the slot: there is nothing left to reset).
            _task_slots.pop(task_id, None)
            _release_quietly(backend, slot, reset=False)
        return reply


def _run_once(
    backend: ToolBackend, command: str, profile: str | None, timeout: float | None
) -> str:
    try:
        slot = backend.call_blocking(backend.acquire, None, profile)
    except HermesError as exc:
        return _reply("", None, _describe_failure(exc))
    try:
        reply, _ = _run_in(backend, slot, command, timeout)
        return reply
    finally:
        _release_quietly(backend, slot, reset=True)


def _run_in(
    backend: ToolBackend, slot: Slot, command: str, timeout: float | None
) -> tuple[str, bool]:
    """The JSON reply for one command in `slot`, and whether the slot's sandbox was lost."""
    args: dict[str, Any] = {"command": command}
    if timeout is not None:
        args["timeout"] = timeout
    try:
        [result] = backend.call_blocking(backend.execute_batch, [(slot, "bash", args)])
    except HermesError as exc:
        return _reply("", None, _describe_failure(exc)), isinstance(exc, InfrastructureError)
    exit_code = result.metadata.get("exit_code")
    lost = "infra_error" in result.metadata
    error = result.error or None  # null on success, as the original tool's JSON has it
    if lost and error is not None:
        error = f"sandbox infrastructure failure ({result.metadata['infra_error']}): {error}"
    return _reply(result.output, exit_code, error), lost


def _describe_failure(exc: HermesError) -> str:
    if isinstance(exc, InfrastructureError):
        return f"sandbox infrastructure failure ({exc.kind}): {exc}"
    return str(exc)


def _release_quietly(backend: ToolBackend, slot: Slot, *, reset: bool) -> None:
    try:
        backend.call_blocking(backend.release, slot, reset)
    except HermesError as exc:
        logger.info("releasing %s failed: %s", slot.slot_id, exc)


def cleanup_vm(task_id: str) -> None:
    """Give back `task_id`'s slot: its processes are killed and its files wiped.

    A task without a slot (never used, or already cleaned up) is a no-op. Never raises for a
    failed sandbox.
    """
    with _task_lock(task_id):
        slot = _task_slots.pop(task_id, None)
        backend = _backend
        if slot is not None and backend is not None:
            _release_quietly(backend, slot, reset=True)
    with _lock:
        _task_locks.pop(task_id, None)


def shutdown_terminal_backend() -> None:
    """Stop the process-wide backend: every task's slot is gone and every sandbox terminated.

    The next `terminal_tool` call builds a new backend (re-reading the configuration). Also
    happens at interpreter exit.
    """
    global _backend
    with _lock:
        backend, _backend = _backend, None
        _task_slots.clear()
        _task_locks.clear()
    if backend is not None:
        backend.stop_sync()
