"""The values that travel unchanged from the facades to the wire: operations and their results.

An *operation* is one thing a slot's agent does: run a `Command`, `ReadFile`, `WriteFile`,
`ListFiles`, `ResetSlot`, `EndShell`, or work on a whole tree (`TreeOperation`: checkpoints,
forks, tar streams). Each is a frozen value that knows its agent op name (`op`), its wire
arguments (`to_wire(slot)`, the field names are the protocol's), and how to read the agent's
answer back (`result_from_wire`). The facades build them, the runtime carries them to the sandbox
actor, the client writes them as one frame. A new per-command option is one field on `Command`
(its name is its wire name; `None` means "the agent's default", and is not sent).

Results are frozen values too (`CommandResult`, `FileContent`, `FileWritten`, `Listing`,
`SlotReset`, `CheckpointTaken`, `TarOpened`, `TarChunk`), or a plain `bool`/`None` where the
answer is a yes/no or an acknowledgement: what came back, nothing added. A new operation is one
value class here plus its handler in the agent.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import attrs

__all__ = [
    "CheckpointTaken",
    "Command",
    "CommandResult",
    "DropCheckpoint",
    "EndShell",
    "FileContent",
    "FileWritten",
    "ForkIn",
    "ForkSlot",
    "GetShellState",
    "ListFiles",
    "Listing",
    "Operation",
    "ReadFile",
    "ResetSlot",
    "RestoreCheckpoint",
    "ShellState",
    "SlotReset",
    "StreamClose",
    "StreamRead",
    "StreamWrite",
    "TakeCheckpoint",
    "TarChunk",
    "TarIn",
    "TarOpened",
    "TarOut",
    "TreeOperation",
    "WriteFile",
]


def _tuple_or_none(value: Any) -> tuple[str, ...] | None:
    return None if value is None else tuple(value)


def _frozen_env(value: Mapping[str, str] | None) -> Mapping[str, str]:
    return dict(value or {})


def _finite_positive(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{attribute.name!r} must be a number > 0, got {value!r}")


class _Operation:
    """Base of the operation values: their fields are their wire arguments."""

    __slots__ = ()

    def to_wire(self, slot: int) -> dict[str, Any]:
        """The agent's arguments for doing this in `slot`: the fields under their own names,
        `None` ones left out (the agent's default)."""
        args: dict[str, Any] = {"slot": slot}
        for field in attrs.fields(type(self)):  # type: ignore[arg-type]
            item = getattr(self, field.name)
            if item is None:
                continue
            if isinstance(item, tuple):
                item = list(item)
            elif isinstance(item, Mapping):
                item = dict(item)
            args[field.name] = item
        return args


class _Acknowledged(_Operation):
    """Base of the operations whose answer carries nothing: their result is None."""

    __slots__ = ()

    @staticmethod
    def result_from_wire(answer: Mapping[str, Any]) -> None:
        return None


@attrs.frozen(kw_only=True)
class Command(_Operation):
    """One command for a slot: a shell `command` (run by bash) or an `argv`, never both.

    `cwd` is relative to the slot's workspace; `env` adds variables; `stdin` is fed to the
    command (else /dev/null); `timeout_s` kills the whole tree after that many seconds (None:
    no limit); `max_output_bytes` caps each captured stream (None: the agent's default).
    `shell` is `"persistent"` (the command runs in the slot's long-lived shell: cwd, variables,
    functions persist between calls) or `"fresh"` (its own `bash -c`; the agent's default when
    None); `merge_stderr` sends stderr into stdout in write order.
    """

    op: ClassVar[str] = "exec"

    command: str | None = None
    argv: tuple[str, ...] | None = attrs.field(default=None, converter=_tuple_or_none)
    cwd: str = "."
    env: Mapping[str, str] = attrs.field(factory=dict, converter=_frozen_env, repr=False)
    stdin: bytes | None = attrs.field(default=None, repr=False)
    timeout_s: float | None = attrs.field(default=None, validator=_finite_positive)
    max_output_bytes: int | None = None
    shell: str | None = None
    merge_stderr: bool | None = None

    def __attrs_post_init__(self) -> None:
        if (self.command is None) == (self.argv is None):
            raise ValueError("a Command needs exactly one of command= or argv=")

    def to_wire(self, slot: int) -> dict[str, Any]:
        args = super().to_wire(slot)
        if self.timeout_s is not None and not math.isfinite(self.timeout_s):
            del args["timeout_s"]
        return args

    @staticmethod
    def result_from_wire(answer: Mapping[str, Any]) -> CommandResult:
        return CommandResult.from_wire(answer)


@attrs.frozen(kw_only=True)
class CommandResult:
    """What one command did; a timeout or cancel is a result (`timed_out`, `cancelled`)."""

    exit_code: int
    signal: int | None
    timed_out: bool
    cancelled: bool
    duration_s: float
    stdout: bytes = attrs.field(repr=False)
    stderr: bytes = attrs.field(repr=False)
    #: Bytes of stdout (stderr) the agent dropped from the middle to keep within the cap.
    stdout_dropped: int
    stderr_dropped: int
    #: The slot's persistent shell ended during this call (`exit`, `exec`, killed), or since
    #: the previous one, and was replaced (last known cwd and exported env restored).
    shell_restarted: bool = False

    @classmethod
    def from_wire(cls, answer: Mapping[str, Any]) -> CommandResult:
        return cls(
            exit_code=int(answer["exit_code"]),
            signal=answer.get("signal"),
            timed_out=bool(answer.get("timed_out", False)),
            cancelled=bool(answer.get("cancelled", False)),
            duration_s=float(answer.get("duration_s", 0.0)),
            stdout=answer.get("stdout", b""),
            stderr=answer.get("stderr", b""),
            stdout_dropped=int(answer.get("stdout_dropped", 0)),
            stderr_dropped=int(answer.get("stderr_dropped", 0)),
            shell_restarted=bool(answer.get("shell_restarted", False)),
        )


@attrs.frozen(kw_only=True)
class ReadFile(_Operation):
    """Read a file of the slot's workspace; at most `max_bytes` (None: the agent's bound)."""

    op: ClassVar[str] = "read_file"

    path: str
    max_bytes: int | None = None

    @staticmethod
    def result_from_wire(answer: Mapping[str, Any]) -> FileContent:
        data: bytes = answer["data"]
        return FileContent(
            data=data,
            size=int(answer.get("size", len(data))),
            truncated=bool(answer.get("truncated", False)),
        )


@attrs.frozen(kw_only=True)
class FileContent:
    """A file read: `data` is all of it unless `truncated`; `size` is the file's real size."""

    data: bytes = attrs.field(repr=False)
    size: int
    truncated: bool


@attrs.frozen(kw_only=True)
class WriteFile(_Operation):
    """Write `data` to a file of the slot's workspace, atomically."""

    op: ClassVar[str] = "write_file"

    path: str
    data: bytes = attrs.field(repr=False)
    mode: int | None = None

    @staticmethod
    def result_from_wire(answer: Mapping[str, Any]) -> FileWritten:
        return FileWritten(size=int(answer["size"]))


@attrs.frozen(kw_only=True)
class FileWritten:
    """A file written: how many bytes."""

    size: int


@attrs.frozen(kw_only=True)
class ListFiles(_Operation):
    """The entries under `path` of the slot's workspace."""

    op: ClassVar[str] = "list_files"

    path: str = "."
    recursive: bool = False
    max_entries: int | None = None

    @staticmethod
    def result_from_wire(answer: Mapping[str, Any]) -> Listing:
        return Listing(
            entries=tuple(answer.get("entries", ())),
            truncated=bool(answer.get("truncated", False)),
        )


@attrs.frozen(kw_only=True)
class Listing:
    """Entries (`{"path", "type", "size"}` each); `truncated` when `max_entries` cut it short."""

    entries: tuple[Mapping[str, Any], ...]
    truncated: bool


@attrs.frozen(kw_only=True)
class ResetSlot(_Operation):
    """Kill everything the slot started and wipe its workspace."""

    op: ClassVar[str] = "reset_slot"

    #: Keep the slot's idle persistent shell, set back and checked, instead of a new one (the
    #: profile's `reuse_shell`).
    keep_shell: bool = False

    @staticmethod
    def result_from_wire(answer: Mapping[str, Any]) -> SlotReset:
        return SlotReset(killed=int(answer.get("killed", 0)))


@attrs.frozen(kw_only=True)
class SlotReset:
    """A slot reset: how many processes were killed."""

    killed: int


# -- workspace trees: checkpoints, forks, tar streams (`runtime._trees` decides where) ------------

#: A persistent shell's state as its agent reports it (working directory and exported
#: environment): opaque to the host, which hands it back to an agent as it came.
ShellState = Mapping[str, Any]


def _slot_tuple(value: Iterable[int]) -> tuple[int, ...]:
    return tuple(value)


@attrs.frozen(kw_only=True)
class TakeCheckpoint(_Operation):
    """Copy the slot's workspace into a new checkpoint `checkpoint`, stored in the sandbox."""

    op: ClassVar[str] = "checkpoint"

    checkpoint: str

    @staticmethod
    def result_from_wire(answer: Mapping[str, Any]) -> CheckpointTaken:
        return CheckpointTaken(
            size_bytes=int(answer["bytes"]),
            entries=int(answer["entries"]),
            shell=answer.get("shell"),
            flat=bool(answer.get("flat", True)),
        )


@attrs.frozen(kw_only=True)
class CheckpointTaken:
    """A checkpoint stored: its files' bytes and entries, and the slot's shell state then."""

    size_bytes: int
    entries: int
    shell: ShellState | None = attrs.field(repr=False)
    #: Whether its stored tree is the whole workspace (else an overlay layer of the changes
    #: since a layer below it: only the agent can show it whole).
    flat: bool = True


@attrs.frozen(kw_only=True)
class RestoreCheckpoint(_Acknowledged):
    """Make the slot's workspace checkpoint `checkpoint`'s (the slot's processes are killed);
    its shell starts from `shell`."""

    op: ClassVar[str] = "restore"

    checkpoint: str
    shell: ShellState | None = attrs.field(default=None, repr=False)


@attrs.frozen(kw_only=True)
class DropCheckpoint(_Operation):
    """Free a checkpoint's storage (any slot may ask). The result: whether it existed."""

    op: ClassVar[str] = "drop_checkpoint"

    checkpoint: str

    @staticmethod
    def result_from_wire(answer: Mapping[str, Any]) -> bool:
        return bool(answer.get("dropped", False))


@attrs.frozen(kw_only=True)
class ForkSlot(_Acknowledged):
    """Copy the slot's workspace and shell state into each of `targets`, slots of the same
    sandbox (a copy inside the sandbox)."""

    op: ClassVar[str] = "fork"

    targets: tuple[int, ...] = attrs.field(converter=_slot_tuple)


@attrs.frozen(kw_only=True)
class GetShellState(_Operation):
    """The slot's shell state (cwd and exported environment), or None without a shell."""

    op: ClassVar[str] = "get_shell_state"

    @staticmethod
    def result_from_wire(answer: Mapping[str, Any]) -> ShellState | None:
        shell: ShellState | None = answer.get("shell")
        return shell


@attrs.frozen(kw_only=True)
class ForkIn(_Acknowledged):
    """Copy the tree the provider mounted at the agent's mounts directory under `mount` into
    the slot and each of `targets` (slots of the same sandbox), whose shells then start from
    `shell`: the target side of a fork across sandboxes."""

    op: ClassVar[str] = "fork_in"

    mount: str
    targets: tuple[int, ...] = attrs.field(converter=_slot_tuple)
    shell: ShellState | None = attrs.field(default=None, repr=False)


@attrs.frozen(kw_only=True)
class TarOut(_Operation):
    """Start `tar c` of the slot's directory `path`, or of checkpoint `checkpoint` when given;
    the host pulls it with `StreamRead`."""

    op: ClassVar[str] = "tar_out"

    path: str = "."
    checkpoint: str | None = None
    #: The host's name for the stream, to close it by (`StreamClose`) if the answer is lost.
    tag: str | None = None

    @staticmethod
    def result_from_wire(answer: Mapping[str, Any]) -> TarOpened:
        return TarOpened(stream=int(answer["stream"]), shell=answer.get("shell"))


@attrs.frozen(kw_only=True)
class TarOpened:
    """A `tar c` stream opened: its id, and the slot's shell state (for a fork via the host)."""

    stream: int
    shell: ShellState | None = attrs.field(default=None, repr=False)


@attrs.frozen(kw_only=True)
class TarIn(_Operation):
    """Start `tar x` into the slot's directory `path` (created) with its first bytes `data`;
    `last` says no more data follows (the answer then comes when tar is done), and `shell` is
    given to the slot once tar succeeded. The result: the stream's id to feed with
    `StreamWrite`, or None after `last`."""

    op: ClassVar[str] = "tar_in"

    path: str = "."
    data: bytes = attrs.field(default=b"", repr=False)
    last: bool = False
    shell: ShellState | None = attrs.field(default=None, repr=False)
    #: The host's name for the stream, to close it by (`StreamClose`) if the answer is lost.
    tag: str | None = None

    @staticmethod
    def result_from_wire(answer: Mapping[str, Any]) -> int | None:
        stream = answer.get("stream")
        return None if stream is None else int(stream)


@attrs.frozen(kw_only=True)
class StreamRead(_Operation):
    """The next `max_bytes` of a `tar c` stream (fewer only at its end)."""

    op: ClassVar[str] = "stream_read"

    stream: int
    max_bytes: int

    @staticmethod
    def result_from_wire(answer: Mapping[str, Any]) -> TarChunk:
        return TarChunk(data=answer.get("data", b""), eof=bool(answer.get("eof", False)))


@attrs.frozen(kw_only=True)
class TarChunk:
    """Bytes of a tar stream; `eof` once tar finished (successfully: a failure is an error)."""

    data: bytes = attrs.field(repr=False)
    eof: bool


@attrs.frozen(kw_only=True)
class StreamWrite(_Acknowledged):
    """Feed `data` to a `tar x` stream; with `last`, the answer comes when tar is done."""

    op: ClassVar[str] = "stream_write"

    stream: int
    data: bytes = attrs.field(repr=False)
    last: bool = False


@attrs.frozen(kw_only=True)
class StreamClose(_Operation):
    """Close a tar stream the host gives up on (a `tar c` is stopped), named by its id
    `stream`, or by the `tag` it was opened with when the host never heard its id (its tar is
    then killed, whichever way it goes). The result: whether there was such a stream."""

    op: ClassVar[str] = "stream_close"

    stream: int | None = None
    tag: str | None = None

    def __attrs_post_init__(self) -> None:
        if (self.stream is None) == (self.tag is None):
            raise ValueError("StreamClose takes a 'stream' or a 'tag', exactly one")

    @staticmethod
    def result_from_wire(answer: Mapping[str, Any]) -> bool:
        return bool(answer.get("closed", False))


@attrs.frozen(kw_only=True)
class EndShell(_Operation):
    """End the slot's persistent shell (files and processes stay); the next call starts a
    clean one. The result: whether there was one."""

    op: ClassVar[str] = "end_shell"

    #: Set an idle shell back instead of ending it (see `ResetSlot.keep_shell`).
    keep_shell: bool = False

    @staticmethod
    def result_from_wire(answer: Mapping[str, Any]) -> bool:
        return bool(answer.get("ended", False))


#: What a slot's agent does to whole workspace trees.
TreeOperation = (
    TakeCheckpoint
    | RestoreCheckpoint
    | DropCheckpoint
    | ForkSlot
    | GetShellState
    | ForkIn
    | TarOut
    | TarIn
    | StreamRead
    | StreamWrite
    | StreamClose
)

#: Everything a slot's agent can be asked to do.
Operation = Command | ReadFile | WriteFile | ListFiles | ResetSlot | EndShell | TreeOperation
