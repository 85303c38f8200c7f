"""Local stand-ins for Modal sandboxes: a temp directory and a tree of local processes.

Everything here runs on the Modal emulator's own asyncio loop (never on the caller's trio loop).

A `LocalSandbox` owns:

* a root directory `<emulator tmp>/<sandbox id>`; the sandbox's `workdir` (and an exec's) is
  always mapped *under* that root (`/data` -> `<root>/data`), never used as a host path. As root
  every host path is writable, so "use it when writable" would let sandboxes (and tests) share
  and litter host directories. Only the working directory is virtualised: a command that names
  an absolute path still sees the host's file system.
* its processes: the entrypoint (when `Sandbox.create` was given a command) and one
  `LocalProcess` per exec. Each starts in its own session, and every one of them carries the
  sandbox's unique `MODAL_TASK_ID` in its environment. The sandbox's processes are the members
  of those sessions, the processes carrying that marker, and all their descendants
  (`sandbox_pids`): that catches commands that cleared their environment and `setsid`/`nohup`
  escapees while their parent lives. Killing the sandbox kills them all, sweeping until none is
  left.
* its lifetime: `timeout` (max lifetime) and `idle_timeout` (no running exec and no stdin write
  for that long) end the sandbox with `GENERIC_STATUS_TIMEOUT`, which the client reports as
  returncode 124; `terminate` ends it with `GENERIC_STATUS_TERMINATED` (returncode 137). When the
  entrypoint exits the sandbox ends with its exit code, and the rest of its processes are killed.

Invariant: once `result` is set, no process of the sandbox is alive, and every output buffer of
the sandbox is closed (readers see EOF).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import TypeAlias

from modal_proto import api_pb2

from hermes_actors.drivers._local_procs import (
    pids_with_environ_entry,
    process_table,
    start_ticks,
    with_descendants,
)

from ._emulator_snapshots import Mounts

_READ_CHUNK = 64 * 1024
_DEFAULT_LIFETIME_SECS = 300
_KILL_SWEEPS = 8
_EXIT_GRACE_SECS = 5.0

GenericStatus: TypeAlias = api_pb2.GenericResult.GenericStatus.ValueType


class OutputBuffer:
    """Everything a process wrote to one stream, kept whole so reads can resume at any offset."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False
        self._changed = asyncio.Event()

    def append(self, chunk: bytes) -> None:
        if chunk:
            self.data += chunk
            self._notify()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._notify()

    async def wait_beyond(self, offset: int) -> None:
        """Return once data exists past `offset` or the stream is closed."""
        while len(self.data) <= offset and not self.closed:
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()


class StdinGapError(ValueError):
    """A stdin write started past the end of what was already accepted."""


class StdinFeeder:
    """Feeds client stdin writes, in offset order and without duplicates, to a process pipe.

    Writes are accepted immediately (the RPC never waits for the process to read); one pump task
    per process moves them into the pipe in order, then closes it once EOF was requested.
    """

    def __init__(self, writer: asyncio.StreamWriter | None) -> None:
        self.accepted = 0
        self.eof_requested = False
        self._writer = writer
        self._pending = bytearray()
        self._wakeup = asyncio.Event()

    def accept(self, offset: int, data: bytes, eof: bool) -> None:
        """Take `data` written at byte `offset`; bytes already accepted are ignored (a retry)."""
        if offset > self.accepted:
            raise StdinGapError(
                f"stdin write at offset {offset}, but only {self.accepted} bytes were written"
            )
        fresh = data[self.accepted - offset :]
        if fresh and not self.eof_requested:
            self._pending += fresh
            self.accepted += len(fresh)
        if eof:
            self.eof_requested = True
        self._wakeup.set()

    async def pump(self) -> None:
        writer = self._writer
        if writer is None:
            return
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup.clear()
                if self._pending:
                    chunk = bytes(self._pending)
                    self._pending.clear()
                    writer.write(chunk)
                    await writer.drain()
                if self.eof_requested and not self._pending:
                    return
        except (BrokenPipeError, ConnectionResetError):
            # The process stopped reading (it exited): later writes are dropped, as on Modal.
            return
        finally:
            writer.close()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                await writer.wait_closed()


