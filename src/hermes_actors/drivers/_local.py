"""The local driver: sandboxes are agent processes on this machine, isolated with bubblewrap.

Each sandbox gets a private host directory (its slot workspaces, and the agent's log) and one
agent process started as ``python3 -c BOOTSTRAP``; the agent's stdin/stdout are the stream.

Isolation (`SandboxConfig.isolation`):

* ``bwrap``: the agent runs inside bubblewrap with its own pid/net/ipc/uts namespaces, host
  ``/usr`` and ``/etc`` read-only, private ``/tmp`` and ``/run``, the workspace root bound
  read-write at ``spec.workspace_base``, and no network unless ``spec.network``. Sandboxed
  commands never run as host uid 0 with capabilities: started by root, the agent keeps only the
  capabilities it needs to switch uid and runs each slot's commands as its own unprivileged uid
  (``SLOT_UID_BASE + slot``) in a 0700 workspace, so slots cannot see each other; started by
  another user, bwrap runs unprivileged in a user namespace (slots then share that one uid).
  Killing bwrap tears down the pid namespace, so nothing started inside survives it.
* ``none``: plain processes. Tree kill relies on the agent (a subreaper keeper per slot) and,
  when the agent itself is killed, on the writers of the sandbox's liveness pipe and everything
  below them (`_local_procs`), found from here.
* ``auto``: ``bwrap`` when it works here, else ``none`` with a logged warning.

Whatever ends the host, nothing is left: each sandbox directory records its owner
(`OWNER_FILE`, for `reap`), the driver's watchdog process (`_Watchdog`) removes the sandboxes a
dead host left, and where the host delegated a cgroup v2 subtree each sandbox runs in its own
cgroup with the profile's limits (`_local_cgroups`; `EnforcedLimits` says what holds).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import json
import logging
import os
import queue
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import trio

from hermes_actors._agent import BOOTSTRAP, SLOT_UID_BASE, slot_account_lines
from hermes_actors._config import SandboxConfig
from hermes_actors._errors import IsolationUnavailable, SandboxStartFailed
from hermes_actors.drivers._local_cgroups import (
    CgroupParent,
    SandboxCgroup,
    create_sandbox_cgroup,
    find_delegated_cgroup,
    join_argv,
    remove_sandbox_cgroup,
)
from hermes_actors.drivers._local_procs import (
    WATCHDOG_GRACE_S,
    kill_sandbox_processes,
    now_ticks,
    pipe_name,
    proc_info,
    remove_tree,
    watchdog_argv,
)

logger = logging.getLogger("hermes_actors.drivers.local")

#: How many processes one slot's uid may have at once (RLIMIT_NPROC; only with slot uids).
PROCESSES_PER_SLOT = 1024
MIB = 1024 * 1024


@attrs.frozen(kw_only=True)
class EnforcedLimits:
    """Which of a profile's limits a local sandbox enforces, and how (None: not enforced).

    Two mechanisms: the agent's rlimits (always) and, where the host delegated a cgroup v2
    subtree to the runtime, one cgroup per sandbox (`drivers._local_cgroups`).
    """

    #: Each process's data (heap, private writable mappings) is capped at the profile's
    #: `memory` (RLIMIT_DATA): a memory hog fails its allocation instead of the host OOMing.
    memory_bytes_per_process: int | None
    #: The processes one slot may have at once (RLIMIT_NPROC of its own uid): a fork bomb
    #: stops there. Only with slot uids (bwrap started by root).
    processes_per_slot: int | None
    #: The profile's `cpu`, as the sandbox cgroup's `cpu.max` (only with a delegated cgroup).
    cpu: float | None = None
    #: The profile's `memory` for the whole sandbox (its cgroup's `memory.max`).
    memory_bytes_per_sandbox: int | None = None
    #: The processes the whole sandbox may have (its cgroup's `pids.max`).
    processes_per_sandbox: int | None = None
    #: The sandbox's cgroup v2 directory, when it has one.
    cgroup: str | None = None

    def describe(self) -> str:
        """One line: each limit, and how it is enforced."""
        parts = []
        if self.memory_bytes_per_sandbox is not None:
            parts.append(f"memory {self.memory_bytes_per_sandbox // MIB} MiB per sandbox (cgroup)")
        if self.memory_bytes_per_process is not None:
            parts.append(
                f"memory {self.memory_bytes_per_process // MIB} MiB per process (RLIMIT_DATA)"
            )
        if self.memory_bytes_per_sandbox is None and self.memory_bytes_per_process is None:
            parts.append("memory not enforced")
        parts.append(f"cpu {self.cpu:g} (cgroup cpu.max)" if self.cpu else "cpu not enforced")
        if self.processes_per_sandbox is not None:
            parts.append(f"{self.processes_per_sandbox} processes per sandbox (cgroup)")
        if self.processes_per_slot is not None:
            parts.append(f"{self.processes_per_slot} processes per slot (RLIMIT_NPROC)")
        if self.processes_per_sandbox is None and self.processes_per_slot is None:
            parts.append("process count not enforced")
        return ", ".join(parts)


#: The environment variable (and value prefix) that marks every process of a sandbox.
SANDBOX_MARKER_VAR = "HERMES_SANDBOX_ID"
#: The environment variable naming the host process that started a sandbox's top process
#: (diagnostics only: `reap` reads the owner record, which commands cannot change).
HOST_PID_VAR = "HERMES_HOST_PID"
#: A sandbox directory's owner record: who made it and how to find its processes (`reap`).
OWNER_FILE = "owner.json"
#: How long a sandbox may take to exit after its stream is closed before it is killed.
GRACEFUL_EXIT_S = 2.0
_AGENT_CAPABILITIES = (
    "CAP_SETUID",
    "CAP_SETGID",
    "CAP_CHOWN",
    "CAP_FOWNER",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_KILL",
    # Reading where a slot's shell has its stdout (/proc/<pid>/fd/1, see the agent's shells).
    "CAP_SYS_PTRACE",
    # Overlay and idmapped mounts in the sandbox's own mount namespace: a fork is a mount, not
    # a copy (the agent's tree section). Commands never have it: they run as slot uids.
    "CAP_SYS_ADMIN",
)
_SANDBOX_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _install_hint() -> str:
    return (
        "install bubblewrap (Debian/Ubuntu: `apt-get install -y bubblewrap`), or set "
        "`isolation: none` in the profile to run commands without isolation"
    )


def _agent_python() -> tuple[str, list[str]]:
    """The interpreter to run the agent with inside bwrap, and host paths it needs bound.

    The system python3 lives under /usr, which every sandbox sees; a virtualenv or pyenv
    interpreter elsewhere needs its prefix bound read-only.
    """
    system = Path("/usr/bin/python3")
    if system.exists():
        return str(system), []
    prefix = sys.base_prefix
    if prefix.startswith("/usr"):
        return sys.executable, []
    return str(Path(prefix) / "bin" / "python3"), [prefix]


def is_rootfs_image(image: str) -> bool:
    """Whether a profile's `image` names a local root filesystem directory (an absolute path).

    Any other value (`host`, a registry reference) means the host's own /usr and /etc.
    """
    return image.startswith("/")


#: Where an image's python3 may live, tried in order.
_ROOTFS_PYTHONS = ("/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3")
#: Top-level entries of a root filesystem that the sandbox sets up itself.
_ROOTFS_OWN = frozenset({"proc", "dev", "tmp", "run", "sys"})


def rootfs_problem(rootfs: str) -> str | None:
    """Why `rootfs` cannot serve as a sandbox's `/` (None when it can)."""
    if not os.path.isdir(rootfs):
        return f"image {rootfs!r} is not a directory (a local image is a root filesystem)"
    if _rootfs_python(rootfs) is None:
        return (
            f"image {rootfs!r} has no python3 (looked for {', '.join(_ROOTFS_PYTHONS)}); the "
            "sandbox agent needs one (any python3 >= 3.8, standard library only): install it "
            "in the image"
        )
    return None


