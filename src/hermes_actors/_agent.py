"""The sandbox agent: one stdlib-only program that runs INSIDE every sandbox.

This file is both a host-side module (the host imports its wire codec and bootstrap) and the
program the host sends into a sandbox: the driver starts ``python3 -c BOOTSTRAP``, the host writes
``bootstrap_payload(config)`` to its stdin, and from then on both sides speak frames over the
process's stdin/stdout. It must run on any ``python3 >= 3.8`` with nothing installed, so it uses
only the standard library and no syntax newer than 3.8.

Wire format
-----------
A frame is ``u32 json_length, u32 blobs_length, json, blobs`` (big endian). Byte strings never go
inside the JSON: each ``bytes`` value is replaced by ``{"$b": n}`` and its ``n`` bytes follow in
``blobs``, in the order the placeholders appear in the JSON text. So binary output and files of any
content travel without escaping or base64.

Requests: ``{"id": int > 0, "op": str, "args": {...}}``.
Replies:  ``{"id": int, "ok": true, "result": {...}}`` or
          ``{"id": int, "ok": false, "error": {"code": str, "message": str}}``.
Output:   ``{"id": int, "output": "stdout"|"stderr", "data": bytes, "skipped": int}``, sent
          while an exec with ``"stream_output": true`` runs, before its reply (see
          `Agent.stream_output`); a frame without ``ok`` is never a reply.
The agent's first frame is ``{"id": 0, "ok": true, "result": {"ready": true, ...}}``.
A frame the agent cannot parse gets ``{"id": 0, "ok": false, "error": {"code": "bad_frame"}}``
when the stream is still usable, and a clean exit when it is not.

The agent
---------
One single-threaded ``selectors`` loop (`Agent`) watches stdin, every command's pipes, a signal
wakeup pipe (SIGCHLD, SIGTERM, SIGINT, SIGHUP) and a heap of exec deadlines. Requests are served
concurrently: ``exec`` replies when its command ends, every other op replies at once. Ops and
their error codes are listed in `OPS` and `_ERRNO_CODES`; bad arguments give ``bad_request``.

Invariants:

* fd 1 carries frames only (``sys.stdout`` is pointed at stderr); replies a slow host has not
  read are buffered, and past `OUTBOX_HIGH_WATER` no new request is taken until it catches up.
* Every command runs in its own session with stdin from /dev/null (unless data is given), a
  non-interactive environment (the sandbox's own < `DEFAULT_ENV` < config ``env`` < exec
  ``env``; see `_sandbox_env`) and HOME at its slot workspace. A command longer than argv
  allows (`_MAX_ARGV_COMMAND`) reaches its shell on fd 3 instead (a memfd, see `_script_fd`).
* Every command is started by its slot's keeper (`_keeper_main`), a child subreaper, so the
  slot's processes are exactly the keeper's descendants: ownership is read from the process
  tree, which no command can rewrite (environment and session are not consulted). A keeper
  is only lent to another slot once it has no child left (a few such spares are kept, the
  rest exit): idle slots cost no process. A timeout, cancel, reset or exit kills whole
  trees, ``setsid``/double-fork escapees included, and repeats until a /proc scan finds
  none alive. Exit codes: 124 and ``timed_out`` after a
  timeout, ``cancelled`` after cancel/reset/shutdown (or the loss of the slot's keeper),
  ``-N`` and ``signal: N`` for a command killed by signal N.
* Once a command's own process has exited, its reply goes out with what its pipes hold at that
  moment: background children that keep the pipes open do not delay it.
* Every child is reaped (keepers reap their slot's, and report each leader's end).
* An exec with ``"shell": "persistent"`` runs in its slot's long-lived shell instead of its own
  ``bash -c`` (state persists between calls; see `_Shells` for the protocol, the framing that
  never travels in the output, and how timeouts, ``exit`` and resets are handled).
  ``"merge_stderr": true`` sends stderr into stdout in write order (one pipe or FIFO for both).
  With ``"warm_shells": true`` in the config (a profile whose calls use the persistent shell),
  every slot's shell is started before the ready frame, and again as soon as a reset or
  ``end_shell`` has ended one: a slot's first call finds its shell waiting, as its next ones.
* File ops are confined to the slot workspace (``..``, absolute paths and symlinks resolving
  outside give ``path_escape``); with slot uids they run under the slot's uid (``seteuid``).
* Leaving the loop (shutdown, stdin EOF, ``ttl_s`` without a frame, a fatal signal, a broken
  stream) kills everything the agent started, flushes the last replies, and exits.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import heapq
import json
import os
import re
import selectors
import shlex
import signal
import stat
import struct
import sys
import time
from typing import Any, Callable, Deque, Dict, Iterable, List, Mapping, Optional, Set, Tuple

PROTOCOL_VERSION = 1
_HEADER = struct.Struct(">II")
MAX_FRAME_BYTES = 256 * 1024 * 1024


class FrameError(Exception):
    """A frame that cannot be decoded."""


_ENCODER_SEPARATORS = (",", ":")


def encode_frame(message: Dict[str, Any]) -> bytes:
    """Encode one message (a JSON-able dict whose leaves may be bytes) as a frame.

    Each bytes-like leaf becomes a ``{"$b": size}`` placeholder in the JSON text, in the order
    the text holds them, and its bytes follow the text in that order.
    """
    blobs: List[bytes] = []

    def blob(value: Any) -> Any:
        if isinstance(value, (bytes, bytearray, memoryview)):
            data = bytes(value)
            blobs.append(data)
            return {"$b": len(data)}
        raise TypeError("%s is not JSON serializable" % type(value).__name__)

    text = json.dumps(message, separators=_ENCODER_SEPARATORS, default=blob).encode()
    blob_bytes = b"".join(blobs)
    return _HEADER.pack(len(text), len(blob_bytes)) + text + blob_bytes


def decode_body(text: bytes, blobs: bytes) -> Dict[str, Any]:
    """Decode the JSON part and the blobs of one frame into a message."""
    offset = 0

    def restore(value: Dict[str, Any]) -> Any:
        # Called for each object as it is completed: placeholders (leaves) in text order.
        nonlocal offset
        if len(value) != 1 or "$b" not in value:
            return value
        size = value["$b"]
        if not isinstance(size, int) or size < 0 or offset + size > len(blobs):
            raise FrameError("blob placeholder out of range")
        start = offset
        offset = start + size
        return blobs[start:offset]

    try:
        if blobs or b"$b" in text or b"\\u" in text:
            raw = json.loads(text.decode("utf-8"), object_hook=restore)
        else:
            # No placeholder can be in the text (its key is spelled neither plainly nor with
            # an escape): no Python call per object. Most frames are like this.
            raw = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise FrameError("frame is not valid JSON: %s" % exc) from None
    if not isinstance(raw, dict):
        raise FrameError("frame is not a JSON object")
    if offset != len(blobs):
        raise FrameError("frame has %d unreferenced blob bytes" % (len(blobs) - offset))
    return raw


class FrameDecoder:
    """Incremental decoder: feed bytes, get complete messages.

    A malformed body raises `FrameError` for that frame only (the stream stays in sync, since the
    header gave its length); an impossible header makes the stream unusable (`broken` is set).
    """

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self._buffer = bytearray()
        self._max = max_frame_bytes
        self.broken = False

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def next_frame(self) -> Tuple[bool, Any]:
        """Return ``(True, message)``, or ``(False, None)`` when no whole frame is buffered.

        Raises `FrameError` for a frame that is complete but malformed.
        """
        if len(self._buffer) < _HEADER.size:
            return False, None
        text_len, blob_len = _HEADER.unpack_from(self._buffer)
        if text_len + blob_len > self._max:
            self.broken = True
            raise FrameError("frame of %d bytes exceeds the limit" % (text_len + blob_len))
        end = _HEADER.size + text_len + blob_len
        if len(self._buffer) < end:
            return False, None
        text = bytes(self._buffer[_HEADER.size : _HEADER.size + text_len])
        blobs = bytes(self._buffer[_HEADER.size + text_len : end])
        del self._buffer[:end]
        return True, decode_body(text, blobs)


# The bootstrap the driver passes to `python3 -c`. It reads the agent's source and config from
# stdin, so nothing has to exist in the sandbox image but a python3. It reads fd 0 unbuffered:
# a buffered reader could swallow the first request frames sent right after the payload.
BOOTSTRAP = (
    "import os,struct\n"
    "def n(k):\n"
    " b=b''\n"
    " while len(b)<k:\n"
    "  c=os.read(0,k-len(b))\n"
    "  if not c:raise SystemExit(3)\n"
    "  b+=c\n"
    " return b\n"
    "s=n(struct.unpack('>I',n(4))[0]).decode()\n"
    "g={'__name__':'__hermes_agent__'}\n"
    "exec(compile(s,'hermes_agent','exec'),g)\n"
    "g['main'](n(struct.unpack('>I',n(4))[0]).decode())\n"
)


def agent_source() -> str:
    """This module's source: what the host sends into the sandbox."""
    with open(__file__, encoding="utf-8") as handle:
        return handle.read()


def bootstrap_payload(config: Dict[str, Any]) -> bytes:
    """The bytes the host writes to the bootstrap's stdin: the agent source, then its config."""
    source = agent_source().encode("utf-8")
    config_bytes = json.dumps(config).encode("utf-8")
    return (
        struct.pack(">I", len(source))
        + source
        + struct.pack(">I", len(config_bytes))
        + config_bytes
    )


# ---------------------------------------------------------------------------------------------
# The agent proper. Everything below runs inside the sandbox; the host only imports the codec.
# ---------------------------------------------------------------------------------------------

#: Non-interactive defaults for every command; the host's env and the exec's env override them.
DEFAULT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
    "NO_COLOR": "1",
    "CI": "1",
    "PAGER": "cat",
    "MANPAGER": "cat",
    "GIT_PAGER": "cat",
    "GIT_EDITOR": "true",
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_SSH_COMMAND": "ssh -o BatchMode=yes",
    "DEBIAN_FRONTEND": "noninteractive",
    "PIP_NO_INPUT": "1",
    "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    "PYTHONUNBUFFERED": "1",
    "npm_config_yes": "true",
    "HOMEBREW_NO_AUTO_UPDATE": "1",
}


def _sandbox_env(environ: Mapping[str, str]) -> Dict[str, str]:
    """The environment commands start from: the sandbox's own, made non-interactive.

    The sandbox's environment carries what the image and the provider set (an image's PATH,
    a provider secret's variables), so it is kept; `DEFAULT_ENV` then forces non-interactive
    behaviour, except PATH and LANG, which it only fills in when the sandbox has none.
    """
    env = dict(environ)
    for key, value in DEFAULT_ENV.items():
        if key in ("PATH", "LANG"):
            env.setdefault(key, value)
        else:
            env[key] = value
    return env


DEFAULT_TTL_S = 60.0
DEFAULT_MAX_OUTPUT_BYTES = 1000000
#: Per-stream cap an exec may ask for: two streams must fit in one frame with room to spare.
MAX_OUTPUT_CAP = 100 * 1024 * 1024
#: Largest file body `read_file` returns in one reply (bigger files come back truncated).
MAX_READ_BYTES = 128 * 1024 * 1024
DEFAULT_MAX_ENTRIES = 10000
MAX_SLOT = 1000000
#: Replies buffered for a host that does not read: above this, stop taking new requests.
OUTBOX_HIGH_WATER = 64 * 1024 * 1024
_READ_CHUNK = 256 * 1024
#: Frames queued for the host are written at once past this many bytes (else at the end of
#: the loop turn, together).
_FLUSH_AT_BYTES = 64 * 1024
#: A persistent shell's ``export -p`` text is read in pieces of this size (one is the rule).
_ENV_CHUNK = 64 * 1024
#: Its memfd is emptied once this much has accumulated (see `_Shells.rewind_exported`).
_ENV_REWIND_BYTES = 1024 * 1024
#: How long a checkpoint waits for a live shell to finish writing its last call's exports.
_EXPORTED_WAIT_S = 2.0
#: Output frames of streamed execs are sent only while fewer bytes than this wait for the host;
#: the rest is skipped (counted in the next frame), so a slow host bounds the agent's memory
#: and never slows the command (its capture, and so its reply, has everything as usual).
STREAM_OUTBOX_LIMIT = 1024 * 1024
#: After a command exits, how much still-buffered output is taken from each pipe at most (the
#: command's own writes are all in the pipe by then; a background writer must not hold us).
_FINAL_DRAIN_BYTES = 4 * 1024 * 1024
#: How long a kill keeps scanning /proc for a tree that refuses to die (D state).
_KILL_LIMIT_S = 5.0
#: Longest command passed in argv (the kernel refuses one argument of 128 KiB or more).
_MAX_ARGV_COMMAND = 100 * 1024
_FLUSH_ON_EXIT_S = 2.0

EXIT_OK = 0
EXIT_BAD_CONFIG = 2
EXIT_TTL = 4
EXIT_BROKEN_STREAM = 5

_PR_SET_CHILD_SUBREAPER = 36

#: How an exec with a ``command`` runs: in the slot's persistent shell, or as its own ``bash -c``.
SHELL_MODES = ("fresh", "persistent")
#: After a timed-out or cancelled shell call's processes are killed, how long the shell has to
#: report the call's end before it counts as stuck (a builtin loop) and is replaced.
SHELL_KILL_GRACE_S = 0.25

OPS = (
    "exec",
    "cancel",
    "read_file",
    "write_file",
    "list_files",
    "reset_slot",
    "end_shell",
    "ping",
    "shutdown",
)
#: Operations that accept ``"serial": true``: run one at a time per slot, in arrival order.
SERIAL_OPS = ("exec", "read_file", "write_file", "list_files", "end_shell")


class OpError(Exception):
    """An operation refused or failed: becomes an ``ok: false`` reply with a stable `code`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


_ERRNO_CODES = {
    errno.ENOENT: "not_found",
    errno.EISDIR: "is_a_directory",
    errno.ENOTDIR: "not_a_directory",
    errno.EACCES: "permission_denied",
    errno.EPERM: "permission_denied",
    errno.ELOOP: "symlink_loop",
    errno.ENOSPC: "no_space",
    errno.EDQUOT: "no_space",
    errno.EROFS: "read_only",
    errno.ENAMETOOLONG: "bad_request",
    errno.EEXIST: "exists",
}


def _os_error(what: str, path: str, exc: OSError) -> OpError:
    code = _ERRNO_CODES.get(exc.errno or 0, "io_error")
    return OpError(code, "%s %r: %s" % (what, path, exc.strerror or exc))


def _exit_code_of(status: int) -> Tuple[int, Optional[int]]:
    """``(exit_code, signal)`` from a wait status: ``-N, N`` when killed by signal N."""
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        return -number, number
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status), None
    return -1, None


def _become_subreaper() -> bool:
    """Adopt orphaned descendants (double-forked escapees), so they are reaped here."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except Exception:  # no ctypes in a minimal image, or not Linux: orphans go to init
        return False


_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4


def _drop_inheritable_privileges() -> bool:
    """Make sure no command can gain privileges: no_new_privs, and no ambient capabilities.

    Ambient capabilities (bubblewrap's --cap-add sets them) survive exec for any uid whose
    saved uid stayed 0, which is what the posix_spawn path leaves; no_new_privs stops setuid
    binaries. Returns False if the ambient set could not be cleared (then the posix_spawn
    path must not switch uids).
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        return bool(libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) == 0)
    except Exception:
        return False


_HAVE_POSIX_SPAWN = hasattr(os, "posix_spawn") and hasattr(os, "setresuid")
#: The effective uid a sealed program (see `_spawn_as`) starts with, until it drops to its
#: real uid, the slot's: nobody's (no slot's, never 0), valid wherever the agent is root.
_SEALED_START_UID = 65534
#: What starting sealed takes from a shell's environment, given back by its first line (see
#: `_Shells.spawn`): glibc's secure mode (a program started with two different uids) drops
#: the loader's and a few libraries' variables, and bash ignores these of its own.
_SEALED_DROPS = frozenset(
    (
        "CDPATH",
        "GCONV_PATH",
        "GETCONF_DIR",
        "GLOBIGNORE",
        "HOSTALIASES",
        "LOCALDOMAIN",
        "LOCPATH",
        "NIS_PATH",
        "NLSPATH",
        "RESOLV_HOST_CONF",
        "RES_OPTIONS",
        "TMPDIR",
        "TZDIR",
    )
)
_SEALED_DROP_PREFIXES = ("LD_", "MALLOC_", "GLIBC_")
#: Signals Python ignores that a command must get back at their default disposition.
_DEFAULT_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGPIPE", "SIGXFSZ", "SIGXFZ") if hasattr(signal, name)
)


def _close_on_exec_all() -> None:
    """Mark every inherited fd above 2 close-on-exec, so no command inherits it."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return
    for name in names:
        fd = int(name)
        if fd > 2:
            with contextlib.suppress(OSError):  # the listing's own fd is gone by now
                os.set_inheritable(fd, False)


def _return_free_memory() -> None:
    """Give the C heap's free pages back to the system, where the C library can (glibc).

    Compiling this program leaves about 7 MB of freed compiler memory in the heap, which every
    keeper forked from the agent would map again (counted in each one's RSS); nothing needs
    it. Without ctypes or glibc this does nothing.
    """
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (ImportError, OSError, AttributeError):
        pass


def _which(name: str, search_path: str) -> Optional[str]:
    """The first executable `name` on `search_path` (shutil.which, without importing shutil)."""
    for directory in search_path.split(os.pathsep):
        candidate = os.path.join(directory or ".", name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def _find_shell() -> List[str]:
    for candidate in ("/bin/bash", "/usr/bin/bash", "/usr/local/bin/bash"):
        if os.access(candidate, os.X_OK):
            return [candidate, "-c"]
    return ["/bin/sh", "-c"]


def _write_all_nonblocking(fd: int, data: bytes) -> int:
    """Write as much of `data` as the fd takes now; return the number of bytes written."""
    view = memoryview(data)
    written = 0
    while written < len(view):
        try:
            written += os.write(fd, view[written:])
        except BlockingIOError:
            break
    return written


# ---------------------------------------------------------------------------------------------
# Process ownership: one keeper per slot.
#
# Which processes belong to a slot is decided from the process tree, which a command cannot
# rewrite: every command of a slot is spawned by that slot's keeper, a small child subreaper
# forked from the agent. A process that leaves its session, clears its environment or double
# forks still stays a descendant of the keeper: when its parent dies it is reparented to the
# nearest living subreaper above it, the keeper. So a slot's processes are exactly the
# keeper's descendants, and a command's are its leader's descendants plus the orphans the
# keeper adopted that were started after the command (`_kill_until_gone` loops until a /proc
# scan finds none alive). When the agent goes away (its socket closes), the keeper kills all
# its descendants and exits; when a keeper dies, its orphans reach the agent (a subreaper too),
# which kills them.
#
# Wire between agent and keeper: a SOCK_STREAM socketpair, frames of ``u32 length, json``;
# a spawn request carries the command's fds (stdin, stdout, stderr[, script]) as SCM_RIGHTS.
# Requests: ``{"argv", "path", "env", "cwd"}`` -> ``{"pid", "start"}`` or ``{"errno",
# "message"}``. Notices from the keeper: ``{"exited": pid, "status": wait_status}``.
# ---------------------------------------------------------------------------------------------

_KEEPER_HEADER = struct.Struct(">I")
_KEEPER_MAX_FDS = 8
#: Signals a keeper ignores (it ends only when its agent closes the socket); a command must
#: get them back at their default disposition.
_KEEPER_IGNORED = tuple(
    getattr(signal, name)
    for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")
    if hasattr(signal, name)
)
#: How long the agent waits for its keeper to answer a spawn before giving the keeper up.
_KEEPER_REPLY_S = 10.0
#: How many keepers with nothing to keep an agent holds for the next command of any slot;
#: more are let go (each is a process of a few MB: a sandbox's idle slots keep none).
SPARE_KEEPERS = 4


def _keeper_frame(message: Dict[str, Any]) -> bytes:
    data = json.dumps(message, separators=(",", ":")).encode("utf-8")
    return _KEEPER_HEADER.pack(len(data)) + data


def _send_to_keeper_peer(sock: Any, message: Dict[str, Any], fds: Tuple[int, ...] = ()) -> None:
    """Send one frame on a blocking socket, `fds` riding with its first byte."""
    import socket

    payload = _keeper_frame(message)
    sent = 0
    if fds:
        rights = struct.pack("%di" % len(fds), *fds)
        sent = sock.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
    if sent < len(payload):
        sock.sendall(payload[sent:])


def _children_of(table: Dict[int, Tuple[int, int, bool]]) -> Dict[int, List[int]]:
    children: Dict[int, List[int]] = {}
    for pid, (parent, _, _) in table.items():
        children.setdefault(parent, []).append(pid)
    return children


def _descendants(children: Dict[int, List[int]], roots: Any) -> Set[int]:
    """Every process below `roots` (the roots themselves not included)."""
    found: Set[int] = set()
    stack = list(roots)
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def _kill_until_gone(
    select: Callable[[Dict[int, Tuple[int, int, bool]]], Set[int]],
    reap: Callable[[], None],
    limit_s: float = _KILL_LIMIT_S,
) -> Set[int]:
    """SIGKILL what `select` picks from a fresh process table, until it picks nothing alive.

    Killing is repeated rather than trusted: a process forked between a scan and its parent's
    kill shows up in the next scan (reparented to a keeper, still picked). Returns every pid
    killed. `limit_s` bounds it against a process the kernel cannot kill (D state).
    """
    killed: Set[int] = set()
    own = os.getpid()
    limit = time.monotonic() + limit_s
    pause = 0.0005
    while True:
        table = _process_table()
        targets = [
            pid
            for pid in select(table)
            if pid in table and not table[pid][2] and pid != own and pid != 1
        ]
        if not targets:
            return killed
        for pid in targets:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                continue
            killed.add(pid)
        reap()
        if time.monotonic() > limit:
            return killed
        time.sleep(pause)
        pause = min(pause * 2, 0.02)


def _children_listed(pid: int) -> List[int]:
    """The children of a single-threaded process, from /proc (raises OSError, ValueError)."""
    with open("/proc/%d/task/%d/children" % (pid, pid), "rb") as handle:
        return [int(child) for child in handle.read().split()]


def _only_child(parent: int, child: int) -> bool:
    """Whether `child` is the single-threaded `parent`'s only child and has none itself."""
    try:
        return _children_listed(parent) == [child] and not _children_listed(child)
    except (OSError, ValueError):
        return False


def _kill_descendants(
    reap: Callable[[], None], limit_s: float = _KILL_LIMIT_S, spare: int = 0
) -> List[int]:
    """SIGKILL every process below this one (a subreaper) until it has no child; the pids killed.

    A subreaper's descendants are its children and theirs, and an orphan becomes its child when
    its parent dies: killing the children, again after each death, reaches every level without
    a scan of every process on the machine (``/proc/self/task/*/children`` lists them). Where
    that list is missing, it falls back to the scan. `limit_s` bounds it against a process the
    kernel cannot kill (D state); zombies are reaped by `reap` and not counted.

    `spare` (a child: the slot's idle shell, kept for the next lease) is the one process left
    alive; its children are killed like every other (theirs then come to us as orphans).
    """
    own = os.getpid()
    killed: List[int] = []
    limit = time.monotonic() + limit_s
    pause = 0.0002
    while True:
        reap()
        try:
            children = _children_listed(own)
            if spare in children:
                children.remove(spare)
                children += _children_listed(spare)
        except (OSError, ValueError):
            table_kill = _kill_until_gone(
                lambda table: _descendants(_children_of(table), [own]) - {spare}, reap, limit_s
            )
            return killed + sorted(table_kill - set(killed))
        if spare and not children:
            # The spared shell is the slot's last process. (Zombies are waited out, not taken
            # as gone: a dying process hands its children to us only as it becomes one.)
            return killed
        if not children:
            try:
                ended = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return killed
            if ended is None:  # a live child the listing missed: find it in the table
                children = sorted(_descendants(_children_of(_process_table()), [own]))
        for pid in children:
            if _process_state(pid) in (b"Z", b"X", b""):
                continue
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                continue
            if pid not in killed:
                killed.append(pid)
        if time.monotonic() > limit:
            return killed
        time.sleep(pause)
        pause = min(pause * 2, 0.02)


def _process_state(pid: int) -> bytes:
    """A process's state letter from /proc (b"" when it is gone)."""
    try:
        fd = os.open("/proc/%d/stat" % pid, os.O_RDONLY | os.O_CLOEXEC)
        try:
            line = os.read(fd, 4096)
        finally:
            os.close(fd)
        return line[line.rindex(b")") + 2 :][:1]
    except (OSError, ValueError):
        return b""


def _start_time(pid: int) -> int:
    """A process's start time in clock ticks since boot (0 when it cannot be read)."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as handle:
            line = handle.read()
        return int(line[line.rindex(b")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return 0


def _spawn_as(
    path: str,
    argv: List[str],
    env: Dict[str, str],
    cwd: str,
    fds: List[int],
    uid: Optional[int],
    fast_uid_spawn: bool,
    sealed: bool = False,
) -> int:
    """Start a command with `fds` as its fds 0..n-1, in its own session, as `uid`.

    posix_spawn is vfork-fast even when the command runs as a slot uid: `subprocess.Popen(
    user=...)` must fork() the whole process (about 1 ms more per command). Instead the
    spawner briefly makes the slot uid its *real* uid (keeping uid 0 as effective and saved,
    so it keeps its capabilities) and asks posix_spawn to reset the child's effective ids to
    the real ones: the command starts as the slot uid, all ids non-zero, so exec leaves it no
    capability. posix_spawn has no cwd: the spawner is single-threaded, so it changes its own.
    Every other fd of the spawner is close-on-exec.

    `sealed` (a slot's persistent bash, which a reset may keep for the slot's next lease): the
    program starts with `_SEALED_START_UID` as its effective uid and the slot's as its real
    one, and bash, seeing them differ, sets all three to the real one itself. A process whose
    ids changed is not dumpable: no process of the slot (same uid) can ptrace the shell or write
    its memory through ``/proc/PID/mem``, so nothing a lease ran can live on in a kept shell
    where no reset check would see it.
    """
    for target, fd in enumerate(fds):
        if fd == target:  # dup2 onto itself would keep close-on-exec set
            os.set_inheritable(fd, True)
    if _HAVE_POSIX_SPAWN and (uid is None or fast_uid_spawn):
        actions = [(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(fds)]
        os.chdir(cwd)
        if uid is not None:
            os.setresgid(uid, uid if sealed else 0, 0)
            os.setresuid(uid, _SEALED_START_UID if sealed else 0, 0)
        try:
            return os.posix_spawn(
                path,
                argv,
                env,
                file_actions=actions,
                setsid=True,
                resetids=uid is not None and not sealed,
                setsigdef=_DEFAULT_SIGNALS + _KEEPER_IGNORED,
                setsigmask=(),
            )
        finally:
            if uid is not None:
                os.setresuid(0, 0, 0)
                os.setresgid(0, 0, 0)
            os.chdir("/")
    return _fork_exec_as(path, argv, env, cwd, fds, uid, sealed)  # pragma: no cover


def _fork_exec_as(  # pragma: no cover - only where posix_spawn cannot drop the uid
    path: str,
    argv: List[str],
    env: Dict[str, str],
    cwd: str,
    fds: List[int],
    uid: Optional[int],
    sealed: bool,
) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
            for number in _DEFAULT_SIGNALS + _KEEPER_IGNORED:
                signal.signal(number, signal.SIG_DFL)
            os.setsid()
            os.chdir(cwd)
            if uid is not None:
                os.setgroups([])
                os.setresgid(uid, uid, uid)
                start_uid = _SEALED_START_UID if sealed else uid
                os.setresuid(uid, start_uid, start_uid)
            os.execve(path, argv, env)
        except BaseException:
            pass
        os._exit(127)
    return pid


def _keeper_receive(sock: Any) -> Tuple[Optional[Dict[str, Any]], List[int]]:
    """Read one request frame (blocking) and the fds that came with it; None at EOF."""
    import socket

    header = b""
    fds: List[int] = []
    space = socket.CMSG_SPACE(_KEEPER_MAX_FDS * 4)
    while len(header) < _KEEPER_HEADER.size:
        data, ancillary, _, _ = sock.recvmsg(
            _KEEPER_HEADER.size - len(header), space, getattr(socket, "MSG_CMSG_CLOEXEC", 0)
        )
        for level, kind, blob in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(blob) - len(blob) % 4
                fds.extend(struct.unpack("%di" % (usable // 4), blob[:usable]))
        if not data:
            for fd in fds:
                os.close(fd)
            return None, []
        header += data
    (length,) = _KEEPER_HEADER.unpack(header)
    body = bytearray()
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        if not chunk:
            for fd in fds:
                os.close(fd)
            return None, []
        body += chunk
    return json.loads(body.decode("utf-8")), fds


#: The soft limit of open files the agent started with, given back to every command (see
#: `_raise_open_files_limit`); None until the agent raised its own.
_COMMAND_OPEN_FILES: Optional[int] = None


def _raise_open_files_limit() -> None:
    """Raise the agent's soft limit of open files to its hard limit, remembering the first.

    The agent holds several fds per slot (its keeper's socket, the shell's pipes, memfd and
    output FIFOs with a reader and a writer each): at 100 slots that nears a 1024 soft limit,
    a common default in containers. Commands get the limit they would have had back from their
    keeper (`_apply_limits`): some programs walk every fd up to the soft limit.
    """
    global _COMMAND_OPEN_FILES
    try:
        import resource
    except ImportError:  # pragma: no cover - not Linux
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            _COMMAND_OPEN_FILES = soft


def _apply_limits(limits: Dict[str, Any], uid: Optional[int]) -> None:
    """Per-slot resource limits, set on the keeper so every process of the slot inherits them.

    ``memory_bytes`` bounds each process's data (RLIMIT_DATA: heap and private writable
    mappings; not address space, which breaks JVM and Go runtimes). ``processes`` bounds the
    slot uid's process count (RLIMIT_NPROC counts per uid, so only with slot uids). The soft
    limit of open files goes back to what the agent started with.
    """
    try:
        import resource
    except ImportError:  # pragma: no cover - not Linux
        return
    if _COMMAND_OPEN_FILES is not None:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (_COMMAND_OPEN_FILES, hard))
    for name, value in (
        ("RLIMIT_DATA", limits.get("memory_bytes")),
        ("RLIMIT_NPROC", limits.get("processes")),
    ):
        if not value or (name == "RLIMIT_NPROC" and uid is None) or not hasattr(resource, name):
            continue
        kind = getattr(resource, name)
        _, hard = resource.getrlimit(kind)
        bound = int(value) if hard == resource.RLIM_INFINITY else min(int(value), hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(kind, (bound, bound))


def _leave_the_agent(name: str, own_fd: int, keep_fds: Set[int]) -> None:
    """In a process just forked from the agent (a keeper or the zygote): take `name`, drop
    the agent's signal handling, and keep no fd of the agent's but `keep_fds` and `own_fd`.
    The host stream is the agent's alone: the host must see EOF when the agent dies."""
    _name_process(name)
    signal.set_wakeup_fd(-1)
    for number in _KEEPER_IGNORED:
        signal.signal(number, signal.SIG_IGN)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    keep = set(keep_fds) | {0, 1, 2, own_fd}
    for entry in os.listdir("/proc/self/fd"):
        fd = int(entry)
        if fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def _keeper_main(
    sock_fd: int,
    slot_uids: bool,
    fast_uid_spawn: bool,
    keep_fds: Set[int],
    limits: Optional[Dict[str, Any]] = None,
) -> None:
    """Serve as a slot's keeper until the agent closes the socket; then kill and exit.

    Runs in a process forked from the agent (never returns: the caller `_exit`s). Each spawn
    request names the uid its command runs as (the slot's): a keeper with no child left may
    serve another slot next (see `Agent._keeper`). `slot_uids`: whether commands run as slot
    uids (the process-count limit needs them).
    """
    import select
    import socket

    os.setsid()  # a kill of the agent's process group must leave the cleanup to us
    _become_subreaper()
    _leave_the_agent("hermes-keeper", sock_fd, keep_fds)
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_read, False)
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda number, frame: None)
    sock = socket.socket(fileno=sock_fd)
    sock.setblocking(True)
    leaders: Set[int] = set()
    _apply_limits(limits or {}, 1 if slot_uids else None)

    def reap(report_idle: bool = True) -> None:
        notices: List[Dict[str, Any]] = []
        reaped = idle = False
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                idle = True  # no child left: nothing of the slot is alive
                break
            if pid == 0:
                break
            reaped = True
            if pid in leaders:
                leaders.discard(pid)
                notices.append({"exited": pid, "status": status})
        if idle and reaped and report_idle:
            # The agent may let this keeper go (see `Agent._retire_if_idle`): with no child it
            # has no descendant, and only a spawn request can give it one again.
            if not notices:
                notices.append({})
            notices[-1]["idle"] = True
        for notice in notices:
            _send_to_keeper_peer(sock, notice)

    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    poller.register(wake_read, select.POLLIN)
    try:
        while True:
            try:
                events = poller.poll()
            except InterruptedError:
                continue
            with contextlib.suppress(BlockingIOError):
                while os.read(wake_read, 4096):
                    pass
            reap()
            if not any(fd == sock.fileno() for fd, _ in events):
                continue
            request, fds = _keeper_receive(sock)
            if request is None:
                break
            if request.get("kill"):
                for fd in fds:
                    os.close(fd)
                spare = int(request.get("spare") or 0)
                killed = _kill_descendants(lambda: reap(report_idle=False), spare=spare)
                idle = not (spare and _process_state(spare) not in (b"Z", b"X", b""))
                _send_to_keeper_peer(sock, {"killed": killed, "idle": idle})
                continue
            try:
                pid = _spawn_as(
                    request["path"],
                    request["argv"],
                    request["env"],
                    request["cwd"],
                    fds,
                    request.get("uid"),
                    fast_uid_spawn,
                    bool(request.get("sealed")),
                )
                reply: Dict[str, Any] = {"pid": pid, "start": _start_time(pid)}
                leaders.add(pid)
            except OSError as exc:
                reply = {"errno": exc.errno or 0, "message": exc.strerror or str(exc)}
            finally:
                for fd in fds:
                    os.close(fd)
            _send_to_keeper_peer(sock, reply)
    except OSError:
        pass  # the agent is gone: fall through to the cleanup
    leaders.clear()

    def reap_quietly() -> None:
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass

    own = os.getpid()
    _kill_until_gone(lambda table: _descendants(_children_of(table), [own]), reap_quietly)
    reap_quietly()


