"""Per-sandbox cgroup v2 limits, where the host has delegated a cgroup v2 subtree to the runtime.

The local driver limits memory, cpu and processes with one cgroup per sandbox when it may, and
falls back to the agent's rlimits when it may not (`EnforcedLimits` says which happened).

When the runtime may (`find_delegated_cgroup`): either `HERMES_CGROUP_PARENT` names a cgroup v2
directory an operator delegated to it, or the process's own cgroup (the ``0::<path>`` line of
/proc/self/cgroup, under the cgroup2 mount found in /proc/self/mountinfo) has been prepared for
children by whoever delegated it (systemd's ``Delegate=yes``, a container runtime): it is
writable by this process and its ``cgroup.subtree_control`` already enables at least one of
the ``memory``, ``cpu`` and ``pids`` controllers. The runtime never enables a controller and
never writes to a cgroup it did not create: it only makes (and later removes) one child per
sandbox below that parent, ``hermes-<sandbox id>``, with ``memory.max`` (the profile's memory;
``memory.swap.max`` 0 where swap is accounted), ``cpu.max`` (the profile's cpu) and
``pids.max``, for the controllers the parent enables. Hosts with cgroup v1 only, or a v2
hierarchy whose controllers stay with the host (as the machines this was written on), get no
cgroup: `find_delegated_cgroup` says why.

The sandbox's first process joins its cgroup before it runs anything (`join_argv`: a shell
writes its own pid into ``cgroup.procs``, then execs the agent), so everything the sandbox ever
starts is in it. Removing it writes ``cgroup.kill`` (which ends every process left inside at
once), waits for it to empty and removes the directory.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping

import attrs

from hermes_actors.drivers._local_procs import remove_cgroup

__all__ = [
    "CONTROLLERS",
    "ENV_CGROUP_PARENT",
    "CgroupParent",
    "SandboxCgroup",
    "create_sandbox_cgroup",
    "find_delegated_cgroup",
    "join_argv",
    "remove_sandbox_cgroup",
]

#: The controllers the runtime uses, when the parent cgroup enables them.
CONTROLLERS = ("memory", "cpu", "pids")
#: Names a cgroup v2 directory delegated to the runtime (overrides the detection).
ENV_CGROUP_PARENT = "HERMES_CGROUP_PARENT"
#: The period `cpu.max` is written with, in microseconds (the kernel's default).
CPU_PERIOD_US = 100_000
#: How long removing a sandbox's cgroup waits for its processes to be gone.
REMOVE_WAIT_S = 2.0


@attrs.frozen(kw_only=True)
class CgroupParent:
    """A cgroup v2 directory delegated to the runtime: sandboxes' cgroups are made below it."""

    path: str
    #: Of `CONTROLLERS`, those its `cgroup.subtree_control` enables.
    controllers: frozenset[str]


@attrs.frozen(kw_only=True)
class SandboxCgroup:
    """One sandbox's cgroup and the limits written into it (None: that controller is off)."""

    path: str
    memory_bytes: int | None
    cpu: float | None
    processes: int | None

    @property
    def procs_file(self) -> str:
        return os.path.join(self.path, "cgroup.procs")


def _writable(path: str) -> bool:
    return os.access(path, os.W_OK)


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except OSError:
        return None


def _own_cgroup_dir(proc_self: str) -> tuple[str | None, str]:
    """This process's cgroup v2 directory, or None and why there is none."""
    membership = _read(os.path.join(proc_self, "cgroup"))
    if membership is None:
        return None, "cannot read /proc/self/cgroup"
    own = next((line[3:] for line in membership.splitlines() if line.startswith("0::")), None)
    if own is None:
        return None, "this process is in no cgroup v2 hierarchy (cgroup v1 only)"
    mounts = _read(os.path.join(proc_self, "mountinfo")) or ""
    for line in mounts.splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        fstype = line.split(" - ", 1)[1].split()[0]
        if fstype != "cgroup2":
            continue
        root, mount_point = fields[3], fields[4]
        if own != root and not own.startswith(root.rstrip("/") + "/"):
            continue
        relative = own[len(root) :].lstrip("/") if root != "/" else own.lstrip("/")
        return os.path.join(mount_point, relative) if relative else mount_point, ""
    return None, "no cgroup2 file system holding this process's cgroup is mounted"