def _rootfs_python(rootfs: str) -> str | None:
    for candidate in _ROOTFS_PYTHONS:
        if os.path.exists(os.path.join(rootfs, candidate.lstrip("/"))):
            return candidate
    return None


def _root_binds(rootfs: str | None) -> tuple[list[str], str, list[str]]:
    """bwrap arguments making `/` (the host's /usr, /etc and top links, or a root filesystem
    directory, entry by entry so new mount points stay possible), the agent's python, and host
    prefixes it needs bound."""
    argv: list[str] = []
    if rootfs is None:
        python, extra_binds = _agent_python()
        argv += ["--ro-bind", "/usr", "/usr"]
        for name in ("bin", "lib", "lib64", "lib32", "sbin"):
            top = Path("/") / name
            if top.is_symlink():
                argv += ["--symlink", os.readlink(top), f"/{name}"]
            elif top.is_dir():
                argv += ["--ro-bind", str(top), f"/{name}"]
        argv += ["--ro-bind", "/etc", "/etc"]
        return argv, python, extra_binds
    found = _rootfs_python(rootfs)
    assert found is not None  # checked by rootfs_problem before
    for name in sorted(os.listdir(rootfs)):
        if name in _ROOTFS_OWN:
            continue
        entry = os.path.join(rootfs, name)
        if os.path.islink(entry):
            argv += ["--symlink", os.readlink(entry), f"/{name}"]
        else:
            argv += ["--ro-bind", entry, f"/{name}"]
    return argv, found, []


