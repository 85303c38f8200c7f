"""Status publication: a running runtime answers `hermes-actors status` from another process.

Each running `Runtime` publishes under the state directory (`$HERMES_ACTORS_STATE_DIR`, else
`$XDG_STATE_HOME/hermes-actors`, else `~/.local/state/hermes-actors`), in `runs/`:

* `<pid>-<run>.sock`: a Unix socket; each connection receives one JSON document (the status
  snapshot at that moment, newline-terminated) and is closed. Nothing is written while nobody
  asks, so publication costs nothing on the hot path.
* `<pid>-<run>.json`: the run's record (pid, run id, start time, profiles, socket path), so a
  reader finds the sockets and can tell a crashed run's leftovers (its pid is gone) from a live
  one.

Both are removed when the runtime stops; `read_runs` removes those of runs that died without
stopping. `HERMES_ACTORS_PUBLISH_STATUS=0` turns publication off. Publication never stops the
runtime: a state directory that cannot be written is logged (once) and skipped.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

import attrs
import cattrs
import trio

from hermes_actors._status import BackendStatus
from hermes_actors.drivers import _local_procs

__all__ = [
    "ENV_PUBLISH",
    "ENV_STATE_DIR",
    "PublishedRun",
    "publish_status",
    "read_runs",
    "runs_dir",
    "state_dir",
]

logger = logging.getLogger("hermes_actors.status")
_converter: Final = cattrs.Converter()

ENV_STATE_DIR: Final = "HERMES_ACTORS_STATE_DIR"
ENV_PUBLISH: Final = "HERMES_ACTORS_PUBLISH_STATUS"
#: How long one reader may take to receive its snapshot before the runtime gives up on it.
ANSWER_TIMEOUT_S: Final = 5.0


def state_dir(env: Mapping[str, str] | None = None) -> Path:
    """The directory hermes-actors keeps run state in (see the module docstring)."""
    environment = os.environ if env is None else env
    if environment.get(ENV_STATE_DIR):
        return Path(environment[ENV_STATE_DIR])
    if environment.get("XDG_STATE_HOME"):
        return Path(environment["XDG_STATE_HOME"]) / "hermes-actors"
    return Path.home() / ".local" / "state" / "hermes-actors"


def runs_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where running runtimes publish their records and sockets."""
    return state_dir(env) / "runs"


def pid_alive(pid: int, start_ticks: int | None = None) -> bool:
    """Whether process `pid` exists (and, given `start_ticks`, is the same process)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if start_ticks is None:
        return True
    return _local_procs.start_ticks(pid) in (start_ticks, None)


async def publish_status(
    snapshot: Callable[[], Mapping[str, Any]],
    *,
    run_id: str,
    profiles: tuple[str, ...],
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `snapshot()` on this run's socket until cancelled; then remove the socket and record.

    Reports started once the socket listens (or publication is off, or failed).
    """
    if os.environ.get(ENV_PUBLISH, "1") == "0":
        task_status.started()
        await trio.sleep_forever()
    directory = runs_dir()
    base = directory / f"{os.getpid()}-{run_id[:12]}"
    socket_path, record_path = base.with_suffix(".sock"), base.with_suffix(".json")
    listener_socket = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            await _listen(listener_socket, directory, socket_path, record_path, run_id, profiles)
        except OSError as error:
            logger.warning(
                "cannot publish status under %s (%s): `hermes-actors status` will not see this "
                "run; set %s to a writable directory",
                directory,
                error.strerror or error,
                ENV_STATE_DIR,
            )
            task_status.started()
            await trio.sleep_forever()
        listener = trio.SocketListener(listener_socket)
        task_status.started()
        async with trio.open_nursery() as nursery:
            while True:
                stream = await listener.accept()
                nursery.start_soon(_answer, stream, snapshot, name="status-reader")
    finally:
        # Sync: this runs while being cancelled, where an await would not.
        listener_socket.close()
        for path in (record_path, socket_path):
            with contextlib.suppress(OSError):
                path.unlink()


def _prepare(directory: Path, socket_path: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(FileNotFoundError):
        socket_path.unlink()  # a crashed run with our pid and run id: unlikely but cheap


async def _listen(
    listener_socket: trio.socket.SocketType,
    directory: Path,
    socket_path: Path,
    record_path: Path,
    run_id: str,
    profiles: tuple[str, ...],
) -> None:
    """Bind and listen on the run's socket, then write its record (atomically)."""
    _prepare(directory, socket_path)
    await listener_socket.bind(os.fspath(socket_path))
    os.chmod(socket_path, 0o600)
    listener_socket.listen(16)
    record = {
        "pid": os.getpid(),
        "start_ticks": _local_procs.start_ticks(os.getpid()),
        "run_id": run_id,
        "started_at": time.time(),
        "profiles": list(profiles),
        "socket": os.fspath(socket_path),
        "command": " ".join(sys.orig_argv),
    }
    temporary = record_path.with_suffix(".tmp")
    temporary.write_text(json.dumps(record))
    os.replace(temporary, record_path)


async def _answer(stream: trio.SocketStream, snapshot: Callable[[], Mapping[str, Any]]) -> None:
    with trio.move_on_after(ANSWER_TIMEOUT_S):
        try:
            data = json.dumps(snapshot()).encode() + b"\n"
            await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the reader left
        finally:
            await trio.aclose_forcefully(stream)


@attrs.frozen(kw_only=True)
class PublishedRun:
    """A running runtime found in the state directory, and its status snapshot."""

    pid: int
    run_id: str
    started_at: float
    command: str
    #: The snapshot the runtime sent (`Runtime.published_status()`).
    status: BackendStatus


def _receive(path: str, timeout_s: float) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(timeout_s)
        client.connect(path)
        chunks = []
        while chunk := client.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def read_runs(
    env: Mapping[str, str] | None = None, *, timeout_s: float = 2.0
) -> list[PublishedRun]:
    """The status of every live runtime publishing under the state directory (blocking).

    Records left by runs that died are removed. A run that does not answer within `timeout_s`
    (busy, or stopping) is left out this time.
    """
    directory = runs_dir(env)
    runs: list[PublishedRun] = []
    try:
        records = sorted(directory.glob("*.json"))
    except OSError:
        return runs
    for record_path in records:
        try:
            record = json.loads(record_path.read_text())
            pid, socket_path = int(record["pid"]), str(record["socket"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being written or removed right now
        if not pid_alive(pid, record.get("start_ticks")):
            logger.info("removing the record of run %s (process %d is gone)", record_path, pid)
            for path in (record_path, Path(socket_path)):
                with contextlib.suppress(OSError):
                    path.unlink()
            continue
        try:
            data = json.loads(_receive(socket_path, timeout_s))
        except OSError as error:
            if error.errno not in (errno.ECONNREFUSED, errno.ENOENT) and not isinstance(
                error, TimeoutError
            ):
                logger.warning("cannot read the status of run %s: %s", record_path, error)
            continue
        except ValueError:
            continue  # the run stopped while answering
        try:
            status = _converter.structure(data, BackendStatus)
        except (TypeError, KeyError, cattrs.BaseValidationError):
            continue  # the run stopped while answering, or speaks another version
        runs.append(
            PublishedRun(
                pid=pid,
                run_id=str(record.get("run_id", "")),
                started_at=float(record.get("started_at", 0.0)),
                command=str(record.get("command", "")),
                status=status,
            )
        )
    return runs