def _name_process(name: str) -> None:
    """Set this process's name as ps and /proc/PID/comm show it (best effort)."""
    with contextlib.suppress(OSError), open("/proc/self/comm", "w") as handle:
        handle.write(name)


def _zygote_main(
    control_fd: int,
    slot_uids: bool,
    fast_uid_spawn: bool,
    keep_fds: Set[int],
    limits: Optional[Dict[str, Any]] = None,
) -> None:
    """Fork keepers on request until the agent closes the socket (see `Agent._fork_keeper`).

    Forked from the agent before it serves anything, and never writing to its copy of the
    agent's memory after that, so the keepers forked from it share those pages: a keeper owns
    only what it writes itself. (A keeper forked from the serving agent would end up owning
    every page the agent changed since, about 2.5 MB each.) Requests: ``{}`` with the keeper's
    socket attached; replies ``{"pid": n}`` or ``{"errno", "message"}``. Keepers are reaped by
    the kernel (SIGCHLD ignored): the agent learns of their end from their sockets.
    """
    import gc
    import socket

    _leave_the_agent("hermes-zygote", control_fd, keep_fds)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    sock = socket.socket(fileno=control_fd)
    sock.setblocking(True)
    gc.freeze()  # a collection here or in a keeper must not write to every object's header
    while True:
        try:
            request, fds = _keeper_receive(sock)
        except OSError:
            return
        if request is None:
            return
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            _send_to_keeper_peer(sock, {"errno": errno.EINVAL, "message": "one socket expected"})
            continue
        try:
            pid = os.fork()
        except OSError as exc:
            os.close(fds[0])
            _send_to_keeper_peer(sock, {"errno": exc.errno or 0, "message": str(exc)})
            continue
        if pid == 0:  # pragma: no cover - runs in the keeper process (measured by its tests)
            code = 0
            try:
                sock.close()
                _keeper_main(fds[0], slot_uids, fast_uid_spawn, keep_fds, limits)
            except BaseException as exc:
                code = 1
                _log("keeper failed: %r" % (exc,))
            finally:
                os._exit(code)
        os.close(fds[0])
        _send_to_keeper_peer(sock, {"pid": pid})