def _write_accounts(
    directory: str, etc: str, slots: int, workspace_base: str
) -> tuple[str, str] | None:
    """passwd and group files for a sandbox: `etc`'s own plus one user and group per slot uid.

    Tools look the running user up (``whoami``, ``getpass.getuser()``, git, ssh, pip): each
    slot uid gets a name (``slotN``) and its workspace as HOME. None when `etc` has no such
    files to bind over.
    """
    sources = [os.path.join(etc, "passwd"), os.path.join(etc, "group")]
    if not all(os.path.isfile(path) for path in sources):
        return None
    with open(sources[0], encoding="utf-8", errors="surrogateescape") as handle:
        passwd = handle.read()
    with open(sources[1], encoding="utf-8", errors="surrogateescape") as handle:
        group = handle.read()
    shell = "/bin/bash" if os.path.exists(os.path.join(etc, "..", "bin", "bash")) else "/bin/sh"
    passwd = passwd if passwd.endswith("\n") or not passwd else passwd + "\n"
    group = group if group.endswith("\n") or not group else group + "\n"
    users, groups = slot_account_lines(
        passwd, group, SLOT_UID_BASE, slots, workspace_base.rstrip("/") or "/", shell
    )
    passwd, group = passwd + users, group + groups
    paths = (os.path.join(directory, "passwd"), os.path.join(directory, "group"))
    for path, text in zip(paths, (passwd, group), strict=True):
        with open(path, "w", encoding="utf-8", errors="surrogateescape") as handle:
            handle.write(text)
        os.chmod(path, 0o644)
    return paths


def _bwrap_argv(
    *,
    workspace_host: str,
    workspace_base: str,
    network: bool,
    sandbox_id: str,
    as_root: bool,
    rootfs: str | None = None,
    accounts: tuple[str, str] | None = None,
) -> list[str]:
    root_binds, python, extra_binds = _root_binds(rootfs)
    if accounts is not None:
        # Bound over the sandbox's own (read-only) files: the slot users exist inside.
        root_binds += [
            "--ro-bind",
            accounts[0],
            "/etc/passwd",
            "--ro-bind",
            accounts[1],
            "/etc/group",
        ]
    argv = [
        "bwrap",
        "--die-with-parent",
        "--new-session",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--hostname",
        "hermes-sandbox",
        *root_binds,
    ]
    argv += [
        "--proc",
        "/proc",
        "--ro-bind",
        "/proc/sys",
        "/proc/sys",
        "--dev",
        "/dev",
        "--perms",
        "1777",
        "--tmpfs",
        "/tmp",
        "--tmpfs",
        "/run",
    ]
    for prefix in extra_binds:
        argv += ["--ro-bind", prefix, prefix]
    argv += ["--bind", workspace_host, workspace_base, "--chdir", workspace_base]
    if not network:
        argv.append("--unshare-net")
    if as_root:
        # Keep only what the agent needs to run each slot as its own unprivileged uid; the
        # commands lose every capability when the agent switches uid before exec.
        argv += ["--cap-drop", "ALL"]
        for capability in _AGENT_CAPABILITIES:
            argv += ["--cap-add", capability]
    else:
        argv += ["--unshare-user", "--disable-userns"]
    argv += [
        "--clearenv",
        "--setenv",
        "PATH",
        _SANDBOX_PATH,
        "--setenv",
        "LANG",
        "C.UTF-8",
        "--setenv",
        "HOME",
        workspace_base,
        "--setenv",
        SANDBOX_MARKER_VAR,
        sandbox_id,
        "--",
        python,
        "-c",
        BOOTSTRAP,
    ]
    return argv


_bwrap_checked: dict[bool, str | None] = {}


async def bwrap_problem() -> str | None:
    """Why bubblewrap cannot be used here (None when it works). Checked once per process."""
    as_root = os.geteuid() == 0
    if as_root in _bwrap_checked:
        return _bwrap_checked[as_root]
    problem: str | None = None
    if shutil.which("bwrap") is None:
        problem = "bubblewrap (`bwrap`) is not installed"
    else:
        with tempfile.TemporaryDirectory(prefix="hermes-bwrap-check-") as workspace:
            argv = _bwrap_argv(
                workspace_host=workspace,
                workspace_base="/data",
                network=False,
                sandbox_id="check",
                as_root=as_root,
            )
            # Replace the agent bootstrap by a trivial program: we only check the sandbox starts.
            argv[-1] = "import sys; sys.exit(0)"
            result = await trio.run_process(
                argv, capture_stdout=True, capture_stderr=True, check=False
            )
            if result.returncode != 0:
                detail = (
                    result.stderr.decode(errors="replace").strip() or f"exit {result.returncode}"
                )
                problem = f"bubblewrap does not work here: {detail}"
    _bwrap_checked[as_root] = problem
    return problem


