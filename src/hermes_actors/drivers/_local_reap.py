"""Finding and stopping what dead local runs left behind (`hermes-actors reap`).

Local sandboxes normally never outlive their run: bubblewrap dies with its parent, the agent
kills everything it started when its stream closes, and the driver's watchdog removes the
directories of a run that died (`_local_procs`). What can still be left, when the watchdog died
with its host (both SIGKILLed, the OOM killer) or a sandbox was stuck: its directory under the
temporary directory (workspaces and the agent's log), and the processes of a sandbox whose
agent was stopped or stuck.

Ownership comes from facts no command can change. Each sandbox directory holds an owner record
(`OWNER_FILE`, written by the host before the agent starts, outside every workspace): the host's
pid and start time, and the sandbox's liveness pipe. A sandbox is left behind when its host is
gone (pid gone, or reused by a process started later); its processes are then the writers of
that pipe and everything below them (each slot's keeper is a subreaper, so orphans stay below
it). Environment variables are never consulted: a command can strip or forge them. A directory
without an owner record (a sandbox being created, or made by an older version) is left behind
only when its agent log is older than `min_age_s`.

A backend's directory of checkpoint copies (`CHECKPOINT_COPIES_PREFIX`, kept on the host for
sandboxes that ended) records its host the same way (`OWNER_FILE`: pid and start time); it is
left behind once that host is gone.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
import time
from pathlib import Path

import attrs

from hermes_actors.drivers._local import OWNER_FILE
from hermes_actors.drivers._local_procs import (
    is_alive,
    kill_all,
    process_table,
    remove_tree,
    sandbox_processes,
    start_ticks,
)

__all__ = ["LocalLeftovers", "find_local_leftovers", "reap_local"]


@attrs.frozen(kw_only=True)
class LocalLeftovers:
    """What dead local runs left: sandboxes with processes still running (id -> pids) and
    directories."""

    sandboxes: dict[str, tuple[int, ...]]
    directories: tuple[str, ...]
    #: Each leftover sandbox's liveness pipe (``pipe:[inode]``): how `reap_local` finds its
    #: processes again (new ones may have started since).
    pipes: dict[str, tuple[str, int | None]] = attrs.field(factory=dict, repr=False)

    @property
    def empty(self) -> bool:
        return not self.sandboxes and not self.directories


@attrs.frozen(kw_only=True)
class _Owner:
    sandbox_id: str
    host_pid: int
    host_start_ticks: int | None
    pipe: str
    created_ticks: int | None


def _read_owner(directory: Path) -> _Owner | None:
    try:
        record = json.loads((directory / OWNER_FILE).read_text())
        return _Owner(
            sandbox_id=str(record["sandbox_id"]),
            host_pid=int(record["host_pid"]),
            host_start_ticks=record.get("host_start_ticks"),
            pipe=str(record["pipe"]),
            created_ticks=record.get("created_ticks"),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


#: How a backend's directory of checkpoint copies is named (`runtime._trees.CheckpointLedger`).
CHECKPOINT_COPIES_PREFIX = "hermes-checkpoints-"


def write_host_record(directory: Path) -> None:
    """Record this process as the owner of `directory` (a directory of checkpoint copies)."""
    pid = os.getpid()
    record = {"host_pid": pid, "host_start_ticks": start_ticks(pid)}
    (directory / OWNER_FILE).write_text(json.dumps(record))


def _host_gone(directory: Path) -> bool:
    """Whether the host recorded in `directory` is gone (False when there is no record)."""
    try:
        record = json.loads((directory / OWNER_FILE).read_text())
        return not is_alive(int(record["host_pid"]), record.get("host_start_ticks"))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def find_local_leftovers(root_dir: str | None = None, *, min_age_s: float = 60.0) -> LocalLeftovers:
    """What dead local runs left on this machine (see the module docstring). Reads only."""
    root = Path(root_dir or tempfile.gettempdir())
    table = process_table()
    sandboxes: dict[str, tuple[int, ...]] = {}
    pipes: dict[str, tuple[str, int | None]] = {}
    directories = []
    now = time.time()
    for candidate in sorted(root.glob("hermes-*")):
        if candidate.name.startswith(CHECKPOINT_COPIES_PREFIX):
            if candidate.is_dir() and _host_gone(candidate):
                directories.append(os.fspath(candidate))
            continue
        if not (candidate / "ws").is_dir():
            continue
        owner = _read_owner(candidate)
        if owner is None:
            try:
                if now - (candidate / "agent.log").stat().st_mtime < min_age_s:
                    continue
            except OSError:
                continue
        else:
            if is_alive(owner.host_pid, owner.host_start_ticks):
                continue
            pids = sandbox_processes(owner.pipe, table, started_after=owner.created_ticks)
            if pids:
                sandboxes[owner.sandbox_id] = tuple(sorted(pids))
                pipes[owner.sandbox_id] = (owner.pipe, owner.created_ticks)
        directories.append(os.fspath(candidate))
    return LocalLeftovers(sandboxes=sandboxes, directories=tuple(directories), pipes=pipes)


def reap_local(leftovers: LocalLeftovers) -> int:
    """Kill the leftover sandboxes' processes and remove the leftover directories.

    Returns how many processes were killed.
    """
    killed = 0
    for pipe, created in leftovers.pipes.values():
        killed += kill_all(functools.partial(sandbox_processes, pipe, started_after=created))
    for directory in leftovers.directories:
        with contextlib.suppress(FileNotFoundError):
            remove_tree(directory)
    return killed
