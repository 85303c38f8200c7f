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

The names and signatures are the original Hermes terminal tool's (`terminal_tool(command,
background, timeout, task_id, profile)`, `cleanup_vm`, `cleanup_all_environments`,
`get_active_environments_info`, `check_terminal_requirements`, `TERMINAL_TOOL_DESCRIPTION`),
so its callers work unchanged; see docs/migrating.md for what behaves differently.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import logging
import math
import os
import threading
from typing import Any

import trio

from hermes_actors._config import load_profiles
from hermes_actors._errors import HermesError, InfrastructureError
from hermes_actors.facades._backend import Slot, ToolBackend

__all__ = [
    "MAX_OUTPUT_CHARS",
    "TERMINAL_TOOL_DESCRIPTION",
    "check_terminal_requirements",
    "cleanup_all_environments",
    "cleanup_vm",
    "get_active_environments_info",
    "register_task_image",
    "shutdown_terminal_backend",
    "terminal_tool",
]

logger = logging.getLogger("hermes_actors.terminal")

#: Output longer than this many characters keeps its head and tail, with a note in between.
MAX_OUTPUT_CHARS = 50_000
#: The task a `background` call without `task_id` runs in (the original's shared task).
DEFAULT_TASK_ID = "default"
#: Default command timeout for `terminal_tool`, in seconds, when set (the original's variable).
ENV_TIMEOUT = "TERMINAL_TIMEOUT"

#: A description of the tool for an LLM's tool list (the original exported one too).
TERMINAL_TOOL_DESCRIPTION = """Run a shell command (bash) in an isolated Linux sandbox.

- Each task has its own workspace: files and installed packages persist between calls of the
  same task until the task ends. The workspace starts empty.
- Output is stdout then stderr; very long output keeps its beginning and end.
- timeout: seconds before the command and everything it started are killed (exit code 124).
- background: true starts the command detached and returns at once with the file its output
  goes to; use it for servers and long jobs, then read that file with later commands.
- profile: the sandbox profile for the task's first command (for example one with a GPU).
- Network access depends on the sandbox profile; if a download fails, say so.
- Commands cannot be interactive (no prompts, editors or REPLs); pipe long output to a file
  or through head/tail, and pass -y / --yes style flags to installers.
"""

_lock = threading.Lock()
_backend: ToolBackend | None = None
# task_id -> its slot, and a lock per task so one task's commands run one at a time.
_task_slots: dict[str, Slot] = {}
_task_locks: dict[str, threading.Lock] = {}
# task_id -> the image its slot runs, for tasks registered before their first command.
_task_images: dict[str, str] = {}


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


def register_task_image(task_id: str, image: str) -> None:
    """Run `task_id`'s commands in a sandbox of `image` (the task's repository and toolchain).

    Takes effect at the task's first command (or after `cleanup_vm`); kept until `cleanup_vm`.
    Modal: a registry image; local: a root filesystem directory (used as `/` under bwrap).
    """
    with _lock:
        _task_images[task_id] = image


def terminal_tool(
    command: str,
    background: bool = False,
    timeout: float | None = None,
    task_id: str | None = None,
    profile: str | None = None,
    image: str | None = None,
    shell: str | None = None,
) -> str:
    """Run `command` with bash in a sandbox and return `{"output", "exit_code", "error"}` JSON.

    The original Hermes tool's signature, so its positional callers keep working.
    `output` is what a terminal shows: stdout and stderr interleaved in the order they were
    written, capped (head and tail kept) at `MAX_OUTPUT_CHARS`.
    `exit_code` is the command's status (124 after a timeout, null when it did not run).
    `task_id` keeps one slot (files, background processes, and with the profile's default
    `shell: persistent` its shell: cwd, variables, functions) until `cleanup_vm(task_id)`;
    `shell` (`"persistent"` or `"fresh"`) overrides the profile's `shell` for this call;
    `profile` picks the sandbox profile for a task's first command (default profile when
    None); `timeout` bounds the command in seconds (default: `$TERMINAL_TIMEOUT` when set,
    else the profile's `execution_timeout_s`). With `background`, the command starts detached
    and the call returns at once, saying which file collects its output; it runs until
    `cleanup_vm` of its task (`default` when `task_id` is None). `image` runs a task's first
    command (and so all its later ones) in a sandbox of that image, like `register_task_image`.
    Blocks the calling thread; never raises, also not for arguments of the wrong type (they are
    reported in `error`).
    """
    problem = _argument_problem(command, task_id, profile, timeout)
    if problem is None and not isinstance(background, bool):
        problem = f"invalid arguments: 'background' must be a bool, got {type(background).__name__}"
    if problem is None and image is not None and not isinstance(image, str):
        problem = f"invalid arguments: 'image' must be a str, got {type(image).__name__}"
    if problem is not None:
        return _reply("", None, problem)
    if timeout is None:
        try:
            timeout = _timeout_from_environment()
        except ValueError as exc:
            return _reply("", None, str(exc))
    try:
        backend = _get_backend()
    except HermesError as exc:
        return _reply("", None, f"the sandbox configuration is invalid: {exc}")
    if background and task_id is None:
        task_id = DEFAULT_TASK_ID
    if task_id is None:
        return _run_once(backend, command, profile, timeout, image, shell)
    with _task_lock(task_id):
        slot = _task_slots.get(task_id)
        if slot is not None and profile is not None and profile != slot.profile:
            return _reply(
                "",
                None,
                f"task {task_id!r} already runs in profile {slot.profile!r}; call "
                f"cleanup_vm({task_id!r}) before using profile {profile!r}",
            )
        if slot is not None and image is not None and image != slot.lease.image:
            return _reply(
                "",
                None,
                f"task {task_id!r} already runs image {slot.lease.image!r}; call "
                f"cleanup_vm({task_id!r}) before using image {image!r}",
            )
        if slot is None:
            with _lock:
                wanted = image or _task_images.get(task_id)
            try:
                slot = backend.call_blocking(backend.acquire, task_id, profile, wanted)
            except HermesError as exc:
                return _reply("", None, _describe_failure(exc))
            _task_slots[task_id] = slot
        reply, lost = _run_in(backend, slot, command, timeout, background=background, shell=shell)
        if lost:
            # The sandbox is gone, and the task's files with it: the next call starts afresh
            # (releasing only forgets the slot: there is nothing left to reset).
            _task_slots.pop(task_id, None)
            _release_quietly(backend, slot, reset=False)
        return reply


def _argument_problem(
    command: object, task_id: object, profile: object, timeout: object
) -> str | None:
    """What is wrong with terminal_tool's arguments, or None."""
    problems = []
    if not isinstance(command, str):
        problems.append(f"'command' must be a str, got {type(command).__name__}")
    elif "\0" in command:
        problems.append("'command' must not contain NUL characters")
    for name, value in (("task_id", task_id), ("profile", profile)):
        if value is not None and not isinstance(value, str):
            problems.append(f"{name!r} must be a str or None, got {type(value).__name__}")
    if timeout is not None and (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not math.isfinite(timeout)
        or timeout <= 0
    ):
        shown = repr(timeout) if isinstance(timeout, int | float) else type(timeout).__name__
        problems.append(f"'timeout' must be a number of seconds > 0 or None, got {shown}")
    if not problems:
        return None
    return "invalid arguments: " + "; ".join(problems)


def _run_once(
    backend: ToolBackend,
    command: str,
    profile: str | None,
    timeout: float | None,
    image: str | None,
    shell: str | None,
) -> str:
    try:
        slot = backend.call_blocking(backend.acquire, None, profile, image)
    except HermesError as exc:
        return _reply("", None, _describe_failure(exc))
    try:
        reply, _ = _run_in(backend, slot, command, timeout, shell=shell)
        return reply
    finally:
        _release_quietly(backend, slot, reset=True)


def _run_in(
    backend: ToolBackend,
    slot: Slot,
    command: str,
    timeout: float | None,
    *,
    background: bool = False,
    shell: str | None = None,
) -> tuple[str, bool]:
    """The JSON reply for one command in `slot`, and whether the slot's sandbox was lost."""
    args: dict[str, Any] = {"command": command}
    if timeout is not None:
        args["timeout"] = timeout
    if background:
        args["background"] = True
    if shell is not None:
        args["shell"] = shell
    try:
        [result] = backend.call_blocking(backend.execute_batch, [(slot, "terminal", args)])
    except HermesError as exc:
        return _reply("", None, _describe_failure(exc)), isinstance(exc, InfrastructureError)
    exit_code = result.metadata.get("exit_code")
    lost = "infra_error" in result.metadata
    error = result.error or None  # null on success, as the original tool's JSON has it
    if lost and error is not None:
        error = f"sandbox infrastructure failure ({result.metadata['infra_error']}): {error}"
    output = result.output
    if background and result.success:
        task_id = slot.trajectory_id
        log = result.metadata["background_log"]
        output += (
            f"; read it with terminal_tool('cat {log}', task_id={task_id!r}); it runs until "
            f"cleanup_vm({task_id!r})"
        )
    return _reply(output, exit_code, error), lost


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
    failed sandbox; a `task_id` that is not a str cannot have a slot, so it is a no-op too.
    """
    if not isinstance(task_id, str):
        return
    with _task_lock(task_id):
        slot = _task_slots.pop(task_id, None)
        backend = _backend
        if slot is not None and backend is not None:
            _release_quietly(backend, slot, reset=True)
    with _lock:
        _task_locks.pop(task_id, None)
        _task_images.pop(task_id, None)


def cleanup_all_environments() -> int:
    """`cleanup_vm` every task that holds a slot; returns how many there were."""
    with _lock:
        task_ids = list(_task_slots)
    for task_id in task_ids:
        cleanup_vm(task_id)
    return len(task_ids)


def get_active_environments_info() -> dict[str, Any]:
    """The tasks holding a slot: `{count, task_ids, workdirs, total_disk_usage_mb}`.

    `workdirs` maps each task to its workspace inside its sandbox; `total_disk_usage_mb` adds
    up what those workspaces hold (measured in the sandboxes, so it takes one command each).
    """
    with _lock:
        slots = dict(_task_slots)
        backend = _backend
    used_kib = 0
    if slots and backend is not None:
        measure: dict[str, Any] = {"command": "du -sk . 2>/dev/null | cut -f1"}
        try:
            results = backend.call_blocking(
                backend.execute_batch, [(slot, "bash", measure) for slot in slots.values()]
            )
        except HermesError as exc:
            logger.info("measuring the workspaces failed: %s", exc)
            results = []
        for result in results:
            if result.success and result.output.strip().isdigit():
                used_kib += int(result.output.strip())
    return {
        "count": len(slots),
        "task_ids": list(slots),
        "workdirs": {task_id: slot.workspace_dir for task_id, slot in slots.items()},
        "total_disk_usage_mb": round(used_kib / 1024, 2),
    }


def check_terminal_requirements() -> bool:
    """Whether `terminal_tool` can run commands here: the profiles load and the default
    profile's backend is usable (bubblewrap for `isolation: bwrap`; the `modal` package and
    Modal credentials for the modal backend). Never raises.
    """
    try:
        config = load_profiles().get_profile()
    except HermesError as exc:
        logger.info("terminal requirements: %s", exc)
        return False
    if config.backend == "modal":
        return _modal_usable()
    if config.isolation == "bwrap":
        from hermes_actors.drivers._local import bwrap_problem

        # In a thread of its own: the caller may be inside an event loop (trio's or asyncio's).
        with concurrent.futures.ThreadPoolExecutor(1) as thread:
            problem = thread.submit(trio.run, bwrap_problem).result()
        if problem is not None:
            logger.info("terminal requirements: bubblewrap cannot run here: %s", problem)
        return problem is None
    return True


def _modal_usable() -> bool:
    if importlib.util.find_spec("modal") is None:
        logger.info("terminal requirements: the modal package is not installed")
        return False
    if os.environ.get("MODAL_TOKEN_ID") and os.environ.get("MODAL_TOKEN_SECRET"):
        return True
    config_path = os.environ.get("MODAL_CONFIG_PATH") or os.path.expanduser("~/.modal.toml")
    if os.path.isfile(config_path):
        return True
    logger.info("terminal requirements: no Modal credentials (run `modal token new`)")
    return False


def _timeout_from_environment() -> float | None:
    text = os.environ.get(ENV_TIMEOUT, "")
    if text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(
            f"environment: {ENV_TIMEOUT}: expected a number of seconds > 0, got {text!r}; fix "
            "or unset it"
        )
    return value


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
        _task_images.clear()
    if backend is not None:
        backend.stop_sync()