#: A spawn thread's queue: (job, its future) pairs, then None to end the thread.
_SpawnJobs = queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future[Any]] | None]


class _SpawnThread:
    """The thread that starts every sandbox process; it lives while one of them runs.

    bwrap's ``--die-with-parent`` (PR_SET_PDEATHSIG) fires when the *thread* that forked it
    exits, not the process. trio's `open_process` forks from a worker thread that trio retires
    after ten idle seconds, which killed every bwrap sandbox about ten seconds after its start.
    Forking from a thread that outlives every process it started ties the signal to this
    process's death instead. The thread ends once the last of them is reaped (`release`), so a
    program that has stopped its backends holds no thread of ours; the next start makes a new one.
    """

    _lock = threading.Lock()
    _jobs: _SpawnJobs | None = None
    #: Jobs not yet done plus processes started and not yet released.
    _holders = 0

    @classmethod
    def submit(cls, job: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        """Run `job` (a spawn) on the thread. A job that raises releases its hold itself; one
        that returns a process holds the thread until `release` is called for it."""
        with cls._lock:
            if cls._jobs is None:
                cls._jobs = queue.SimpleQueue()
                threading.Thread(
                    target=cls._serve, args=(cls._jobs,), name="hermes-sandbox-spawner", daemon=True
                ).start()
            cls._holders += 1
            future: concurrent.futures.Future[Any] = concurrent.futures.Future()
            cls._jobs.put((job, future))
        return future

    @classmethod
    def release(cls) -> None:
        """One process started by a job is reaped (or a job did not start one)."""
        with cls._lock:
            cls._holders -= 1
            if cls._holders == 0 and cls._jobs is not None:
                cls._jobs.put(None)  # after every job of this thread: it ends once they are run
                cls._jobs = None

    @classmethod
    def _serve(
        cls,
        jobs: _SpawnJobs,
    ) -> None:
        while (item := jobs.get()) is not None:
            job, future = item
            if not future.set_running_or_notify_cancel():
                cls.release()
                continue
            try:
                future.set_result(job())
            except BaseException as exc:
                cls.release()
                future.set_exception(exc)


class _AgentProcess:
    """The agent's process (bwrap or python), started on the `_SpawnThread`.

    Its stdin and stdout are trio streams; `wait` watches a pidfd. The host also keeps the read
    end of a pipe whose write end only the sandbox's own processes hold (the agent passes it to
    its keepers, never to commands): its EOF means that all of them are gone.
    """

    def __init__(
        self, popen: subprocess.Popen[bytes], stdin_fd: int, stdout_fd: int, alive_fd: int
    ) -> None:
        self._popen = popen
        self.pid = popen.pid
        self.stdin = trio.lowlevel.FdStream(stdin_fd)
        self.stdout = trio.lowlevel.FdStream(stdout_fd)
        self._alive_fd = alive_fd
        os.set_blocking(alive_fd, False)
        self._pidfd = os.pidfd_open(popen.pid)
        self._wait_lock = trio.Lock()
        #: ``pipe:[inode]``, as /proc/<pid>/fd shows the liveness pipe.
        self.alive_pipe = os.readlink(f"/proc/self/fd/{alive_fd}")

    @property
    def returncode(self) -> int | None:
        return self._popen.poll()

    async def wait(self) -> int:
        async with self._wait_lock:
            if self._popen.poll() is None:
                await trio.lowlevel.wait_readable(self._pidfd)
                self._popen.wait()
        return self._popen.returncode

    async def wait_all_gone(self) -> None:
        """Wait until no process of the sandbox holds the liveness pipe any more."""
        while True:
            try:
                if not os.read(self._alive_fd, 64):
                    return
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self._alive_fd)

    def close_fds(self) -> None:
        """Let go of the process (reaped, or past saving): its fds and its spawn thread hold."""
        if self._pidfd < 0:
            return
        for fd in (self._pidfd, self._alive_fd):
            if fd >= 0:
                trio.lowlevel.notify_closing(fd)
                os.close(fd)
        self._pidfd = self._alive_fd = -1
        _SpawnThread.release()


def _spawn_agent(
    argv: list[str], env: Mapping[str, str], cwd: str, log_fd: int, alive_write: int
) -> tuple[subprocess.Popen[bytes], int, int]:
    """Start the agent (runs on the `_SpawnThread`) holding `alive_write`, the write end of
    its liveness pipe; return it and the host's ends of its stdin and stdout."""
    stdin_read, stdin_write = os.pipe()
    stdout_read, stdout_write = os.pipe()
    ours = [stdin_write, stdout_read]
    try:
        popen = subprocess.Popen(
            argv,
            stdin=stdin_read,
            stdout=stdout_write,
            stderr=log_fd,
            start_new_session=True,
            env=dict(env),
            cwd=cwd,
            pass_fds=(alive_write,),
        )
    except BaseException:
        for fd in ours:
            os.close(fd)
        raise
    finally:
        for fd in (stdin_read, stdout_write):
            os.close(fd)
    return popen, stdin_write, stdout_read