class LocalProcess:
    """One local process of a sandbox (its entrypoint or an exec) with captured stdio."""

    def __init__(self, *, argv: Sequence[str]) -> None:
        self.argv = tuple(argv)
        self.pid: int | None = None
        self.stdout = OutputBuffer()
        self.stderr = OutputBuffer()
        self.stdin = StdinFeeder(None)
        self.returncode: int | None = None
        self.exited = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    async def spawn(
        cls,
        argv: Sequence[str],
        *,
        cwd: Path,
        env: Mapping[str, str],
        pipe_stdout: bool = True,
        pipe_stderr: bool = True,
        on_exit: Callable[[LocalProcess], None] | None = None,
    ) -> LocalProcess:
        """Start `argv` in its own session; a missing program exits 127 like a shell would."""
        self = cls(argv=argv)
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE if pipe_stdout else asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE if pipe_stderr else asyncio.subprocess.DEVNULL,
                cwd=cwd,
                env=dict(env),
                start_new_session=True,
            )
        except (FileNotFoundError, PermissionError, NotADirectoryError) as exc:
            code = 127 if isinstance(exc, FileNotFoundError) else 126
            self.stderr.append(
                f"exec {argv[0] if argv else ''!r} failed: {exc.strerror}\n".encode()
            )
            self._finish(code, on_exit)
            return self
        self.pid = process.pid
        self.stdin = StdinFeeder(process.stdin)
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self.stdin.pump()))
        self._tasks.append(loop.create_task(self._watch(process, on_exit)))
        return self

    async def _watch(
        self, process: asyncio.subprocess.Process, on_exit: Callable[[LocalProcess], None] | None
    ) -> None:
        await asyncio.gather(
            _drain(process.stdout, self.stdout), _drain(process.stderr, self.stderr)
        )
        self._finish(await process.wait(), on_exit)

    def _finish(self, returncode: int, on_exit: Callable[[LocalProcess], None] | None) -> None:
        self.returncode = returncode
        self.stdout.close()
        self.stderr.close()
        self.exited.set()
        if on_exit is not None:
            on_exit(self)

    def kill_leader(self) -> None:
        """Kill only the direct process (what Modal does when an exec's own timeout passes)."""
        if self.pid is not None and self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    async def aclose(self) -> None:
        """Stop the stdio pumps; a process not yet seen exiting is reported as killed."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.returncode is None:
            self._finish(-signal.SIGKILL, None)


async def _drain(source: asyncio.StreamReader | None, sink: OutputBuffer) -> None:
    if source is None:
        sink.close()
        return
    while chunk := await source.read(_READ_CHUNK):
        sink.append(chunk)


def kill_process_tree(marker: bytes, sessions: Mapping[int, int | None]) -> None:
    """SIGKILL every process of a sandbox (see `sandbox_pids`), sweeping until none is left.

    Frozen first (SIGSTOP, until a sweep finds no process not yet stopped), then killed: as a
    container runtime ends a container (freeze, then kill), no process of the sandbox runs
    while another of it dies. So the agent never sees a command die of this SIGKILL and reports
    it as the command's own fate before dying itself. Found first, then signalled together, so
    no parent dies (reparenting its children out of reach) before its descendants were found.
    """
    stopped: set[int] = set()
    for _ in range(_KILL_SWEEPS):
        fresh = [pid for pid in sandbox_pids(marker, sessions) if pid not in stopped]
        if not fresh:
            break
        for pid in fresh:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGSTOP)
        stopped.update(fresh)
    for pid in stopped:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    for _ in range(_KILL_SWEEPS):
        survivors = sandbox_pids(marker, sessions)
        if not survivors:
            return
        for pid in survivors:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def sandbox_pids(marker: bytes, sessions: Mapping[int, int | None]) -> list[int]:
    """Live processes of a sandbox: its sessions' members, the processes carrying its marker in
    their environment, and every descendant of those.

    `sessions` maps the session id of each process the sandbox started (each starts its own
    session, so the id is its pid) to that leader's start time. The marker alone misses
    commands that cleared or changed their environment; the sessions alone miss `setsid`
    escapees; the descendants catch both while their parent lives. A session counts only while
    its leader is the process recorded (or is gone: then the id cannot be reused while any member
    remains), so a reused pid never makes an unrelated process ours. (A provider's own view:
    the local driver decides ownership from facts no command can change, see `_local_procs`.)
    """
    own_pid = os.getpid()
    table = process_table()
    ours = {
        sid
        for sid, started in sessions.items()
        if sid not in table or started is None or table[sid].start_ticks == started
    }
    roots = {pid for pid, info in table.items() if info.session in ours}
    roots.update(pids_with_environ_entry(marker, table))
    roots.discard(own_pid)
    found = with_descendants(roots, table)
    found.discard(own_pid)
    return sorted(found)


def _private_accounts(root: Path) -> tuple[Path, Path] | None:
    """`<root>/etc/passwd` and `group`, copies of the host's, when the emulator runs as root.

    A container has its own /etc: an agent that is root in it may add users there. Emulated
    sandboxes are host processes, so as root their Python programs (the hermes agent among
    them) get these copies bound over /etc/passwd and /etc/group in a mount namespace of their
    own (`_with_private_accounts`), and whatever they start inherits it; the host's files are
    never written. Other execs (`bash -c ...`) see the host's files: wrapping every exec would
    cost each one 10-20 ms here (two extra processes and two mounts), which would skew the
    benchmarks of one exec per command. Not as root, nothing can add users anyway.
    """
    if os.geteuid() != 0:
        return None
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        raise RuntimeError(
            "the Modal emulator runs as root: it needs unshare(1) and mount(1) (util-linux) to "
            "give each sandbox its own /etc/passwd and /etc/group"
        )
    etc = root / "etc"
    etc.mkdir(parents=True, exist_ok=True)
    copies = (etc / "passwd", etc / "group")
    for copy in copies:
        if not copy.exists():  # a sandbox made from a filesystem snapshot keeps its own
            shutil.copyfile(Path("/etc", copy.name), copy)
            copy.chmod(0o644)
    return copies


_BIND_ACCOUNTS = (
    'mount --bind "$1" /etc/passwd && mount --bind "$2" /etc/group && shift 2 && exec "$@"'
)


def _with_private_accounts(argv: Sequence[str], accounts: tuple[Path, Path]) -> list[str]:
    """`argv` run in a mount namespace of its own with `accounts` bound over the host's."""
    unshare = shutil.which("unshare") or "unshare"
    script = ["sh", "-c", _BIND_ACCOUNTS, "modal-emulator", str(accounts[0]), str(accounts[1])]
    return [unshare, "--mount", "--propagation", "private", "--", *script, *argv]


