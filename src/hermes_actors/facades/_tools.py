"""The tools of `execute_batch`, as one table: a tool's name -> its arguments, operation, result.

A `Tool` row says which attrs class holds the tool's arguments (its fields and validators are
the argument rules, one field per argument), how those arguments become an operation value for
the slot's agent (`hermes_actors._values`), optionally why the call must not run (`refuse`), and
how the operation's result is rendered as an `ExecutionResult`. Adding a tool is one row in
`TOOLS` and its argument class; adding an argument is one field.
"""

from __future__ import annotations

import json
import math
import random
import shlex
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any, get_args

import attrs

from hermes_actors._config import SandboxConfig, Shell
from hermes_actors._values import (
    Command,
    CommandResult,
    FileContent,
    FileWritten,
    Operation,
    ReadFile,
    WriteFile,
)

__all__ = [
    "BACKGROUND_LOG_DIR",
    "BACKGROUND_START_TIMEOUT_S",
    "TOOLS",
    "BadRequest",
    "ExecutionResult",
    "Tool",
    "ToolContext",
    "ToolResult",
    "error_result",
    "parse_arguments",
]

#: Where a `background` command's output goes, under the slot's workspace.
BACKGROUND_LOG_DIR = ".hermes-background"
#: How long starting a `background` command may take.
BACKGROUND_START_TIMEOUT_S = 10.0


@attrs.define
class ToolResult:
    """A tool call's result in the shape the original Hermes agent consumes.

    Made by `ExecutionResult.to_tool_result()`; mutable (the caller sets `uniq_id` to its tool
    call's id). `error` is `''` on success.
    """

    success: bool
    output: str = ""
    error: str = ""
    metadata: dict[str, Any] = attrs.field(factory=dict)
    uniq_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """All five fields, as plain data."""
        return {
            "success": self.success,
            "output": self.output,
            "error": self.error,
            "metadata": self.metadata,
            "uniq_id": self.uniq_id,
        }

    def to_xml(self) -> str:
        """`<tool_response>{json}</tool_response>`, leaving out empty `uniq_id`, `error`,
        `metadata`, as the agent puts results into a conversation."""
        data: dict[str, Any] = {"success": self.success, "output": self.output}
        if self.uniq_id:
            data["uniq_id"] = self.uniq_id
        if self.error:
            data["error"] = self.error
        if self.metadata:
            data["metadata"] = self.metadata
        return f"<tool_response>{json.dumps(data, default=str)}</tool_response>"


@attrs.frozen
class ExecutionResult:
    """The outcome of one tool call of a batch.

    `success` is True when the tool did what was asked (for `bash`: exit status 0, not timed
    out). `output` is the tool's text (for `bash`: stdout, then stderr; for `terminal`: both
    interleaved in the order they were written). `error` says what went wrong, and is `''` on
    success (as in the original Hermes result). `metadata` always holds `tool`, `exit_code` and
    its original name `returncode`, `timed_out`, `duration_s`, `stdout_dropped` and
    `stderr_dropped`; `bash` and `terminal` add `isolated` and `network` (what the sandbox
    enforced), `network_note` when `allow_network=True` could not be met, and
    `shell_restarted` (the slot's persistent shell ended, by `exit`, `exec` or a kill, and was
    replaced with its last known cwd and exported environment); an infrastructure failure adds
    `infra_error` (the error's kind, e.g. `sandbox_lost`) and `retryable`.
    """

    success: bool
    output: str
    error: str
    execution_id: str
    slot_id: str
    metadata: Mapping[str, Any] = attrs.field(factory=dict)

    def to_tool_result(self) -> ToolResult:
        """This result as the original Hermes agent's `ToolResult` (`uniq_id`: our id)."""
        return ToolResult(
            success=self.success,
            output=self.output,
            error=self.error,
            metadata=dict(self.metadata),
            uniq_id=self.execution_id,
        )


class BadRequest(Exception):
    """A batch request that cannot run (unknown tool, bad arguments, slot not held)."""


@attrs.frozen(kw_only=True)
class ToolContext:
    """What a tool needs besides its arguments: the slot, its profile, the batch's settings."""

    slot_id: str
    #: The slot's profile.
    config: SandboxConfig
    #: Seconds a command may run when its own arguments do not say.
    timeout_s: float
    #: What the slot's sandbox enforces: commands isolated from the host, network reachable.
    isolated: bool
    network: bool
    #: `time.monotonic()` when the call started.
    started: float = attrs.field(factory=time.monotonic)


# -- argument rules -----------------------------------------------------------------------------


def _str(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, str):
        raise BadRequest(f"{attribute.name!r} must be a str, got {type(value).__name__}")


def _str_or_bytes(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, str | bytes):
        raise BadRequest(f"{attribute.name!r} must be str or bytes, got {type(value).__name__}")