async def open_agent_process(
    argv: list[str], env: Mapping[str, str], cwd: str, log_fd: int, alive: tuple[int, int]
) -> _AgentProcess:
    """Start the agent from the `_SpawnThread`, with `alive` (read end, write end) as its
    liveness pipe: this takes over the read end (closed here on failure); the caller closes the
    write end once this returns or raises.

    Not cancellable while it forks (milliseconds); a caller cancelled meanwhile gets the
    process killed and reaped, then the cancellation."""
    alive_read, alive_write = alive
    future = _SpawnThread.submit(lambda: _spawn_agent(argv, env, cwd, log_fd, alive_write))
    try:
        with trio.CancelScope(shield=True):  # the spawn happens anyway: never drop its result
            popen, stdin_fd, stdout_fd = await trio.to_thread.run_sync(future.result)
    except BaseException:
        os.close(alive_read)
        raise
    process = _AgentProcess(popen, stdin_fd, stdout_fd, alive_read)
    try:
        await trio.lowlevel.checkpoint_if_cancelled()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(popen.pid, signal.SIGKILL)
        popen.wait()
        process.close_fds()
        for stream in (process.stdin, process.stdout):
            with contextlib.suppress(trio.ClosedResourceError):
                await stream.aclose()
        raise
    return process


class _Watchdog:
    """The host's side of a local driver's watchdog process (`_local_procs.watchdog_main`).

    The process runs while the driver has sandboxes: it starts with the first one watched and
    is told to exit (its control socket closed) when the last one is forgotten, or at
    `aclose`. If the host dies first, the watchdog ends the sandboxes still watched and
    removes their directories.
    """

    def __init__(self) -> None:
        self._control: socket.socket | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._retired: list[subprocess.Popen[bytes]] = []
        self._watched: set[str] = set()
        self._lock = trio.Lock()

    @property
    def pid(self) -> int | None:
        """The running watchdog's pid (None while the driver has no sandbox)."""
        return self._process.pid if self._control is not None and self._process else None

    async def watch(
        self, sandbox_id: str, directory: str, alive_read: int, cgroup: str | None = None
    ) -> None:
        """Have the watchdog end `sandbox_id` if the host dies: its processes are the
        writers of the pipe `alive_read` reads (and all below them); then `directory` (and
        the sandbox's `cgroup`) go."""
        async with self._lock:
            if self._control is None:
                with trio.CancelScope(shield=True):  # a started process is never dropped
                    await self._reap_retired()
                    self._control, self._process = await trio.to_thread.run_sync(_start_watchdog)
            self._watched.add(sandbox_id)
            message = {"watch": sandbox_id, "directory": directory, "cgroup": cgroup}
            self._send(message, (alive_read,))

    async def forget(self, sandbox_id: str) -> None:
        """The host ended `sandbox_id` itself; the last one forgotten stops the watchdog.

        Safe in a cancelled scope (the wait for the watchdog's exit is shielded, bounded)."""
        if sandbox_id not in self._watched:
            return
        self._watched.discard(sandbox_id)
        self._send({"forget": sandbox_id})
        if not self._watched:
            self._retire()
            with trio.CancelScope(shield=True):
                await self._reap_retired()

    async def aclose(self) -> None:
        """Stop the watchdog; it ends whatever is still watched (normally nothing)."""
        self._watched.clear()
        self._retire()
        with trio.CancelScope(shield=True):
            await self._reap_retired(WATCHDOG_GRACE_S + GRACEFUL_EXIT_S + 1.0)

    def _send(self, message: Mapping[str, object], fds: tuple[int, ...] = ()) -> None:
        if self._control is None:
            return
        try:
            socket.send_fds(self._control, [json.dumps(message).encode()], list(fds))
        except OSError as exc:
            logger.warning(
                "the local sandboxes' watchdog is gone (%s): a crash of this process would leave "
                "their directories behind until `hermes-actors reap`",
                exc,
            )
            self._retire()

    def _retire(self) -> None:
        control, self._control = self._control, None
        if control is not None:
            control.close()  # the watchdog reads EOF, ends what it still watches, and exits
        if self._process is not None:
            self._retired.append(self._process)
            self._process = None

    async def _reap_retired(self, limit_s: float = GRACEFUL_EXIT_S) -> None:
        for process in self._retired:
            if process.poll() is None:
                pidfd = os.pidfd_open(process.pid)
                try:
                    with trio.move_on_after(limit_s):
                        await trio.lowlevel.wait_readable(pidfd)
                finally:
                    os.close(pidfd)
            if process.poll() is None:
                logger.warning("the local sandboxes' watchdog did not exit: killing it")
                process.kill()
            process.wait()
        self._retired.clear()