def map_workdir(root: Path, workdir: str | None) -> Path:
    """Map a sandbox path such as `/data` to `<root>/data` (created if missing)."""
    if not workdir:
        return root
    relative = (
        PurePosixPath(workdir).relative_to("/")
        if workdir.startswith("/")
        else PurePosixPath(workdir)
    )
    parts = [part for part in relative.parts if part not in ("", ".", "..")]
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


class LocalSandbox:
    """One emulated sandbox: its directory, processes, lifetime and final result."""

    def __init__(
        self,
        *,
        sandbox_id: str,
        task_id: str,
        app_id: str,
        root: Path,
        definition: api_pb2.Sandbox,
        env: Mapping[str, str],
        tags: Mapping[str, str],
        created_at: float,
    ) -> None:
        self.sandbox_id = sandbox_id
        self.task_id = task_id
        self.app_id = app_id
        self.root = root
        self.definition = definition
        self.tags = dict(tags)
        self.created_at = created_at
        self.started = False
        self.result: api_pb2.GenericResult | None = None
        self.finished = asyncio.Event()
        self.execs: dict[str, LocalProcess] = {}
        self.entrypoint: LocalProcess | None = None
        # The sandbox's own stdio, read with SandboxStdioReadV2; fed by the entrypoint if any.
        self.stdout = OutputBuffer()
        self.stderr = OutputBuffer()
        self.stdin = StdinFeeder(None)
        self.workdir = map_workdir(root, definition.workdir or None)
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "HOME": str(root),
            "LANG": "C.UTF-8",
            **env,
            "MODAL_SANDBOX_ID": sandbox_id,
            "MODAL_TASK_ID": task_id,
            "MODAL_EMULATOR_SANDBOX_ROOT": str(root),
        }
        self._marker = f"MODAL_TASK_ID={task_id}".encode()
        # Session id (= pid of the process that started it) -> that leader's start time.
        self._sessions: dict[int, int | None] = {}
        self._last_activity = 0.0
        self._activity = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._processes: list[LocalProcess] = []
        self._accounts = _private_accounts(root)
        #: Images mounted into the sandbox (`Sandbox.mount_image`).
        self.mounts = Mounts(root)

    # -- lifecycle --

    async def start(self) -> None:
        """Start the entrypoint (if any) and the lifetime and idle clocks."""
        loop = asyncio.get_running_loop()
        self.started = True
        self._last_activity = loop.time()
        args = list(self.definition.entrypoint_args)
        if args:
            process = await self._spawn(
                args, self.workdir, self.env, on_exit=self._entrypoint_exited
            )
            self.entrypoint = process
            self.stdin = process.stdin
            self._tasks.append(loop.create_task(_mirror(process.stdout, self.stdout)))
            self._tasks.append(loop.create_task(_mirror(process.stderr, self.stderr)))
        lifetime = self.definition.timeout_secs or _DEFAULT_LIFETIME_SECS
        self._tasks.append(loop.create_task(self._expire_after(lifetime)))
        if self.definition.idle_timeout_secs:
            self._tasks.append(
                loop.create_task(self._watch_idle(self.definition.idle_timeout_secs))
            )

    async def finish(self, status: GenericStatus, *, exitcode: int = 0, message: str = "") -> None:
        """End the sandbox (idempotent): record the result, then kill every process it started."""
        if self.result is not None:
            await self.finished.wait()
            return
        self.result = api_pb2.GenericResult(status=status, exitcode=exitcode, exception=message)
        kill_process_tree(self._marker, self._sessions)
        # A process that cleared its environment and kept a pipe open would block EOF forever.
        waits = [asyncio.ensure_future(process.exited.wait()) for process in self._processes]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=_EXIT_GRACE_SECS)
            for waiter in pending:
                waiter.cancel()
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        await asyncio.gather(
            *(task for task in self._tasks if task is not current), return_exceptions=True
        )
        for process in self._processes:
            await process.aclose()
        self.stdout.close()
        self.stderr.close()
        self.finished.set()

    # -- execs --

    async def exec(
        self,
        exec_id: str,
        argv: Sequence[str],
        *,
        workdir: str | None,
        env: Mapping[str, str],
        pipe_stdout: bool,
        pipe_stderr: bool,
        timeout_secs: int | None,
    ) -> LocalProcess:
        """Start an exec (idempotent per `exec_id`: a retried start returns the first process)."""
        if exec_id in self.execs:
            return self.execs[exec_id]
        self.note_activity()
        cwd = map_workdir(self.root, workdir) if workdir else self.workdir
        process = await self._spawn(
            argv,
            cwd,
            {**self.env, **env, "MODAL_TASK_ID": self.task_id},
            pipe_stdout=pipe_stdout,
            pipe_stderr=pipe_stderr,
            on_exit=lambda _process: self.note_activity(),
        )
        self.execs[exec_id] = process
        if timeout_secs:
            self._tasks.append(
                asyncio.get_running_loop().create_task(_kill_leader_after(process, timeout_secs))
            )
        return process

    def note_activity(self) -> None:
        """Push the idle deadline forward (exec start or exit, stdin write)."""
        self._last_activity = asyncio.get_running_loop().time()
        self._activity.set()
        self._activity = asyncio.Event()

    def running_exec_count(self) -> int:
        return sum(1 for process in self.execs.values() if process.returncode is None)

    def live_pids(self) -> list[int]:
        """Processes of this sandbox still alive (found by their environment marker)."""
        return sandbox_pids(self._marker, self._sessions)

    # -- internals --

    async def _spawn(
        self,
        argv: Sequence[str],
        cwd: Path,
        env: Mapping[str, str],
        *,
        pipe_stdout: bool = True,
        pipe_stderr: bool = True,
        on_exit: Callable[[LocalProcess], None] | None = None,
    ) -> LocalProcess:
        if (
            self._accounts is not None
            and os.path.basename(argv[0]).startswith("python")
            and shutil.which(argv[0], path=env.get("PATH"))
        ):
            argv = _with_private_accounts(argv, self._accounts)
        process = await LocalProcess.spawn(
            argv,
            cwd=cwd,
            env=env,
            pipe_stdout=pipe_stdout,
            pipe_stderr=pipe_stderr,
            on_exit=on_exit,
        )
        self._processes.append(process)
        if process.pid is not None:
            # start_new_session: the leader's pid is its process group id.
            self._sessions[process.pid] = start_ticks(process.pid)
            if self.result is not None:
                # The sandbox ended while this process was starting: it must not outlive it.
                kill_process_tree(self._marker, {process.pid: self._sessions[process.pid]})
        return process

    def _entrypoint_exited(self, process: LocalProcess) -> None:
        code = process.returncode if process.returncode is not None else 0
        if code < 0:
            code = 128 - code
        status = (
            api_pb2.GenericResult.GENERIC_STATUS_SUCCESS
            if code == 0
            else api_pb2.GenericResult.GENERIC_STATUS_FAILURE
        )
        self._tasks.append(
            asyncio.get_running_loop().create_task(self.finish(status, exitcode=code))
        )

    async def _expire_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        await self.finish(
            api_pb2.GenericResult.GENERIC_STATUS_TIMEOUT,
            message=f"Sandbox reached its timeout of {seconds}s",
        )

    async def _watch_idle(self, idle_timeout: float) -> None:
        loop = asyncio.get_running_loop()
        while self.result is None:
            activity = self._activity
            if self.running_exec_count():
                await activity.wait()
                continue
            remaining = self._last_activity + idle_timeout - loop.time()
            if remaining <= 0:
                await self.finish(
                    api_pb2.GenericResult.GENERIC_STATUS_TIMEOUT,
                    message=f"Sandbox was idle for {idle_timeout}s (idle_timeout)",
                )
                return
            # Not `asyncio.wait_for`: before Python 3.12 it swallows a cancellation that races
            # with the awaited event (an exec exiting as `finish` cancels this task), and the
            # loop then kept `finish` waiting for this task forever.
            async with _deadline(remaining):
                await activity.wait()


async def _mirror(source: OutputBuffer, sink: OutputBuffer) -> None:
    offset = 0
    while True:
        await source.wait_beyond(offset)
        if len(source.data) > offset:
            sink.append(bytes(source.data[offset:]))
            offset = len(source.data)
        elif source.closed:
            sink.close()
            return


async def _kill_leader_after(process: LocalProcess, seconds: float) -> None:
    async with _deadline(seconds):
        await process.exited.wait()
        return
    process.kill_leader()


@contextlib.asynccontextmanager
async def _deadline(seconds: float) -> AsyncIterator[None]:
    """Leave the block quietly after `seconds` (`asyncio.timeout`, minus its TimeoutError).

    Unlike `asyncio.wait_for` on Python 3.11, a cancellation of the enclosing task is never lost
    when it races with the awaited thing finishing.
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            yield