def _optional_bool(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and not isinstance(value, bool):
        raise BadRequest(f"{attribute.name!r} must be a bool, got {type(value).__name__}")


def _positive_number(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is None:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not value > 0
    ):
        raise BadRequest(f"{attribute.name!r} must be a number > 0, got {value!r}")


def _positive_int(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadRequest(f"{attribute.name!r} must be an int >= 1, got {value!r}")


def _shell_mode(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and value not in get_args(Shell):
        modes = ", ".join(repr(mode) for mode in get_args(Shell))
        raise BadRequest(f"{attribute.name!r} must be one of {modes}, got {value!r}")


@attrs.frozen(kw_only=True)
class BashArgs:
    """`bash`: run `command` with bash in the slot's workspace."""

    command: str = attrs.field(validator=_str)
    #: Seconds before the command's whole tree is killed (default: the batch's timeout).
    timeout: float | None = attrs.field(default=None, validator=_positive_number)
    #: The original executor's policy, failing closed: `False` refuses to run where the
    #: sandbox has network; `True` where it has none runs without, with a note.
    allow_network: bool | None = attrs.field(default=None, validator=_optional_bool)
    #: Refuse to run where the sandbox does not isolate commands from the host.
    require_sandbox: bool | None = attrs.field(default=None, validator=_optional_bool)
    #: Start detached and return at once with the log file its output goes to.
    background: bool | None = attrs.field(default=None, validator=_optional_bool)
    #: `persistent` (the slot's long-lived shell: cwd, variables, functions carry over) or
    #: `fresh` (its own `bash -c`); default: the profile's `shell`.
    shell: str | None = attrs.field(default=None, validator=_shell_mode)


@attrs.frozen(kw_only=True)
class ReadFileArgs:
    """`read_file`: the text of a file of the slot's workspace.

    Without `max_bytes` the caller asks for the whole file: a file longer than the profile's
    `max_output_bytes` is an error (its head is still in `output`). With `max_bytes`, the first
    `max_bytes` bytes are a success, flagged `truncated` when the file is longer.
    """

    path: str = attrs.field(validator=_str)
    max_bytes: int | None = attrs.field(default=None, validator=_positive_int)


@attrs.frozen(kw_only=True)
class WriteFileArgs:
    """`write_file`: write `content` (text as UTF-8, or bytes) to a file, atomically."""

    path: str = attrs.field(validator=_str)
    content: str | bytes = attrs.field(validator=_str_or_bytes)


def parse_arguments(tool: str, arguments_class: type[Any], args: object) -> Any:
    """The tool's argument value from a request's mapping; raises `BadRequest` saying why."""
    if not isinstance(args, Mapping):
        raise BadRequest(f"{tool}: args must be a mapping, got {type(args).__name__}")
    required, optional = _argument_names(arguments_class)
    given = args.keys()
    missing = sorted(required - given)
    unknown = sorted(str(name) for name in given - required - optional)
    if missing or unknown:
        parts = []
        if missing:
            parts.append("missing " + ", ".join(repr(name) for name in missing))
        if unknown:
            parts.append("unknown " + ", ".join(repr(name) for name in unknown))
        expected = ", ".join([*sorted(required), *(f"{name}?" for name in sorted(optional))])
        raise BadRequest(f"{tool}: {'; '.join(parts)} argument(s); expected {{{expected}}}")
    try:
        return arguments_class(**args)
    except BadRequest as exc:
        raise BadRequest(f"{tool}: {exc}") from None


_argument_names_of: dict[type[Any], tuple[frozenset[str], frozenset[str]]] = {}


def _argument_names(arguments_class: type[Any]) -> tuple[frozenset[str], frozenset[str]]:
    """The names of an arguments class's required and optional fields (worked out once)."""
    names = _argument_names_of.get(arguments_class)
    if names is None:
        fields = attrs.fields(arguments_class)
        required = frozenset(f.name for f in fields if f.default is attrs.NOTHING)
        names = required, frozenset(f.name for f in fields) - required
        _argument_names_of[arguments_class] = names
    return names


# -- rendering ----------------------------------------------------------------------------------


def _new_execution_id() -> str:
    # 64 random bits, as uuid4's first 16 hex digits were, without a syscall per result (the
    # module's generator is seeded from the OS and reseeded in forked children).
    return f"exec-{random.getrandbits(64):016x}"


def _metadata(tool: str | None, duration_s: float, **extra: Any) -> dict[str, Any]:
    metadata = {
        "tool": tool,
        "exit_code": None,
        "timed_out": False,
        "duration_s": duration_s,
        "stdout_dropped": 0,
        "stderr_dropped": 0,
        **extra,
    }
    metadata["returncode"] = metadata["exit_code"]  # the original Hermes result's name
    return metadata


def _ok_result(
    slot_id: str, output: str, tool: str, duration_s: float, **extra: Any
) -> ExecutionResult:
    return ExecutionResult(
        success=True,
        output=output,
        error="",
        execution_id=_new_execution_id(),
        slot_id=slot_id,
        metadata=_metadata(tool, duration_s, **extra),
    )


def error_result(
    slot_id: str, error: str, tool: str | None, duration_s: float, **extra: Any
) -> ExecutionResult:
    return ExecutionResult(
        success=False,
        output="",
        error=error,
        execution_id=_new_execution_id(),
        slot_id=slot_id,
        metadata=_metadata(tool, duration_s, **extra),
    )


def _capped_text(data: bytes, dropped: int, cap: int, stream: str) -> str:
    """Decode captured output, marking where the agent dropped the middle of it."""
    if not dropped:
        return data.decode("utf-8", errors="replace")
    head, tail = data[: cap // 2], data[cap // 2 :]
    return (
        head.decode("utf-8", errors="replace")
        + f"\n[... {dropped} bytes of {stream} omitted ...]\n"
        + tail.decode("utf-8", errors="replace")
    )


def _bash_result(
    slot_id: str, result: CommandResult, cap: int, timeout_s: float, tool: str = "bash"
) -> ExecutionResult:
    stdout = _capped_text(result.stdout, result.stdout_dropped, cap, "stdout")
    stderr = _capped_text(result.stderr, result.stderr_dropped, cap, "stderr")
    if stdout and stderr and not stdout.endswith("\n"):
        stdout += "\n"
    success = result.exit_code == 0 and not result.timed_out and not result.cancelled
    if success:
        error = ""
    elif result.timed_out:
        error = f"command timed out after {timeout_s:g} s (its processes were killed)"
    elif result.cancelled:
        error = "command was cancelled (its processes were killed)"
    elif result.signal is not None:
        error = f"command was killed by signal {result.signal}"
    else:
        error = f"command exited with status {result.exit_code}"
    return ExecutionResult(
        success=success,
        output=stdout + stderr,
        error=error,
        execution_id=_new_execution_id(),
        slot_id=slot_id,
        metadata=_metadata(
            tool,
            result.duration_s,
            exit_code=result.exit_code,
            signal=result.signal,
            timed_out=result.timed_out,
            stdout_dropped=result.stdout_dropped,
            stderr_dropped=result.stderr_dropped,
            shell_restarted=result.shell_restarted,
        ),
    )


def _background_command(command: str) -> str:
    """A shell command that starts `command` detached, its output going to a log file in the
    workspace, and prints the detached process's pid and the log's path.

    The process belongs to the slot: it runs until the slot is reset (or its sandbox ends).
    """
    log = f"$HOME/{BACKGROUND_LOG_DIR}/{uuid.uuid4().hex[:12]}.log"
    # No `exit` on failure: in the slot's persistent shell it would end the shell. The log is
    # made before the job starts (its own redirection runs in the job, maybe after this call
    # returned), so the caller can read it at once.
    return (
        f'if mkdir -p "$HOME/{BACKGROUND_LOG_DIR}" && : > "{log}"; then\n'
        f'bash -c {shlex.quote(command)} >> "{log}" 2>&1 < /dev/null &\n'
        f'printf "%s %s\\n" "$!" "{log}"\n'
        "else false; fi\n"
    )


def _background_result(started: ExecutionResult) -> ExecutionResult:
    if not started.success:
        return attrs.evolve(started, error=f"could not start in the background: {started.error}")
    pid, log = started.output.strip().split(" ", 1)
    output = f"started in the background (pid {pid}); its output goes to {log}"
    metadata = {**started.metadata, "background_pid": int(pid), "background_log": log}
    return attrs.evolve(started, output=output, metadata=metadata)


def _facts(context: ToolContext) -> dict[str, bool]:
    return {"isolated": context.isolated, "network": context.network}


def _bash_refusal(args: BashArgs, context: ToolContext) -> str | None:
    """Why `require_sandbox` / `allow_network` cannot be honoured, or None (both fail closed:
    a command never runs with less isolation than asked for)."""
    profile = context.config.name
    if args.require_sandbox and not context.isolated:
        return (
            f"require_sandbox=True could not be met: the sandboxes of profile {profile!r} "
            "run commands without isolation (isolation 'none', or 'auto' without a working "
            "bubblewrap); the command was not run. Use a profile with isolation: bwrap, or the "
            "modal backend"
        )
    if args.allow_network is False and context.network:
        return (
            f"allow_network=False could not be met: the sandboxes of profile {profile!r} "
            "have network access (network: true, or no isolation to take it away) and it "
            "cannot be taken away for one command; the command was not run. Use a profile "
            "with network: false (and isolation: bwrap on the local backend)"
        )
    return None


def _bash_timeout(args: BashArgs, context: ToolContext) -> float:
    if args.background:
        return BACKGROUND_START_TIMEOUT_S
    return float(args.timeout or context.timeout_s)


def _bash_command(args: BashArgs, context: ToolContext, merge_stderr: bool = False) -> Command:
    command = _background_command(args.command) if args.background else args.command
    return Command(
        command=command,
        timeout_s=_bash_timeout(args, context),
        max_output_bytes=context.config.max_output_bytes,
        shell=args.shell or context.config.shell,
        merge_stderr=merge_stderr or None,
    )


def _terminal_command(args: BashArgs, context: ToolContext) -> Command:
    return _bash_command(args, context, merge_stderr=True)


def _bash_render(
    args: BashArgs, result: CommandResult, context: ToolContext, tool: str = "bash"
) -> ExecutionResult:
    rendered = _bash_result(
        context.slot_id,
        result,
        context.config.max_output_bytes,
        _bash_timeout(args, context),
        tool,
    )
    if args.background:
        rendered = _background_result(rendered)
    metadata = rendered.metadata
    assert isinstance(metadata, dict)  # a fresh dict of this call's result: ours to extend
    metadata.update(_facts(context))
    if args.allow_network and not context.network:
        metadata["network_note"] = (
            f"allow_network=True could not be met: the sandboxes of profile "
            f"{context.config.name!r} have no network (network: false); the command ran "
            "without network"
        )
    return rendered


def _terminal_render(
    args: BashArgs, result: CommandResult, context: ToolContext
) -> ExecutionResult:
    return _bash_render(args, result, context, "terminal")


def _read_operation(args: ReadFileArgs, context: ToolContext) -> ReadFile:
    cap = context.config.max_output_bytes
    return ReadFile(path=args.path, max_bytes=min(args.max_bytes or cap, cap))


def _read_render(args: ReadFileArgs, content: FileContent, context: ToolContext) -> ExecutionResult:
    """The whole file, or says it is not (an error when the whole file was asked for)."""
    duration_s = time.monotonic() - context.started
    text = content.data.decode("utf-8", errors="replace")
    facts = {"size": content.size, "truncated": content.truncated}
    if content.truncated and (args.max_bytes is None or args.max_bytes > len(content.data)):
        cap = context.config.max_output_bytes
        failed = error_result(
            context.slot_id,
            f"read_file: {args.path!r} is {content.size} bytes, more than the {cap}-byte cap "
            f"(the profile's max_output_bytes); output holds its first {len(content.data)} "
            "bytes. Read it in parts (max_bytes, or bash with head/tail) or raise "
            "max_output_bytes",
            "read_file",
            duration_s,
            **facts,
        )
        return attrs.evolve(failed, output=text)
    return _ok_result(context.slot_id, text, "read_file", duration_s, **facts)


def _write_operation(args: WriteFileArgs, context: ToolContext) -> WriteFile:
    content = args.content
    return WriteFile(
        path=args.path, data=content.encode("utf-8") if isinstance(content, str) else content
    )


def _write_render(
    args: WriteFileArgs, written: FileWritten, context: ToolContext
) -> ExecutionResult:
    return _ok_result(
        context.slot_id,
        f"wrote {written.size} bytes to {args.path}",
        "write_file",
        time.monotonic() - context.started,
        size=written.size,
    )


def _never(args: object, context: ToolContext) -> str | None:
    return None


@attrs.frozen(kw_only=True)
class Tool:
    """One tool: its argument class, how its arguments become an operation, how it renders,
    and why a call must not run (`refuse`: a reason, or None)."""

    arguments: type[Any]
    operation: Callable[[Any, ToolContext], Operation]
    render: Callable[[Any, Any, ToolContext], ExecutionResult]
    refuse: Callable[[Any, ToolContext], str | None] = _never

    def refusal(self, name: str, arguments: Any, context: ToolContext) -> ExecutionResult | None:
        """The error result of a call that must not run, or None."""
        reason = self.refuse(arguments, context)
        if reason is None:
            return None
        return error_result(context.slot_id, reason, name, 0.0, **_facts(context))


#: The tools `execute_batch` knows. `terminal` is `bash` whose output interleaves stdout and
#: stderr in the order they were written (what a terminal shows; `terminal_tool` uses it).
TOOLS: Mapping[str, Tool] = {
    "bash": Tool(
        arguments=BashArgs, operation=_bash_command, render=_bash_render, refuse=_bash_refusal
    ),
    "terminal": Tool(
        arguments=BashArgs,
        operation=_terminal_command,
        render=_terminal_render,
        refuse=_bash_refusal,
    ),
    "read_file": Tool(arguments=ReadFileArgs, operation=_read_operation, render=_read_render),
    "write_file": Tool(arguments=WriteFileArgs, operation=_write_operation, render=_write_render),
}