def _start_watchdog() -> tuple[socket.socket, subprocess.Popen[bytes]]:
    """Start a watchdog process; return the host's end of its control socket and it."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        process = subprocess.Popen(
            watchdog_argv(sys.executable, theirs.fileno()),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            pass_fds=(theirs.fileno(),),
            # Its own session: Ctrl-C at a terminal (the foreground process group) must not
            # reach it, nor anything that kills the host's process group.
            start_new_session=True,
            cwd="/",
        )
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    return ours, process


class LocalSandbox:
    """One local sandbox: the agent process (maybe inside bwrap) and its host directory."""

    def __init__(
        self,
        *,
        sandbox_id: str,
        process: _AgentProcess,
        directory: str,
        agent_config: Mapping[str, object],
        isolation: str,
        network: bool,
        enforced_limits: EnforcedLimits | None = None,
        watchdog: _Watchdog | None = None,
        cgroup: SandboxCgroup | None = None,
    ) -> None:
        self._sandbox_id = sandbox_id
        self._watchdog = watchdog
        self._cgroup = cgroup
        self._process = process
        self._directory = directory
        self._agent_config = agent_config
        #: Directories of the workspace root moved out when the sandbox ends (`keep_on_exit`).
        self._kept: dict[str, str] = {}
        self.isolation = isolation
        #: Which of the profile's limits this sandbox enforces (see `EnforcedLimits`).
        self.enforced_limits = enforced_limits or EnforcedLimits(
            memory_bytes_per_process=None, processes_per_slot=None
        )
        self.isolated = isolation == "bwrap"
        # Without bubblewrap nothing takes the host's network away.
        self.network = network or not self.isolated
        self._stream: trio.StapledStream[trio.abc.SendStream, trio.abc.ReceiveStream] = (
            trio.StapledStream(process.stdin, process.stdout)
        )
        self._terminated = False

    @property
    def sandbox_id(self) -> str:
        return self._sandbox_id

    @property
    def stream(self) -> trio.StapledStream[trio.abc.SendStream, trio.abc.ReceiveStream]:
        return self._stream

    @property
    def agent_config(self) -> Mapping[str, object]:
        return self._agent_config

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def directory(self) -> str:
        return self._directory

    def is_alive(self) -> bool:
        return self._process.returncode is None

    async def wait_exited(self) -> int | None:
        return await self._process.wait()

    # -- KeepsTrees: checkpoints that outlive the sandbox, its crash included ---------------

    def keep_on_exit(self, path: str, into: str) -> None:
        """When the sandbox ends, however (a crash included), move its directory `path`
        (relative to the workspace root) to `into` before its files go, if it is still there.
        `into` must be on the same filesystem (a rename)."""
        if os.path.isabs(path) or ".." in path.split("/"):
            raise ValueError(f"not a path inside the workspace root: {path!r}")
        self._kept[path] = into

    def forget_kept(self, path: str) -> None:
        """`path` goes with the sandbox after all."""
        self._kept.pop(path, None)

    def _move_kept(self) -> None:
        """In a worker thread, once no process of the sandbox is left."""
        root = os.path.join(self._directory, "ws")
        for path, into in self._kept.items():
            try:
                os.rename(os.path.join(root, path), into)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    logger.warning(
                        "could not keep %s of sandbox %s: %s", path, self._sandbox_id, exc
                    )
        self._kept.clear()

    async def terminate(self) -> None:
        """Close the agent's stream (its dead-man switch kills its commands), then make sure.

        Graceful first (bounded by `GRACEFUL_EXIT_S`), then SIGKILL to the agent's session; then
        waits (bounded) until no process of the sandbox holds its liveness pipe, killing what
        still does and everything below it; finally the directory is deleted and the
        driver's watchdog forgets the sandbox. Idempotent, and safe to call from a cancelled
        scope (it shields itself, bounded). What `keep_on_exit` names is moved out first.
        """
        if self._terminated:
            return
        self._terminated = True
        with trio.CancelScope(shield=True):
            with trio.move_on_after(GRACEFUL_EXIT_S):
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await self._stream.send_stream.aclose()
                await self._process.wait()
            if self._process.returncode is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self._process.pid, signal.SIGKILL)
                with trio.move_on_after(GRACEFUL_EXIT_S):
                    await self._process.wait()
            # The agent's keepers kill their slots' processes when it goes; the liveness
            # pipe says when they are done. Keepers that do not finish are killed from here,
            # with everything below them.
            with trio.move_on_after(GRACEFUL_EXIT_S) as waiting:
                await self._process.wait_all_gone()
            if waiting.cancelled_caught:
                pipe = self._process.alive_pipe
                await trio.to_thread.run_sync(kill_sandbox_processes, pipe)
            self._process.close_fds()
            with contextlib.suppress(trio.ClosedResourceError):
                await self._stream.receive_stream.aclose()
            if self._cgroup is not None and not await trio.to_thread.run_sync(
                remove_sandbox_cgroup, self._cgroup
            ):
                logger.warning("could not remove the sandbox's cgroup %s", self._cgroup.path)
            if self._kept:
                await trio.to_thread.run_sync(self._move_kept)
            await trio.to_thread.run_sync(remove_tree, self._directory)
            if self._watchdog is not None:
                await self._watchdog.forget(self._sandbox_id)


def _write_owner(directory: str, sandbox_id: str, alive_read: int) -> None:
    """Record who owns `directory` (see `_local_reap`): outside every workspace, so no command
    under bwrap can reach it."""
    host = proc_info(os.getpid())
    record = {
        "sandbox_id": sandbox_id,
        "host_pid": os.getpid(),
        "host_start_ticks": host.start_ticks if host is not None else None,
        "pipe": pipe_name(alive_read),
        # Before the agent starts: every process of the sandbox started after this.
        "created_ticks": now_ticks() - 1,
    }
    with open(os.path.join(directory, OWNER_FILE), "w", encoding="utf-8") as handle:
        json.dump(record, handle)


class LocalDriver:
    """Starts sandboxes as local processes. `root_dir` holds their directories (default: tmp)."""

    name = "local"

    def __init__(
        self,
        *,
        root_dir: str | None = None,
        cgroup_parent: CgroupParent | None = None,
        detect_cgroups: bool = True,
    ) -> None:
        """`cgroup_parent`: where sandboxes' cgroups go; by default (`detect_cgroups`) the
        cgroup v2 subtree the host delegated to this process, if any (`_local_cgroups`)."""
        self._root_dir = root_dir
        #: Where the sandboxes' directories go (None: the temporary directory); what the host
        #: keeps for the backend (checkpoints copied out of ended sandboxes) goes there too.
        self.root_dir = root_dir
        self.sandboxes_started = 0
        self._watchdog = _Watchdog()
        #: Why sandboxes get no cgroup ("" when they do).
        self.cgroup_problem = ""
        if cgroup_parent is None and detect_cgroups:
            cgroup_parent, self.cgroup_problem = find_delegated_cgroup()
        elif cgroup_parent is None:
            self.cgroup_problem = "cgroups turned off for this driver"
        self.cgroup_parent = cgroup_parent

    @property
    def watchdog_pid(self) -> int | None:
        """The pid of this driver's watchdog process, while it has sandboxes."""
        return self._watchdog.pid

    async def resolve_isolation(self, requested: str) -> str:
        """`bwrap` or `none` for a requested isolation; raises if `bwrap` cannot work here."""
        if requested == "none":
            return "none"
        problem = await bwrap_problem()
        if requested == "bwrap":
            if problem is not None:
                raise IsolationUnavailable(
                    f"isolation 'bwrap' was requested but {problem}; {_install_hint()}"
                )
            return "bwrap"
        if requested != "auto":
            raise IsolationUnavailable(
                f"unknown isolation {requested!r}: use 'bwrap', 'none' or 'auto'"
            )
        if problem is not None:
            logger.warning("running sandboxes WITHOUT isolation: %s; %s", problem, _install_hint())
            return "none"
        return "bwrap"

    async def create(self, spec: SandboxConfig) -> LocalSandbox:
        isolation = await self.resolve_isolation(spec.isolation)
        rootfs = spec.image if is_rootfs_image(spec.image) else None
        if rootfs is not None:
            if isolation != "bwrap":
                raise SandboxStartFailed(
                    f"image {rootfs!r} is a root filesystem, which only isolation 'bwrap' can "
                    "use as `/`: set `isolation: bwrap` (or `auto` with bubblewrap installed)",
                    retryable=False,
                )
            problem = await trio.to_thread.run_sync(rootfs_problem, rootfs)
            if problem is not None:
                raise SandboxStartFailed(problem, retryable=False)
        sandbox_id = f"local-{spec.name}-{secrets.token_hex(4)}"
        directory = tempfile.mkdtemp(prefix=f"hermes-{spec.name}-", dir=self._root_dir)
        workspace = os.path.join(directory, "ws")
        os.mkdir(workspace)
        # Slot uids must traverse the workspace root to reach their own 0700 directories.
        os.chmod(workspace, 0o711)
        as_root = os.geteuid() == 0
        # Commands inherit the agent's environment, so the host's own (its credentials
        # included) stays out: only a PATH, a locale and the marker go in, as under bwrap.
        env = {
            "PATH": os.environ.get("PATH", _SANDBOX_PATH),
            "LANG": "C.UTF-8",
            SANDBOX_MARKER_VAR: sandbox_id,
            HOST_PID_VAR: f"{os.getpid()}",
        }
        if isolation == "bwrap":
            accounts = None
            if as_root:
                etc = os.path.join(rootfs, "etc") if rootfs is not None else "/etc"
                try:
                    accounts = _write_accounts(
                        directory, etc, spec.slots_per_sandbox, spec.workspace_base
                    )
                except OSError as exc:  # the slots still work, only unnamed
                    logger.warning("no passwd entries for the slot users: %s", exc)
            argv = _bwrap_argv(
                workspace_host=workspace,
                workspace_base=spec.workspace_base,
                network=spec.network,
                sandbox_id=sandbox_id,
                as_root=as_root,
                rootfs=rootfs,
                accounts=accounts,
            )
            agent_config: dict[str, object] = {
                "workspace_root": spec.workspace_base,
                "slot_uid_base": SLOT_UID_BASE if as_root else None,
            }
        else:
            # The system python3 when there is one: the agent needs only the standard library,
            # and it is lighter than a virtualenv's interpreter.
            argv = [_agent_python()[0], "-c", BOOTSTRAP]
            agent_config = {"workspace_root": workspace, "slot_uid_base": None}
        agent_config["env"] = {SANDBOX_MARKER_VAR: sandbox_id}
        agent_config["slots"] = spec.slots_per_sandbox
        agent_config["warm_shells"] = spec.shell == "persistent"
        memory_bytes = spec.memory * MIB
        agent_config["limits"] = {"memory_bytes": memory_bytes, "processes": PROCESSES_PER_SLOT}
        cgroup = self._make_cgroup(sandbox_id, spec)
        if cgroup is not None:
            argv = join_argv(cgroup, argv)
        limits = EnforcedLimits(
            memory_bytes_per_process=memory_bytes,
            processes_per_slot=PROCESSES_PER_SLOT if agent_config["slot_uid_base"] else None,
            cpu=cgroup.cpu if cgroup is not None else None,
            memory_bytes_per_sandbox=cgroup.memory_bytes if cgroup is not None else None,
            processes_per_sandbox=cgroup.processes if cgroup is not None else None,
            cgroup=cgroup.path if cgroup is not None else None,
        )
        log_fd = os.open(os.path.join(directory, "agent.log"), os.O_WRONLY | os.O_CREAT, 0o600)
        alive_read, alive_write = os.pipe()
        try:
            # Watched before the agent exists: from here on a crash of this process leaves
            # nothing behind.
            try:
                _write_owner(directory, sandbox_id, alive_read)
                await self._watchdog.watch(
                    sandbox_id, directory, alive_read, cgroup.path if cgroup else None
                )
            except BaseException:
                os.close(alive_read)
                raise
            process = await open_agent_process(
                argv, env, directory, log_fd, (alive_read, alive_write)
            )
        except BaseException as exc:
            with trio.CancelScope(shield=True):
                # The directory holds nothing yet but an empty log and workspace.
                remove_tree(directory)
                if cgroup is not None:
                    remove_sandbox_cgroup(cgroup)
                await self._watchdog.forget(sandbox_id)
            if isinstance(exc, OSError):
                raise SandboxStartFailed(f"could not start a local sandbox: {exc}") from exc
            raise
        finally:
            os.close(alive_write)
            os.close(log_fd)
        self.sandboxes_started += 1
        return LocalSandbox(
            sandbox_id=sandbox_id,
            process=process,
            directory=directory,
            agent_config=agent_config,
            isolation=isolation,
            network=spec.network,
            enforced_limits=limits,
            watchdog=self._watchdog,
            cgroup=cgroup,
        )

    def _make_cgroup(self, sandbox_id: str, spec: SandboxConfig) -> SandboxCgroup | None:
        """The sandbox's own cgroup with the profile's limits, when the host delegated a
        subtree; None (the agent's rlimits alone) otherwise or when the kernel refuses."""
        if self.cgroup_parent is None:
            return None
        try:
            return create_sandbox_cgroup(
                self.cgroup_parent,
                f"hermes-{sandbox_id}",
                memory_bytes=spec.memory * MIB,
                cpu=spec.cpu,
                processes=spec.slots_per_sandbox * PROCESSES_PER_SLOT,
            )
        except OSError as exc:
            logger.warning(
                "could not make a cgroup for a sandbox below %s (%s): its limits are the "
                "agent's rlimits only",
                self.cgroup_parent.path,
                exc,
            )
            return None

    async def aclose(self) -> None:
        """Stop the watchdog. Each sandbox is terminated by its owner before; one that was
        not is ended by the watchdog as it exits."""
        await self._watchdog.aclose()