class _Keeper:
    """The agent's side of one slot's keeper: its pid, socket and unread notices."""

    def __init__(self, slot: int, pid: int, sock: Any) -> None:
        #: The slot it keeps; None while it is a spare (see `Agent._retire_if_idle`).
        self.slot: Optional[int] = slot
        self.pid = pid
        self.sock = sock
        self.fd: int = sock.fileno()
        self.buffer = bytearray()
        self.eof = False
        #: Resets waiting for this keeper's kill (see `Agent.op_reset_slot`), in request order:
        #: (request id, slot, processes killed already, the shells killed on purpose, not to
        #: count, the shell the kill spares to keep it for the next lease, or None).
        self.pending_kills: Deque[Tuple[int, int, int, List[_Shell], Optional[_Shell]]] = (
            collections.deque()
        )
        #: One entry per spawn request sent and not answered yet, in order: the callback of a
        #: spawn that does not wait (`Agent.spawn_in_slot_nowait`), or None for one that does.
        self.spawns: Deque[Optional[Callable[[Dict[str, Any]], None]]] = collections.deque()

    def read_available(self) -> None:
        """Take what the socket holds now (without blocking); sets `eof` when it closed."""
        import socket

        while not self.eof:
            try:
                data = self.sock.recv(1 << 16, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self.eof = True
                return
            self.buffer += data

    def next_message(self) -> Optional[Dict[str, Any]]:
        if len(self.buffer) < _KEEPER_HEADER.size:
            return None
        (length,) = _KEEPER_HEADER.unpack_from(self.buffer)
        end = _KEEPER_HEADER.size + length
        if len(self.buffer) < end:
            return None
        message = json.loads(bytes(self.buffer[_KEEPER_HEADER.size : end]).decode("utf-8"))
        del self.buffer[:end]
        return message  # type: ignore[no-any-return]


class _Capture:
    """A bounded head+tail buffer: the first half of the cap and the last half, exact drops."""

    def __init__(self, cap: int) -> None:
        self.head_cap = cap // 2
        self.tail_cap = cap - self.head_cap
        self.head = bytearray()
        self.tail = bytearray()
        self.dropped = 0
        #: Called with every piece fed (an exec with ``stream_output``).
        self.on_data: Optional[Callable[[bytes], None]] = None

    def feed(self, data: bytes) -> None:
        if self.on_data is not None:
            self.on_data(data)
        room = self.head_cap - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
            if not data:
                return
        self.tail += data
        # Trim lazily (amortized), keeping at most twice the tail between trims.
        if len(self.tail) > 2 * self.tail_cap + _READ_CHUNK:
            self._trim()

    def _trim(self) -> None:
        excess = len(self.tail) - self.tail_cap
        if excess > 0:
            self.dropped += excess
            del self.tail[:excess]

    def result(self) -> Tuple[bytes, int]:
        self._trim()
        return bytes(self.head) + bytes(self.tail), self.dropped


#: Slot N's commands run as this uid + N when the agent runs as root (bwrap, Modal containers).
SLOT_UID_BASE = 200000


def slot_account_lines(
    passwd: str, group: str, uid_base: int, slots: int, workspace_root: str, shell: str
) -> Tuple[str, str]:
    """The passwd and group lines naming each slot uid (user and group ``slotN``, HOME its
    workspace), for the uids and gids `passwd` and `group` (those files' texts) lack.

    Tools look the running user up (``whoami``, ``getpass.getuser()``, git, ssh, pip).
    """
    taken_uids = {line.split(":")[2] for line in passwd.splitlines() if line.count(":") >= 3}
    taken_gids = {line.split(":")[2] for line in group.splitlines() if line.count(":") >= 3}
    users: List[str] = []
    groups: List[str] = []
    for slot in range(slots):
        uid = uid_base + slot
        if str(uid) not in taken_uids:
            home = os.path.join(workspace_root, "slot-%d" % slot)
            entry = (slot, uid, uid, slot, home, shell)
            users.append("slot%d:x:%d:%d:hermes slot %d:%s:%s\n" % entry)
        if str(uid) not in taken_gids:
            groups.append("slot%d:x:%d:\n" % (slot, uid))
    return "".join(users), "".join(groups)


def _add_slot_accounts(uid_base: int, slots: int, workspace_root: str) -> None:
    """Append the slot users and groups to this system's /etc/passwd and /etc/group (the agent
    is root in a container of its own); a failure only leaves the slot uids unnamed."""
    try:
        texts = []
        for path in ("/etc/passwd", "/etc/group"):
            with open(path, encoding="utf-8", errors="surrogateescape") as handle:
                texts.append(handle.read())
        shell = "/bin/bash" if os.path.exists("/bin/bash") else "/bin/sh"
        additions = slot_account_lines(texts[0], texts[1], uid_base, slots, workspace_root, shell)
        for index, path in enumerate(("/etc/passwd", "/etc/group")):
            text, added = texts[index], additions[index]
            if added:
                with open(path, "a", encoding="utf-8", errors="surrogateescape") as handle:
                    handle.write(added if text.endswith("\n") or not text else "\n" + added)
    except OSError as exc:
        _log("could not name the slot users in /etc/passwd: %s" % exc)


class _SlotIdentity:
    """File work done for a slot runs with the slot's uid (when slots have uids), so what it
    creates is owned by the slot and the kernel's permission checks confine it like a command."""

    def __init__(self, uid: Optional[int]) -> None:
        self.uid = uid
        self.groups: List[int] = []

    def __enter__(self) -> None:
        if self.uid is not None:
            self.groups = os.getgroups()
            os.setgroups([])
            os.setegid(self.uid)
            os.seteuid(self.uid)

    def __exit__(self, *exc_info: Any) -> None:
        if self.uid is not None:
            os.seteuid(0)
            os.setegid(0)
            os.setgroups(self.groups)


class _Exec:
    """One command in flight: its leader process, pipes, buffers and deadline."""

    def __init__(self, request_id: int, exec_id: int, slot: int) -> None:
        self.request_id = request_id
        self.exec_id = exec_id
        self.slot = slot
        self.pid = 0
        self.started = 0.0
        self.deadline: Optional[float] = None
        self.fds: Dict[int, _Capture] = {}
        self.stdout: Optional[_Capture] = None
        self.stderr: Optional[_Capture] = None
        #: Pipes we still write to (stdin data, a script too long for argv): fd -> unwritten.
        self.feeds: Dict[int, memoryview] = {}
        #: Why we killed it: "timeout", "cancel", "reset" or "shutdown"; None if it ended itself.
        self.kill_reason: Optional[str] = None
        #: Run by the slot's persistent shell (see `_Shells`), not as a process of its own.
        self.in_shell = False
        #: For a shell call: the shell's FIFO behind each output fd (see `_Fifo`).
        self.fifos: Dict[int, _Fifo] = {}
        #: When the command (or shell call) started, in kernel clock ticks since boot: the
        #: orphans its keeper adopted since then may be its escapees; older ones are not.
        self.start_tick = 0
        #: Output frames are sent while it runs (``stream_output``); bytes skipped per stream.
        self.streamed = False
        self.skipped: Dict[str, int] = {}


class Agent:
    """The single-threaded event loop serving one host over fds 0 (requests) and 1 (replies).

    Invariants: fd 1 carries frames only; every command runs in its own session, started by its
    slot's keeper; every child is reaped; every exec gets exactly one reply; leaving `run`
    kills everything this agent started.
    """

    def __init__(self, config: Dict[str, Any], in_fd: int = 0, out_fd: int = 1) -> None:
        self.in_fd = in_fd
        self.out_fd = out_fd
        self.workspace_root = os.path.abspath(config["workspace_root"])
        self.ttl_s = float(config.get("ttl_s", DEFAULT_TTL_S))
        self.base_env = dict(config.get("env") or {})
        self.sandbox_env = _sandbox_env(os.environ)
        self.max_output_bytes = int(config.get("max_output_bytes", DEFAULT_MAX_OUTPUT_BYTES))
        self.outbox_high_water = int(config.get("outbox_high_water", OUTBOX_HIGH_WATER))
        uid_base = config.get("slot_uid_base")
        self.slot_uid_base: Optional[int] = (
            int(uid_base) if uid_base is not None and os.getuid() == 0 else None
        )
        #: How many slot users to add to /etc/passwd (0: the driver named them already).
        self.slot_accounts = int(config.get("slot_accounts") or 0)
        #: The sandbox's slot count (its ``slots_per_sandbox``): requests for slots outside
        #: ``[0, slots)`` are refused. None: any slot up to `MAX_SLOT` (the host names none).
        self.slots: Optional[int] = config.get("slots")
        #: Keep a started shell in every slot (see the module docstring and `_Shells.warm`).
        self.warm_shells = bool(config.get("warm_shells")) and self.slots is not None
        self.nonce = os.urandom(6).hex()
        self.shell = _find_shell()
        self.selector = selectors.DefaultSelector()
        self.decoder = FrameDecoder()
        self.outbox = bytearray()
        self.writing = False
        #: Frames sent during this loop turn, written together before the agent sleeps or
        #: after it handled the turn's events (`flush`).
        self.unflushed: List[bytes] = []
        self.unflushed_bytes = 0
        self.reading = True
        self.execs: Dict[int, _Exec] = {}  # by leader pid
        self.by_request: Dict[int, _Exec] = {}
        self.timers: List[Tuple[float, int, int]] = []  # (deadline, exec_id, pid)
        self.next_exec_id = 1
        self.slots_used: Set[int] = set()
        # Serial requests (args "serial": true) run one at a time per slot, in arrival order,
        # so a host can send a slot's whole batch in one write. A slot is busy while its
        # serial exec runs; what arrives meanwhile waits in the slot's queue.
        self.serial_running: Dict[int, int] = {}  # slot -> request id of its running exec
        self.serial_queues: Dict[int, Deque[Tuple[int, str, Dict[str, Any]]]] = {}
        self.slots_to_pump: Set[int] = set()
        self.exit_code: Optional[int] = None
        self.exit_reason = ""
        self.host_deadline = time.monotonic() + self.ttl_s
        self.pending_signals: List[int] = []
        #: Reap at the next loop turn even without a SIGCHLD (children started before the
        #: handler was installed).
        self.reap_pending = True
        self.subreaper = False
        self.fast_uid_spawn = False
        self.keepers: Dict[int, _Keeper] = {}  # by slot
        #: The process that forks keepers (see `_zygote_main`): its socket and pid.
        self.zygote: Any = None
        self.zygote_pid = 0
        #: Keepers with nothing to keep, for any slot's next command (see `_retire_if_idle`).
        self.spare_keepers: List[_Keeper] = []
        #: Resource limits each slot's processes get (see `_apply_limits`).
        self.limits: Dict[str, Any] = dict(config.get("limits") or {})
        self.keeper_notices: Deque[Tuple[_Keeper, Dict[str, Any]]] = collections.deque()
        #: fds the agent was started with: keepers keep them open (the host may watch them).
        self.inherited_fds: Set[int] = set()
        self.devnull = -1
        self.wakeup_read = -1
        self.wakeup_write = -1
        self.shells = _Shells(self)
        self.handlers: Dict[str, Callable[[int, Dict[str, Any]], Optional[Dict[str, Any]]]] = {
            "exec": self.op_exec,
            "cancel": self.op_cancel,
            "read_file": self.op_read_file,
            "write_file": self.op_write_file,
            "list_files": self.op_list_files,
            "reset_slot": self.op_reset_slot,
            "ping": self.op_ping,
            "shutdown": self.op_shutdown,
            "end_shell": self.op_end_shell,
        }
        self.trees = TreeOps(self)
        self.handlers.update(self.trees.handlers())

    # -- lifecycle ----------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until shutdown, host loss, ttl expiry or a signal; return the exit status."""
        _return_free_memory()
        with contextlib.suppress(OSError):
            self.inherited_fds = {int(name) for name in os.listdir("/proc/self/fd")}
        self.subreaper = _become_subreaper()
        # Without a cleared ambient set, uid switches must take the fork()+setuid() path,
        # which clears every capability.
        self.fast_uid_spawn = _drop_inheritable_privileges()
        if os.getuid() == 0:
            self.trees.mounter = _Mounter.in_private_namespace()
        os.makedirs(self.workspace_root, exist_ok=True)
        if self.slot_uid_base is not None:
            # Slot users must be able to traverse the root to reach their own 0700 workspace.
            mode = os.stat(self.workspace_root).st_mode
            os.chmod(self.workspace_root, stat.S_IMODE(mode) | 0o111)
        if self.slot_uid_base is not None:
            # Commands inherit the agent's supplementary groups through posix_spawn: none.
            os.setgroups([])
            if self.slot_accounts:
                _add_slot_accounts(self.slot_uid_base, self.slot_accounts, self.workspace_root)
        _close_on_exec_all()
        os.chdir("/")
        _raise_open_files_limit()
        self._start_zygote()
        self.devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        self.wakeup_read, self.wakeup_write = os.pipe()
        os.set_blocking(self.wakeup_read, False)
        os.set_blocking(self.wakeup_write, False)
        signal.set_wakeup_fd(self.wakeup_write, warn_on_full_buffer=False)
        for number in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(number, self._on_signal)
            signal.siginterrupt(number, False)
        os.set_blocking(self.in_fd, False)
        os.set_blocking(self.out_fd, False)
        self.selector.register(self.in_fd, selectors.EVENT_READ, self._on_stdin)
        self.selector.register(self.wakeup_read, selectors.EVENT_READ, self._on_wakeup)
        features = [*list(OPS), *TREE_OPS, "head_tail_output", "tree_kill", "serial"]
        features += ["shell", "merge_stderr", "keepers", "long_command", "stream_output"]
        if self.subreaper:
            features.append("subreaper")
        if self.slot_uid_base is not None:
            features.append("slot_uids")
        if self.warm_shells:
            # Before the ready frame: a sandbox counted warm runs its slots' first calls as
            # fast as their next ones. (Their processes exist when it goes out; each shell
            # reads its first line while the host takes the frame.)
            for slot in range(self.slots or 0):
                self.shells.warm(slot)
            self._await_spawns()
        self.send(
            {
                "id": 0,
                "ok": True,
                "result": {
                    "ready": True,
                    "pid": os.getpid(),
                    "workspace_root": self.workspace_root,
                    "python": "%d.%d.%d" % sys.version_info[:3],
                    "protocol": PROTOCOL_VERSION,
                    "uid": os.getuid(),
                    "features": features,
                    "limits": self.enforced_limits(),
                },
            }
        )
        try:
            while self.exit_code is None:
                self._loop_once()
        except BaseException as exc:
            self._exit(1, "internal error: %r" % exc)
            raise
        finally:
            self._kill_everything()
            self._flush_blocking(_FLUSH_ON_EXIT_S)
        _log("exiting: %s" % self.exit_reason)
        return self.exit_code if self.exit_code is not None else 1

    def _loop_once(self) -> None:
        self._handle_keeper_notices()
        # Notices handled just now may have finished a slot's command and freed its serial
        # queue: start the next request before sleeping, or it would wait for the next frame
        # from the host (a heartbeat, up to ttl_s/3 later).
        self._pump_serial_queues()
        now = time.monotonic()
        wake_at = self.host_deadline
        if self.timers:
            wake_at = min(wake_at, self.timers[0][0])
        timeout = max(0.0, wake_at - now)
        if self.keeper_notices or self.slots_to_pump:
            timeout = 0.0  # work queued meanwhile: look at events without sleeping
        self.flush()
        for key, mask in self.selector.select(timeout):
            # An earlier callback of this batch may have closed this fd, and a new command
            # may even have reused its number: such an event is stale, skip it.
            try:
                if self.selector.get_key(key.fd) is not key:
                    continue
            except KeyError:
                continue
            key.data(key.fd, mask)
            if self.exit_code is not None:
                return
        self.flush()  # the answers of this turn's events, before the housekeeping below
        if self._handle_signals():
            self._reap()
        self._fire_timers()
        self._pump_serial_queues()
        if self.exit_code is None and time.monotonic() >= self.host_deadline:
            self._exit(EXIT_TTL, "no frame from the host within ttl_s=%s" % self.ttl_s)

    def _exit(self, code: int, reason: str) -> None:
        if self.exit_code is None:
            self.exit_code = code
            self.exit_reason = reason

    def _on_signal(self, number: int, frame: Any) -> None:
        # Runs between bytecodes; the wakeup fd already woke the selector. Only record.
        self.pending_signals.append(number)

    def _on_wakeup(self, fd: int, mask: int) -> None:
        try:
            while os.read(fd, 4096):
                pass
        except BlockingIOError:
            pass

    def _handle_signals(self) -> bool:
        """Act on the signals recorded since the last call; True when a child may have exited.

        Children are reaped only then (a ``waitpid`` per loop turn would cost two syscalls per
        command): a SIGCHLD that arrives after this call is recorded and has written to the
        wakeup fd, so the next turn does not sleep before reaping it.
        """
        child_exited = self.reap_pending
        self.reap_pending = False
        while self.pending_signals:
            number = self.pending_signals.pop()
            if number == signal.SIGCHLD:
                child_exited = True
            else:
                self._exit(128 + number, "signal %d" % number)
        return child_exited

    # -- host stream ----------------------------------------------------------------------------

    def _on_stdin(self, fd: int, mask: int) -> None:
        try:
            data = os.read(fd, 1 << 20)
        except BlockingIOError:
            return
        except OSError as exc:
            self._exit(EXIT_OK, "host stream failed: %s" % exc)
            return
        if not data:
            self._exit(EXIT_OK, "host closed the stream")
            return
        self.host_deadline = time.monotonic() + self.ttl_s
        self.decoder.feed(data)
        self._serve_buffered_frames()

    def _serve_buffered_frames(self) -> None:
        while self.exit_code is None and self.reading:
            try:
                complete, message = self.decoder.next_frame()
            except FrameError as exc:
                if self.decoder.broken:
                    self._exit(EXIT_BROKEN_STREAM, "unusable stream: %s" % exc)
                    return
                self.send(_error_reply(0, "bad_frame", str(exc)))
                continue
            if not complete:
                break
            self._dispatch(message)
            if len(self.outbox) + self.unflushed_bytes > self.outbox_high_water:
                self.flush()
                if len(self.outbox) > self.outbox_high_water:
                    # The host is not reading: stop taking work until it catches up.
                    self._set_reading(False)
                    break

    def _set_reading(self, reading: bool) -> None:
        if reading != self.reading:
            self.reading = reading
            if reading:
                self.selector.register(self.in_fd, selectors.EVENT_READ, self._on_stdin)
                # Requests that arrived before the pause are already buffered: serve them now.
                self._serve_buffered_frames()
            else:
                self.selector.unregister(self.in_fd)

    def send(self, message: Dict[str, Any]) -> None:
        """Queue a frame for the host: the frames of one loop turn leave in one write (see
        `flush`), a large one at once."""
        frame = encode_frame(message)
        self.unflushed.append(frame)
        self.unflushed_bytes += len(frame)
        if self.unflushed_bytes >= _FLUSH_AT_BYTES:
            self.flush()

    def flush(self) -> None:
        """Write the queued frames now, as far as the pipe takes them; the rest waits for it."""
        if not self.unflushed:
            return
        data = b"".join(self.unflushed)
        self.unflushed.clear()
        self.unflushed_bytes = 0
        if not self.outbox:
            try:
                written = _write_all_nonblocking(self.out_fd, data)
            except OSError as exc:
                self._exit(EXIT_OK, "host stream failed: %s" % exc)
                return
            if written == len(data):
                return
            data = data[written:]
        self.outbox += data
        if not self.writing:
            self.writing = True
            self.selector.register(self.out_fd, selectors.EVENT_WRITE, self._on_stdout)

    def _on_stdout(self, fd: int, mask: int) -> None:
        try:
            written = _write_all_nonblocking(fd, bytes(self.outbox[: 4 * _READ_CHUNK]))
        except OSError as exc:
            self._exit(EXIT_OK, "host stream failed: %s" % exc)
            return
        if written:
            del self.outbox[:written]
            # A host that drains replies is alive even while we do not read its requests.
            self.host_deadline = max(self.host_deadline, time.monotonic() + self.ttl_s)
        if not self.outbox:
            self.writing = False
            self.selector.unregister(fd)
        if len(self.outbox) <= self.outbox_high_water // 2 and self.exit_code is None:
            self._set_reading(True)

    def _flush_blocking(self, limit: float) -> None:
        """Best effort: give the host the last replies, for at most `limit` seconds."""
        self.outbox += b"".join(self.unflushed)
        self.unflushed.clear()
        self.unflushed_bytes = 0
        deadline = time.monotonic() + limit
        while self.outbox and time.monotonic() < deadline:
            try:
                written = _write_all_nonblocking(self.out_fd, bytes(self.outbox[: 1 << 20]))
            except OSError:
                return
            del self.outbox[:written]
            if self.outbox and not written:
                time.sleep(0.005)

    def _dispatch(self, message: Dict[str, Any]) -> None:
        request_id = message.get("id")
        if not isinstance(request_id, int) or isinstance(request_id, bool):
            self.send(_error_reply(0, "bad_frame", "request without an integer 'id'"))
            return
        op = message.get("op")
        args = message.get("args", {})
        if args is None:
            args = {}
        try:
            if not isinstance(op, str):
                raise OpError("bad_request", "request without a string 'op'")
            handler = self.handlers.get(op)
            if handler is None:
                raise OpError("unknown_op", "unknown op %r; known: %s" % (op, ", ".join(OPS)))
            if not isinstance(args, dict):
                raise OpError("bad_request", "'args' must be an object")
            self._check_slots(args)
            if (args.get("serial") and (op in SERIAL_OPS or op in SLOT_TREE_OPS)) or _uses_shell(
                op, args
            ):
                slot = _slot_arg(args)
                if slot in self.serial_running or self.serial_queues.get(slot):
                    self.serial_queues.setdefault(slot, collections.deque()).append(
                        (request_id, op, args)
                    )
                    return
                result = self._run_serial(request_id, op, args, slot)
            else:
                result = handler(request_id, args)
        except OpError as exc:
            self.send(_error_reply(request_id, exc.code, exc.message))
            return
        except Exception as exc:  # never crash the agent on one request
            _log("internal error in %r: %r" % (op, exc))
            self.send(_error_reply(request_id, "internal", "%s: %s" % (type(exc).__name__, exc)))
            return
        if result is not None:
            self.send({"id": request_id, "ok": True, "result": result})

    def _check_slots(self, args: Dict[str, Any]) -> None:
        """Refuse a slot (or fork target) outside this sandbox's slots: its uid would be
        another sandbox's slot uid on a shared host, and its workspace one the pool never
        resets. The host never sends one; this is the agent's own check."""
        if self.slots is None:
            return
        slots = [args.get("slot")]
        targets = args.get("targets")
        if isinstance(targets, list):
            slots += targets
        for slot in slots:
            if isinstance(slot, int) and not isinstance(slot, bool) and slot >= self.slots:
                raise OpError(
                    "bad_request",
                    "slot %d is outside this sandbox's %d slots (0 to %d): use a slot the pool "
                    "leased, or give the profile more slots_per_sandbox"
                    % (slot, self.slots, self.slots - 1),
                )

    # -- per-slot serial queues -----------------------------------------------------------------

    def _run_serial(
        self, request_id: int, op: str, args: Dict[str, Any], slot: int
    ) -> Optional[Dict[str, Any]]:
        result = self.handlers[op](request_id, args)
        if (op == "exec" and request_id in self.by_request) or request_id in self.trees.busy:
            self.serial_running[slot] = request_id
        return result

    def _pump_serial_queues(self) -> None:
        """Start what waits in the queues of slots whose serial exec has finished."""
        while self.slots_to_pump and self.exit_code is None:
            slot = self.slots_to_pump.pop()
            queue = self.serial_queues.get(slot)
            while queue and slot not in self.serial_running:
                request_id, op, args = queue.popleft()
                try:
                    result = self._run_serial(request_id, op, args, slot)
                except OpError as exc:
                    self.send(_error_reply(request_id, exc.code, exc.message))
                    continue
                except Exception as exc:  # never crash the agent on one request
                    _log("internal error in queued %r: %r" % (op, exc))
                    message = "%s: %s" % (type(exc).__name__, exc)
                    self.send(_error_reply(request_id, "internal", message))
                    continue
                if result is not None:
                    self.send({"id": request_id, "ok": True, "result": result})
            if not queue:
                self.serial_queues.pop(slot, None)

    def _drop_queued(self, slot: int, target: Optional[int] = None) -> int:
        """Answer queued requests of `slot` (only `target`, if given) as cancelled, unrun."""
        queue = self.serial_queues.get(slot)
        if not queue:
            return 0
        dropped = [item for item in queue if target is None or item[0] == target]
        for item in dropped:
            queue.remove(item)
            request_id, op, _ = item
            if op == "exec":
                result = _exec_result(-signal.SIGKILL, None, False, True, 0.0, b"", 0, b"", 0)
                self.send({"id": request_id, "ok": True, "result": result})
            else:
                message = "%s was cancelled before it ran" % op
                self.send(_error_reply(request_id, "cancelled", message))
        if not queue:
            self.serial_queues.pop(slot, None)
        return len(dropped)

    # -- workspaces and paths -------------------------------------------------------------------

    def slot_uid(self, slot: int) -> Optional[int]:
        return None if self.slot_uid_base is None else self.slot_uid_base + slot

    def workspace_path(self, slot: int) -> str:
        return os.path.join(self.workspace_root, "slot-%d" % slot)

    def workspace(self, slot: int) -> str:
        """The slot's workspace directory, created (0700, owned by the slot user) if missing."""
        path = self.workspace_path(slot)
        self.slots_used.add(slot)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            if stat.S_ISDIR(os.lstat(path).st_mode):
                return path
            # A command replaced its workspace by a symlink or a file: never follow it (a
            # reset would wipe the target), start afresh instead.
            os.unlink(path)
            os.mkdir(path, 0o700)
        os.chmod(path, 0o700)
        uid = self.slot_uid(slot)
        if uid is not None:
            os.chown(path, uid, uid)
        return path

    def resolve(self, slot: int, path: Any, what: str) -> Tuple[str, str]:
        """``(real_path, workspace_relative_path)`` of `path`, refusing anything outside."""
        if not isinstance(path, str) or "\0" in path:
            raise OpError("bad_request", "%s: 'path' must be a string without NUL" % what)
        workspace = self.workspace_path(slot)
        real_workspace = os.path.realpath(workspace)
        joined = path if os.path.isabs(path) else os.path.join(workspace, path)
        real = os.path.realpath(joined)
        if real != real_workspace and not real.startswith(real_workspace + os.sep):
            raise OpError(
                "path_escape",
                "%s: %r resolves to %r, outside the workspace of slot %d"
                % (what, path, real, slot),
            )
        return real, os.path.relpath(real, real_workspace)

    def as_slot(self, slot: int) -> _SlotIdentity:
        """Create the slot's workspace, then switch to the slot's identity for file work."""
        self.workspace(slot)
        return _SlotIdentity(self.slot_uid(slot))

    # -- exec -----------------------------------------------------------------------------------

    def op_exec(self, request_id: int, args: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        slot = _slot_arg(args)
        command = args.get("command")
        argv = args.get("argv")
        if (command is None) == (argv is None):
            raise OpError("bad_request", "exec needs exactly one of 'command' or 'argv'")
        script: Optional[bytes] = None
        if command is not None:
            if not isinstance(command, str):
                raise OpError("bad_request", "'command' must be a string")
            if len(command.encode("utf-8", "surrogateescape")) > _MAX_ARGV_COMMAND:
                # Past the kernel's limit for one argument (128 KiB): the shell reads the
                # script from fd 3 instead, which the script's first words close.
                script = ("exec 3<&-; " + command).encode("utf-8", "surrogateescape")
                full_argv = [self.shell[0], "/dev/fd/3"]
            else:
                full_argv = [*self.shell, command]
        else:
            if (
                not isinstance(argv, list)
                or not argv
                or not all(isinstance(item, str) for item in argv)
            ):
                raise OpError("bad_request", "'argv' must be a non-empty list of strings")
            full_argv = list(argv)
        if any("\0" in item for item in full_argv):
            raise OpError("bad_request", "command contains a NUL byte")
        extra_env = args.get("env") or {}
        _check_env(extra_env, "'env'")
        stdin = args.get("stdin")
        if stdin is not None and not isinstance(stdin, bytes):
            raise OpError("bad_request", "'stdin' must be bytes or null")
        timeout_s = args.get("timeout_s")
        if timeout_s is not None and (
            not isinstance(timeout_s, (int, float))
            or isinstance(timeout_s, bool)
            or not timeout_s >= 0  # NaN too
        ):
            raise OpError("bad_request", "'timeout_s' must be a number >= 0 or null")
        cap = args.get("max_output_bytes", self.max_output_bytes)
        if not isinstance(cap, int) or isinstance(cap, bool) or cap < 0:
            raise OpError("bad_request", "'max_output_bytes' must be an int >= 0")
        cap = min(cap, MAX_OUTPUT_CAP)
        merge_stderr = args.get("merge_stderr", False)
        if not isinstance(merge_stderr, bool):
            raise OpError("bad_request", "'merge_stderr' must be a bool")
        streamed = args.get("stream_output", False)
        if not isinstance(streamed, bool):
            raise OpError("bad_request", "'stream_output' must be a bool")
        shell_mode = args.get("shell", "fresh")
        if shell_mode not in SHELL_MODES:
            raise OpError("bad_request", "'shell' must be one of %s" % ", ".join(SHELL_MODES))
        in_shell = shell_mode == "persistent" and command is not None
        if in_shell and stdin is not None:
            raise OpError("bad_request", "'stdin' data needs shell 'fresh' (the shell gives none)")
        if in_shell:
            for key in extra_env:
                if not _is_shell_name(key):
                    raise OpError("bad_request", "'env': %r is not a shell variable name" % key)
        cwd_arg = args.get("cwd", ".")
        if in_shell and cwd_arg in (None, ".") and slot in self.shells.by_slot:
            cwd = ""  # the running shell's own cwd: nothing to check on this hot path
        else:
            self.workspace(slot)
            cwd, _ = self.resolve(slot, "." if cwd_arg is None else cwd_arg, "exec cwd")
            if not os.path.isdir(cwd):
                if os.path.exists(cwd):
                    raise OpError("not_a_directory", "exec cwd %r is not a directory" % cwd_arg)
                raise OpError("not_found", "exec cwd %r does not exist" % cwd_arg)

        ex = _Exec(request_id, self.next_exec_id, slot)
        self.next_exec_id += 1
        ex.streamed = streamed
        if in_shell:
            assert command is not None
            explicit_cwd = cwd if cwd_arg not in (None, ".") else None
            self.shells.start(ex, command, extra_env, explicit_cwd, cap, merge_stderr)
        else:
            env = self.command_env(slot)
            env.update(extra_env)
            self._spawn(ex, full_argv, script, cwd, env, stdin, cap, merge_stderr)
        if ex.pid == 0:
            return None  # could not start: already replied
        if streamed and ex.stdout is not None and ex.stderr is not None:
            ex.stdout.on_data = functools.partial(self.stream_output, ex, "stdout")
            ex.stderr.on_data = functools.partial(self.stream_output, ex, "stderr")
        if timeout_s is not None:
            ex.deadline = ex.started + float(timeout_s)
            # A shell call's timer names no pid (0): the shell outlives its calls.
            heapq.heappush(self.timers, (ex.deadline, ex.exec_id, 0 if ex.in_shell else ex.pid))
        return None

    def command_env(self, slot: int) -> Dict[str, str]:
        """The environment a slot's commands (and its shell) start with."""
        env = dict(self.sandbox_env)
        env.update(self.base_env)
        env["HOME"] = self.workspace(slot)
        return env

    def _spawn(
        self,
        ex: _Exec,
        argv: List[str],
        script: Optional[bytes],
        cwd: str,
        env: Dict[str, str],
        stdin: Optional[bytes],
        cap: int,
        merge_stderr: bool = False,
    ) -> None:
        """Start the command through its slot's keeper (which makes it the keeper's child)."""
        uid = self.slot_uid(ex.slot)
        parent_ends: List[int] = []
        child_ends: List[int] = []
        feeds: List[Tuple[int, bytes]] = []
        try:
            if stdin is not None:
                in_read, in_write = os.pipe()
                child_ends.append(in_read)
                parent_ends.append(in_write)
                feeds.append((in_write, stdin))
            else:
                child_ends.append(self.devnull)
            out_read, out_write = os.pipe()
            child_ends.append(out_write)
            # Merged: one pipe behind both fds, so the output keeps the order it was written in.
            err_read, err_write = (-1, out_write) if merge_stderr else os.pipe()
            child_ends.append(err_write)
            parent_ends += [fd for fd in (out_read, err_read) if fd >= 0]
            if script is not None:
                child_ends.append(self._script_fd(script, uid, parent_ends, feeds))
            ex.started = time.monotonic()
            ex.pid, ex.start_tick = self.spawn_in_slot(ex.slot, argv, env, cwd, child_ends)
        except OSError as exc:
            for fd in parent_ends:
                os.close(fd)
            self.reply_not_started(ex, argv[0], exc)
            return
        finally:
            for fd in set(child_ends):
                if fd != self.devnull:
                    os.close(fd)
        ex.stdout = _Capture(cap)
        ex.stderr = _Capture(cap)
        for fd, capture in ((out_read, ex.stdout), (err_read, ex.stderr)):
            if fd < 0:
                continue
            os.set_blocking(fd, False)
            ex.fds[fd] = capture
            self.selector.register(fd, selectors.EVENT_READ, self._output_callback(ex))
        self.execs[ex.pid] = ex
        self.by_request[ex.request_id] = ex
        for fd, data in feeds:
            os.set_blocking(fd, False)
            ex.feeds[fd] = memoryview(data)
            self._feed(ex, fd)
            if fd in ex.feeds:
                self.selector.register(fd, selectors.EVENT_WRITE, self._feed_callback(ex))

    def _script_fd(
        self,
        script: bytes,
        uid: Optional[int],
        parent_ends: List[int],
        feeds: List[Tuple[int, bytes]],
    ) -> int:
        """The fd the shell reads a long command from as /dev/fd/3: a memfd holding it (bash
        reads a seekable script in blocks; from a pipe it must read one byte at a time, about
        1 s per 3 MiB), else a pipe fed as the command runs. No file is left anywhere."""
        memfd_create = getattr(os, "memfd_create", None)
        if memfd_create is not None:
            try:
                fd: int = memfd_create("hermes-command", os.MFD_CLOEXEC)
            except OSError:
                pass
            else:
                try:
                    if _write_all_nonblocking(fd, script) != len(script):
                        raise OSError(errno.ENOSPC, "no room for the command in memory")
                    os.lseek(fd, 0, os.SEEK_SET)
                    if uid is not None:
                        os.fchown(fd, uid, uid)  # reopened through /dev/fd/3 by the slot's uid
                except BaseException:
                    os.close(fd)
                    raise
                return fd
        # Owned by the slot's uid, so its shell may reopen it as /dev/fd/3.
        with _SlotIdentity(uid):
            script_read, script_write = os.pipe()
        parent_ends.append(script_write)
        feeds.append((script_write, script))
        return script_read

    def reply_not_started(self, ex: _Exec, program: str, exc: OSError) -> None:
        """Report a command that cannot start the way a shell does: 127 missing, 126 denied."""
        code = 127 if isinstance(exc, FileNotFoundError) else 126
        message = "hermes-agent: %s: %s\n" % (program, exc.strerror or exc)
        result = _exec_result(code, None, False, False, 0.0, b"", 0, message.encode(), 0)
        if ex.streamed:
            self.stream_output(ex, "stderr", message.encode())
        self.send({"id": ex.request_id, "ok": True, "result": result})

    def stream_output(self, ex: _Exec, name: str, data: bytes) -> None:
        """Send a piece of a streamed exec's output now, or skip it while the host lags.

        Skipped bytes are counted and reported in the stream's next frame; the command's
        capture (its reply) is unaffected.
        """
        if len(self.outbox) + self.unflushed_bytes > STREAM_OUTBOX_LIMIT:
            ex.skipped[name] = ex.skipped.get(name, 0) + len(data)
            return
        skipped = ex.skipped.pop(name, 0)
        self.send({"id": ex.request_id, "output": name, "data": data, "skipped": skipped})

    def _feed_callback(self, ex: _Exec) -> Callable[[int, int], None]:
        return lambda fd, mask: self._feed(ex, fd)

    def _feed(self, ex: _Exec, fd: int) -> None:
        data = ex.feeds[fd]
        try:
            written = _write_all_nonblocking(fd, bytes(data[: 1 << 20]))
        except OSError:  # the command closed the pipe or exited: it does not want the rest
            written = len(data)
        ex.feeds[fd] = data[written:]
        if not ex.feeds[fd]:
            self._close_feed(ex, fd)

    def _close_feed(self, ex: _Exec, fd: int) -> None:
        del ex.feeds[fd]
        with contextlib.suppress(KeyError):
            self.selector.unregister(fd)
        os.close(fd)

    # -- keepers --------------------------------------------------------------------------------

    def enforced_limits(self) -> Dict[str, Optional[int]]:
        """The limits every slot's processes get here (None: not enforced)."""
        memory = self.limits.get("memory_bytes")
        processes = self.limits.get("processes")
        return {
            "memory_bytes_per_process": int(memory) if memory else None,
            "processes_per_slot": int(processes)
            if processes and self.slot_uid_base is not None
            else None,
        }

    def spawn_in_slot(
        self, slot: int, argv: List[str], env: Dict[str, str], cwd: str, fds: List[int]
    ) -> Tuple[int, int]:
        """Start a process of `slot`: `fds` become its fds 0..n-1; ``(pid, start tick)``.

        The one way a slot's processes start (commands, the persistent shell): the slot's
        keeper spawns it, in its own session, as the slot's uid, so it and everything it
        starts stay the keeper's descendants. The keeper reports its end (see
        `_handle_keeper_notices`). Raises OSError (FileNotFoundError for a missing program).
        """
        keeper, request = self._spawn_request(slot, argv, env, cwd)
        return self._keeper_spawn(keeper, request, fds)

    def _spawn_request(
        self, slot: int, argv: List[str], env: Dict[str, str], cwd: str
    ) -> Tuple[_Keeper, Dict[str, Any]]:
        """The slot's keeper and what to ask it: the program found on the command's PATH, run
        as the slot's uid. Raises FileNotFoundError for a program not found."""
        path = argv[0]
        if "/" not in path:
            found = _which(path, env.get("PATH", os.defpath))
            if found is None:
                raise FileNotFoundError(errno.ENOENT, "command not found", path)
            path = found
        request = {"path": path, "argv": argv, "env": env, "cwd": cwd, "uid": self.slot_uid(slot)}
        return self._keeper(slot), request

    def spawn_in_slot_nowait(
        self,
        slot: int,
        argv: List[str],
        env: Dict[str, str],
        cwd: str,
        fds: List[int],
        started: Callable[[Dict[str, Any]], None],
        sealed: bool = False,
    ) -> None:
        """`spawn_in_slot` without waiting for the keeper: `started` gets its reply later,
        ``{"pid", "start"}`` or ``{"errno", "message"}``, before any notice of the process's
        end. Raises OSError when the request cannot be sent (nothing was started then).
        `sealed`: see `_spawn_as`."""
        keeper, request = self._spawn_request(slot, argv, env, cwd)
        request["sealed"] = sealed and request["uid"] is not None
        try:
            _send_to_keeper_peer(keeper.sock, request, tuple(fds))
        except OSError:
            self._keeper_lost(keeper)
            raise
        keeper.spawns.append(started)

    def _keeper(self, slot: int) -> _Keeper:
        """The slot's keeper: its own, else a spare one, else a new one (forked from here).

        A keeper serves one slot at a time. It is only handed to another slot as a spare, once
        it has said it has no child (so nothing of its last slot is alive; see
        `_retire_if_idle`).
        """
        keeper = self.keepers.get(slot)
        if keeper is not None:
            return keeper
        if not self.spare_keepers:
            self._collect_idle_keepers()
        while self.spare_keepers:
            keeper = self.spare_keepers.pop()
            keeper.read_available()
            if keeper.eof or keeper.buffer:  # it died (or says something it must not): gone
                self._retire(keeper)
                continue
            keeper.slot = slot
            self.keepers[slot] = keeper
            return keeper
        pid, ours = self._fork_keeper()
        ours.setblocking(True)
        keeper = _Keeper(slot, pid, ours)
        self.keepers[slot] = keeper
        self.selector.register(keeper.fd, selectors.EVENT_READ, self._keeper_callback(keeper))
        return keeper

    def _start_zygote(self) -> None:
        """Fork the process that forks keepers (see `_zygote_main`), while the heap is small."""
        try:
            self.zygote_pid, self.zygote = self._fork_serving("zygote", _zygote_main)
        except OSError as exc:
            _log("no zygote (%s): keepers are forked from the agent" % exc)
            return
        self.zygote.settimeout(_KEEPER_REPLY_S)

    def _fork_keeper(self) -> Tuple[int, Any]:
        """A new keeper: its pid and the agent's end of its socket. Forked by the zygote; by
        the agent itself when there is no zygote (any more)."""
        if self.zygote is not None:
            forked = self._keeper_from_zygote()
            if forked is not None:
                return forked
        return self._fork_serving("keeper", _keeper_main)

    def _keeper_from_zygote(self) -> Optional[Tuple[int, Any]]:
        """A keeper forked by the zygote, or None (then the zygote is let go if it is lost)."""
        import socket

        assert self.zygote is not None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            _send_to_keeper_peer(self.zygote, {}, (theirs.fileno(),))
            reply, _ = _keeper_receive(self.zygote)
        except OSError as exc:
            reply = None
            _log("zygote lost (%s): keepers are forked from the agent" % exc)
        finally:
            theirs.close()
        if reply is not None and "pid" in reply:
            return int(reply["pid"]), ours
        ours.close()
        if reply is None:
            self._close_zygote()
        else:
            _log("zygote could not fork: %s" % reply.get("message"))
        return None

    def _fork_serving(self, role: str, main: Callable[..., None]) -> Tuple[int, Any]:
        """Fork a process that runs `main` (`_keeper_main` or `_zygote_main`) with the agent's
        settings on its end of a new socket pair; its pid and the agent's end."""
        import socket

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        sys.stderr.flush()
        try:
            pid = os.fork()
        except BaseException:
            ours.close()
            theirs.close()
            raise
        if pid == 0:  # pragma: no cover - runs in the child (measured by the keepers' tests)
            code = 0
            try:
                ours.close()
                main(
                    theirs.detach(),
                    self.slot_uid_base is not None,
                    self.fast_uid_spawn,
                    self.inherited_fds,
                    self.limits,
                )
            except BaseException as exc:
                code = 1
                _log("%s failed: %r" % (role, exc))
            finally:
                os._exit(code)
        theirs.close()
        return pid, ours

    def _close_zygote(self) -> None:
        """Let the zygote go (it exits at EOF); keepers it forked live on."""
        if self.zygote is not None:
            self.zygote.close()
            self.zygote = None

    def _keeper_callback(self, keeper: _Keeper) -> Callable[[int, int], None]:
        def on_readable(fd: int, mask: int) -> None:
            self._read_keeper(keeper)
            self._handle_keeper_notices()

        return on_readable

    def _read_keeper(self, keeper: _Keeper) -> Optional[Dict[str, Any]]:
        """Queue the keeper's notices; return a spawn reply if one came (None if not yet)."""
        keeper.read_available()
        reply = None
        while True:
            message = keeper.next_message()
            if message is None:
                break
            if "exited" in message or "idle" in message or "killed" in message:
                self.keeper_notices.append((keeper, message))
                continue
            callback = keeper.spawns.popleft() if keeper.spawns else None
            if callback is None:
                reply = message
            else:  # handled in order with the notices (the command's end comes after it)
                self.keeper_notices.append((keeper, {"started": message, "callback": callback}))
        if keeper.eof:
            self.keeper_notices.append((keeper, {"lost": True}))
        return reply

    def _await_spawns(self) -> None:
        """Wait (bounded by `_KEEPER_REPLY_S`) until every keeper has answered the spawns sent
        without waiting (`spawn_in_slot_nowait`), and handle the answers."""
        import select

        deadline = time.monotonic() + _KEEPER_REPLY_S
        while True:
            self._handle_keeper_notices()
            waiting = [keeper for keeper in self.keepers.values() if keeper.spawns]
            remaining = deadline - time.monotonic()
            if not waiting or remaining <= 0:
                return
            with contextlib.suppress(InterruptedError):
                select.select([keeper.fd for keeper in waiting], [], [], remaining)
            for keeper in waiting:
                self._read_keeper(keeper)

    def _keeper_spawn(
        self, keeper: _Keeper, request: Dict[str, Any], fds: List[int]
    ) -> Tuple[int, int]:
        """Have the keeper start a command; ``(pid, start ticks)``. Raises OSError on failure."""
        import select

        try:
            _send_to_keeper_peer(keeper.sock, request, tuple(fds))
        except OSError:
            self._keeper_lost(keeper)
            raise
        keeper.spawns.append(None)
        deadline = time.monotonic() + _KEEPER_REPLY_S
        while True:
            reply = self._read_keeper(keeper)
            if reply is not None:
                break
            remaining = deadline - time.monotonic()
            if keeper.eof or remaining <= 0:
                self._keeper_lost(keeper)
                raise OSError(errno.ECHILD, "the slot's keeper process is gone")
            with contextlib.suppress(InterruptedError):
                select.select([keeper.fd], [], [], remaining)
        if "pid" not in reply:
            code = int(reply.get("errno") or errno.EIO)
            raise OSError(code, str(reply.get("message") or os.strerror(code)))
        return int(reply["pid"]), int(reply.get("start") or 0)

    def _handle_keeper_notices(self) -> None:
        while self.keeper_notices:
            keeper, notice = self.keeper_notices.popleft()
            if notice.get("lost"):
                self._keeper_lost(keeper)
                continue
            if "exited" in notice:
                pid, status = int(notice["exited"]), int(notice["status"])
                ex = self.execs.get(pid)
                if ex is not None:
                    self._finish(ex, status)
                else:
                    self.shells.on_reaped(pid, status)
            if "started" in notice:
                notice["callback"](notice["started"])
            if "killed" in notice and keeper.pending_kills:
                request_id, slot, killed, shells, kept = keeper.pending_kills.popleft()
                killed += len(set(notice["killed"]) - _pids(shells))
                if kept is not None:
                    self.shells.recycle(kept, request_id, killed)
                else:
                    self._reply_reset(request_id, slot, killed)
            if notice.get("idle"):
                self._retire_if_idle(keeper)

    def _retire_if_idle(self, keeper: _Keeper) -> None:
        """Take a keeper from its slot once nothing of the slot is alive: a spare, or gone.

        A keeper is a process (megabytes of copied pages): a sandbox holding a hundred slots
        whose commands have ended keeps at most `SPARE_KEEPERS` of them, for the next command
        of any slot. The keeper said it has no child (so no descendant); a spawn sent after
        that notice is an exec or shell of the slot that is still known here (its end comes
        later on the same socket), so none known means none alive.
        """
        slot = keeper.slot
        if slot is None or self.keepers.get(slot) is not keeper or keeper.buffer:
            return
        if keeper.pending_kills or keeper.spawns:
            return
        shell = self.shells.by_slot.get(slot)
        if shell is not None and (shell.pid or shell.starting):
            return
        if any(ex.slot == slot for ex in self.execs.values()):
            return
        del self.keepers[slot]
        keeper.slot = None
        self.spare_keepers.append(keeper)
        if len(self.spare_keepers) > SPARE_KEEPERS:
            self._retire(self.spare_keepers.pop(0))

    def _retire(self, keeper: _Keeper) -> None:
        """Let a spare keeper go: closing its socket is its cue to exit (it is reaped here)."""
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(keeper.fd)
        keeper.sock.close()

    def _collect_idle_keepers(self) -> None:
        """Take the notices busy keepers have sent meanwhile, without waiting: a keeper whose
        command has ended may be a spare now, which costs no fork."""
        import select

        poller = select.poll()
        by_fd = {}
        for keeper in self.keepers.values():
            poller.register(keeper.fd, select.POLLIN)
            by_fd[keeper.fd] = keeper
        if not by_fd:
            return
        for fd, _ in poller.poll(0):
            self._read_keeper(by_fd[fd])
        self._handle_keeper_notices()

    def _keeper_pids(self) -> Set[int]:
        """Every keeper's pid: the slots' and the spare ones."""
        pids = {keeper.pid for keeper in self.keepers.values()}
        pids.update(keeper.pid for keeper in self.spare_keepers)
        return pids

    def _keeper_lost(self, keeper: _Keeper) -> None:
        """A keeper died (or stopped answering): its slot's processes die with it.

        Its orphans were reparented to this agent (a subreaper): everything below the agent
        that is not under a living keeper is what it kept, so all of that is killed. Commands
        whose leader dies that way reply as cancelled.
        """
        if keeper in self.spare_keepers:
            self.spare_keepers.remove(keeper)  # it had nothing to keep
            self._retire(keeper)
            return
        if keeper.slot is None or self.keepers.get(keeper.slot) is not keeper:
            return
        del self.keepers[keeper.slot]
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(keeper.fd)
        keeper.sock.close()
        with contextlib.suppress(OSError):
            os.kill(keeper.pid, signal.SIGKILL)
        _log("keeper of slot %d lost: killing what it kept" % keeper.slot)
        for ex in self.execs.values():
            if ex.slot == keeper.slot and ex.kill_reason is None:
                ex.kill_reason = "cancel"
        self._kill_unkept()
        self._fail_pending_spawns(keeper)
        self._reply_pending_resets(keeper)

    def _fail_pending_spawns(self, keeper: _Keeper) -> None:
        """Tell the spawns still waiting for a keeper that is gone that they did not start."""
        gone = {"errno": errno.ECHILD, "message": "the slot's keeper process is gone"}
        while keeper.spawns:
            callback = keeper.spawns.popleft()
            if callback is not None:
                callback(gone)

    def _reply_pending_resets(self, keeper: _Keeper) -> None:
        """Finish the resets that waited for a keeper that is gone (its processes are too)."""
        while keeper.pending_kills:
            request_id, slot, killed, _, kept = keeper.pending_kills.popleft()
            if kept is not None:
                kept.resetting = None  # it died with its keeper
            self._reply_reset(request_id, slot, killed)

    def _kill_unkept(self) -> int:
        """Kill every process below the agent that no living keeper holds."""
        own = os.getpid()
        keeper_pids = self._keeper_pids()

        def select(table: Dict[int, Tuple[int, int, bool]]) -> Set[int]:
            children = _children_of(table)
            # The zygote is spared, not what is below it: a lost keeper is its child.
            kept = _descendants(children, keeper_pids) | keeper_pids | {self.zygote_pid}
            return _descendants(children, [own]) - kept

        return len(_kill_until_gone(select, self._reap))

    def _output_callback(self, ex: _Exec) -> Callable[[int, int], None]:
        def on_output(fd: int, mask: int) -> None:
            try:
                data = os.read(fd, _READ_CHUNK)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if data:
                ex.fds[fd].feed(data)
            else:
                self._close_output(ex, fd)

        return on_output

    def _close_output(self, ex: _Exec, fd: int) -> None:
        del ex.fds[fd]
        self.selector.unregister(fd)
        os.close(fd)

    def exec_done(self, ex: _Exec) -> None:
        """Forget a finished exec; its slot's next serial request may start."""
        if self.execs.get(ex.pid) is ex:
            del self.execs[ex.pid]
        if self.by_request.get(ex.request_id) is ex:
            del self.by_request[ex.request_id]
        if self.serial_running.get(ex.slot) == ex.request_id:
            # The slot's next queued request starts once this loop turn is done (not from
            # here: _finish also runs in the middle of kills).
            del self.serial_running[ex.slot]
            self.slots_to_pump.add(ex.slot)

    def _finish(self, ex: _Exec, status: Optional[int]) -> None:
        """The leader is gone: take what is readable right now, close up, and reply."""
        self.exec_done(ex)
        for fd in list(ex.fds):
            _drain_into(fd, ex.fds[fd])
            self._close_output(ex, fd)
        for fd in list(ex.feeds):
            self._close_feed(ex, fd)
        duration = time.monotonic() - ex.started
        signal_number: Optional[int]
        if status is None:
            exit_code, signal_number = -signal.SIGKILL, int(signal.SIGKILL)
        else:
            exit_code, signal_number = _exit_code_of(status)
        timed_out = ex.kill_reason == "timeout"
        if timed_out:
            exit_code = 124
        assert ex.stdout is not None
        assert ex.stderr is not None
        stdout, stdout_dropped = ex.stdout.result()
        stderr, stderr_dropped = ex.stderr.result()
        result = _exec_result(
            exit_code,
            signal_number,
            timed_out,
            ex.kill_reason in ("cancel", "reset", "shutdown"),
            duration,
            stdout,
            stdout_dropped,
            stderr,
            stderr_dropped,
        )
        self.send({"id": ex.request_id, "ok": True, "result": result})

    def _reap(self) -> None:
        """Reap every exited child: keepers that died are handled, adopted orphans dropped.

        The agent's children are the zygote (whose children are the keepers), the tree ops'
        helpers, keepers forked without a zygote, and what a dead keeper left (leaders and
        shells among them: those end their exec here).
        """
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            ex = self.execs.get(pid)
            if ex is not None:
                self._finish(ex, status)
                continue
            if self.trees.exited(pid, status):
                continue
            if pid == self.zygote_pid:
                self.zygote_pid = 0
                self._close_zygote()
                continue
            for keeper in list(self.keepers.values()):
                if keeper.pid == pid:
                    self._keeper_lost(keeper)
            self.shells.on_reaped(pid, status)

    def _fire_timers(self) -> None:
        now = time.monotonic()
        expired: List[_Exec] = []
        while self.timers and self.timers[0][0] <= now:
            _, exec_id, pid = heapq.heappop(self.timers)
            if pid == -2:  # a reset that keeps a shell: its time to show it is pristine
                self.shells.on_reset_timer(exec_id)
                continue
            if pid == -3:  # such a reset: look at the shell again (see `look_again`)
                self.shells.look_again(exec_id)
                continue
            if pid <= 0:  # a persistent shell's call: its timeout (0) or kill grace (-1)
                self.shells.on_timer(exec_id, grace=pid < 0)
                continue
            ex = self.execs.get(pid)
            if ex is not None and ex.exec_id == exec_id and ex.kill_reason is None:
                expired.append(ex)
        if expired:
            self.kill_execs(expired, "timeout")

    # -- killing --------------------------------------------------------------------------------

    def kill_execs(self, execs: List[_Exec], reason: str) -> int:
        """Kill the whole trees of `execs`; return how many processes were killed.

        An exec's tree is its leader's descendants plus the orphans its keeper adopted that
        started after the leader (a setsid or double-fork escapee): facts from the process
        tree, not from anything the command controls. Returns once all of them are dead and
        the execs have replied (the keeper reports each leader's end).
        """
        for ex in execs:
            if ex.kill_reason is None:
                ex.kill_reason = reason
        leaders = {ex.pid for ex in execs}
        all_leaders = set(self.execs)
        orphan_rules: Dict[int, int] = {}  # keeper pid -> earliest start of its killed execs
        for ex in execs:
            keeper = self.keepers.get(ex.slot)
            if keeper is not None:
                earliest = orphan_rules.get(keeper.pid, ex.start_tick)
                orphan_rules[keeper.pid] = min(earliest, ex.start_tick)

        def select(table: Dict[int, Tuple[int, int, bool]]) -> Set[int]:
            children = _children_of(table)
            roots = set(leaders)
            for keeper_pid, start in orphan_rules.items():
                for pid in children.get(keeper_pid, ()):
                    if pid not in all_leaders and table[pid][1] >= start:
                        roots.add(pid)
            return roots | _descendants(children, roots)

        killed = _kill_until_gone(select, self._reap)
        self._wait_finished(execs)
        return len(killed)

    def kill_slot(self, slot: int, reason: str) -> int:
        """Kill every process of `slot` (its keeper's descendants); its execs reply."""
        execs = [ex for ex in self.execs.values() if ex.slot == slot]
        for ex in execs:
            if ex.kill_reason is None:
                ex.kill_reason = reason
        roots = set(self._slot_helpers(slot))
        keeper = self.keepers.get(slot)
        if keeper is not None:
            keeper_pid = keeper.pid
            roots.add(keeper_pid)

        def select(table: Dict[int, Tuple[int, int, bool]]) -> Set[int]:
            helpers = roots - {keeper_pid} if keeper is not None else roots
            return helpers | _descendants(_children_of(table), roots)

        killed = _kill_until_gone(select, self._reap) if roots else set()
        self._wait_finished(execs)
        return len(killed)

    def kill_trees(self, roots: Set[int]) -> int:
        """Kill `roots` and everything below them (until a scan finds none alive)."""
        return len(
            _kill_until_gone(
                lambda table: set(roots) | _descendants(_children_of(table), roots), self._reap
            )
        )

    def _slot_helpers(self, slot: int) -> Set[int]:
        """Pids of the tree ops' helper processes working for `slot`."""
        pids: Set[int] = set()
        for busy_slot, helper_pids in self.trees.busy.values():
            if busy_slot == slot:
                pids |= helper_pids
        for stream in self.trees.streams.values():
            if stream.slot == slot:
                pids.add(stream.helper.pid)
        return pids

    def _wait_finished(self, execs: List[_Exec], limit_s: float = 2.0) -> None:
        """Wait (bounded) until the keepers report the end of `execs`' killed leaders."""
        import select

        deadline = time.monotonic() + limit_s
        while True:
            self._handle_keeper_notices()
            waiting = [ex for ex in execs if self.execs.get(ex.pid) is ex]
            if not waiting:
                return
            keepers = [self.keepers[ex.slot] for ex in waiting if ex.slot in self.keepers]
            fds = {keeper.fd: keeper for keeper in keepers}
            remaining = deadline - time.monotonic()
            if not fds or remaining <= 0:
                return
            with contextlib.suppress(InterruptedError):
                ready, _, _ = select.select(list(fds), [], [], remaining)
            for fd in ready:
                self._read_keeper(fds[fd])
            self._reap()

    def _kill_everything(self) -> None:
        """On exit: kill every process below the agent, then let the keepers go."""
        for slot in list(self.serial_queues):
            self._drop_queued(slot)
        for ex in self.execs.values():
            if ex.kill_reason is None:
                ex.kill_reason = "shutdown"
        self.shells.closing(None, "shutdown")
        own = os.getpid()
        keeper_pids = self._keeper_pids()
        spared = keeper_pids | {self.zygote_pid}
        try:
            _kill_until_gone(
                lambda table: _descendants(_children_of(table), [own]) - spared, self._reap
            )
            self._wait_finished(list(self.execs.values()), 1.0)
        except Exception as exc:  # exiting anyway: say why, never mask the exit
            _log("kill on exit failed: %r" % exc)
        for keeper in list(self.keepers.values()):
            self._fail_pending_spawns(keeper)  # started or not, killed just now
            self._reply_pending_resets(keeper)  # everything of theirs was killed just now
        for keeper in [*self.keepers.values(), *self.spare_keepers]:
            keeper.sock.close()  # the keeper finds nothing left to kill and exits
        # Keepers are the zygote's children (or ours, without a zygote): wait on their pidfds.
        _wait_dead(keeper_pids, 1.0)
        self._reap()
        for pid in keeper_pids:
            if _start_time(pid):  # still there: it could not clean up in time
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        self._close_zygote()
        self.keepers.clear()
        self.spare_keepers.clear()
        for ex in list(self.execs.values()):
            self._finish(ex, None)
        self.trees.close_all()
        self.shells.close(None)
        self.trees.close_all()

    # -- other ops ------------------------------------------------------------------------------

    def op_cancel(self, request_id: int, args: Dict[str, Any]) -> Dict[str, Any]:
        target = args.get("target")
        if not isinstance(target, int) or isinstance(target, bool):
            raise OpError("bad_request", "'target' must be the request id of an exec")
        for slot in list(self.serial_queues):
            if self._drop_queued(slot, target):
                return {"found": True}
        if self.trees.cancel(target):
            return {"found": True}
        ex = self.by_request.get(target)
        if ex is None or ex.kill_reason is not None:
            return {"found": False}
        if ex.in_shell:
            self.shells.kill_call(ex, "cancel")
        else:
            self.kill_execs([ex], "cancel")
        return {"found": True}

    def op_reset_slot(self, request_id: int, args: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        """Kill every process of the slot, then wipe its workspace; replies once both are done.

        The slot's keeper kills its own descendants (see `_kill_descendants`: no scan of every
        process) and reports; meanwhile the agent serves other slots. The slot's execs and
        shell call reply (cancelled) before the reset does: the keeper reports their ends first.
        With ``keep_shell`` (the profile's ``reuse_shell``), an idle bash survives the reset,
        set back and checked (see `_Shells.keepable`).
        """
        slot = _slot_arg(args)
        # Queued requests go first, or killing the running one would start the next.
        self._drop_queued(slot)
        kept = self.shells.keepable(slot) if args.get("keep_shell") else None
        keeper = self.keepers.get(slot)
        if kept is not None and keeper is not None and _only_child(keeper.pid, kept.pid):
            # The idle shell is the slot's only process (any other would be below the keeper
            # or the shell): nothing to kill; the shell is checked (see `_Shells.recycle`).
            kept.resetting = (request_id, 0, 0)
            self.shells.recycle(kept, request_id, 0)
            return None
        if kept is not None and keeper is not None:
            # Everything of the slot but its idle shell dies; then the shell is checked, and
            # set back, or replaced after all (see `_Shells.recycle`).
            try:
                _send_to_keeper_peer(keeper.sock, {"kill": True, "spare": kept.pid})
            except OSError:
                self._keeper_lost(keeper)  # it killed what it kept, the shell too
            else:
                kept.resetting = (request_id, 0, 0)
                keeper.pending_kills.append((request_id, slot, 0, [], kept))
                return None
        shells = self.shells.closing(slot, "reset")
        for ex in self.execs.values():
            if ex.slot == slot and ex.kill_reason is None:
                ex.kill_reason = "reset"
        helpers = self._slot_helpers(slot)
        killed = self.kill_trees(helpers) if helpers else 0
        keeper = self.keepers.get(slot)
        if keeper is not None:
            try:
                _send_to_keeper_peer(keeper.sock, {"kill": True})
            except OSError:
                self._keeper_lost(keeper)  # it killed what it kept
            else:
                keeper.pending_kills.append((request_id, slot, killed, shells, None))
                return None
        return self._reset_workspace(slot, killed)

    def _reply_reset(
        self, request_id: int, slot: int, killed: int, keep_shell: bool = False
    ) -> None:
        try:
            result = self._reset_workspace(slot, killed, keep_shell)
        except OpError as exc:
            self.send(_error_reply(request_id, exc.code, exc.message))
            return
        self.send({"id": request_id, "ok": True, "result": result})

    def _reset_workspace(self, slot: int, killed: int, keep_shell: bool = False) -> Dict[str, Any]:
        """The second half of a reset, once nothing of the slot is alive: forget its shell (or,
        with `keep_shell`, keep the shell that was found pristine) and overlay, wipe its
        workspace."""
        if keep_shell:
            self.shells.tidy(slot)
        else:
            self.shells.close(slot)
        self.trees.discard_overlay(slot)
        uid = self.slot_uid(slot)
        workspace = self.workspace_path(slot)
        self.slots_used.add(slot)
        try:
            is_directory = stat.S_ISDIR(os.lstat(workspace).st_mode)
        except OSError:
            is_directory = False
        if not is_directory:  # (missing, or a symlink or file: made again, see `workspace`)
            workspace = self.workspace(slot)
        try:
            _wipe_contents(workspace)
        except OSError as exc:
            raise _os_error("reset_slot: wiping", workspace, exc) from None
        os.chmod(workspace, 0o700)
        if uid is not None:
            os.chown(workspace, uid, uid)
        if not keep_shell:
            self.shells.warm(slot)
        return {"killed": killed, "shell_kept": keep_shell}

    def op_end_shell(self, request_id: int, args: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        """End the slot's persistent shell (only it: files and other processes stay), so the
        slot's next persistent call starts a clean one; for a release that keeps the slot.

        With ``keep_shell``, an idle bash is set back instead, as at a reset (see
        `_Shells.recycle`), and replaced only if it cannot be shown pristine; the reply comes
        then."""
        slot = _slot_arg(args)
        kept = self.shells.keepable(slot) if args.get("keep_shell") else None
        if kept is not None:
            self.shells.recycle(kept, request_id, 0, ending=True)
            return None
        ended = self.shells.end(slot)
        self.shells.warm(slot)
        return {"ended": ended}

    def op_ping(self, request_id: int, args: Dict[str, Any]) -> Dict[str, Any]:
        execs = len(self.execs) + len(self.shells.execs)
        return {"time": time.time(), "execs": execs, "shells": len(self.shells.by_pid)}

    def op_shutdown(self, request_id: int, args: Dict[str, Any]) -> Dict[str, Any]:
        self._exit(EXIT_OK, "shutdown requested")
        return {}

    def op_read_file(self, request_id: int, args: Dict[str, Any]) -> Dict[str, Any]:
        slot = _slot_arg(args)
        max_bytes = args.get("max_bytes")
        if max_bytes is None:
            max_bytes = MAX_READ_BYTES
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 0:
            raise OpError("bad_request", "'max_bytes' must be an int >= 0")
        max_bytes = min(max_bytes, MAX_READ_BYTES)
        path = args.get("path")
        with self.as_slot(slot):
            real, _ = self.resolve(slot, path, "read_file")
            try:
                fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as exc:
                raise _os_error("read_file", str(path), exc) from None
            try:
                info = os.fstat(fd)
                if stat.S_ISDIR(info.st_mode):
                    raise OpError("is_a_directory", "read_file %r: is a directory" % path)
                if not stat.S_ISREG(info.st_mode):
                    raise OpError("not_a_file", "read_file %r: not a regular file" % path)
                chunks: List[bytes] = []
                remaining = max_bytes
                while remaining > 0:
                    chunk = os.read(fd, min(remaining, 1 << 20))
                    if not chunk:
                        break
                    chunks.append(chunk)
                    remaining -= len(chunk)
                data = b"".join(chunks)
                size = max(info.st_size, len(data))
                truncated = size > len(data) or (remaining == 0 and os.read(fd, 1) != b"")
            except OSError as exc:
                raise _os_error("read_file", str(path), exc) from None
            finally:
                os.close(fd)
        return {"data": data, "size": size, "truncated": truncated}

    def op_write_file(self, request_id: int, args: Dict[str, Any]) -> Dict[str, Any]:
        slot = _slot_arg(args)
        data = args.get("data")
        if not isinstance(data, bytes):
            raise OpError("bad_request", "'data' must be bytes")
        mode = args.get("mode", 0o644)
        if not isinstance(mode, int) or isinstance(mode, bool) or not 0 <= mode <= 0o7777:
            raise OpError("bad_request", "'mode' must be an int in [0, 0o7777]")
        path = args.get("path")
        with self.as_slot(slot):
            real, relative = self.resolve(slot, path, "write_file")
            if relative == os.curdir:
                raise OpError("is_a_directory", "write_file %r: is the workspace itself" % path)
            if os.path.isdir(real):
                raise OpError("is_a_directory", "write_file %r: is a directory" % path)
            parent = os.path.dirname(real)
            try:
                os.makedirs(parent, exist_ok=True)
            except FileExistsError:
                raise OpError(
                    "not_a_directory", "write_file %r: a parent is not a directory" % path
                ) from None
            except OSError as exc:
                raise _os_error("write_file: creating the parent of", str(path), exc) from None
            temp = os.path.join(
                parent, ".%s.hermes-tmp-%s" % (os.path.basename(real), os.urandom(4).hex())
            )
            try:
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view) :]
                    os.fchmod(fd, mode)
                finally:
                    os.close(fd)
                os.rename(temp, real)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    os.unlink(temp)
                raise _os_error("write_file", str(path), exc) from None
        return {"size": len(data)}

    def op_list_files(self, request_id: int, args: Dict[str, Any]) -> Dict[str, Any]:
        slot = _slot_arg(args)
        recursive = args.get("recursive", False)
        if not isinstance(recursive, bool):
            raise OpError("bad_request", "'recursive' must be a bool")
        max_entries = args.get("max_entries", DEFAULT_MAX_ENTRIES)
        if not isinstance(max_entries, int) or isinstance(max_entries, bool) or max_entries < 0:
            raise OpError("bad_request", "'max_entries' must be an int >= 0")
        path = args.get("path", ".")
        entries: List[Dict[str, Any]] = []
        with self.as_slot(slot):
            real, relative = self.resolve(slot, "." if path is None else path, "list_files")
            try:
                if not stat.S_ISDIR(os.stat(real).st_mode):
                    raise OpError("not_a_directory", "list_files %r: not a directory" % path)
                truncated = _list_into(
                    real, "" if relative == os.curdir else relative, recursive, max_entries, entries
                )
            except OSError as exc:
                raise _os_error("list_files", str(path), exc) from None
        return {"entries": entries, "truncated": truncated}


# ---------------------------------------------------------------------------------------------
# Workspace trees: checkpoints, forks, restores and directory transfer (tar streams).
#
# Whole trees are copied by helper processes (cp, chown, tar, rm) that the agent starts and
# reaps like commands, so a 50 MB copy never stalls the loop. Reading a slot's tree runs as the
# slot's uid (the kernel confines it like a command); what lands in a slot is chowned to that
# slot's uid. Checkpoints live under `CHECKPOINTS_DIR` in the workspace root, each in a 0700
# root-owned directory no slot can reach, until `drop_checkpoint` or the sandbox's end.
# Running processes are not captured: a checkpoint holds files only.
# ---------------------------------------------------------------------------------------------

CHECKPOINTS_DIR = ".hermes-checkpoints"
STAGING_PREFIX = ".hermes-stage-"
#: Tree ops that occupy their slot until done, like a command (all: `TREE_OPS`).
SLOT_TREE_OPS = ("checkpoint", "restore", "fork", "fork_in")
#: Where the provider mounts a snapshot of another sandbox's slot for `fork_in`.
MOUNTS_DIR = ".hermes-mounts"
#: Largest chunk one `stream_read` returns or one `stream_write` takes.
MAX_STREAM_CHUNK = 8 * 1024 * 1024
_MAX_CHECKPOINT_ID = 64
_HELPER_ERRORS_BYTES = 8192


def _slot_arg(args: Dict[str, Any]) -> int:
    slot = args.get("slot")
    if not isinstance(slot, int) or isinstance(slot, bool) or not 0 <= slot <= MAX_SLOT:
        raise OpError("bad_request", "'slot' must be an int in [0, %d]" % MAX_SLOT)
    return slot


def _checkpoint_id(args: Dict[str, Any]) -> str:
    return _checked_checkpoint_id(args.get("checkpoint"))


def _optional_checkpoint_id(args: Dict[str, Any]) -> Optional[str]:
    name = args.get("checkpoint")
    return None if name is None else _checked_checkpoint_id(name)


def _checked_checkpoint_id(name: Any) -> str:
    if (
        not isinstance(name, str)
        or not 0 < len(name) <= _MAX_CHECKPOINT_ID
        or not all(c.isalnum() or c in "-_" for c in name)
        or not name.isascii()
    ):
        raise OpError("bad_request", "'checkpoint' must be 1-64 ASCII letters, digits, '-' or '_'")
    return name


def _stream_id(args: Dict[str, Any]) -> int:
    stream = args.get("stream")
    if not isinstance(stream, int) or isinstance(stream, bool):
        raise OpError("bad_request", "'stream' must be the id a tar_out/tar_in reply gave")
    return stream


def _optional_stream_id(args: Dict[str, Any]) -> Optional[int]:
    return None if args.get("stream") is None else _stream_id(args)


def _tag_arg(args: Dict[str, Any]) -> Optional[str]:
    tag = args.get("tag")
    if tag is not None and (not isinstance(tag, str) or not 0 < len(tag) <= 64):
        raise OpError("bad_request", "'tag' must be a string of 1-64 characters, or null")
    return tag


def _shell_state_arg(args: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    shell = args.get("shell")
    if shell is not None and not isinstance(shell, dict):
        raise OpError(
            "bad_request", "'shell' must be a state a checkpoint or tar_out gave, or null"
        )
    return shell


def _targets_arg(args: Dict[str, Any]) -> List[int]:
    targets = args.get("targets")
    if (
        not isinstance(targets, list)
        or not all(isinstance(t, int) and not isinstance(t, bool) for t in targets)
        or not all(0 <= t <= MAX_SLOT for t in targets)
        or len(set(targets)) != len(targets)
        or args.get("slot") in targets
    ):
        raise OpError("bad_request", "'targets' must be distinct slots other than 'slot'")
    return targets


def _data_arg(args: Dict[str, Any]) -> bytes:
    data = args.get("data", b"")
    if not isinstance(data, bytes):
        raise OpError("bad_request", "'data' must be bytes")
    return data


def _last_arg(args: Dict[str, Any]) -> bool:
    last = args.get("last", False)
    if not isinstance(last, bool):
        raise OpError("bad_request", "'last' must be a bool")
    return last


def _max_bytes_arg(args: Dict[str, Any]) -> int:
    max_bytes = args.get("max_bytes", 1 << 20)
    if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes <= 0:
        raise OpError("bad_request", "'max_bytes' must be an int > 0")
    return max_bytes


def _mount_arg(args: Dict[str, Any]) -> str:
    name = args.get("mount")
    if not isinstance(name, str) or not name.isascii() or not name.isidentifier():
        raise OpError("bad_request", "'mount' must be an ASCII name of letters, digits, '_'")
    return name


def _path_arg(args: Dict[str, Any]) -> Any:
    return args.get("path", ".")  # checked where it is resolved (`Agent.resolve`)


_ArgReaders = Tuple[Tuple[str, Callable[[Dict[str, Any]], Any]], ...]
#: The arguments of each tree op, as the host's values (`hermes_actors._values`) send them,
#: each with its one check; a handler gets them checked, defaults filled in, nothing else.
TREE_OP_ARGS: Dict[str, _ArgReaders] = {
    "checkpoint": (("slot", _slot_arg), ("checkpoint", _checkpoint_id)),
    "restore": (("slot", _slot_arg), ("checkpoint", _checkpoint_id), ("shell", _shell_state_arg)),
    "fork": (("slot", _slot_arg), ("targets", _targets_arg)),
    "drop_checkpoint": (("checkpoint", _checkpoint_id),),
    "tar_out": (
        ("slot", _slot_arg),
        ("path", _path_arg),
        ("checkpoint", _optional_checkpoint_id),
        ("tag", _tag_arg),
    ),
    "tar_in": (
        ("slot", _slot_arg),
        ("path", _path_arg),
        ("data", _data_arg),
        ("last", _last_arg),
        ("shell", _shell_state_arg),
        ("tag", _tag_arg),
    ),
    "stream_read": (("stream", _stream_id), ("max_bytes", _max_bytes_arg)),
    "stream_write": (("stream", _stream_id), ("data", _data_arg), ("last", _last_arg)),
    "stream_close": (("stream", _optional_stream_id), ("tag", _tag_arg)),
    "get_shell_state": (("slot", _slot_arg),),
    "fork_in": (
        ("slot", _slot_arg),
        ("mount", _mount_arg),
        ("targets", _targets_arg),
        ("shell", _shell_state_arg),
    ),
}
#: The ops of this section.
TREE_OPS = tuple(TREE_OP_ARGS)


def _with_checked_args(
    op: str, handler: Callable[[int, Dict[str, Any]], Optional[Dict[str, Any]]]
) -> Callable[[int, Dict[str, Any]], Optional[Dict[str, Any]]]:
    readers = TREE_OP_ARGS[op]

    def run(request_id: int, args: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        return handler(request_id, {name: read(args) for name, read in readers})

    return run


def _tree_size(path: str) -> Tuple[int, int]:
    """``(bytes, entries)`` of a tree: apparent sizes, symlinks not followed."""
    total = 0
    entries = 0
    for root, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            entries += 1
            with contextlib.suppress(OSError):
                info = os.lstat(os.path.join(root, name))
                if not stat.S_ISDIR(info.st_mode):
                    total += info.st_size
    return total, entries


def _error_code_of(errors: str) -> str:
    if "No space left" in errors or "Disk quota" in errors:
        return "no_space"
    return "copy_failed"


class _Helper:
    """One helper process (cp, chown, tar, rm) and what happens when it exits."""

    def __init__(self, pid: int, process: Any, errors_fd: int, request_id: int) -> None:
        self.pid = pid
        self.process = process
        self.errors_fd = errors_fd
        self.request_id = request_id
        self.on_exit: Optional[Callable[[int, str], None]] = None
        self.status: Optional[int] = None
        self.errors_text = ""

    def errors(self) -> str:
        try:
            os.lseek(self.errors_fd, 0, os.SEEK_SET)
            return os.read(self.errors_fd, _HELPER_ERRORS_BYTES).decode("utf-8", "replace")
        except OSError:
            return ""


class _Stream:
    """A tar stream: ``tar c`` whose stdout the host pulls, or ``tar x`` the host feeds."""

    def __init__(self, stream_id: int, slot: int, helper: _Helper, fd: int, out: bool) -> None:
        self.stream_id = stream_id
        self.slot = slot
        self.helper = helper
        self.fd = fd  # our end of tar's stdout (out) or stdin (in); -1 once closed
        self.out = out
        self.pending: Optional[int] = None  # the request waiting on fd
        self.pending_data = memoryview(b"")
        self.max_bytes = 0
        self.buffer = bytearray()  # tar's output read ahead of a full chunk
        self.eof = False
        self.closing: Optional[int] = None  # the request waiting for tar's exit
        self.last = False  # the pending write is the last one
        self.opened = False  # the pending write came with tar_in: reply with the stream id
        self.shell: Optional[Dict[str, Any]] = None  # given to the slot once tar x succeeded
        self.tag: Optional[str] = None  # the host's name for it (see `TreeOps._add_stream`)


# -- copy-on-write workspaces: overlay mounts over a frozen tree ---------------------------------
#
# A fork or restore needs one frozen copy of the tree (a *layer*); each target slot's workspace
# then becomes an overlay mount (lower: the layer, upper: the slot's own directory), which costs
# a mount instead of a copy. Where the layer's files belong to another slot uid, the lower is an
# idmapped bind of the layer (the layer's owner shown as the target's uid), so the target owns
# what it sees. The agent mounts in its own mount namespace (made at start, slave to its
# parent's): the mounts are invisible outside the sandbox and vanish with its last process,
# whatever way the agent ends. Without the privilege to mount (not root, gVisor, no overlayfs),
# trees are copied instead.

LAYERS_DIR = ".hermes-layers"
_CLONE_NEWNS = 0x00020000
_CLONE_NEWUSER = 0x10000000
_MS_REC = 0x4000
_MS_SLAVE = 1 << 19
_MNT_DETACH = 2
# Numbers of the new mount API: the same on every architecture (they came after 424).
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_MOUNT_SETATTR = 442
_OPEN_TREE_CLONE = 1
_OPEN_TREE_CLOEXEC = 0o2000000
_MOVE_MOUNT_F_EMPTY_PATH = 4
_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_MOUNT_ATTR_IDMAP = 0x00100000


class _Mounter:
    """The kernel calls behind copy-on-write workspaces (through ctypes)."""

    def __init__(self, libc: Any) -> None:
        self.libc = libc
        #: User namespaces mapping one uid onto another, by (from, to): an idmapped mount
        #: needs one, and making one costs a fork.
        self.userns: Dict[Tuple[int, int], int] = {}

    @classmethod
    def in_private_namespace(cls) -> "Optional[_Mounter]":
        """Move the agent into a mount namespace of its own; None where it may not mount."""
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.mount.argtypes = [
                ctypes.c_char_p,
                ctypes.c_char_p,
                ctypes.c_char_p,
                ctypes.c_ulong,
                ctypes.c_char_p,
            ]
            libc.syscall.restype = ctypes.c_long
            if libc.unshare(_CLONE_NEWNS) != 0:
                return None
            # Slave: mounts made here never propagate back to the host's namespace.
            if libc.mount(None, b"/", None, _MS_REC | _MS_SLAVE, None) != 0:
                return None
        except Exception:  # no ctypes, not Linux
            return None
        return cls(libc)

    def _check(self, result: int, what: str, path: str) -> int:
        if result < 0:
            import ctypes

            number = ctypes.get_errno()
            raise OSError(number, "%s: %s" % (what, os.strerror(number)), path)
        return result

    def overlay(self, lowers: List[str], upper: str, work: str, target: str) -> None:
        """Mount an overlay at `target`: `lowers` (top first) under `upper`."""
        for path in [*lowers, upper, work]:
            if any(c in path for c in ",:\\"):
                raise OSError(errno.EINVAL, "path unfit for overlay options", path)
        options = "lowerdir=%s,upperdir=%s,workdir=%s" % (":".join(lowers), upper, work)
        result = self.libc.mount(b"overlay", target.encode(), b"overlay", 0, options.encode())
        self._check(result, "mounting an overlay", target)

    def overlay_read_only(self, lowers: List[str], target: str) -> None:
        """Mount the read-only union of `lowers` (top first) at `target`."""
        for path in lowers:
            if any(c in path for c in ",:\\"):
                raise OSError(errno.EINVAL, "path unfit for overlay options", path)
        options = "lowerdir=%s" % ":".join(lowers)
        result = self.libc.mount(b"overlay", target.encode(), b"overlay", 0, options.encode())
        self._check(result, "mounting an overlay", target)

    def detach(self, target: str) -> None:
        """Unmount `target` now; whatever still uses the mount keeps it, detached (lazy)."""
        self._check(self.libc.umount2(target.encode(), _MNT_DETACH), "unmounting", target)

    def unmount(self, target: str) -> None:
        """Unmount `target`, or raise (EBUSY) if a process still has a file or its working
        directory on it: then the mount stays, and its directories must not be reused."""
        self._check(self.libc.umount2(target.encode(), 0), "unmounting", target)

    def idmapped_bind(self, source: str, target: str, owner: int, uid: int) -> None:
        """Bind `source` at `target` showing files of `owner` as `uid`'s."""
        import ctypes

        class MountAttr(ctypes.Structure):
            _fields_ = [
                ("attr_set", ctypes.c_uint64),
                ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64),
                ("userns_fd", ctypes.c_uint64),
            ]

        syscall = self.libc.syscall
        flags = _OPEN_TREE_CLONE | _OPEN_TREE_CLOEXEC
        fd = self._check(
            syscall(_SYS_OPEN_TREE, _AT_FDCWD, source.encode(), flags), "open_tree", source
        )
        try:
            attr = MountAttr(_MOUNT_ATTR_IDMAP, 0, 0, self._userns(owner, uid))
            size = ctypes.c_size_t(ctypes.sizeof(attr))
            result = syscall(_SYS_MOUNT_SETATTR, fd, b"", _AT_EMPTY_PATH, ctypes.byref(attr), size)
            self._check(result, "idmapping a mount", source)
            flags = _MOVE_MOUNT_F_EMPTY_PATH
            result = syscall(_SYS_MOVE_MOUNT, fd, b"", _AT_FDCWD, target.encode(), flags)
            self._check(result, "move_mount", target)
        finally:
            os.close(fd)

    def _userns(self, owner: int, uid: int) -> int:
        """A user namespace in which `owner` is `uid` (made once per pair, by a child)."""
        key = (owner, uid)
        if key in self.userns:
            return self.userns[key]
        ready_read, ready_write = os.pipe()
        done_read, done_write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child only unshares and waits
            try:
                os.close(ready_read)
                os.close(done_write)
                ok = self.libc.unshare(_CLONE_NEWUSER) == 0
                os.write(ready_write, b"y" if ok else b"n")
                os.read(done_read, 1)
            finally:
                os._exit(0)
        os.close(ready_write)
        os.close(done_read)
        try:
            if os.read(ready_read, 1) != b"y":
                raise OSError(errno.EPERM, "no user namespace for an idmapped mount")
            for name in ("uid_map", "gid_map"):
                with open("/proc/%d/%s" % (pid, name), "w") as handle:
                    handle.write("%d %d 1\n" % (owner, uid))
            fd = os.open("/proc/%d/ns/user" % pid, os.O_RDONLY | os.O_CLOEXEC)
        finally:
            os.close(ready_read)
            os.close(done_write)  # the child exits
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        self.userns[key] = fd
        return fd

    def probe(self, directory: str, uids: Optional[Tuple[int, int]]) -> Optional[str]:
        """Why overlays (idmapped ones with `uids`) do not work in `directory`, or None."""
        parts = ["lower", "upper", "work", "merged", "mapped"]
        paths = [os.path.join(directory, part) for part in parts]
        mounted: List[str] = []
        try:
            os.mkdir(directory, 0o700)
            for path in paths:
                os.mkdir(path, 0o700)
            lower = paths[0]
            if uids is not None:
                os.chown(lower, uids[0], uids[0])
                os.chown(paths[1], uids[1], uids[1])
                self.idmapped_bind(lower, paths[4], uids[0], uids[1])
                mounted.append(paths[4])
                lower = paths[4]
            self.overlay([lower], paths[1], paths[2], paths[3])
            mounted.append(paths[3])
            return None
        except OSError as exc:
            return str(exc)
        finally:
            for path in reversed(mounted):
                with contextlib.suppress(OSError):
                    self.detach(path)
            _remove_stage(directory)

    def close(self) -> None:
        for fd in self.userns.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.userns.clear()


#: Layers one overlay may stack (a fork of a fork of ... adds one); deeper, a fork copies.
_MAX_LAYERS = 8
#: What an idle shell is sent to step out of its workspace (see `TreeOps._shell_left`): its
#: ``PWD`` and ``OLDPWD`` wait in its positional parameters, which no call sees between calls,
#: until its next call puts them back (`_Shells.start`).
_LEAVE_WORKSPACE = (
    b'\\command set -- "$PWD" "${OLDPWD-}" "${OLDPWD+x}" "$@"; \\command cd / >/dev/null 2>&1\n'
)


class _Layer:
    """A frozen tree that overlay workspaces use as their lower layer.

    A layer may lie on another (`below`): the upper directory of a workspace that was itself an
    overlay, frozen when that workspace was forked or checkpointed.
    """

    def __init__(
        self, path: str, owner: Optional[int], held: bool, below: "Optional[_Layer]" = None
    ) -> None:
        self.path = path  # removed with the layer: the tree is `path`/w/tree
        self.owner = owner  # the uid owning the files (None: no slot uids)
        self.held = held  # a checkpoint keeps it
        self.below = below
        #: Slots whose workspace is an overlay on it, and layers lying on it.
        self.users: Set[object] = set()
        if below is not None:
            below.users.add(self)

    @property
    def tree(self) -> str:
        return os.path.join(self.path, "w", "tree")

    def chain(self) -> "List[_Layer]":
        """This layer and those below it, top first (the order of overlay's lowerdir)."""
        layers: List[_Layer] = []
        layer: Optional[_Layer] = self
        while layer is not None:
            layers.append(layer)
            layer = layer.below
        return layers


class TreeOps:
    """The tree ops of one agent (see the section comment). Holds helper processes by pid."""

    def __init__(self, agent: "Agent") -> None:
        self.agent = agent
        self.helpers: Dict[int, _Helper] = {}
        self.streams: Dict[int, _Stream] = {}
        self.stream_tags: Dict[str, int] = {}
        self.next_stream = 1
        #: Requests of `SLOT_TREE_OPS` still running: request id -> (slot, helper pids).
        self.busy: Dict[int, Tuple[int, Set[int]]] = {}
        self._gnu_cp: Optional[bool] = None
        #: Set by the agent at start where it may mount (see the copy-on-write section).
        self.mounter: Optional[_Mounter] = None
        #: Why copy-on-write workspaces do not work here ("" when they do; None: not probed).
        self.cow_problem: Optional[str] = None
        #: Slots whose workspace is an overlay: slot -> (its layer, its private directory).
        self.overlays: Dict[int, Tuple[_Layer, str]] = {}
        #: Checkpoints that are layers (frozen in place, or restored from once), by name; a
        #: layer stays while held or lain on.
        self.checkpoint_layers: Dict[str, _Layer] = {}

    def handlers(self) -> Dict[str, Callable[[int, Dict[str, Any]], Optional[Dict[str, Any]]]]:
        """Each tree op's handler (``op_<name>``), given its arguments checked (`TREE_OP_ARGS`)."""
        return {op: _with_checked_args(op, getattr(self, "op_" + op)) for op in TREE_OPS}

    # -- helper processes ---------------------------------------------------------------------

    def _spawn(
        self,
        request_id: int,
        slot: int,
        argv: List[str],
        uid: Optional[int],
        on_exit: Callable[[int, str], None],
        stdin: int = -1,
        stdout: int = -1,
    ) -> _Helper:
        agent = self.agent
        if hasattr(os, "memfd_create"):
            errors_fd = os.memfd_create("hermes-helper-errors", os.MFD_CLOEXEC)
        else:  # pragma: no cover - kernels without memfd
            import tempfile

            errors_fd, name = tempfile.mkstemp()
            os.unlink(name)
        env = dict(agent.sandbox_env)
        env["LC_ALL"] = "C"
        # Helpers are the agent's own children: a reset of their slot (`Agent.kill_slot`) and
        # the agent's exit kill them by pid.
        fds = [
            agent.devnull if stdin < 0 else stdin,
            agent.devnull if stdout < 0 else stdout,
            errors_fd,
        ]
        process = None
        try:
            path = _which(argv[0], env.get("PATH", os.defpath)) if "/" not in argv[0] else argv[0]
            if path is None:
                raise FileNotFoundError(errno.ENOENT, "command not found", argv[0])
            pid = _spawn_as(path, argv, env, "/", fds, uid, agent.fast_uid_spawn)
        except OSError as exc:
            os.close(errors_fd)
            raise OpError(
                "missing_tool", "%s is needed in the image: %s" % (argv[0], exc.strerror or exc)
            ) from None
        helper = _Helper(pid, process, errors_fd, request_id)
        helper.on_exit = on_exit
        self.helpers[pid] = helper
        busy = self.busy.get(request_id)
        if busy is not None:
            busy[1].add(pid)
        return helper

    def exited(self, pid: int, status: int) -> bool:
        """Called by the agent's reaper for every child; True if it was one of ours."""
        helper = self.helpers.pop(pid, None)
        if helper is None:
            return False
        exit_code, _ = _exit_code_of(status)
        if helper.process is not None:
            helper.process.returncode = exit_code
        helper.status = exit_code
        busy = self.busy.get(helper.request_id)
        if busy is not None:
            busy[1].discard(pid)
        errors = helper.errors_text = helper.errors()
        os.close(helper.errors_fd)
        if helper.on_exit is not None:
            try:
                helper.on_exit(exit_code, errors)
            except Exception as exc:  # never crash the agent on one request
                _log("internal error after helper %d: %r" % (pid, exc))
                self._finish(helper.request_id, error=("internal", repr(exc)))
        return True

    def cancel(self, request_id: int) -> bool:
        """Kill the helpers of a running tree op (its reply then says cancelled)."""
        busy = self.busy.get(request_id)
        if busy is None:
            return False
        for pid in list(busy[1]):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        return True

    def _cp(self) -> List[str]:
        if self._gnu_cp is None:
            path = _which("cp", self.agent.sandbox_env.get("PATH", os.defpath)) or "cp"
            self._gnu_cp = os.path.basename(os.path.realpath(path)) != "busybox"
        # -a keeps modes, times, symlinks and hard links between the copied files; reflinks
        # make the copy copy-on-write where the filesystem can.
        return ["cp", "-a", "--reflink=auto"] if self._gnu_cp else ["cp", "-a"]

    def _start(self, request_id: int, slot: int) -> None:
        self.busy[request_id] = (slot, set())

    def _finish(
        self,
        request_id: int,
        result: Optional[Dict[str, Any]] = None,
        error: Optional[Tuple[str, str]] = None,
    ) -> None:
        """Reply to a tree op once, and free its slot for the next queued request."""
        busy = self.busy.pop(request_id, None)
        if busy is None:
            return
        slot, pids = busy
        for pid in pids:  # a failed step: its siblings are of no use any more
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        agent = self.agent
        if agent.serial_running.get(slot) == request_id:
            del agent.serial_running[slot]
            agent.slots_to_pump.add(slot)
        if error is not None:
            agent.send(_error_reply(request_id, error[0], error[1]))
        else:
            agent.send({"id": request_id, "ok": True, "result": result or {}})

    # -- staging: where a copy is built before it replaces a workspace -------------------------

    def _stage(self, reader_uid: Optional[int]) -> Tuple[str, str]:
        """``(stage, tree)``: a fresh root-owned staging dir, with a writable dir for `reader_uid`.

        The helper copying into it runs as `reader_uid`, so `tree` sits in a 0700 dir it owns.
        """
        stage = os.path.join(self.agent.workspace_root, STAGING_PREFIX + os.urandom(8).hex())
        os.mkdir(stage, 0o711)
        inner = os.path.join(stage, "w")
        os.mkdir(inner, 0o700)
        if reader_uid is not None:
            os.chown(inner, reader_uid, reader_uid)
        return stage, os.path.join(inner, "tree")

    def _seal(self, inner: str) -> None:
        """Take a finished copy away from the uid that wrote it."""
        if self.agent.slot_uid_base is not None:
            os.lchown(inner, 0, 0)
        os.chmod(inner, 0o700)

    def _install(self, tree: str, slot: int) -> None:
        """Make `tree` (already owned by the slot's uid) the slot's workspace."""
        self.discard_overlay(slot)
        workspace = self.agent.workspace(slot)
        _wipe_contents(workspace)
        os.rename(tree, workspace)  # replaces the now empty directory
        os.chmod(workspace, 0o700)

    def _copy_into_slot(
        self,
        request_id: int,
        source: str,
        reader_uid: Optional[int],
        slot: int,
        on_done: Callable[[], None],
    ) -> None:
        """cp `source` (read as `reader_uid`) into a stage, chown it to `slot`, install it."""
        stage, tree = self._stage(reader_uid)
        target_uid = self.agent.slot_uid(slot)

        def fail(code: str, message: str) -> None:
            _remove_stage(stage)
            self._finish(request_id, error=(code, message))

        def copied(exit_code: int, errors: str) -> None:
            if request_id not in self.busy:
                _remove_stage(stage)
                return
            if exit_code != 0:
                fail(_error_code_of(errors), "copying the workspace failed: %s" % errors.strip())
                return
            self._seal(os.path.dirname(tree))
            if target_uid is None or target_uid == reader_uid:
                installed(0, "")
                return
            owner = "%d:%d" % (target_uid, target_uid)
            self._spawn(request_id, slot, ["chown", "-R", "-h", owner, tree], None, installed)

        def installed(exit_code: int, errors: str) -> None:
            if request_id not in self.busy:
                _remove_stage(stage)
                return
            if exit_code != 0:
                fail("copy_failed", "giving the copy to slot %d failed: %s" % (slot, errors))
                return
            try:
                self._install(tree, slot)
            except OSError as exc:
                fail(*_os_error_pair("installing the copy into slot %d" % slot, exc))
                return
            finally:
                _remove_stage(stage)
            on_done()

        self._spawn(request_id, slot, [*self._cp(), source, tree], reader_uid, copied)

    # -- copy-on-write workspaces ----------------------------------------------------------

    def cow(self) -> bool:
        """Whether workspaces can be overlays here (probed once, on first use)."""
        if self.mounter is None:
            return False
        if self.cow_problem is None:
            base = self.agent.slot_uid_base
            uids = (base, base + 1) if base is not None else None
            probe = os.path.join(self._layers_root(), "probe-" + os.urandom(6).hex())
            self.cow_problem = self.mounter.probe(probe, uids) or ""
            if self.cow_problem:
                _log("no copy-on-write workspaces, trees are copied: %s" % self.cow_problem)
        return self.cow_problem == ""

    def _layers_root(self) -> str:
        root = os.path.join(self.agent.workspace_root, LAYERS_DIR)
        with contextlib.suppress(FileExistsError):
            # Traversable: a fork's copy is made by the source slot's uid (see `_new_layer`).
            os.mkdir(root, 0o711)
        return root

    def _new_layer(self, owner: Optional[int]) -> _Layer:
        """An empty layer whose tree `owner` (a slot uid, or None) may write, once."""
        path = os.path.join(self._layers_root(), "fork-" + os.urandom(8).hex())
        os.mkdir(path, 0o711)
        inner = os.path.join(path, "w")
        os.mkdir(inner, 0o700)
        if owner is not None:
            os.chown(inner, owner, owner)
        return _Layer(path, owner, held=False)

    def _overlay_into(self, layer: _Layer, slot: int) -> None:
        """Make the slot's workspace an overlay on `layer` (what it had before is gone)."""
        mounter = self.mounter
        assert mounter is not None
        agent = self.agent
        self.discard_overlay(slot)
        workspace = agent.workspace(slot)
        _wipe_contents(workspace)
        uid = agent.slot_uid(slot)
        private = os.path.join(self._layers_root(), "slot-%d-%s" % (slot, os.urandom(6).hex()))
        os.mkdir(private, 0o700)
        upper, work = os.path.join(private, "u"), os.path.join(private, "w")
        mapped: List[str] = []
        try:
            os.mkdir(upper, 0o700)
            os.mkdir(work, 0o700)
            if uid is not None:
                os.chown(upper, uid, uid)
            lowers: List[str] = []
            for below in layer.chain():
                lower = below.tree
                if uid is not None and below.owner is not None and below.owner != uid:
                    bind = os.path.join(private, "l%d" % len(lowers))
                    os.mkdir(bind, 0o700)
                    mounter.idmapped_bind(lower, bind, below.owner, uid)
                    mapped.append(bind)
                    lower = bind
                lowers.append(lower)
            mounter.overlay(lowers, upper, work, workspace)
        except BaseException:
            for bind in mapped:
                with contextlib.suppress(OSError):
                    mounter.detach(bind)
            _remove_stage(private)
            raise
        for bind in mapped:  # the overlay holds its own references to its lowers
            with contextlib.suppress(OSError):
                mounter.detach(bind)
                os.rmdir(bind)
        self.overlays[slot] = (layer, private)
        layer.users.add(slot)

    def _freeze_in_place(self, slot: int, path: str, held: bool) -> Optional[_Layer]:
        """Move the slot's workspace into a new layer at `path`, and put an overlay on that layer
        in its place: a snapshot without copying. None (nothing changed) where that is not safe:
        the workspace is an overlay already, or something of the slot besides its idle shell
        could still write into the moved tree."""
        agent = self.agent
        if not self._quiet(slot):
            return None
        if slot in self.overlays:
            return self._freeze_upper(slot, path, held)
        workspace = agent.workspace(slot)
        layer = _Layer(path, agent.slot_uid(slot), held)
        os.mkdir(path, 0o711)
        os.mkdir(os.path.dirname(layer.tree), 0o700)  # root's: sealed from the start
        os.rename(workspace, layer.tree)
        try:
            self._overlay_into(layer, slot)
        except OSError as exc:
            try:
                with contextlib.suppress(FileNotFoundError):
                    os.rmdir(workspace)
                os.rename(layer.tree, workspace)
            except OSError as back:  # never remove the slot's files: keep them in the layer
                _log("slot %d's workspace stays in %s: %r, then %r" % (slot, path, exc, back))
                return None
            _remove_stage(path)
            return None
        shell = agent.shells.by_slot.get(slot)
        if shell is not None:
            shell.recenter = True
        return layer

    def _freeze_upper(self, slot: int, path: str, held: bool) -> Optional[_Layer]:
        """`_freeze_in_place` of a workspace that is an overlay: its upper becomes a layer on
        the one below it, and a new overlay goes on that."""
        mounter = self.mounter
        assert mounter is not None
        below, private = self.overlays[slot]
        if len(below.chain()) >= _MAX_LAYERS:
            return None  # a copy flattens the stack
        workspace = self.agent.workspace_path(slot)
        # The old mount must be gone, not detached: its upper becomes a lower, and its work
        # directory is removed; an overlay still in use by a process would write into both
        # (the kernel: "lowerdir is in-use as upperdir/workdir of another mount").
        if not self._shell_left(slot):
            return None  # a copy of the workspace instead
        os.mkdir(path, 0o711)
        os.mkdir(os.path.join(path, "w"), 0o700)
        try:
            mounter.unmount(workspace)
        except OSError as exc:
            _log("slot %d's overlay stays (%s): its tree is copied instead" % (slot, exc))
            _remove_stage(path)
            return None
        # From here the slot's files are in `private`'s upper: they must end in a layer.
        del self.overlays[slot]
        below.users.discard(slot)
        layer = _Layer(path, self.agent.slot_uid(slot), held, below)
        os.rename(os.path.join(private, "u"), layer.tree)
        self._remove_later(private)
        self._overlay_into(layer, slot)
        shell = self.agent.shells.by_slot.get(slot)
        if shell is not None:
            shell.recenter = True
        return layer

    def _shell_left(self, slot: int, limit_s: float = 2.0) -> bool:
        """Whether the slot's idle shell has no working directory in the workspace's mount:
        if it has, it is asked to step out to ``/`` (keeping its ``PWD`` and ``OLDPWD`` for its
        next call, see `_Shell.left`), and this waits (bounded) until it did."""
        shell = self.agent.shells.by_slot.get(slot)
        if shell is None or shell.pid == 0:
            return True
        workspace = self.agent.workspace_path(slot)

        def inside() -> bool:
            try:
                cwd = os.readlink("/proc/%d/cwd" % shell.pid)
            except OSError:  # gone: it holds nothing
                return False
            return cwd == workspace or cwd.startswith(workspace + os.sep)

        if not inside():
            return True
        if not shell.left:
            shell.left = True
            self.agent.shells.send_script(shell, _LEAVE_WORKSPACE)
        deadline = time.monotonic() + limit_s
        pause = 0.0002
        while inside():
            if time.monotonic() > deadline:
                return False
            time.sleep(pause)
            pause = min(pause * 2, 0.01)
        return True

    def _quiet(self, slot: int) -> bool:
        """Whether nothing of the slot can write into its workspace now, its idle persistent
        shell aside (its working directory is all it holds there: see `_Shell.recenter`)."""
        agent = self.agent
        if any(stream.slot == slot for stream in self.streams.values()):
            return False
        keeper = agent.keepers.get(slot)
        if keeper is None:
            return True
        shell = agent.shells.by_slot.get(slot)
        shell_pid = 0
        if shell is not None:
            if shell.current is not None:
                return False
            shell_pid = shell.pid
        table = _process_table()
        below = _descendants(_children_of(table), [keeper.pid])
        if {pid for pid in below if not table[pid][2]} - {shell_pid}:
            return False
        if shell_pid:
            inside = agent.workspace_path(slot) + os.sep
            try:
                names = os.listdir("/proc/%d/fd" % shell_pid)
            except OSError:
                return False
            for name in names:
                with contextlib.suppress(OSError):
                    if os.readlink("/proc/%d/fd/%s" % (shell_pid, name)).startswith(inside):
                        return False
        return True

    def discard_overlay(self, slot: int) -> None:
        """Unmount the slot's overlay and free its files (its processes are gone already)."""
        entry = self.overlays.pop(slot, None)
        if entry is None:
            return
        layer, private = entry
        if self.mounter is not None:
            workspace = self.agent.workspace_path(slot)
            try:
                self.mounter.unmount(workspace)
            except OSError as exc:
                # Something of the slot outlived its kill: it keeps a detached mount whose
                # files go now (it sees them vanish); the next tree never shows them.
                _log("slot %d's overlay was still in use (%s): detached" % (slot, exc))
                with contextlib.suppress(OSError):
                    self.mounter.detach(workspace)
        self._remove_later(private)
        layer.users.discard(slot)
        self._release_layer(layer)

    def _release_layer(self, layer: _Layer) -> None:
        """Free a layer no overlay uses and no checkpoint holds (and what it alone held up)."""
        if layer.users or layer.held:
            return
        self._remove_later(layer.path)
        if layer.below is not None:
            layer.below.users.discard(layer)
            self._release_layer(layer.below)

    def _remove_later(self, path: str) -> None:
        """Remove a tree by a helper (a big one never stalls the loop); its name is free now."""
        doomed = os.path.join(self._layers_root(), ".gone-" + os.urandom(8).hex())
        try:
            os.rename(path, doomed)
            self._spawn(-1, 0, ["rm", "-rf", doomed], None, lambda code, _: _remove_stage(doomed))
        except (OSError, OpError):
            _remove_stage(path)
            _remove_stage(doomed)

    # -- checkpoint, restore, fork ---------------------------------------------------------

    def checkpoint_path(self, name: str) -> str:
        return os.path.join(self.agent.workspace_root, CHECKPOINTS_DIR, name)

    def op_checkpoint(self, request_id: int, args: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        slot, name = args["slot"], args["checkpoint"]
        agent = self.agent
        source = agent.workspace(slot)
        uid = agent.slot_uid(slot)
        root = os.path.join(agent.workspace_root, CHECKPOINTS_DIR)
        with contextlib.suppress(FileExistsError):
            os.mkdir(root, 0o711)
        path = self.checkpoint_path(name)
        if os.path.lexists(path):
            raise OpError("exists", "checkpoint %r exists already" % name)
        if self.cow():
            layer = self._freeze_in_place(slot, path, held=True)
            if layer is not None:
                self.checkpoint_layers[name] = layer
                # What the checkpoint holds, as a copy would (its layer may hold only what
                # changed since the layer below it).
                size, entries = _tree_size(source)
                return {
                    "bytes": size,
                    "entries": entries,
                    "shell": self.shell_state(slot),
                    # Its tree is whole only when no layer lies below it (else: the changes).
                    "flat": layer.below is None,
                }
        try:
            os.mkdir(path, 0o711)
        except FileExistsError:
            raise OpError("exists", "checkpoint %r exists already" % name) from None
        inner = os.path.join(path, "w")
        os.mkdir(inner, 0o700)
        if uid is not None:
            os.chown(inner, uid, uid)
        tree = os.path.join(inner, "tree")
        self._start(request_id, slot)

        def copied(exit_code: int, errors: str) -> None:
            if exit_code != 0 or request_id not in self.busy:
                _remove_stage(path)
                message = "checkpoint of slot %d failed: %s" % (slot, errors.strip() or "killed")
                self._finish(request_id, error=(_error_code_of(errors), message))
                return
            self._seal(inner)
            size, entries = _tree_size(tree)
            shell = self.shell_state(slot)
            result = {"bytes": size, "entries": entries, "shell": shell, "flat": True}
            self._finish(request_id, result)

        try:
            self._spawn(request_id, slot, [*self._cp(), source, tree], uid, copied)
        except OpError:
            self.busy.pop(request_id, None)
            _remove_stage(path)
            raise
        return None

    def op_restore(self, request_id: int, args: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        slot, name, shell = args["slot"], args["checkpoint"], args["shell"]
        tree = os.path.join(self.checkpoint_path(name), "w", "tree")
        if not os.path.isdir(tree):
            raise OpError("not_found", "checkpoint %r does not exist in this sandbox" % name)
        agent = self.agent
        self._evict([slot])
        self._start(request_id, slot)

        def restored() -> None:
            self.set_shell_state(slot, shell)
            self._finish(request_id, {})

        if self.cow():
            # The checkpoint's tree becomes the lower layer: no copy.
            layer = self.checkpoint_layers.get(name)
            if layer is None:  # a checkpoint that was copied: its tree becomes a layer
                owner = os.stat(tree).st_uid if agent.slot_uid_base is not None else None
                layer = self.checkpoint_layers[name] = _Layer(
                    self.checkpoint_path(name), owner, held=True
                )
            try:
                self._overlay_into(layer, slot)
            except OSError as exc:
                self._finish(request_id, error=_os_error_pair("restore", exc))
                return None
            restored()
            return None
        try:
            self._copy_into_slot(request_id, tree, None, slot, restored)
        except OpError as exc:
            self._finish(request_id, error=(exc.code, exc.message))
        except OSError as exc:
            self._finish(request_id, error=_os_error_pair("restore", exc))
        return None

    def _evict(self, slots: List[int]) -> None:
        """Like a reset, without the wipe: nothing these slots started (shells included) stays
        in, or writes into, the workspace a new tree is about to replace; nor does it keep an
        overlay there in use (see `discard_overlay`). A fork target was released without reset
        by its last holder, say. One scan of the processes when none of them runs anything."""
        agent = self.agent
        keepers = {slot: agent.keepers[slot].pid for slot in slots if slot in agent.keepers}
        if keepers:
            table = _process_table()
            children = _children_of(table)
        for slot in slots:
            agent.shells.closing(slot, "reset")
            pid = keepers.get(slot)
            running = pid is not None and any(
                not table[below][2] for below in _descendants(children, [pid])
            )
            if running or agent._slot_helpers(slot):
                agent.kill_slot(slot, "reset")
            agent.shells.close(slot)

    def op_fork(self, request_id: int, args: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        slot, targets = args["slot"], args["targets"]
        if not targets:
            return {}
        agent = self.agent
        source = agent.workspace(slot)
        shell = self.shell_state(slot)
        self._evict(targets)
        self._start(request_id, slot)
        if self.cow():
            try:
                self._fork_by_overlays(request_id, source, agent.slot_uid(slot), targets, shell)
            except OpError as exc:  # e.g. no `cp` to freeze a busy tree with: reply, free slot
                self._finish(request_id, error=(exc.code, exc.message))
            except OSError as exc:
                self._finish(request_id, error=_os_error_pair("fork", exc))
            return None
        self._copy_into_slots(request_id, "fork", source, agent.slot_uid(slot), targets, shell)
        return None

    def _copy_into_slots(
        self,
        request_id: int,
        op: str,
        source: str,
        reader_uid: Optional[int],
        slots: List[int],
        shell: Optional[Dict[str, Any]],
    ) -> None:
        """Copy `source` (read as `reader_uid`) into every slot of `slots`, each of whose
        shells then starts from `shell`; reply once all are done, or with the first failure."""
        left = [len(slots)]

        def one_done(target: int) -> None:
            self.set_shell_state(target, shell)
            left[0] -= 1
            if left[0] == 0:
                self._finish(request_id, {})

        try:
            for target in slots:
                self._copy_into_slot(
                    request_id, source, reader_uid, target, functools.partial(one_done, target)
                )
        except OpError as exc:
            self._finish(request_id, error=(exc.code, exc.message))
        except OSError as exc:
            self._finish(request_id, error=_os_error_pair(op, exc))

    def op_get_shell_state(self, request_id: int, args: Dict[str, Any]) -> Dict[str, Any]:
        """The slot's shell state (cwd and exported environment), for a fork across sandboxes."""
        return {"shell": self.shell_state(args["slot"])}

    def op_fork_in(self, request_id: int, args: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        """The target side of a fork across sandboxes: copy the tree the provider mounted at
        ``MOUNTS_DIR/<mount>`` into 'slot' and each slot of 'targets', whose shells then start
        from 'shell' (the source slot's state)."""
        slot, name, targets, shell = args["slot"], args["mount"], args["targets"], args["shell"]
        source = os.path.join(self.agent.workspace_root, MOUNTS_DIR, name)
        if not os.path.isdir(source):
            raise OpError("not_found", "nothing is mounted at %s/%s" % (MOUNTS_DIR, name))
        everyone = [slot, *targets]
        self._evict(everyone)
        self._start(request_id, slot)
        self._copy_into_slots(request_id, "fork_in", source, None, everyone, shell)
        return None

    def _fork_by_overlays(
        self,
        request_id: int,
        source: str,
        uid: Optional[int],
        targets: List[int],
        shell: Optional[Dict[str, Any]],
    ) -> None:
        """The source's tree frozen in place (or, where it cannot be, one copy of it read as
        its uid), then an overlay on it per target."""
        slot = self.busy[request_id][0]
        path = os.path.join(self._layers_root(), "fork-" + os.urandom(8).hex())
        frozen = self._freeze_in_place(slot, path, held=False)
        if frozen is not None:
            self._overlays_onto(request_id, frozen, targets, shell)
            return
        layer = self._new_layer(uid)

        def copied(exit_code: int, errors: str) -> None:
            if exit_code != 0 or request_id not in self.busy:
                self._release_layer(layer)
                message = "copying the workspace failed: %s" % (errors.strip() or "killed")
                self._finish(request_id, error=(_error_code_of(errors), message))
                return
            self._seal(os.path.dirname(layer.tree))
            self._overlays_onto(request_id, layer, targets, shell)

        try:
            self._spawn(request_id, 0, [*self._cp(), source, layer.tree], uid, copied)
        except OpError:
            self._release_layer(layer)
            raise

    def _overlays_onto(
        self, request_id: int, layer: _Layer, targets: List[int], shell: Optional[Dict[str, Any]]
    ) -> None:
        """Each target's workspace an overlay on `layer`, with `shell`; then the reply."""
        done: List[int] = []
        try:
            for target in targets:
                self._overlay_into(layer, target)
                done.append(target)
        except OSError as exc:
            for target in done:
                self.discard_overlay(target)
            self._release_layer(layer)
            self._finish(request_id, error=_os_error_pair("fork", exc))
            return
        for target in targets:
            self.set_shell_state(target, shell)
        self._finish(request_id, {})

    def op_drop_checkpoint(self, request_id: int, args: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        name = args["checkpoint"]
        path = self.checkpoint_path(name)
        if not os.path.isdir(path):
            return {"dropped": False}
        layer = self.checkpoint_layers.pop(name, None)
        if layer is not None:
            layer.held = False
            if layer.users:
                # Workspaces still lie on its tree: it goes when the last of them does.
                layer.path = os.path.join(self._layers_root(), "dropped-" + os.urandom(8).hex())
                os.rename(path, layer.path)
            else:
                self._release_layer(layer)
            return {"dropped": True}
        # Renamed first, so the name is free at once and a crash leaves no half-deleted
        # checkpoint behind; the rm runs as a helper so a big tree does not stall the loop.
        doomed = os.path.join(os.path.dirname(path), ".drop-" + os.urandom(8).hex())
        os.rename(path, doomed)
        slot = 0  # any slot: helpers are the agent's children, its exit kills them
        self.busy[request_id] = (-1, set())

        def removed(exit_code: int, errors: str) -> None:
            if exit_code != 0:
                _remove_stage(doomed)
            self._finish(request_id, {"dropped": True})

        self._spawn(request_id, slot, ["rm", "-rf", doomed], None, removed)
        return None

    # -- the persistent shell's state: working directory and exported environment ----------

    def shell_state(self, slot: int) -> Optional[Dict[str, Any]]:
        """The slot's shell's last known cwd (relative) and ``export -p`` text, or None."""
        shell = self.agent.shells.by_slot.get(slot)
        if shell is None:
            return None
        workspace = self.agent.workspace_path(slot)
        cwd = "."
        if shell.cwd.startswith(workspace + os.sep):
            cwd = os.path.relpath(shell.cwd, workspace)
        exported = self.agent.shells.exported(shell, wait_s=_EXPORTED_WAIT_S)
        return {"cwd": cwd, "exported": exported, "workspace": workspace}

    def set_shell_state(self, slot: int, state: Optional[Dict[str, Any]]) -> None:
        """Replace the slot's shell by one that starts (lazily, at the next call) from `state`.

        Paths under the state's workspace are moved to this slot's. (The new shell belongs to
        this slot because this slot's keeper starts it.)
        """
        shells = self.agent.shells
        alive = {shell.pid for shell in shells.closing(slot, "reset") if shell.pid}
        if alive:
            self.agent.kill_trees(alive)
        shells.close(slot)
        if not state:
            return
        workspace = self.agent.workspace_path(slot)
        relative = state.get("cwd")
        cwd = workspace
        if isinstance(relative, str) and relative not in ("", "."):
            candidate = os.path.normpath(os.path.join(workspace, relative))
            if candidate.startswith(workspace + os.sep):
                cwd = candidate
        placeholder = _Shell(slot, cwd)
        exported = state.get("exported")
        origin = state.get("workspace")
        if isinstance(exported, bytes) and isinstance(origin, str):
            placeholder.exported = _retarget_exports(exported, origin, workspace)
        shells.by_slot[slot] = placeholder

    # -- tar streams ------------------------------------------------------------------------

    def op_tar_out(self, request_id: int, args: Dict[str, Any]) -> Dict[str, Any]:
        """Start ``tar c`` of a slot directory (or of a checkpoint); the host pulls it with
        `stream_read`. The reply carries the slot's shell state, for a fork through the host."""
        agent = self.agent
        slot, path, checkpoint = args["slot"], args["path"], args["checkpoint"]
        uid: Optional[int]
        view: Optional[Tuple[_Layer, str]] = None
        if checkpoint is not None:
            directory = os.path.join(self.checkpoint_path(checkpoint), "w", "tree")
            if not os.path.isdir(directory):
                raise OpError("not_found", "checkpoint %r does not exist here" % checkpoint)
            layer = self.checkpoint_layers.get(checkpoint)
            if layer is not None and layer.below is not None:
                # Its tree holds only what changed since the layer below: tar the merged view.
                view = self._read_only_view(layer)
                directory = view[1]
            uid = None
        else:
            with agent.as_slot(slot):
                directory, _ = agent.resolve(slot, path, "tar_out")
                if not os.path.isdir(directory):
                    if os.path.exists(directory):
                        raise OpError("not_a_directory", "tar_out: %r is not a directory" % path)
                    raise OpError("not_found", "tar_out: %r does not exist" % path)
            uid = agent.slot_uid(slot)
        read_fd, write_fd = os.pipe()
        try:
            helper = self._spawn(
                request_id,
                slot,
                ["tar", "-C", directory, "-cf", "-", "."],
                uid,
                lambda code, errors: None,
                stdout=write_fd,
            )
        except OpError:
            os.close(read_fd)
            if view is not None:
                self._close_view(*view)
            raise
        finally:
            os.close(write_fd)
        os.set_blocking(read_fd, False)
        stream = self._add_stream(slot, helper, read_fd, out=True, tag=args["tag"])
        if view is not None:
            exited = helper.on_exit
            assert exited is not None
            layers_view = view

            def exited_then_close(code: int, errors: str) -> None:
                self._close_view(*layers_view)
                exited(code, errors)

            helper.on_exit = exited_then_close
        return {"stream": stream.stream_id, "shell": self.shell_state(slot)}

    def _read_only_view(self, layer: _Layer) -> Tuple[_Layer, str]:
        """A read-only overlay of `layer` and those below it (the layer kept meanwhile)."""
        mounter = self.mounter
        assert mounter is not None
        path = os.path.join(self._layers_root(), "view-" + os.urandom(6).hex())
        os.mkdir(path, 0o700)
        try:
            mounter.overlay_read_only([below.tree for below in layer.chain()], path)
        except OSError as exc:
            os.rmdir(path)
            raise OpError(*_os_error_pair("tar_out of a checkpoint", exc)) from None
        layer.users.add(path)
        return layer, path

    def _close_view(self, layer: _Layer, path: str) -> None:
        if self.mounter is not None:
            with contextlib.suppress(OSError):
                self.mounter.detach(path)
        with contextlib.suppress(OSError):
            os.rmdir(path)
        layer.users.discard(path)
        self._release_layer(layer)

    def op_tar_in(self, request_id: int, args: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        """Start ``tar x`` into a slot directory; the host feeds it with `stream_write`.

        Optional: ``data`` (the first bytes, written at once), ``last`` (no more data: the
        reply comes when tar is done, as for `stream_close`), ``shell`` (a shell state to give
        the slot once tar succeeded). So a small tree costs one request.
        """
        agent = self.agent
        slot, path, data, last = args["slot"], args["path"], args["data"], args["last"]
        with agent.as_slot(slot):
            directory, _ = agent.resolve(slot, path, "tar_in")
            try:
                os.makedirs(directory, exist_ok=True)
            except OSError as exc:
                raise _os_error("tar_in: creating", str(path), exc) from None
        uid = agent.slot_uid(slot)
        argv = ["tar", "-C", directory, "-xf", "-"]
        if uid is None and os.geteuid() == 0:
            argv.insert(1, "-o")  # never give files the owners another machine recorded
        read_fd, write_fd = os.pipe()
        try:
            helper = self._spawn(
                request_id, slot, argv, uid, lambda code, errors: None, stdin=read_fd
            )
        except OpError:
            os.close(write_fd)
            raise
        finally:
            os.close(read_fd)
        os.set_blocking(write_fd, False)
        stream = self._add_stream(slot, helper, write_fd, out=False, tag=args["tag"])
        stream.shell = args["shell"]
        stream.opened = True
        self._start_write(stream, request_id, data, last)
        return None

    def _add_stream(
        self, slot: int, helper: _Helper, fd: int, out: bool, tag: Optional[str] = None
    ) -> _Stream:
        """Register a stream; `tag` (a string the host chose) lets the host close it without
        knowing its id, as when it gave up on the request that opened it."""
        stream = _Stream(self.next_stream, slot, helper, fd, out)
        self.next_stream += 1
        self.streams[stream.stream_id] = stream
        if tag is not None:
            stream.tag = tag
            self.stream_tags[tag] = stream.stream_id
        helper.on_exit = lambda code, errors: self._stream_exited(stream, code, errors)
        return stream

    def _get_stream(self, stream_id: int, out: Optional[bool]) -> _Stream:
        stream = self.streams.get(stream_id)
        if stream is None:
            raise OpError("not_found", "no open stream %r" % stream_id)
        if out is not None and stream.out != out:
            raise OpError("bad_request", "stream %d does not go that way" % stream.stream_id)
        if stream.pending is not None or stream.closing is not None:
            raise OpError("bad_request", "stream %d has a request pending" % stream.stream_id)
        return stream

    def op_stream_read(self, request_id: int, args: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        """The next `max_bytes` of tar's output (fewer only at its end, with ``eof``)."""
        stream = self._get_stream(args["stream"], out=True)
        stream.max_bytes = min(args["max_bytes"], MAX_STREAM_CHUNK)
        stream.pending = request_id
        self._try_read(stream)
        if stream.pending is not None and not stream.eof:
            self.agent.selector.register(
                stream.fd, selectors.EVENT_READ, lambda fd, mask: self._try_read(stream)
            )
        return None

    def _try_read(self, stream: _Stream) -> None:
        while len(stream.buffer) < stream.max_bytes:
            try:
                data = os.read(stream.fd, min(stream.max_bytes - len(stream.buffer), 1 << 20))
            except BlockingIOError:
                return  # wait for more (a full chunk, or the end)
            except OSError:
                data = b""
            if not data:
                stream.eof = True
                break
            stream.buffer += data
        with contextlib.suppress(KeyError, ValueError):
            self.agent.selector.unregister(stream.fd)
        if not stream.eof:
            request_id, stream.pending = stream.pending, None
            chunk, stream.buffer = bytes(stream.buffer), bytearray()
            assert request_id is not None
            self.agent.send({"id": request_id, "ok": True, "result": {"data": chunk}})
            return
        # The end of tar's output: tar is exiting; reap it now if it has, so the last chunk
        # and the outcome travel in one reply.
        if stream.helper.status is None:
            with contextlib.suppress(ChildProcessError):
                pid, status = os.waitpid(stream.helper.pid, os.WNOHANG)
                if pid:
                    self.exited(pid, status)  # replies through `_stream_exited`
                    return
        if stream.helper.status is not None:
            self._reply_end(stream)
        # else: `_stream_exited` replies once tar's exit is reaped.

    def _reply_end(self, stream: _Stream) -> None:
        """tar is done: answer the waiting request with its outcome and forget the stream."""
        request_id = stream.pending if stream.pending is not None else stream.closing
        stream.pending = stream.closing = None
        data, stream.buffer = bytes(stream.buffer), bytearray()
        self._close_stream(stream)
        if request_id is None:
            return
        code = stream.helper.status
        if code != 0:
            errors = stream.helper.errors_text.strip() or "exit status %s" % code
            self.agent.send(_error_reply(request_id, "tar_failed", "tar failed: %s" % errors))
            return
        if not stream.out and stream.shell is not None:
            self.set_shell_state(stream.slot, stream.shell)
        self.agent.send({"id": request_id, "ok": True, "result": {"data": data, "eof": True}})

    def _stream_exited(self, stream: _Stream, code: int, errors: str) -> None:
        if stream.out:
            # A read waiting at the end of the output gets the outcome now; one arriving
            # later finds the end and the status at once.
            if stream.closing is not None or (stream.eof and stream.pending is not None):
                self._reply_end(stream)
            elif stream.pending is not None:
                self._try_read(stream)
            return
        if stream.closing is not None:
            self._reply_end(stream)
        elif stream.pending is not None:  # a write tar will never take: the stream is done
            request_id, stream.pending = stream.pending, None
            message = "tar stopped reading: %s" % (errors.strip() or "exit status %d" % code)
            self.agent.send(_error_reply(request_id, "tar_failed", message))
            self._close_stream(stream)

    def op_stream_write(self, request_id: int, args: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        """Feed tar x; with ``last``, the stream closes after this data (reply at tar's end)."""
        stream = self._get_stream(args["stream"], out=False)
        if stream.helper.status is not None:
            errors = stream.helper.errors_text.strip()
            raise OpError("tar_failed", "tar stopped reading: %s" % (errors or "it exited"))
        self._start_write(stream, request_id, args["data"], args["last"])
        return None

    def _start_write(self, stream: _Stream, request_id: int, data: bytes, last: bool) -> None:
        stream.pending = request_id
        stream.pending_data = memoryview(data)
        stream.last = last
        self._try_write(stream)
        if stream.pending is not None and stream.fd >= 0:
            self.agent.selector.register(
                stream.fd, selectors.EVENT_WRITE, lambda fd, mask: self._try_write(stream)
            )

    def _try_write(self, stream: _Stream) -> None:
        try:
            written = _write_all_nonblocking(stream.fd, bytes(stream.pending_data[: 1 << 20]))
        except OSError:  # tar is gone; its exit reports why
            with contextlib.suppress(KeyError, ValueError):
                self.agent.selector.unregister(stream.fd)
            return
        stream.pending_data = stream.pending_data[written:]
        if stream.pending_data:
            return
        with contextlib.suppress(KeyError, ValueError):
            self.agent.selector.unregister(stream.fd)
        request_id, stream.pending = stream.pending, None
        if request_id is None:
            return
        if stream.last:
            self._finish_input(stream, request_id)
        elif stream.opened:
            stream.opened = False
            self.agent.send({"id": request_id, "ok": True, "result": {"stream": stream.stream_id}})
        else:
            self.agent.send({"id": request_id, "ok": True, "result": {}})

    def _finish_input(self, stream: _Stream, request_id: int) -> None:
        """No more input: EOF for tar x; `request_id` gets tar's outcome."""
        with contextlib.suppress(KeyError, ValueError):
            self.agent.selector.unregister(stream.fd)
        if stream.fd >= 0:
            os.close(stream.fd)
            stream.fd = -1
        stream.closing = request_id
        if stream.helper.status is not None:
            self._reply_end(stream)

    def op_stream_close(self, request_id: int, args: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        """Close a stream (`stream`: input ends, tar x's outcome is the reply), or abort the one
        opened with `tag` (its tar is killed, whichever way it goes)."""
        if args["stream"] is None:
            stream = self.streams.get(self.stream_tags.get(args["tag"] or "", -1))
            if stream is None:
                return {"closed": False}
            for waiting in (stream.pending, stream.closing):
                if waiting is not None:
                    self.agent.send(_error_reply(waiting, "cancelled", "stream closed"))
            stream.pending = stream.closing = None
            with contextlib.suppress(OSError):
                os.kill(stream.helper.pid, signal.SIGKILL)
            self._close_stream(stream)
            return {"closed": True}
        stream = self.streams.get(args["stream"])
        if stream is None:
            return {"closed": False}
        for waiting in (stream.pending, stream.closing):
            if waiting is not None:  # abandoned mid-request: answer it, then close
                self.agent.send(_error_reply(waiting, "cancelled", "stream closed"))
        stream.pending = stream.closing = None
        if stream.out and not stream.eof:
            # The host gave up reading: stop tar; nothing more is owed.
            with contextlib.suppress(OSError):
                os.kill(stream.helper.pid, signal.SIGKILL)
            self._close_stream(stream)
            return {"closed": True}
        if stream.out:
            self._close_stream(stream)
            return {"closed": True}
        self._finish_input(stream, request_id)
        return None

    def _close_stream(self, stream: _Stream) -> None:
        self.streams.pop(stream.stream_id, None)
        if stream.tag is not None:
            self.stream_tags.pop(stream.tag, None)
        if stream.fd >= 0:
            with contextlib.suppress(KeyError, ValueError):
                self.agent.selector.unregister(stream.fd)
            os.close(stream.fd)
            stream.fd = -1

    def close_all(self) -> None:
        """On exit: every stream closed (their helpers die with the agent's kill sweep).

        Overlay mounts need no unmounting: they end with the agent's mount namespace."""
        for stream in list(self.streams.values()):
            self._close_stream(stream)
        if self.mounter is not None:
            self.mounter.close()


def _retarget_exports(exported: bytes, origin: str, workspace: str) -> bytes:
    """``export -p`` text of one slot made fit for another: its workspace paths become the
    target's."""
    if origin != workspace:
        exported = exported.replace(origin.encode(), workspace.encode())
    return exported


def _remove_stage(path: str) -> None:
    """Remove a staging or checkpoint directory whatever is in it (best effort)."""
    if os.path.lexists(path):
        with contextlib.suppress(OSError):
            _wipe_contents(path)
            os.rmdir(path)


def _os_error_pair(what: str, exc: OSError) -> Tuple[str, str]:
    return _ERRNO_CODES.get(exc.errno or 0, "io_error"), "%s: %s" % (what, exc.strerror or exc)


# ---------------------------------------------------------------------------------------------
# Persistent shells: one long-lived shell per slot, for execs with ``"shell": "persistent"``.
# ---------------------------------------------------------------------------------------------


class _Fifo:
    """One of a shell's output FIFOs, which the agent keeps open from call to call.

    `reader` is watched (and read during a call); `writer` is the agent's own write end, held
    so that the reader never reads EOF while the FIFO waits for the shell, between calls too.
    `identity` (device, inode) is what the path must still name whenever the agent opens it.
    """

    __slots__ = ("identity", "kind", "path", "reader", "writer")

    def __init__(self, kind: str, path: str, reader: int, writer: int, identity: Any) -> None:
        self.kind = kind
        self.path = path
        self.reader = reader
        self.writer = writer
        self.identity = identity


def _pids(shells: Iterable[_Shell]) -> Set[int]:
    """The pids `shells` started with (none for one still starting): a shell killed as it
    starts may have ended, and been reaped, by the time a kill's count reads this."""
    return {shell.spawned_pid for shell in shells if shell.spawned_pid}


class _Shell:
    """One slot's persistent shell: its process, its two channels, and its last known state.

    The agent writes script lines to the shell's stdin (``control_fd``) and reads one status
    record per call from the shell's stdout (``status_fd``); see `_Shells` for the protocol.
    """

    def __init__(self, slot: int, cwd: str) -> None:
        self.slot = slot
        #: The process while it lives (0 before its keeper says it started, and after its end).
        self.pid = 0
        #: The pid it started with, kept after its end (see `_pids`).
        self.spawned_pid = 0
        self.control_fd = -1
        self.status_fd = -1
        #: A memfd the shell writes ``export -p`` into (its fd 3) after every call, read when
        #: needed; -1 where there is no memfd (the text then comes on the status channel).
        self.env_fd = -1
        #: Where the memfd's next unread ``export -p`` text starts, and how many texts were
        #: read whole from it and how many records announced one (see `_Shells.exported`).
        self.env_offset = 0
        self.exports_seen = 0
        self.records_seen = 0
        #: Whether the shell has code that could run unseen (`_HOOK_PROBE`), as its last
        #: probe said; None: not known (a new shell, or one something but a call ran in).
        #: Without any, an `_inert` call needs no new ``export -p`` (see `_Shells.start`);
        #: a shell that has some is not probed again (it dumps after every call anyway).
        self.hooks: Optional[bool] = None
        self.unsent = b""
        self.records = bytearray()
        #: The output FIFOs, open, by kind ("o", "e"): no writer but the agent holds them
        #: between calls, and the next call uses them again.
        self.fifos: Dict[str, _Fifo] = {}
        self.fifo_count = 0
        #: The current call was interrupted (see `_Shells.kill_call`).
        self.interrupted = False
        self.current: Optional[_Exec] = None
        #: What the last finished call left: working directory and ``export -p`` text. A
        #: replacement shell starts from these.
        self.cwd = cwd
        self.exported: Optional[bytes] = None
        #: Set when the shell died between calls: the next call's result says it was replaced.
        self.report_restart = False
        #: Why it is being killed on purpose ("reset", "shutdown"); None while it serves.
        self.closing: Optional[str] = None
        #: Its keeper has not said yet that it started (see `_Shells._started`); calls are
        #: written to its stdin meanwhile, and it reads them once it runs.
        self.starting = False
        #: Its workspace was moved into a layer under it (a fork or checkpoint in place): its
        #: next call first re-enters its directory by path, into the overlay now there.
        self.recenter = False
        #: It stepped out to ``/`` so that an overlay could be unmounted (`_LEAVE_WORKSPACE`):
        #: its next call first goes back to its ``PWD`` and restores ``OLDPWD``.
        self.left = False
        #: What the shell looked like before it ran anything (`_SHELL_DUMP`; and masked, see
        #: `_masked_dump`): a reset keeps the shell only if it looks so again (see
        #: `_Shells.recycle`).
        #: None for a shell that cannot be kept (not bash, or a replacement that started from
        #: an earlier shell's state).
        self.pristine: Optional[bytes] = None
        self.pristine_masked = b""
        #: A reset in progress that keeps this shell: (reset request id, processes killed,
        #: round), until the shell's dump says whether it is pristine again.
        self.resetting: Optional[Tuple[int, int, int]] = None
        #: That request is an ``end_shell`` (nothing else of the slot is killed or wiped).
        self.ending = False


#: What a bash shell prints of its state, on its status channel (its stdout), in sections a
#: ``\1`` line names: variables, dir stack, functions, options, umask, then everything else
#: (aliases, traps, limits, completions, builtins, jobs, history, hashed commands, ``$0``,
#: ``$!``, ``$-``). The last line says whether LINENO, RANDOM and SRANDOM still change on their own
#: (an unset and reassigned one does not); the line before must have set ``$1`` to its
#: LINENO. Builtins are called as ``\builtin``: no alias or function stands in for them. It
#: ends with the record ``NUL 0 NUL cwd NUL <name> NUL ETX`` (see `_Shells.read_status`).
_DUMP_OWN = (
    "\\builtin printf '\\1vars\\n'; \\builtin declare -p; "
    "\\builtin printf '\\1dirs\\n'; \\builtin dirs -l -p; "
)
#: The part every new shell of this agent shows alike (see `_Shells.pristine_common`).
_DUMP_COMMON = (
    "\\builtin printf '\\1functions\\n'; \\builtin declare -F; "
    "\\builtin printf '\\1shopt\\n'; \\builtin shopt -p; "
    "\\builtin printf '\\1set\\n'; \\builtin set +o; "
    "\\builtin printf '\\1umask\\n'; \\builtin umask; "
    "\\builtin printf '\\1rest\\n'; \\builtin alias -p; \\builtin trap -p; "
    "\\builtin ulimit -a; \\builtin ulimit -Ha; \\builtin complete -p; "
    "\\builtin enable -a; \\builtin jobs -l; \\builtin history; \\builtin hash -l; "
    '\\builtin printf \'%%s\\n\' "$0" "$!" "$-" "$#"; '
    "[[ $1 -ne $LINENO && $RANDOM -ne $RANDOM && $SRANDOM -ne $SRANDOM ]] && "
    "\\builtin printf 'dynamic\\n'; "
)
_DUMP_END = "} 2>&1; \\builtin set --; \\builtin printf '\\0%%s\\0%%s\\0%s\\0\\3' 0 \"$PWD\"\n"
_SHELL_DUMP = "{ " + _DUMP_OWN + _DUMP_COMMON + _DUMP_END
#: Only the part of `_SHELL_DUMP` that differs between new shells (variables, cwd).
_SHELL_DUMP_OWN = "{ " + _DUMP_OWN + _DUMP_END
#: Builtins a command could shadow with a function of the same name; a reset removes such
#: functions first, in POSIX mode (where ``unset``, a special builtin, cannot be shadowed).
_SHADOWED_BUILTINS = (
    "alias builtin cd command complete declare dirs echo enable hash history jobs local "
    "printf pwd read set shift shopt test trap typeset ulimit umask unalias unset"
)
#: What shows whether a shell has code that could run or set a variable unseen while an
#: `_inert` command runs (see `_Shells.start`): functions (one could stand in for any
#: command), aliases and traps, printed by these builtins (nothing at all without any); then,
#: as the record's first field (`_HOOK_FIELD`), the prompt strings and PROMPT_COMMAND (an
#: interactive shell expands them at every line) and MAILPATH (its messages are expanded),
#: and the shell's flags (``x``: PS4 is expanded; ``H``: history expansion). See `_has_hooks`.
_HOOK_PROBE = "\\command declare -F; \\command alias -p; \\command trap -p; "
_HOOK_FIELD = '"${PS0-}${PS1-}${PS2-}${PROMPT_COMMAND[*]-}${MAILPATH-} $-"'


def _has_hooks(text: bytes) -> bool:
    """Whether what `_HOOK_PROBE` and `_HOOK_FIELD` printed shows a hook (``$-`` ends it)."""
    printed, _, flags = text.rpartition(b" ")
    return printed != b"" or b"x" in flags or b"H" in flags


#: Variables bash keeps itself, never unset or set by a reset (unset, they would lose what
#: makes them special): their values change on their own (BASH_ARGC and BASH_ARGV keep an
#: entry from the last sourced call), so a dump is compared without them.
_SHELL_DYNAMIC = frozenset(
    (
        "_",
        "BASH_ARGC",
        "BASH_ARGV",
        "BASH_COMMAND",
        "BASH_SUBSHELL",
        "BASHPID",
        "EPOCHREALTIME",
        "EPOCHSECONDS",
        "HISTCMD",
        "LINENO",
        "PIPESTATUS",
        "RANDOM",
        "SECONDS",
        "SRANDOM",
    )
)
_DYNAMIC_VALUES = re.compile(
    b"^(declare -[^ ]+ (?:%s))=.*$" % "|".join(sorted(_SHELL_DYNAMIC)).encode(), re.MULTILINE
)
#: Variables bash keeps itself whose values a dump does compare (a reset leaves them alone).
_SHELL_INTERNAL = frozenset(
    (
        "BASH_ALIASES",
        "BASH_ARGV0",
        "BASH_CMDS",
        "BASH_LINENO",
        "BASH_SOURCE",
        "COMP_WORDBREAKS",
        "DIRSTACK",
        "FUNCNAME",
        "GROUPS",
    )
)
#: How long a shell kept at a reset has to show it is pristine again before it is replaced.
SHELL_RESET_S = 2.0


def _dump_sections(dump: bytes) -> Dict[str, List[bytes]]:
    """A shell dump (`_SHELL_DUMP`) by section name: its lines."""
    sections: Dict[str, List[bytes]] = {}
    for part in dump.split(b"\1")[1:]:
        name, _, body = part.partition(b"\n")
        sections[name.decode("ascii", "replace")] = body.splitlines()
    return sections


def _masked_dump(dump: bytes) -> bytes:
    """A dump, values of `_SHELL_DYNAMIC` variables dropped (their attributes kept)."""
    return _DYNAMIC_VALUES.sub(b"\\1", dump)


def _function_names(dump: bytes) -> List[bytes]:
    """The function names a dump's functions section lists (``declare -f NAME``)."""
    names = []
    for line in _dump_sections(dump).get("functions", []):
        parts = line.split(b" ", 2)
        if len(parts) == 3 and parts[0] == b"declare" and parts[1].startswith(b"-f"):
            names.append(parts[2])
    return names


def _declared(lines: List[bytes]) -> Dict[bytes, Tuple[bytes, bytes]]:
    """A dump's variables: name -> (attributes, the masked ``declare`` line)."""
    found = {}
    for line in _masked_dump(b"\n".join(lines)).split(b"\n"):
        parts = line.split(b" ", 2)
        if len(parts) == 3 and parts[0] == b"declare":
            found[parts[2].split(b"=", 1)[0]] = (parts[1], line)
    return found


def _check_script(token: int) -> bytes:
    """The lines a kept shell gets first at a reset: no errexit or nounset (the dump must not
    end the shell: a new shell has neither); SECONDS counts from now, as in a new shell; the
    positional parameters are dropped (``$1`` carries the LINENO probe); a dump."""
    text = '\\builtin set +eu; SECONDS=0; \\builtin set -- "$LINENO"\n' + _SHELL_DUMP % (
        "R%d" % token
    )
    return text.encode()


def _fix_script(pristine: bytes, dump: bytes, workspace: str, token: int) -> Optional[bytes]:
    """Lines that put a bash shell whose dump is `dump` back as `pristine` shows it, then dump
    it again; None when some difference cannot be undone (the shell is replaced then).

    They run at the shell's top level, in POSIX mode while they work (special builtins such
    as ``unset`` come before functions; an assignment needs no command): functions go (those
    the dump lists, and any named like a builtin used here), traps go back to their defaults,
    options are set as they were, variables the pristine shell did not have are unset and
    changed ones set again as they were; aliases, hashed commands, completions, the dir stack,
    cwd and umask are reset. bash's own dynamic variables cannot be set back (unset, they
    lose what makes them special), nor can a readonly variable, ``$!``, a job, a lowered hard
    limit or a disabled builtin: a difference there gives None.
    """
    before = _dump_sections(pristine)
    after = _dump_sections(dump)
    was = _declared(before.get("vars", []))
    now = _declared(after.get("vars", []))
    fixable_internal = {b"DIRSTACK", b"BASH_ALIASES", b"BASH_CMDS"}
    drop = []
    replay = []
    for name, (attributes, _) in now.items():
        if name not in was:
            if b"r" in attributes:
                return None
            drop.append(name)
    for name, (attributes, line) in was.items():
        if now.get(name) == (attributes, line) and name not in (b"PWD", b"OLDPWD"):
            continue  # (PWD and OLDPWD are set again after the fix's cd)
        if name in (b"BASHOPTS", b"SHELLOPTS"):
            continue  # (readonly, and follow the options, which are set back)
        text = name.decode("ascii", "replace")
        if b"r" in attributes or text in _SHELL_DYNAMIC:
            return None
        if text in _SHELL_INTERNAL:
            if name not in fixable_internal:
                return None
            continue
        if name in now and b"r" in now[name][0]:
            return None
        drop.append(name)
        replay.append(b"\\builtin " + line)
    rest_before = before.get("rest", [])
    rest_after = after.get("rest", [])
    # The dump ends with $0, $!, $-, $# and the dynamic-variable probe: $- follows the
    # options (set back here), the others cannot be set back.
    if (
        len(rest_after) < 5
        or rest_before[-5:-3] + rest_before[-1:] != rest_after[-5:-3] + rest_after[-1:]
    ):
        return None
    options = []
    for line in before.get("set", []):
        parts = line.decode("ascii", "replace").split()
        if len(parts) == 3 and parts[2] != "posix":
            options += parts[1:]
    shopts: Dict[str, List[str]] = {"-s": [], "-u": []}
    for line in before.get("shopt", []):
        parts = line.decode("ascii", "replace").split()
        # (Not the read-only ones, nor compat levels: setting those also sets BASH_COMPAT.)
        settable = parts[2] not in ("login_shell", "restricted_shell") if len(parts) == 3 else False
        if settable and parts[1] in shopts and not parts[2].startswith("compat"):
            shopts[parts[1]].append(parts[2])
    umask = b"".join(before.get("umask", [])).decode("ascii", "replace").strip() or "0022"
    signals = [str(n) for n in range(1, 65) if n not in (signal.SIGKILL, signal.SIGSTOP, 32, 33)]
    functions = [
        _shell_quote(name.decode("utf-8", "surrogateescape")) for name in _function_names(dump)
    ]
    lines = [
        "POSIXLY_CORRECT=y",
        "\\unset -f -- %s %s" % (_SHADOWED_BUILTINS, " ".join(functions)),
        "\\trap - EXIT DEBUG ERR RETURN " + " ".join(signals),
        "\\builtin set " + " ".join(options),
    ]
    for flag in ("-s", "-u"):
        if shopts[flag]:
            lines.append("\\builtin shopt %s %s" % (flag, " ".join(shopts[flag])))
    if drop:
        names = b" ".join(drop).decode("utf-8", "surrogateescape")
        # -n first: a nameref itself goes, not the variable it names; then -v: the others.
        lines.append("\\unset -n -- %s; \\unset -v -- %s" % (names, names))
    # (Unsetting BASH_XTRACEFD closes the fd it named: stderr is /dev/null again.)
    lines.append("\\exec 2>/dev/null; \\builtin cd -- %s" % _shell_quote(workspace))
    lines += [line.decode("utf-8", "surrogateescape") for line in replay]
    lines += [
        "\\builtin unalias -a",
        "\\builtin hash -r",
        "\\builtin complete -r",
        "\\builtin dirs -c",
        "\\builtin umask %s" % umask,
        "\\builtin set +o posix",
        "\\unset -v POSIXLY_CORRECT",
        '\\builtin set -- "$LINENO"',
    ]
    text = "; ".join(lines) + "\n" + _SHELL_DUMP % ("R%d" % token)
    return text.encode("utf-8", "surrogateescape")


class _Shells:
    """The persistent shells of every slot (``exec`` with ``"shell": "persistent"``).

    Protocol between the agent and a shell (an interactive bash, or ``sh -i`` without bash):

    * The shell reads its script from its stdin, a pipe only the agent writes to. A call is two
      lines. The first exports the call's env, then sources (``.``) the command, which follows
      as a quoted here-document (bash reads a sourced file whole before running it; the
      command's first words point its stdin at /dev/null: ``read`` gets EOF; other shells
      source a file of the slot, with ``</dev/null``), its stdout and stderr redirected to
      FIFOs of the slot (one FIFO for both when merged, so the order of writes is kept), and
      fd 3 closed. Sourcing runs the command at the top level (not in a function):
      ``declare``, aliases, ``cd``, functions and options persist, as typed in a terminal;
      and sourced code runs with bash's
      interactive messages off, so the output is what ``bash -c`` prints (no ``[1] PID``, no
      ``exit``). The shell is interactive for one reason: an interrupt ends the running line
      (a loop, a list) and the shell goes on reading, where a non-interactive shell would exit.
      No file is written per call.
    * The second line writes the status record ``NUL status NUL cwd NUL E<exec id> NUL ETX``
      to the shell's own stdout, the status channel, then ``export -p`` to its fd 3, a memfd
      the agent reads when needed (kept for a replacement shell or a checkpoint; without a
      memfd the text goes first on the status channel). No command holds fd 3 (the ``3>&-``)
      or the shell's stdout (the command's is its FIFO; bash restores the shell's after the
      ``.``, even past an ``exec >file`` inside it): nothing a command prints can end a call
      early or forge a status. Framing is never in-band in the output streams.
    * The record also shows whether the shell has hooks (`_HOOK_PROBE`: functions, aliases,
      traps, prompt strings, xtrace; its record is named H then, not E) until a probe found
      some. While the last probe found none, a call the agent sets nothing for and whose
      command is `_inert` (it cannot change a shell variable) writes only its record, named
      I: the last ``export -p`` text still holds, and bash saves about a third of a small
      call's work.
    * Output per call: a FIFO is reused only while no writer holds it. The agent keeps each
      FIFO open (a reader, and a writer of its own so the reader sees no EOF while it waits),
      and the shell opens it by path for each call. When a call ends, the agent closes its own
      writer and reads to EOF: EOF means no one else writes, and the agent opens its writer
      again by path, refusing anything but the same FIFO (a command may have replaced it);
      if a background job of the call still holds the FIFO, the agent keeps draining and
      discarding it until its last writer is gone (a background server writing later must
      not die of SIGPIPE) and the next call gets a new FIFO, so the job's later output never
      reaches another result. No FIFO is opened, closed or (un)watched per call.
    * Timeout and cancel, once the shell is inside the call (its stdout is the call's FIFO):
      the shell is stopped (SIGSTOP), every process of the call gets SIGINT then SIGKILL
      (the shell's descendants and the orphans the slot's keeper adopted, started since the
      call began: older background jobs are spared), the shell gets SIGINT and is continued; it
      ends the call's line, as after Ctrl-C in a terminal, and reports (exit 124 after a
      timeout), keeping its state. A shell that does not report within `SHELL_KILL_GRACE_S`
      (it traps SIGINT, or never reached the command) is killed and replaced.
    * A shell that exits or dies (``exit 3``, ``exec sleep 1``, a signal) is replaced at the
      slot's next call by a new shell started through the same spawn path as every command
      (same uid, environment, HOME, session), in the last known working directory with the
      last known exported environment; the result of the call it died in (or the next call,
      when it died between calls) has ``shell_restarted`` set, with the shell's exit status.
    * Shutdown kills the shell with everything else of the slot. A reset does too, except,
      when asked to, for an idle bash that only ran calls (see `keepable`): the keeper kills
      everything else of the slot, and the shell is set back to the state it showed before its first
      call and checked (see `recycle`), because starting a shell costs about what three
      small commands cost. A shell that cannot be shown pristine again is killed as at any
      reset. Either way the slot's next lease sees a shell as new, except for what only
      the process itself shows: its pid, start time and CPU times, and how many lines it has
      read (``BASH_LINENO`` in a call). The shell is sealed (see `_spawn_as`): no command can
      ptrace it or write its memory. A command that deliberately subverts its own shell from
      inside (a DEBUG trap with ``extdebug`` may skip or fake any command of the check) is not
      defended against: so a reset keeps a shell only when asked to (``keep_shell``, the
      profile's ``reuse_shell``, off by default).
    """

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.by_slot: Dict[int, _Shell] = {}
        self.by_pid: Dict[int, _Shell] = {}
        self.execs: Dict[int, _Exec] = {}  # running calls, by exec id
        self.lingering: Dict[int, int] = {}  # fd of a finished call's FIFO -> its slot
        self.directory: Optional[str] = None
        self.program = _find_shell()[0]
        self.is_bash = os.path.basename(self.program) == "bash"
        self.program_path = os.path.realpath(self.program)
        #: What every new shell here shows alike (`_DUMP_COMMON`), from the first one's dump:
        #: later new shells dump only their own part (a new process runs that code for the
        #: first time, at a cost of its page faults).
        self.pristine_common: Optional[bytes] = None
        self.ticks_per_second = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    # -- calls ----------------------------------------------------------------------------------

    def start(
        self,
        ex: _Exec,
        command: str,
        extra_env: Dict[str, str],
        cwd: Optional[str],
        cap: int,
        merge_stderr: bool,
    ) -> None:
        """Run `command` in the slot's shell (started first if needed); replies when it ends."""
        agent = self.agent
        shell = self.by_slot.get(ex.slot)
        if shell is not None and shell.resetting is not None and shell.resetting[2] > 0:
            # A call while a reset or end_shell checks its shell (a host that did not wait
            # for the reply): that shell is not kept after all.
            self._replace_at_reset(shell)
        if shell is not None and shell.closing is not None:
            # Killed on purpose and not reaped yet (a call cancelled while it started): a new
            # shell serves this call, with nothing of that one.
            shell = None
        if shell is None or (shell.pid == 0 and not shell.starting):
            try:
                shell = self.spawn(ex.slot, shell)
            except OSError as exc:
                agent.reply_not_started(ex, self.program, exc)
                return
        ex.in_shell = True
        ex.stdout = _Capture(cap)
        ex.stderr = _Capture(cap)
        for attempt in (1, 2):
            try:
                paths = self._open_fifos(shell, ex, merge_stderr)
                break
            except OSError as exc:
                self._drop_fifos(shell)
                ex.fds.clear()
                ex.fifos.clear()
                if attempt == 2 or exc.errno not in (errno.ENOENT, errno.ELOOP):
                    agent.reply_not_started(ex, "the shell's FIFOs", exc)
                    return
                if exc.errno == errno.ENOENT:
                    # Our directory was removed under us (see `slot_directory`): make it again.
                    self.directory = None
                # (ELOOP: a command replaced a FIFO; the next try makes new ones.)
        parts: List[str] = []
        for key in sorted(extra_env):
            parts.append("\\command export %s=%s" % (key, _shell_quote(extra_env[key])))
        if shell.left:
            # Back where it was (by path: into the overlay now there), OLDPWD as it was.
            parts.append(
                '\\command cd -- "$1" >/dev/null 2>&1; '
                'if \\command [ -n "$3" ]; then OLDPWD=$2; else \\command unset OLDPWD; fi; '
                "\\command shift 3"
            )
            shell.left = False
            shell.recenter = False
        if cwd is not None:
            parts.append("\\command cd -- %s >/dev/null 2>&1" % _shell_quote(cwd))
        elif shell.recenter:
            # OLDPWD (set or not) stays what it was: `cd -` still goes where it went.
            parts.append(
                '\\command set -- "${OLDPWD-}" "${OLDPWD+x}" "$@"; '
                '\\command cd -- "$PWD" >/dev/null 2>&1; '
                'if \\command [ -n "$2" ]; then OLDPWD=$1; else \\command unset OLDPWD; fi; '
                "\\command shift 2"
            )
        shell.recenter = False
        # A call that cannot change the exported environment keeps the last ``export -p``
        # text (about a third of what bash spends on a small call): the agent sets nothing
        # first, the shell has no code of its own that could run unseen (its last dump
        # said so), and the command is `_inert`.
        inert = (
            self.is_bash
            and shell.env_fd >= 0
            and shell.hooks is False
            and not parts
            and _inert(command)
        )
        redirect = "2>&1" if merge_stderr else "2>|%s" % _shell_quote(paths[1])
        body = command.encode("utf-8", "surrogateescape")
        if not body.endswith(b"\n"):
            body += b"\n"
        outputs = ">|%s %s 3>&-" % (_shell_quote(paths[0]), redirect)
        if self.is_bash:
            # bash reads a sourced file whole before running it, so the command can come as
            # a quoted here-document on the shell's own stdin (a pipe: no file is written per
            # call), and the command's stdin is at EOF, as from /dev/null.
            # A here-document past a pipe's size (or any, before bash 5.1) is a file, which
            # ``/dev/stdin`` reopens at its start: the command's stdin would still hold the
            # whole text. Its first words give it /dev/null (the ``.`` builtin's redirections
            # are undone after it, so the shell's stdin comes back), on its first line: the
            # command's $LINENO stays its own.
            body = b"\\command exec 0</dev/null; " + body
            delimiter = _heredoc_delimiter(body, "HERMES_%s_%d" % (agent.nonce, ex.exec_id))
            parts.append("\\command . /dev/stdin <<'%s' %s" % (delimiter, outputs))
            body += delimiter.encode("ascii") + b"\n"
        else:
            # Other shells read a sourced file as they run it: it must be a file, and the
            # command's stdin /dev/null.
            try:
                script = self._write_command(ex.slot, body)
            except OSError as exc:
                self._drop_fifos(shell)
                ex.fds.clear()
                ex.fifos.clear()
                agent.reply_not_started(ex, "the shell's command file", exc)
                return
            parts.append(". %s </dev/null %s" % (_shell_quote(script), outputs))
            body = b""
        # The record is its own line (an interrupt, see `kill_call`, ends the call's line
        # only), written to the shell's own stdout, the status channel: no redirection (each
        # costs about ten syscalls, saved and restored) before the reply. The exported
        # environment is kept for a replacement shell or a checkpoint: after the record, so
        # the reply does not wait for it, ``export -p`` goes to fd 3, the memfd, ended by a
        # NUL (``export -p`` never prints one; see `exported`); without a memfd it goes first
        # on the status channel, and the record ends it. The status waits in $1 meanwhile (a
        # variable would show up in `set`); `shift` gives the positional parameters back.
        #
        # Until a probe found hooks, bash's hooks go to the status channel too, before and
        # as the record's first field (a shell without any writes nothing more), named H. An
        # inert call (see above) writes the record alone, named I.
        if inert:
            record = '\\command printf \'\\0%%s\\0%%s\\0I%d\\0\\3\' "$?" "$PWD"\n' % ex.exec_id
        else:
            probe = self.is_bash and shell.env_fd >= 0 and shell.hooks is not True
            prefix, field, kind = (_HOOK_PROBE, _HOOK_FIELD, "H") if probe else ("", "''", "E")
            report = '%s\\command printf \'%%s\\0%%s\\0%%s\\0%s%d\\0\\3\' %s "$1" "$PWD"' % (
                prefix,
                kind,
                ex.exec_id,
                field,
            )
            if shell.env_fd >= 0:
                report += "; { \\command export -p; \\command printf '\\0'; } >&3"
                self.rewind_exported(shell)
            else:
                report = "\\command export -p; %s" % report
            record = '\\command set -- "$?" "$@"; %s; \\command shift\n' % report
        line = ("; ".join(parts) + "\n").encode("utf-8", "surrogateescape") + body + record.encode()
        ex.pid = shell.pid or -1  # -1: the shell is starting (see `_started`)
        ex.started = time.monotonic()
        ex.start_tick = self.now_tick()
        shell.current = ex
        self.execs[ex.exec_id] = ex
        agent.by_request[ex.request_id] = ex
        self.send_script(shell, line)

    def spawn(self, slot: int, previous: Optional[_Shell]) -> _Shell:
        """Start the slot's shell; a `previous` one that died hands over its cwd and exports."""
        agent = self.agent
        workspace = agent.workspace(slot)
        shell = _Shell(slot, workspace)
        # Interactive, as in a terminal: aliases expand, and an interrupt ends the running
        # line (a loop too) and returns to reading the next one instead of ending the shell.
        # No history, no history expansion (``!`` stays literal), no prompts.
        if self.is_bash:
            script = [
                "\\command set +H +o history; PS1=; PS2=; PS0=; PROMPT_COMMAND=; unset HISTFILE"
            ]
        else:
            script = ["PS1=; PS2=; unset HISTFILE"]
        cwd = workspace
        env = agent.command_env(slot)
        # A slot's bash starts sealed (see `_spawn_as`), which costs it a few variables: its
        # first line gives them back, so its commands see the environment a fresh one does.
        sealed = self.is_bash and agent.slot_uid(slot) is not None
        dropped = sorted(
            name
            for name in env
            if sealed
            and _is_shell_name(name)
            and (name in _SEALED_DROPS or name.startswith(_SEALED_DROP_PREFIXES))
        )
        if dropped and not (previous is not None and previous.exported):
            script.append(
                "\\command export "
                + " ".join("%s=%s" % (name, shlex.quote(env[name])) for name in dropped)
            )
        if previous is not None:
            shell.cwd = previous.cwd
            shell.exported = previous.exported
            if os.path.isdir(previous.cwd):
                cwd = previous.cwd
            if previous.exported:
                # Exactly the last exported set: what the process starts with goes, then the
                # last ``export -p`` is replayed at the top level (declarations stay global).
                names = " ".join(name for name in sorted(env) if _is_shell_name(name))
                script.append(
                    "{ \\command unset -v %s; %s\n} >/dev/null 2>&1"
                    % (
                        names,
                        previous.exported.decode("utf-8", "surrogateescape"),
                    )
                )
        control_read, control_write = os.pipe()
        status_read, status_write = os.pipe()
        # The shell's own stdout is its status channel and its fd 3 its memfd (see `start`):
        # every call's command has its own stdout and no fd 3, so only the shell's top level
        # writes there.
        memfd_create = getattr(os, "memfd_create", None)
        if memfd_create is not None:
            with contextlib.suppress(OSError):
                shell.env_fd = memfd_create("hermes-shell-env", os.MFD_CLOEXEC)
        exported = shell.env_fd if shell.env_fd >= 0 else agent.devnull
        fds = [control_read, status_write, agent.devnull, exported]
        if self.is_bash:
            argv = [self.program, "--noediting", "--noprofile", "--norc", "-i"]
        else:
            argv = [self.program, "-i"]
        try:
            # Through the slot's keeper like every command: the shell and all it starts are
            # the keeper's descendants; the keeper reports the shell's end. Without waiting:
            # the agent serves on while the keeper starts it (see `_started`).
            agent.spawn_in_slot_nowait(
                slot, argv, env, cwd, fds, functools.partial(self._started, shell), sealed
            )
        except OSError:
            for fd in (control_read, control_write, status_read):
                os.close(fd)
            if shell.env_fd >= 0:
                os.close(shell.env_fd)
            raise
        finally:
            os.close(status_write)
        os.close(control_read)
        shell.starting = True
        shell.control_fd = control_write
        shell.status_fd = status_read
        if previous is not None:
            shell.report_restart = previous.report_restart
        os.set_blocking(control_write, False)
        os.set_blocking(status_read, False)
        agent.selector.register(status_read, selectors.EVENT_READ, self._status_callback(shell))
        self.by_slot[slot] = shell
        agent.slots_used.add(slot)
        init = "; ".join(script) + "\n"
        if self.is_bash and previous is None:
            # What a new shell looks like, before any call: a reset keeps the shell only if
            # it looks so again (see `recycle`).
            dump = _SHELL_DUMP % "P" if self.pristine_common is None else _SHELL_DUMP_OWN % "Q"
            init = init[:-1] + '; \\builtin set -- "$LINENO"\n' + dump
        self.send_script(shell, init.encode("utf-8", "surrogateescape"))
        return shell

    def _started(self, shell: _Shell, reply: Dict[str, Any]) -> None:
        """The keeper's answer to a shell's spawn (before any notice of the shell's end)."""
        shell.starting = False
        if "pid" in reply:
            shell.pid = shell.spawned_pid = int(reply["pid"])
            self.by_pid[shell.pid] = shell
            if shell.current is not None and shell.current.pid == -1:
                shell.current.pid = shell.pid
            if shell.closing is not None:
                # Closed while it started (reset, end_shell, shutdown): its end is reported
                # after this reply, so the pid is still its own. Its reap finishes the rest.
                with contextlib.suppress(OSError):
                    os.kill(shell.pid, signal.SIGKILL)
            return
        # It could not start (or its keeper is gone): the call waiting for it ends unrun.
        self._close_channels(shell)
        if self.by_slot.get(shell.slot) is shell:
            del self.by_slot[shell.slot]
        ex = shell.current
        if ex is None:
            return
        if ex.kill_reason is None:
            code = int(reply.get("errno") or errno.EIO)
            message = "hermes-agent: %s: %s\n" % (self.program, reply.get("message") or code)
            assert ex.stderr is not None
            ex.stderr.feed(message.encode("utf-8", "replace"))
            self.finish(shell, ex, 127 if code == errno.ENOENT else 126, None, restarted=False)
        else:
            self.finish(shell, ex, -signal.SIGKILL, int(signal.SIGKILL), restarted=False)

    def _write_command(self, slot: int, data: bytes) -> str:
        """Put the command in the slot's command file (shells other than bash); its path."""
        script = os.path.join(self.slot_directory(slot), "command")
        # Made anew, never opened through a symlink: the slot's commands write here too.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(script)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(script, flags, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        return script

    def _open_fifos(self, shell: _Shell, ex: _Exec, merge_stderr: bool) -> List[str]:
        """Give the call the shell's output FIFOs (one when merged); their paths."""
        agent = self.agent
        paths = []
        assert ex.stdout is not None
        assert ex.stderr is not None
        callback = agent._output_callback(ex)
        for kind, capture in (("o", ex.stdout), ("e", ex.stderr)):
            if kind == "e" and merge_stderr:
                break
            fifo = self.fifo(shell, kind)
            ex.fds[fifo.reader] = capture
            ex.fifos[fifo.reader] = fifo
            # (Watched already: a new callback is no system call.)
            agent.selector.modify(fifo.reader, selectors.EVENT_READ, callback)
            paths.append(fifo.path)
        return paths

    def fifo(self, shell: _Shell, kind: str) -> _Fifo:
        """A FIFO for a call's output: the slot's last one of that kind, unless a background
        job of an earlier call still holds it, or it was replaced (then a new one)."""
        fifo = shell.fifos.get(kind)
        if fifo is not None:
            # The shell opens it by path: the path must still name it (a background job may
            # have replaced it since the last call; the shell would block on a FIFO nobody
            # reads, or write elsewhere).
            try:
                status = os.lstat(fifo.path)
            except OSError:
                status = None
            if status is not None and (status.st_dev, status.st_ino) == fifo.identity:
                return fifo
            self._release(shell, fifo, None, keep=False)
        shell.fifo_count += 1
        path = os.path.join(self.slot_directory(shell.slot), "%s%d" % (kind, shell.fifo_count))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.mkfifo(path, 0o600)
        uid = self.agent.slot_uid(shell.slot)
        if uid is not None:
            # Never through a symlink: the slot's commands may write in this directory.
            os.chown(path, uid, uid, follow_symlinks=False)
        reader, identity = _open_fifo(path, os.O_RDONLY)
        try:
            # Our own writer (a reader exists: a non-blocking open succeeds), so the reader
            # never reads EOF while it waits for the shell.
            writer = _open_fifo(path, os.O_WRONLY, identity)[0]
        except OSError:
            os.close(reader)
            raise
        fifo = _Fifo(kind, path, reader, writer, identity)
        self.agent.selector.register(reader, selectors.EVENT_READ, self._idle_callback)
        shell.fifos[kind] = fifo
        return fifo

    def _idle_callback(self, fd: int, mask: int) -> None:
        # Between calls only someone who opened the FIFO by path writes: nobody's output.
        _drain_to_eof(fd, None)

    def _release(self, shell: _Shell, fifo: _Fifo, capture: Optional[_Capture], keep: bool) -> None:
        """After a call (or with its shell): take what the FIFO holds, and keep it for the
        next call if `keep` and no one but the agent writes into it; else let it go.

        The agent's own writer is closed first, so that reading to EOF proves no writer is
        left (what a finished call wrote is all buffered: the shell reported after it).
        """
        agent = self.agent
        if fifo.writer >= 0:
            os.close(fifo.writer)
            fifo.writer = -1
        kept = shell.fifos.get(fifo.kind) is fifo
        if _drain_to_eof(fifo.reader, capture):
            if keep and kept:
                try:
                    # By path, as the shell will open it: it must still be this FIFO.
                    fifo.writer = _open_fifo(fifo.path, os.O_WRONLY, fifo.identity)[0]
                except OSError:
                    pass  # replaced or removed: the next call makes a new one
                else:
                    agent.selector.modify(fifo.reader, selectors.EVENT_READ, self._idle_callback)
                    return
            if kept:
                del shell.fifos[fifo.kind]
            agent.selector.unregister(fifo.reader)
            os.close(fifo.reader)
            return
        # A background job of the call still holds it: discarded until its last writer is
        # gone, and the next call gets a new FIFO.
        if kept:
            del shell.fifos[fifo.kind]
        with contextlib.suppress(OSError):
            os.unlink(fifo.path)
        self.lingering[fifo.reader] = shell.slot
        agent.selector.modify(fifo.reader, selectors.EVENT_READ, self._discard_callback)

    def _drop_fifos(self, shell: _Shell) -> None:
        """Let go of the shell's FIFOs; those of its running call at the call's end."""
        current = shell.current.fifos if shell.current is not None else {}
        for fifo in list(shell.fifos.values()):
            if fifo.reader in current:
                del shell.fifos[fifo.kind]
            else:
                self._release(shell, fifo, None, keep=False)

    def slot_directory(self, slot: int) -> str:
        """A directory for the slot's FIFOs, outside its workspace, reachable by its uid only."""
        agent = self.agent
        if self.directory is None:
            directory = os.path.join(agent.workspace_root, ".hermes-shells-" + agent.nonce)
            os.mkdir(directory, 0o711)
            os.chmod(directory, 0o711)
            self.directory = directory
        path = os.path.join(self.directory, "slot-%d" % slot)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            return path
        except FileNotFoundError:
            # Someone removed our directory (a command running as the agent's uid can): make
            # it again, once.
            self.directory = None
            for shell in self.by_slot.values():
                self._drop_fifos(shell)
            return self.slot_directory(slot) if os.path.isdir(agent.workspace_root) else path
        uid = agent.slot_uid(slot)
        if uid is not None:
            os.chown(path, uid, uid)
        return path

    def now_tick(self) -> int:
        """The kernel's clock now, in the ticks /proc/PID/stat counts process start times in."""
        return int(time.clock_gettime(time.CLOCK_BOOTTIME) * self.ticks_per_second)

    # -- the channels ---------------------------------------------------------------------------

    def send_script(self, shell: _Shell, data: bytes) -> None:
        if shell.unsent:
            shell.unsent += data
            return
        try:
            written = _write_all_nonblocking(shell.control_fd, data)
        except OSError:  # the shell is gone: its reap ends the call
            return
        if written < len(data):
            shell.unsent = data[written:]
            self.agent.selector.register(
                shell.control_fd, selectors.EVENT_WRITE, self._control_callback(shell)
            )

    def _control_callback(self, shell: _Shell) -> Callable[[int, int], None]:
        def on_writable(fd: int, mask: int) -> None:
            try:
                written = _write_all_nonblocking(fd, shell.unsent[: 1 << 20])
            except OSError:
                written = len(shell.unsent)
            shell.unsent = shell.unsent[written:]
            if not shell.unsent:
                self.agent.selector.unregister(fd)

        return on_writable

    def _status_callback(self, shell: _Shell) -> Callable[[int, int], None]:
        def on_status(fd: int, mask: int) -> None:
            self.read_status(shell)

        return on_status

    def read_status(self, shell: _Shell) -> None:
        """Take what the shell wrote on its status channel and finish the calls it reports."""
        while shell.status_fd >= 0:
            try:
                data = os.read(shell.status_fd, _READ_CHUNK)
            except BlockingIOError:
                break
            except OSError:
                data = b""
            if not data:
                # Nothing holds the write end any more: the shell is gone (its reap says how).
                self.agent.selector.unregister(shell.status_fd)
                os.close(shell.status_fd)
                shell.status_fd = -1
                break
            shell.records += data
            if len(data) < _READ_CHUNK:
                break  # all there was (the fd is watched: more wakes us again)
        while True:
            end = shell.records.find(b"\0\3")
            if end < 0:
                break
            # A record is ``text NUL status NUL cwd NUL E<exec id> NUL ETX``; the text is
            # ``export -p`` without a memfd; H for E: the text shows the hooks (`_has_hooks`);
            # I for E: an inert call (no text).
            fields = bytes(shell.records[:end]).split(b"\0")
            del shell.records[: end + 2]
            if len(fields) < 4 or fields[-1][:1] not in (b"E", b"H", b"I", b"P", b"Q", b"R"):
                continue
            exported, status, cwd, name = fields[-4:]
            if name in (b"P", b"Q"):
                common = exported.find(b"\1functions\n")
                if name == b"P" and self.pristine_common is None and common >= 0:
                    self.pristine_common = exported[common:]
                if name == b"Q" and self.pristine_common is not None:
                    exported += self.pristine_common
                shell.pristine = exported
                shell.pristine_masked = _masked_dump(exported)
                continue
            if name.startswith(b"R"):
                self._reset_dump(shell, name, exported)
                continue
            shell.cwd = os.fsdecode(cwd) or shell.cwd
            if name[:1] == b"I":
                pass  # an inert call: no ``export -p`` text, the last one stands
            elif shell.env_fd >= 0:
                shell.records_seen += 1  # its ``export -p`` follows in the memfd
                if name[:1] == b"H":
                    shell.hooks = _has_hooks(exported)
            else:
                shell.exported = exported
            ex = shell.current
            if ex is None or name[1:] != b"%d" % ex.exec_id:
                continue
            try:
                exit_code = int(status)
            except ValueError:
                exit_code = 1
            self.finish(shell, ex, exit_code, None, restarted=shell.report_restart)
            shell.report_restart = False
            shell.interrupted = False

    def exported(self, shell: _Shell, wait_s: float = 0.0) -> Optional[bytes]:
        """The shell's last complete ``export -p`` text (None before its first call ended).

        With a memfd, each call's text follows its record there, ended by a NUL; it is read
        here, when someone needs it, not per call. `wait_s` > 0 waits (bounded) for the text
        of the last call reported, which a live shell writes right after the record.
        """
        self._read_exported(shell)
        if wait_s > 0 and shell.env_fd >= 0 and shell.exports_seen < shell.records_seen:
            deadline = time.monotonic() + wait_s
            pause = 0.0001
            while shell.exports_seen < shell.records_seen and shell.pid > 0:
                if time.monotonic() > deadline:
                    break
                time.sleep(pause)
                pause = min(pause * 2, 0.01)
                self._read_exported(shell)
        return shell.exported

    def _read_exported(self, shell: _Shell) -> None:
        """Take the complete texts the shell wrote into its memfd since the last look."""
        fd = shell.env_fd
        if fd < 0:
            return
        chunks = []
        offset = shell.env_offset
        try:
            while True:
                data = os.pread(fd, _ENV_CHUNK, offset)
                offset += len(data)
                chunks.append(data)
                if len(data) < _ENV_CHUNK:
                    break
        except OSError:
            return
        pending = b"".join(chunks)
        end = pending.rfind(b"\0")
        if end < 0:
            return  # nothing complete yet (a text being written stays for the next look)
        texts = pending[:end].split(b"\0")
        shell.exported = texts[-1]
        shell.exports_seen += len(texts)
        shell.env_offset += end + 1

    def rewind_exported(self, shell: _Shell) -> None:
        """Empty the shell's memfd once it has grown past `_ENV_REWIND_BYTES`.

        Only between calls, with the last call's text read whole: then the shell writes
        nothing there until its next call (which is being sent), and a write never lands in
        the middle of the rewind (the shell shares the memfd's offset).
        """
        if shell.env_offset <= _ENV_REWIND_BYTES:
            return
        self._read_exported(shell)
        if shell.exports_seen < shell.records_seen or shell.current is not None:
            return
        try:
            if os.fstat(shell.env_fd).st_size != shell.env_offset:
                return
            os.ftruncate(shell.env_fd, 0)
            os.lseek(shell.env_fd, 0, os.SEEK_SET)
        except OSError:
            return
        shell.env_offset = 0

    # -- ends of calls --------------------------------------------------------------------------

    def finish(
        self,
        shell: _Shell,
        ex: _Exec,
        exit_code: int,
        signal_number: Optional[int],
        restarted: bool,
    ) -> None:
        agent = self.agent
        self.execs.pop(ex.exec_id, None)
        if shell.current is ex:
            shell.current = None
        agent.exec_done(ex)
        # (A shell that ran the call before its keeper's word that it started is alive too.)
        alive = shell.pid > 0 or shell.starting
        keep = alive and shell.closing is None and self.by_slot.get(ex.slot) is shell
        for fd, fifo in list(ex.fifos.items()):
            capture = ex.fds.get(fd)
            if capture is not None:
                self._release(shell, fifo, capture, keep)
                continue
            # Its reader failed and was closed during the call (`_output_callback`).
            if shell.fifos.get(fifo.kind) is fifo:
                del shell.fifos[fifo.kind]
            if fifo.writer >= 0:
                os.close(fifo.writer)
                fifo.writer = -1
        ex.fifos.clear()
        ex.fds.clear()
        timed_out = ex.kill_reason == "timeout"
        cancelled = ex.kill_reason in ("cancel", "reset", "shutdown")
        if timed_out:
            exit_code, signal_number = 124, None
        elif cancelled:
            exit_code, signal_number = -signal.SIGKILL, int(signal.SIGKILL)
        assert ex.stdout is not None
        assert ex.stderr is not None
        stdout, stdout_dropped = ex.stdout.result()
        stderr, stderr_dropped = ex.stderr.result()
        result = _exec_result(
            exit_code,
            signal_number,
            timed_out,
            cancelled,
            time.monotonic() - ex.started,
            stdout,
            stdout_dropped,
            stderr,
            stderr_dropped,
        )
        result["shell_restarted"] = restarted
        agent.send({"id": ex.request_id, "ok": True, "result": result})

    def _discard_callback(self, fd: int, mask: int) -> None:
        if _drain_to_eof(fd, None):
            self._close_lingering(fd)

    def _close_lingering(self, fd: int) -> None:
        self.lingering.pop(fd, None)
        self.agent.selector.unregister(fd)
        os.close(fd)

    def on_reaped(self, pid: int, status: int) -> None:
        """A shell process ended: finish its call, and let the next call start a replacement."""
        shell = self.by_pid.pop(pid, None)
        if shell is None:
            return
        self.read_status(shell)  # a call that ended just before the shell did
        self._close_channels(shell)
        shell.pid = 0
        ex = shell.current
        if shell.resetting is not None and shell.resetting[2] > 0:
            # It died while a reset checked it: the reset goes on as one that does not keep
            # the shell (the keeper's kill has been done).
            request_id, killed, _ = shell.resetting
            shell.resetting = None
            shell.closing = shell.closing or "reset"
            if self.by_slot.get(shell.slot) is shell:
                del self.by_slot[shell.slot]
            if shell.ending:
                self.agent.send({"id": request_id, "ok": True, "result": {"ended": True}})
            else:
                self.agent._reply_reset(request_id, shell.slot, killed)
            return
        if shell.closing is not None:
            if self.by_slot.get(shell.slot) is shell:
                del self.by_slot[shell.slot]
            if ex is not None:
                if ex.kill_reason is None:
                    ex.kill_reason = shell.closing
                self.finish(shell, ex, -signal.SIGKILL, int(signal.SIGKILL), restarted=False)
            return
        if ex is None:
            shell.report_restart = True
            return
        exit_code, signal_number = _exit_code_of(status)
        self.finish(shell, ex, exit_code, signal_number, restarted=True)
        shell.report_restart = False

    def _close_channels(self, shell: _Shell) -> None:
        self._drop_fifos(shell)
        selector = self.agent.selector
        for fd in (shell.control_fd, shell.status_fd):
            if fd >= 0:
                with contextlib.suppress(KeyError):
                    selector.unregister(fd)
                os.close(fd)
        if shell.env_fd >= 0:
            self._read_exported(shell)  # what a replacement shell starts from
            os.close(shell.env_fd)
        shell.control_fd = shell.status_fd = shell.env_fd = -1
        shell.unsent = b""

    # -- resets that keep the shell ------------------------------------------------------------

    def keepable(self, slot: int) -> Optional[_Shell]:
        """The slot's shell, if a reset may keep it for the slot's next lease: a bash with a
        pristine dump, idle between calls, and nothing else of the slot at work (a fresh
        command, a tree op, an overlay). Starting a shell
        costs about what three small commands do: a lease that only ran commands is set back
        instead (see `recycle`)."""
        shell = self.by_slot.get(slot)
        if shell is None or shell.pristine is None or not shell.pid or shell.starting:
            return None
        if shell.closing is not None or shell.current is not None or shell.resetting:
            return None
        if shell.unsent or shell.recenter or shell.left or shell.report_restart:
            return None
        agent = self.agent
        if slot in agent.trees.overlays:
            return None
        if agent._slot_helpers(slot) or any(ex.slot == slot for ex in agent.execs.values()):
            return None
        return shell

    def recycle(self, shell: _Shell, request_id: int, killed: int, ending: bool = False) -> None:
        """A reset's second step, once the keeper killed everything of the slot but `shell`:
        the shell dumps its state; if it is the pristine dump, the shell is kept; if not, one
        round of `_fix_script` sets it back and it dumps again; still not pristine (or not
        answering within `SHELL_RESET_S`), it is replaced as at any reset. The dump is
        compared whole (variables with their attributes, functions, options, aliases, traps,
        umask, limits, dir stack, completions, builtins, jobs, history, hashed commands, ``$0``,
        ``$!``), and the kernel's view too: no child, the same program, no fd but its own.
        `ending`: for ``end_shell`` (the slot's other processes stay, see `op_end_shell`)."""
        alive = self.by_slot.get(shell.slot) is shell and shell.pid and shell.closing is None
        if not alive or shell.current is not None:
            shell.resetting = None
            self.agent._reply_reset(request_id, shell.slot, killed)
            return
        shell.resetting = (request_id, killed, 1)
        shell.ending = ending
        self.send_script(shell, _check_script(request_id))
        deadline = time.monotonic() + SHELL_RESET_S
        heapq.heappush(self.agent.timers, (deadline, request_id, -2))

    def _reset_dump(self, shell: _Shell, name: bytes, dump: bytes) -> None:
        """A dump a reset asked for (see `recycle`): keep the shell, fix it, or replace it."""
        resetting = shell.resetting
        if resetting is None or name != b"R%d" % resetting[0] or shell.pristine is None:
            return
        request_id, killed, round_number = resetting
        if _masked_dump(dump) == shell.pristine_masked:
            shell.resetting = (request_id, killed, 3)  # the dump is pristine: now the kernel's view
            self.look_again(request_id)
            return
        workspace = self.agent.workspace_path(shell.slot)
        fix = None
        if round_number == 1:
            fix = _fix_script(shell.pristine, dump, workspace, request_id)
        if fix is None:
            self._replace_at_reset(shell)
            return
        shell.resetting = (request_id, killed, 2)
        self.send_script(shell, fix)

    def look_again(self, request_id: int) -> None:
        """Keep the shell whose dump was pristine if the kernel's view is too; while the shell
        still runs (undoing the dump's redirections), look again in a moment (the reset's
        `SHELL_RESET_S` bounds it)."""
        for shell in self.by_slot.values():
            if shell.resetting is not None and shell.resetting[0] == request_id:
                break
        else:
            return
        if shell.resetting[2] != 3:
            return
        verdict = self._looks_pristine(shell)
        if verdict is None:
            soon = time.monotonic() + 0.001
            heapq.heappush(self.agent.timers, (soon, request_id, -3))
        elif verdict:
            self._kept(shell)
        else:
            self._replace_at_reset(shell)

    def _looks_pristine(self, shell: _Shell) -> Optional[bool]:
        """What the kernel shows of a kept shell: no child of its own, and at a reset it is the
        slot's only process (its keeper's only child: a trap could have started one during
        the check); its own program, and no fd but the ones it started with (fd 255 is bash's
        copy of its stderr). None: it is running, look again."""
        pid = shell.pid
        keeper = self.agent.keepers.get(shell.slot)
        if keeper is None:
            return False
        devnull = os.fstat(self.agent.devnull)
        expected = {
            "0": os.fstat(shell.control_fd),
            "1": os.fstat(shell.status_fd),
            "2": devnull,
            "3": os.fstat(shell.env_fd) if shell.env_fd >= 0 else devnull,
            "255": devnull,
        }
        try:
            if _children_listed(pid):
                return False
            if not shell.ending and _children_listed(keeper.pid) != [pid]:
                return False
            if os.readlink("/proc/%d/exe" % pid) != self.program_path:
                return False
            names = os.listdir("/proc/%d/fd" % pid)
            odd = [
                fd
                for fd in names
                if fd not in expected
                or not os.path.samestat(os.stat("/proc/%d/fd/%s" % (pid, fd)), expected[fd])
            ]
            if not odd and {"0", "1", "2", "3"} <= set(names):
                return True
            if _process_state(pid) == b"R":
                return None  # still undoing the dump's redirections, maybe
        except (OSError, ValueError):
            pass
        return False

    def _kept(self, shell: _Shell) -> None:
        """The reset keeps the shell: its state is the pristine one again."""
        assert shell.resetting is not None
        request_id, killed, _ = shell.resetting
        shell.resetting = None
        shell.cwd = self.agent.workspace_path(shell.slot)
        self._read_exported(shell)  # (the last call's text: not to be taken up later)
        shell.exported = None
        shell.hooks = None
        shell.interrupted = False
        shell.report_restart = False
        if shell.ending:
            self.agent.send({"id": request_id, "ok": True, "result": {"ended": True}})
            return
        self.agent._reply_reset(request_id, shell.slot, killed, keep_shell=True)

    def _replace_at_reset(self, shell: _Shell) -> None:
        """The reset does not keep the shell after all: it and everything of the slot (what
        the shell may have started since the first kill) are killed as at any reset."""
        assert shell.resetting is not None
        request_id, killed, _ = shell.resetting
        shell.resetting = None
        shell.closing = "reset"
        with contextlib.suppress(OSError):
            os.kill(shell.pid, signal.SIGKILL)
        agent = self.agent
        if shell.ending:  # end_shell: only the shell goes
            if self.by_slot.get(shell.slot) is shell:
                del self.by_slot[shell.slot]
            agent.send({"id": request_id, "ok": True, "result": {"ended": True}})
            return
        keeper = agent.keepers.get(shell.slot)
        if keeper is not None:
            try:
                _send_to_keeper_peer(keeper.sock, {"kill": True})
            except OSError:
                agent._keeper_lost(keeper)  # it killed what it kept
            else:
                keeper.pending_kills.append((request_id, shell.slot, killed, [shell], None))
                return
        agent._reply_reset(request_id, shell.slot, killed)

    def on_reset_timer(self, request_id: int) -> None:
        for shell in list(self.by_slot.values()):
            if shell.resetting is not None and shell.resetting[0] == request_id:
                if shell.resetting[2] > 0:
                    self._replace_at_reset(shell)
                return

    def tidy(self, slot: int) -> None:
        """At a reset that keeps the shell: no lingering output of the slot is read any more,
        and the slot's directory keeps only the shell's FIFOs (a command may have left other
        files there, or put something else in their place)."""
        for fd, owner in list(self.lingering.items()):
            if owner == slot:  # (what held it was killed with the rest of the slot)
                self._close_lingering(fd)
        shell = self.by_slot.get(slot)
        if self.directory is None or shell is None:
            return
        keep = {fifo.path for fifo in shell.fifos.values()}
        directory = os.path.join(self.directory, "slot-%d" % slot)
        try:
            with os.scandir(directory) as scan:
                entries = list(scan)
        except OSError:
            self._drop_fifos(shell)
            return
        for entry in entries:
            with contextlib.suppress(OSError):
                if entry.path in keep and stat.S_ISFIFO(entry.stat(follow_symlinks=False).st_mode):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    import shutil

                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
        # (One replaced by another FIFO is let go at the next call: see `fifo`.)

    # -- timeouts, cancel, reset ----------------------------------------------------------------

    def on_timer(self, exec_id: int, grace: bool) -> None:
        ex = self.execs.get(exec_id)
        if ex is None:
            return
        if not grace:
            if ex.kill_reason is None:
                self.kill_call(ex, "timeout")
            return
        shell = self.by_slot.get(ex.slot)
        if shell is not None and shell.current is ex and shell.starting:
            again = time.monotonic() + SHELL_KILL_GRACE_S  # not running yet: look again then
            heapq.heappush(self.agent.timers, (again, ex.exec_id, -1))
            return
        if shell is not None and shell.current is ex and shell.pid:
            if not shell.interrupted and self._in_call(shell, ex):
                self.interrupt(shell, ex)  # it was still setting up at the first try
                return
            # It did not come back from the interrupt (the command traps SIGINT, or waits on
            # something the kill could not reach), or never reached the command. Replace it;
            # its reap ends the call.
            with contextlib.suppress(OSError):
                os.kill(shell.pid, signal.SIGKILL)
            self._kill_tree(ex, shell.pid, include_root=True)

    def kill_call(self, ex: _Exec, reason: str) -> None:
        """Kill a call's processes, keep the shell: it reports the end; see `on_timer`."""
        shell = self.by_slot.get(ex.slot)
        if shell is None or shell.current is not ex or not (shell.pid or shell.starting):
            return
        if shell.starting:
            # It is killed as soon as its keeper reports it started (see `_started`; it may have
            # run the call by then, like a command cancelled while it runs); its reap ends the
            # call, and the slot's next call gets a new shell.
            ex.kill_reason = reason
            shell.closing = reason
            return
        self.read_status(shell)
        if shell.current is not ex:
            return  # it had just ended
        ex.kill_reason = reason
        self.interrupt(shell, ex)

    def interrupt(self, shell: _Shell, ex: _Exec) -> None:
        """Kill the call's processes and interrupt its line, if the shell is inside the call's
        command now; then give it `SHELL_KILL_GRACE_S` to report (see `on_timer`)."""
        deadline = time.monotonic() + SHELL_KILL_GRACE_S
        heapq.heappush(self.agent.timers, (deadline, ex.exec_id, -1))
        if not self._in_call(shell, ex):
            # Still reading or setting up the call (an interrupt could cut its line in two and
            # run the rest as a command), or writing its record: the grace decides.
            return
        shell.interrupted = True
        with contextlib.suppress(OSError):
            os.kill(shell.pid, signal.SIGSTOP)  # it must not start new processes meanwhile
        try:
            # SIGINT first, so a foreground command that does not handle it dies *of* it: the
            # shell then ends the whole line as after Ctrl-C in a terminal, not just one
            # command of it. The shell gets its own SIGINT too (it ends a builtin loop).
            self._kill_tree(ex, shell.pid, include_root=False, first=signal.SIGINT)
            with contextlib.suppress(OSError):
                os.kill(shell.pid, signal.SIGINT)
        finally:
            with contextlib.suppress(OSError):
                os.kill(shell.pid, signal.SIGCONT)
        self.agent._reap()

    def _in_call(self, shell: _Shell, ex: _Exec) -> bool:
        """Whether the shell runs the call's command now: its stdout is the call's FIFO."""
        try:
            target = os.readlink("/proc/%d/fd/1" % shell.pid)
        except OSError:
            return False
        return any(target == fifo.path for fifo in ex.fifos.values())

    def _kill_tree(
        self, ex: _Exec, root: int, include_root: bool, first: Optional[int] = None
    ) -> int:
        """SIGKILL the call's processes: the shell's descendants, and the orphans the slot's
        keeper adopted, started since the call began. Scans /proc until a scan finds none."""
        agent = self.agent
        keeper = agent.keepers.get(ex.slot)
        keeper_pid = keeper.pid if keeper is not None else -1
        own = os.getpid()
        others = set(agent.execs) | set(self.by_pid) | set(agent.trees.helpers)
        killed: Set[int] = set()
        limit = time.monotonic() + _KILL_LIMIT_S
        pause = 0.0005
        while True:
            table = _process_table()
            children: Dict[int, List[int]] = {}
            for pid, (ppid, _, _) in table.items():
                children.setdefault(ppid, []).append(pid)
            targets = set()
            stack = [root]
            while stack:
                for child in children.get(stack.pop(), ()):
                    # Older processes (a server from an earlier call) and what they start are
                    # not this call's: only walk on through what started since the call began.
                    if table[child][1] >= ex.start_tick:
                        targets.add(child)
                        stack.append(child)
            for pid, (ppid, start, _) in table.items():
                if pid in targets or pid == own or pid == 1 or pid in others:
                    continue
                if ppid == keeper_pid and start >= ex.start_tick:
                    targets.add(pid)  # orphaned (adopted by the keeper) since the call began
                    stack.append(pid)
            while stack:
                for child in children.get(stack.pop(), ()):
                    if child not in targets:
                        targets.add(child)
                        stack.append(child)
            if include_root and root in table:
                targets.add(root)
            elif not include_root:
                targets.discard(root)
            found = 0
            for pid in targets:
                if table[pid][2]:  # a zombie: dead already
                    continue
                if first is not None:
                    with contextlib.suppress(OSError):
                        os.kill(pid, first)
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    continue
                found += 1
                killed.add(pid)
            agent._reap()
            if not found or time.monotonic() > limit:
                return len(killed)
            time.sleep(pause)
            pause = min(pause * 2, 0.02)

    def warm(self, slot: int) -> None:
        """With the agent's ``warm_shells``: start the slot's shell now, if it has none, so
        its next call need not wait for one. A shell that cannot start is left to that call,
        which reports why."""
        if not self.agent.warm_shells or slot in self.by_slot:
            return
        try:
            self.spawn(slot, None)
        except OSError as exc:
            _log("slot %d: no shell started ahead of its calls: %s" % (slot, exc))

    def end(self, slot: int) -> bool:
        """Kill the slot's shell process alone and forget its state (see `op_end_shell`)."""
        shell = self.by_slot.pop(slot, None)
        if shell is None:
            return False
        shell.closing = "cancel"
        if shell.current is not None:
            self.kill_call(shell.current, "cancel")
        if shell.pid:
            with contextlib.suppress(OSError):
                os.kill(shell.pid, signal.SIGKILL)
        return True

    def closing(self, slot: Optional[int], reason: str) -> List[_Shell]:
        """Mark the slot's shell (every shell when `slot` is None) as being killed on purpose;
        returns them. A starting one has no pid yet: its keeper reports it (and it is killed,
        see `_started`) before it answers a kill sent after this, so the kill's count reads
        the pids then (see `_pids`)."""
        shells = []
        for shell in list(self.by_slot.values()):
            if slot is not None and shell.slot != slot:
                continue
            shell.closing = reason
            shells.append(shell)
            if shell.current is not None and shell.current.kill_reason is None:
                shell.current.kill_reason = reason
            if shell.pid:
                # Killed at once: a dead shell is a zombie the sweep skips, so a slot with no
                # background job is done in one scan of /proc instead of two.
                with contextlib.suppress(OSError):
                    os.kill(shell.pid, signal.SIGKILL)
            elif not shell.starting:  # (a starting one is killed as it starts: `_started`)
                del self.by_slot[shell.slot]  # died earlier: nothing to restore any more
        return shells

    def close(self, slot: Optional[int]) -> None:
        """After the kill: forget the slot's shell (or all), its FIFOs and lingering readers."""
        for shell in list(self.by_slot.values()):
            if slot is not None and shell.slot != slot:
                continue
            if shell.pid:
                # Killed but not reaped yet (it may have been stopped): finish it now.
                with contextlib.suppress(OSError):
                    os.kill(shell.pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(shell.pid, 0)
                self.on_reaped(shell.pid, 0)
            elif shell.starting:  # its keeper has not answered: it is killed if it starts
                shell.closing = shell.closing or "shutdown"
                self._started(shell, {"errno": errno.ECHILD, "message": "closed"})
            self.by_slot.pop(shell.slot, None)
        for fd, owner in list(self.lingering.items()):
            if slot is None or owner == slot:
                self._close_lingering(fd)
        if self.directory is not None:
            import shutil

            if slot is None:
                shutil.rmtree(self.directory, ignore_errors=True)
                self.directory = None
            else:
                # Emptied, not removed: removing and making a directory again costs journal
                # work on every release (several ms on a busy ext4).
                with contextlib.suppress(OSError):
                    _wipe_contents(os.path.join(self.directory, "slot-%d" % slot))


def _open_fifo(path: str, mode: int, identity: Any = None) -> Tuple[int, Any]:
    """Open a shell's output FIFO (non-blocking), refusing anything else at that path; the fd
    and the FIFO's (device, inode).

    The FIFOs live in a directory the slot's commands may write to, and the agent opens them
    with its own rights: a command that put a symlink there (to a file, or to another slot's
    FIFO) must not get the agent to open that. Raises OSError(ELOOP) for such a path, and for
    another FIFO than `identity` when given.
    """
    fd = os.open(path, mode | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
    status = os.fstat(fd)
    found = (status.st_dev, status.st_ino)
    if not stat.S_ISFIFO(status.st_mode) or (identity is not None and found != identity):
        os.close(fd)
        raise OSError(errno.ELOOP, "not the shell's FIFO", path)
    return fd, found


def _shell_quote(text: str) -> str:
    """`text` as one single-quoted shell word (every byte literal, NUL excluded)."""
    return "'" + text.replace("'", "'\\''") + "'"


def _heredoc_delimiter(body: bytes, delimiter: str) -> str:
    """`delimiter`, made longer until no line of `body` (ending in a newline) equals it."""
    lines = b"\n" + body
    while ("\n%s\n" % delimiter).encode("ascii") in lines:
        delimiter += "_" + os.urandom(4).hex()
    return delimiter


def _is_shell_name(name: str) -> bool:
    return (
        bool(name)
        and (name[0].isalpha() or name[0] == "_")
        and name.isascii()
        and all(char.isalnum() or char == "_" for char in name)
    )


#: Every bash builtin and reserved word (bash 4 to 5.3).
_BASH_WORD_TEXT = (
    ". : [ [[ ]] ! { } alias bg bind break builtin caller case cd command compgen complete "
    "compopt continue coproc declare dirs disown do done echo elif else enable esac eval exec "
    "exit export false fc fg fi for function getopts hash help history if in jobs kill let "
    "local logout mapfile popd printf pushd pwd read readarray readonly return select set "
    "shift shopt source suspend test then time times trap true type typeset ulimit umask "
    "unalias unset until wait while"
)
_BASH_WORDS = frozenset(_BASH_WORD_TEXT.split())
#: Those of them an `_inert` call may use: they set no variable and run no other code.
_INERT_WORD_TEXT = "! : do done echo elif else false fi if then true until while"
_INERT_WORDS = frozenset(_INERT_WORD_TEXT.split())
#: Reserved words after which the next word is still a command's name.
_KEEP_COMMAND_POSITION = _INERT_WORDS - {":", "echo", "false", "true"}
#: Characters that may set a variable or make a word at run time: expansions, assignments,
#: arithmetic, subshells and function definitions, brace and tilde expansion, globs.
_NOT_INERT = re.compile(r"[$`=(){}\[\]*?~]")


def _shell_tokens(text: str) -> Optional[List[Tuple[str, str]]]:
    """`text` as bash splits it (without expansions, which `_inert` refuses first): each
    token ``("sep", ...)`` (a newline or a run of ``; & |``: a new command starts),
    ``("redir", ...)`` (a redirection operator: a run of ``< >`` and one ``& | -`` after it,
    as in ``>&2``, ``>|`` or ``<<-``) or ``("word", value)`` (quotes and backslashes
    removed; a word right before a redirection, as the 2 of ``2>err``, is ``("fd", ...)``).
    None when a quote is not closed."""
    tokens: List[Tuple[str, str]] = []
    index, end = 0, len(text)
    while index < end:
        char = text[index]
        if char in " \t":  # bash's blanks (not \r, \f or \v: those are part of a word)
            index += 1
        elif char in "\n;&|<>":
            kind = "redir" if char in "<>" else "sep"
            stop = index
            while stop < end and text[stop] in ("<>" if kind == "redir" else "\n;&|"):
                stop += 1
            if kind == "redir" and stop < end and text[stop] in "&|-":
                stop += 1
            tokens.append((kind, text[index:stop]))
            index = stop
        else:
            value = []
            while index < end and text[index] not in " \t\n;&|<>":
                char = text[index]
                if char == "\\":
                    value.append(text[index + 1 : index + 2])
                    index += 2
                elif char in "'\"":
                    close = index + 1
                    while close < end and text[close] != char:
                        close += 2 if char == '"' and text[close] == "\\" else 1
                    if close >= end:
                        return None
                    value.append(text[index + 1 : close].replace("\\", ""))
                    index = close + 1
                else:
                    value.append(char)
                    index += 1
            word = "".join(value)
            fd = word.isdigit() and index < end and text[index] in "<>"
            tokens.append(("fd" if fd else "word", word))
    return tokens


def _inert(command: str) -> bool:
    """Whether `command` cannot change a variable of the bash shell that runs it, given a
    shell without functions, aliases, traps or prompt hooks (see `_Shells.start`).

    Conservative, by the text alone: no character that expands, assigns or makes a word at
    run time (`_NOT_INERT`; inside quotes too), and no word that is a builtin or reserved
    word other than `_INERT_WORDS` (as an argument too), except ``.`` where it cannot be a
    command's name (``git add .``): not first, nor after a command separator or a reserved
    word (a redirection with its target leaves that as it was: ``2>err . x`` sources x;
    `_shell_tokens` reads the text as bash does, quotes included). What is left runs external
    programs and ``echo``: neither can set a variable of the shell. A builtin loaded with
    ``enable -f`` (which takes an earlier call) is not known here.
    """
    if _NOT_INERT.search(command):
        return False
    tokens = _shell_tokens(command.replace("\\\n", ""))
    if tokens is None:
        return False
    command_position = True  # the next word may be a command's name
    redirected = False  # the next word is a redirection's target
    for kind, word in tokens:
        if kind == "sep":
            command_position, redirected = True, False
        elif kind == "redir":
            redirected = True
        else:  # a word (or the fd of a redirection)
            if word == ".":
                if command_position:
                    return False
            elif word in _BASH_WORDS and word not in _INERT_WORDS:
                return False
            if redirected:
                redirected = False  # a target: whether a name may come next is as before
            elif kind == "word":
                command_position = word in _KEEP_COMMAND_POSITION
    return True


def _uses_shell(op: str, args: Dict[str, Any]) -> bool:
    """Whether a request runs in the slot's persistent shell (so waits for the slot's turn)."""
    return op == "exec" and args.get("shell") == "persistent" and args.get("command") is not None


def _drain_into(fd: int, capture: _Capture) -> None:
    """Take what a finished command's pipe holds now (bounded: a background writer may go on)."""
    taken = 0
    while taken < _FINAL_DRAIN_BYTES:
        try:
            data = os.read(fd, _READ_CHUNK)
        except (BlockingIOError, OSError):
            break
        if not data:
            break
        taken += len(data)
        capture.feed(data)
        if len(data) < _READ_CHUNK:
            break  # a short read: the pipe held no more (no read just to see EAGAIN)


def _drain_to_eof(fd: int, capture: Optional[_Capture]) -> bool:
    """Take what a FIFO holds into `capture` (None: drop it); True if it then reads EOF (no
    writer left), False if a writer still holds it (bounded: a writer may go on)."""
    taken = 0
    while taken < _FINAL_DRAIN_BYTES:
        try:
            data = os.read(fd, _READ_CHUNK)
        except BlockingIOError:
            return False
        except OSError:
            return True
        if not data:
            return True
        taken += len(data)
        if capture is not None:
            capture.feed(data)
    return False


def _wait_dead(pids: Set[int], limit_s: float = 0.05) -> None:
    """Wait (bounded) until SIGKILLed `pids` are dead (zombies or gone).

    A process takes a moment to die after SIGKILL: a sweep that scans /proc before that sees
    it alive, kills it again, sleeps and scans once more. Waiting for a few known pids is much
    cheaper than a second scan of every process: on their pidfds where there are pidfds
    (readable once the process has exited), else by watching their state in /proc.
    """
    import select

    deadline = time.monotonic() + limit_s
    pidfd_open = getattr(os, "pidfd_open", None)
    waiting = set(pids)
    if pidfd_open is not None:
        poller = select.poll()
        opened = []
        try:
            for pid in list(waiting):
                try:
                    fd = pidfd_open(pid)
                except OSError as exc:
                    if exc.errno == errno.ESRCH:
                        waiting.discard(pid)  # gone already
                    continue  # no pidfds here: the state check below
                waiting.discard(pid)
                opened.append(fd)
                poller.register(fd, select.POLLIN)
            left = len(opened)
            while left:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                with contextlib.suppress(InterruptedError):
                    for fd, _ in poller.poll(remaining * 1000):
                        poller.unregister(fd)
                        left -= 1
        finally:
            for fd in opened:
                os.close(fd)
    while waiting:
        for pid in list(waiting):
            try:
                fd = os.open("/proc/%d/stat" % pid, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    line = os.read(fd, 4096)
                finally:
                    os.close(fd)
                state = line[line.rindex(b")") + 2 :][:1]
            except (OSError, ValueError):
                state = b"X"
            if state in (b"Z", b"X"):
                waiting.discard(pid)
        if not waiting or time.monotonic() > deadline:
            return
        time.sleep(0.0001)


def _process_table() -> Dict[int, Tuple[int, int, bool]]:
    """Every process in /proc: pid -> (parent pid, start time in ticks, is a zombie)."""
    table: Dict[int, Tuple[int, int, bool]] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return table
    for name in names:
        if not name.isdigit():
            continue
        try:
            # Raw syscalls: a file object costs several times more, and a reset scans every
            # process of the host when the sandbox has no pid namespace of its own.
            fd = os.open("/proc/%s/stat" % name, os.O_RDONLY | os.O_CLOEXEC)
            try:
                line = os.read(fd, 4096)
            finally:
                os.close(fd)
            fields = line[line.rindex(b")") + 2 :].split(None, 20)
            table[int(name)] = (int(fields[1]), int(fields[19]), fields[0] in (b"Z", b"X"))
        except (OSError, ValueError, IndexError):
            continue
    return table


def _list_into(
    directory: str, prefix: str, recursive: bool, limit: int, entries: List[Dict[str, Any]]
) -> bool:
    """Append sorted entries of `directory` (depth first); True if `limit` cut the listing."""
    with os.scandir(directory) as scan:
        children = sorted(scan, key=lambda entry: entry.name)
    for entry in children:
        if len(entries) >= limit:
            return True
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISLNK(info.st_mode):
            kind = "symlink"
        elif stat.S_ISDIR(info.st_mode):
            kind = "dir"
        elif stat.S_ISREG(info.st_mode):
            kind = "file"
        else:
            kind = "other"
        relative = entry.name if not prefix else prefix + "/" + entry.name
        entries.append(
            {"path": relative, "type": kind, "size": info.st_size, "mtime": info.st_mtime}
        )
        if recursive and kind == "dir":
            try:
                if _list_into(entry.path, relative, recursive, limit, entries):
                    return True
            except PermissionError:
                continue
    return False


def _wipe_contents(directory: str) -> None:
    """Remove everything inside `directory` (dotfiles, read-only trees), keep the directory."""
    os.chmod(directory, 0o700)
    for root, dirnames, _ in os.walk(directory):
        for name in dirnames:
            path = os.path.join(root, name)
            # Make read-only or unreadable subtrees deletable before descending (never through
            # a symlink: os.walk lists symlinks to directories among dirnames).
            if not os.path.islink(path):
                with contextlib.suppress(OSError):
                    os.chmod(path, 0o700)
    with os.scandir(directory) as scan:
        children = list(scan)
    for entry in children:
        if entry.is_dir(follow_symlinks=False):
            import shutil

            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)


def _exec_result(
    exit_code: int,
    signal_number: Optional[int],
    timed_out: bool,
    cancelled: bool,
    duration: float,
    stdout: bytes,
    stdout_dropped: int,
    stderr: bytes,
    stderr_dropped: int,
) -> Dict[str, Any]:
    return {
        "exit_code": exit_code,
        "signal": signal_number,
        "timed_out": timed_out,
        "cancelled": cancelled,
        "duration_s": duration,
        "stdout": stdout,
        "stderr": stderr,
        "stdout_dropped": stdout_dropped,
        "stderr_dropped": stderr_dropped,
    }


def _error_reply(request_id: int, code: str, message: str) -> Dict[str, Any]:
    return {"id": request_id, "ok": False, "error": {"code": code, "message": message}}


def _check_env(env: Any, what: str) -> None:
    if not isinstance(env, dict):
        raise OpError("bad_request", "%s must be an object of strings" % what)
    for key, value in env.items():
        if (
            not isinstance(key, str)
            or not isinstance(value, str)
            or not key
            or "=" in key
            or "\0" in key
            or "\0" in value
        ):
            raise OpError("bad_request", "%s: bad entry %r=%r" % (what, key, value))


def _log(text: str) -> None:
    try:
        sys.stderr.write("hermes-agent[%d]: %s\n" % (os.getpid(), text))
        sys.stderr.flush()
    except Exception:
        pass


def _parse_config(config_text: str) -> Dict[str, Any]:
    try:
        config = json.loads(config_text)
    except ValueError as exc:
        raise OpError("bad_config", "config is not JSON: %s" % exc) from None
    if not isinstance(config, dict):
        raise OpError("bad_config", "config must be a JSON object")
    root = config.get("workspace_root")
    if not isinstance(root, str) or not root:
        raise OpError("bad_config", "'workspace_root' (a directory path) is required")
    ttl = config.get("ttl_s", DEFAULT_TTL_S)
    if not isinstance(ttl, (int, float)) or isinstance(ttl, bool) or ttl <= 0:
        raise OpError("bad_config", "'ttl_s' must be a number > 0")
    uid_base = config.get("slot_uid_base")
    if uid_base is not None and (
        not isinstance(uid_base, int) or isinstance(uid_base, bool) or uid_base <= 0
    ):
        raise OpError("bad_config", "'slot_uid_base' must be an int > 0 or null")
    slots = config.get("slots")
    if slots is not None and (
        not isinstance(slots, int) or isinstance(slots, bool) or not 1 <= slots <= MAX_SLOT + 1
    ):
        raise OpError("bad_config", "'slots' must be an int in [1, %d] or null" % (MAX_SLOT + 1))
    if not isinstance(config.get("warm_shells", False), bool):
        raise OpError("bad_config", "'warm_shells' must be true or false")
    accounts = config.get("slot_accounts", 0)
    if not isinstance(accounts, int) or isinstance(accounts, bool) or accounts < 0:
        raise OpError("bad_config", "'slot_accounts' must be an int >= 0")
    cap = config.get("max_output_bytes", DEFAULT_MAX_OUTPUT_BYTES)
    if not isinstance(cap, int) or isinstance(cap, bool) or cap < 0:
        raise OpError("bad_config", "'max_output_bytes' must be an int >= 0")
    limits = config.get("limits") or {}
    if not isinstance(limits, dict) or any(
        key not in ("memory_bytes", "processes")
        or (value is not None and (not isinstance(value, int) or isinstance(value, bool)))
        or (value is not None and value < 1)
        for key, value in limits.items()
    ):
        raise OpError("bad_config", "'limits' must map 'memory_bytes' and 'processes' to ints >= 1")
    try:
        _check_env(config.get("env") or {}, "'env'")
    except OpError as exc:
        raise OpError("bad_config", exc.message) from None
    return config


def serve(config_text: str, in_fd: int = 0, out_fd: int = 1) -> int:
    """Run the agent on `in_fd`/`out_fd` until it stops; return its exit status."""
    try:
        config = _parse_config(config_text)
    except OpError as exc:
        frame = encode_frame(_error_reply(0, exc.code, exc.message))
        os.write(out_fd, frame)
        _log(exc.message)
        return EXIT_BAD_CONFIG
    return Agent(config, in_fd, out_fd).run()


def main(config_text: str) -> None:
    """Entry point inside the sandbox (called by the bootstrap): serve on stdin/stdout."""
    # Nothing but frames may reach fd 1: stray prints (ours or a library's) go to stderr.
    sys.stdout = sys.stderr
    raise SystemExit(serve(config_text))


if __name__ == "__main__":  # pragma: no cover - manual debugging only
    main(sys.argv[1] if len(sys.argv) > 1 else "{}")