def find_delegated_cgroup(
    *,
    proc_self: str = "/proc/self",
    environ: Mapping[str, str] | None = None,
    writable: Callable[[str], bool] = _writable,
) -> tuple[CgroupParent | None, str]:
    """The cgroup v2 directory delegated to the runtime (see the module docstring), or None and
    the reason there is none. Reads only."""
    environ = os.environ if environ is None else environ
    explicit = environ.get(ENV_CGROUP_PARENT)
    if explicit:
        directory: str | None = explicit
        where = f"{ENV_CGROUP_PARENT}={explicit}"
    else:
        directory, why = _own_cgroup_dir(proc_self)
        if directory is None:
            return None, why
        where = f"this process's cgroup {directory}"
    assert directory is not None
    enabled = _read(os.path.join(directory, "cgroup.subtree_control"))
    if enabled is None:
        return None, f"{where} is not a cgroup v2 directory (no cgroup.subtree_control)"
    if not writable(directory) or not writable(os.path.join(directory, "cgroup.subtree_control")):
        return None, f"{where} is not writable by this process (not delegated to it)"
    controllers = frozenset(enabled.split()) & frozenset(CONTROLLERS)
    if not controllers:
        return None, (
            f"{where} enables none of {', '.join(CONTROLLERS)} for its children "
            f"(cgroup.subtree_control: {enabled.strip() or 'empty'})"
        )
    return CgroupParent(path=directory, controllers=controllers), ""


def _write(path: str, value: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(value)


def create_sandbox_cgroup(
    parent: CgroupParent,
    name: str,
    *,
    memory_bytes: int,
    cpu: float,
    processes: int,
) -> SandboxCgroup:
    """Make `parent/name` with the limits its parent's controllers allow. Raises OSError (and
    leaves nothing) when the kernel refuses."""
    path = os.path.join(parent.path, name)
    os.mkdir(path)
    try:
        cgroup = SandboxCgroup(
            path=path,
            memory_bytes=memory_bytes if "memory" in parent.controllers else None,
            cpu=cpu if "cpu" in parent.controllers else None,
            processes=processes if "pids" in parent.controllers else None,
        )
        if cgroup.memory_bytes is not None:
            _write(os.path.join(path, "memory.max"), f"{cgroup.memory_bytes}\n")
            swap = os.path.join(path, "memory.swap.max")
            if os.path.exists(swap):  # only where swap is accounted
                _write(swap, "0\n")
        if cgroup.cpu is not None:
            quota = max(1000, round(cgroup.cpu * CPU_PERIOD_US))
            _write(os.path.join(path, "cpu.max"), f"{quota} {CPU_PERIOD_US}\n")
        if cgroup.processes is not None:
            _write(os.path.join(path, "pids.max"), f"{cgroup.processes}\n")
    except BaseException:
        with contextlib.suppress(OSError):
            os.rmdir(path)
        raise
    return cgroup


def join_argv(cgroup: SandboxCgroup, argv: list[str]) -> list[str]:
    """`argv` run by a shell that first moves itself into `cgroup` (then execs `argv`)."""
    script = 'echo $$ > "$1" || exit 126; shift; exec "$@"'
    return ["/bin/sh", "-c", script, "hermes-cgroup-join", cgroup.procs_file, *argv]


def remove_sandbox_cgroup(cgroup: SandboxCgroup, wait_s: float = REMOVE_WAIT_S) -> bool:
    """Kill whatever is left in the sandbox's cgroup and remove it; whether it is gone."""
    return remove_cgroup(cgroup.path, wait_s)
