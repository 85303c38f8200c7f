"""The five workloads of issue 4, the hermes-actors rows, and the harness that runs every row.

Workloads (sizes in `Sizes`; `FULL` is the issue's, `SMOKE` the test suite's):

1. `tiny`: trajectories x sequential `echo` commands, all trajectories at once (spawn-bound).
1b. `external`: the same with `/bin/echo`, an external command: a process per command for every
   row, so a shell builtin is never the only evidence.
2. `short`: trajectories x sequential `sleep S; echo` commands (concurrency-bound).
3. `latency`: sequential `true` calls on one warm task, after `LATENCY_WARMUP_S` of untimed
   ones; per-call times (p50, p95).
4. `churn`: trajectories through a fixed number of slots: acquire, commands, release with reset.
5. `scale`: every slot held at once, one command each; wall time and the host's peak memory.

A row (`System`) runs the same commands at the same concurrency as every other row; each
command's exit status and output are checked against what it must print, so a row that goes
fast by doing nothing shows up as failures, not as a good figure. Setup that is not part of the
workload (starting a pool and acquiring the slots of workloads 1 and 2, starting SWE-ReX
sessions) is outside the timed region; workload 4 times acquire and release, workload 5 times
everything from a cold start.

Workload 5 runs each row in a child process (`python -m bench _scale-child ...`) while this
process samples the resident memory of the child's whole process tree (the row's own process
and every process it started: sandbox agents, bubblewrap, shells), so the peak is the row's
footprint alone.

Within a repetition every workload runs every row, in an order rotated at each repetition so
that drift of the machine spreads over all rows.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import attrs
import trio

WORKLOADS = ("tiny", "external", "short", "latency", "churn", "scale")

#: A command's outcome as a row reports it: exit status (None when unknown) and its output.
Outcome = tuple[int | None, str]

#: Before its timed calls, every row of workload 3 makes untimed `true` calls for this long (at
#: least one), so that the workload measures a task's steady state. The first hundred or two
#: calls on new processes run slower: hermes' p50 over calls 1-150 of a new sandbox was
#: 0.56 ms, over calls 150-1500 0.44-0.45 ms. It is not the host's garbage collector (a
#: collection first changes nothing) nor elapsed time (a pause of 1 s first changes nothing):
#: it goes with the number of calls made, as the kernel's view of the new processes does.
LATENCY_WARMUP_S = 0.5


def warm_up(call: Callable[[], object]) -> None:
    """Call `call()` for `LATENCY_WARMUP_S` (at least once), untimed."""
    until = time.perf_counter() + LATENCY_WARMUP_S
    call()
    while time.perf_counter() < until:
        call()


async def warm_up_async(call: Callable[[], Awaitable[object]]) -> None:
    """`warm_up` for a row that is awaited."""
    until = time.perf_counter() + LATENCY_WARMUP_S
    await call()
    while time.perf_counter() < until:
        await call()


@attrs.frozen(kw_only=True)
class Sizes:
    """How big each workload is."""

    tiny_trajectories: int = 40
    tiny_commands: int = 25
    short_trajectories: int = 40
    short_commands: int = 5
    short_sleep_s: float = 0.05
    latency_calls: int = 300
    churn_trajectories: int = 500
    churn_slots: int = 50
    churn_commands: int = 3
    scale_slots: int = 1000
    #: Slots per sandbox of the hermes rows: workloads 1, 2 and 4, then workload 5.
    slots_per_sandbox: int = 10
    scale_slots_per_sandbox: int = 100


FULL = Sizes()
SMOKE = Sizes(
    tiny_trajectories=3,
    tiny_commands=3,
    short_trajectories=3,
    short_commands=2,
    short_sleep_s=0.01,
    latency_calls=5,
    churn_trajectories=5,
    churn_slots=2,
    churn_commands=3,
    scale_slots=6,
    slots_per_sandbox=2,
    scale_slots_per_sandbox=4,
)


@attrs.frozen(kw_only=True)
class Command:
    """One command of a workload and the output (stripped) it must print."""

    text: str
    expected: str


def plan_for(workload: str, sizes: Sizes) -> list[list[Command]]:
    """The commands of a workload: one list per trajectory, run in order.

    `latency` is one trajectory of `true` calls; `scale` is one command per slot.
    """
    if workload == "tiny":
        return [
            [
                Command(text=f"echo t{i}c{k}", expected=f"t{i}c{k}")
                for k in range(sizes.tiny_commands)
            ]
            for i in range(sizes.tiny_trajectories)
        ]
    if workload == "external":
        return [
            [
                Command(text=f"/bin/echo t{i}c{k}", expected=f"t{i}c{k}")
                for k in range(sizes.tiny_commands)
            ]
            for i in range(sizes.tiny_trajectories)
        ]
    if workload == "short":
        return [
            [
                Command(text=f"sleep {sizes.short_sleep_s:g}; echo t{i}c{k}", expected=f"t{i}c{k}")
                for k in range(sizes.short_commands)
            ]
            for i in range(sizes.short_trajectories)
        ]
    if workload == "latency":
        return [[Command(text="true", expected="") for _ in range(sizes.latency_calls)]]
    if workload == "churn":
        return [
            [
                Command(text=f"echo t{i}c{k}", expected=f"t{i}c{k}")
                for k in range(sizes.churn_commands)
            ]
            for i in range(sizes.churn_trajectories)
        ]
    if workload == "scale":
        return [[Command(text=f"echo s{i}", expected=f"s{i}")] for i in range(sizes.scale_slots)]
    raise ValueError(f"unknown workload {workload!r}; workloads are {', '.join(WORKLOADS)}")


def texts(plan: Sequence[Sequence[Command]]) -> list[list[str]]:
    return [[command.text for command in trajectory] for trajectory in plan]


@attrs.frozen(kw_only=True)
class Timed:
    """What a row reports for one workload: timed wall, per-call times, every outcome."""

    wall_s: float
    outcomes: list[list[Outcome]]
    per_call_s: tuple[float, ...] = ()


class System(Protocol):
    """One row of the tables: a way to run shell commands.

    Each method runs the commands it is given (one list per trajectory, each list in order)
    and returns the timed wall and every command's outcome, in the same shape. Methods are
    blocking: each row runs its own event loop or threads, the way its users would.
    """

    name: str
    shell: str
    description: str

    def unavailable(self) -> str | None:
        """Why this row cannot run here (a package or bubblewrap missing), or None."""
        ...

    def run_trajectories(self, plan: list[list[str]], sizes: Sizes) -> Timed:
        """Workloads 1 and 2: every trajectory at once, each one command after another."""
        ...

    def run_latency(self, commands: list[str], sizes: Sizes) -> Timed:
        """Workload 3: one warm task, one call after another; `per_call_s` set."""
        ...

    def run_churn(self, plan: list[list[str]], slots: int, sizes: Sizes) -> Timed:
        """Workload 4: trajectories through `slots` places, each set up and torn down."""
        ...

    def run_scale(self, plan: list[list[str]], sizes: Sizes) -> Timed:
        """Workload 5: every trajectory holds its place at once and runs its one command."""
        ...


# ---------------------------------------------------------------------------------------------
# The hermes-actors rows
# ---------------------------------------------------------------------------------------------


class HermesSystem:
    """hermes-actors on the local backend: `ToolBackend.execute_batch`, and `terminal_tool`.

    `shell` is the profile's `shell` setting: `fresh` (a `bash -c` per command, the rows
    `hermes-none`/`hermes-bwrap`) or `persistent` (one long-lived bash per slot, the rows
    `hermes-persistent-none`/`hermes-persistent-bwrap`). The persistent rows also set
    `reuse_shell` (a release keeps the slot's idle shell, set back and checked), as an RL
    trainer, the one party behind every lease, would.

    Workloads 1 and 2 send one `execute_batch` holding every trajectory's commands (calls for
    one slot run in request order, slots run concurrently); workload 3 calls `terminal_tool` on
    one task; workload 4 runs every trajectory as its own task (acquire, one `execute_batch` per
    command, release with reset) with the pool's slots as the bound; workload 5 acquires every
    slot from a cold start and sends one batch.
    """

    shell = "bash"

    def __init__(self, isolation: str, shell: str = "fresh") -> None:
        self.isolation = isolation
        self.shell_mode = shell
        if shell == "fresh":
            self.name = f"hermes-{isolation}"
            self.description = (
                f"hermes-actors, local backend, `isolation: {isolation}`, `shell: fresh` "
                "(a `bash -c` per command)"
            )
        else:
            self.name = f"hermes-{shell}-{isolation}"
            self.description = (
                f"hermes-actors, local backend, `isolation: {isolation}`, `shell: {shell}`, "
                "`reuse_shell: true` (one long-lived bash per slot, kept from lease to lease)"
            )
        self._probed = False
        self._problem: str | None = None

    def _config(self, slots: int, per_sandbox: int) -> Any:
        from hermes_actors import SandboxConfig

        per_sandbox = max(1, min(per_sandbox, slots))
        sandboxes = math.ceil(slots / per_sandbox)
        return SandboxConfig(
            name="bench",
            backend="local",
            isolation=self.isolation,  # type: ignore[arg-type]
            shell=self.shell_mode,  # type: ignore[arg-type]
            reuse_shell=self.shell_mode == "persistent",
            slots_per_sandbox=per_sandbox,
            min_sandboxes=sandboxes,
            max_sandboxes=sandboxes,
            max_starting=sandboxes,
            acquire_timeout_s=600.0,
            execution_timeout_s=120.0,
            idle_timeout=600.0,
        )

    def unavailable(self) -> str | None:
        if not self._probed:
            self._problem = trio.run(self._probe)
            self._probed = True
        return self._problem

    async def _probe(self) -> str | None:
        from hermes_actors import HermesError, ToolBackend

        try:
            async with ToolBackend(self._config(1, 1)) as backend:
                slot = await backend.acquire("probe")
                [result] = await backend.execute_batch([(slot, "bash", {"command": "true"})])
                if not result.success:
                    return f"a command fails: {result.error}"
        except HermesError as exc:
            return str(exc)
        return None

    def run_trajectories(self, plan: list[list[str]], sizes: Sizes) -> Timed:
        return trio.run(self._trajectories, plan, sizes)

    async def _trajectories(self, plan: list[list[str]], sizes: Sizes) -> Timed:
        from hermes_actors import ToolBackend

        async with ToolBackend(self._config(len(plan), sizes.slots_per_sandbox)) as backend:
            slots = await _acquire_all(backend, len(plan), "traj")
            steps = max(len(commands) for commands in plan)
            requests = []
            where = []
            for step in range(steps):
                for index, commands in enumerate(plan):
                    if step < len(commands):
                        requests.append((slots[index], "bash", {"command": commands[step]}))
                        where.append(index)
            started = time.perf_counter()
            results = await backend.execute_batch(requests)
            wall = time.perf_counter() - started
        outcomes: list[list[Outcome]] = [[] for _ in plan]
        for index, result in zip(where, results, strict=True):
            outcomes[index].append(_outcome_of(result))
        return Timed(wall_s=wall, outcomes=outcomes)

    def run_latency(self, commands: list[str], sizes: Sizes) -> Timed:
        from hermes_actors import cleanup_vm, shutdown_terminal_backend, terminal_tool

        with tempfile.TemporaryDirectory(prefix="hermes-bench-") as directory:
            path = os.path.join(directory, "profiles.yaml")
            with open(path, "w") as handle:
                json.dump(
                    {
                        "default_profile": "bench",
                        "profiles": {
                            "bench": {
                                "backend": "local",
                                "isolation": self.isolation,
                                "shell": self.shell_mode,
                                "reuse_shell": self.shell_mode == "persistent",
                                "slots_per_sandbox": 1,
                                "min_sandboxes": 1,
                                "max_sandboxes": 1,
                            }
                        },
                    },
                    handle,
                )
            with _environment(TERMINAL_MODAL_PROFILES_FILE=path, TERMINAL_ENV="local"):
                shutdown_terminal_backend()
                try:
                    task = "bench-latency"
                    warm_up(lambda: terminal_tool("true", task_id=task))  # the task's slot
                    per_call = []
                    outcomes: list[Outcome] = []
                    for command in commands:
                        started = time.perf_counter()
                        reply = terminal_tool(command, task_id=task)
                        per_call.append(time.perf_counter() - started)
                        decoded = json.loads(reply)
                        outcomes.append((decoded["exit_code"], decoded["output"]))
                    cleanup_vm(task)
                finally:
                    shutdown_terminal_backend()
        return Timed(wall_s=sum(per_call), outcomes=[outcomes], per_call_s=tuple(per_call))

    def run_churn(self, plan: list[list[str]], slots: int, sizes: Sizes) -> Timed:
        return trio.run(self._churn, plan, slots, sizes)

    async def _churn(self, plan: list[list[str]], slots: int, sizes: Sizes) -> Timed:
        from hermes_actors import ToolBackend

        outcomes: list[list[Outcome]] = [[] for _ in plan]
        async with ToolBackend(self._config(slots, sizes.slots_per_sandbox)) as backend:
            # Pre-warm: every slot acquired once, so the timed part finds the pool ready.
            for slot in await _acquire_all(backend, slots, "warm"):
                await backend.release(slot, reset_workspace=False)

            async def trajectory(index: int) -> None:
                slot = await backend.acquire(f"churn-{index}")
                for command in plan[index]:
                    [result] = await backend.execute_batch([(slot, "bash", {"command": command})])
                    outcomes[index].append(_outcome_of(result))
                await backend.release(slot, reset_workspace=True)

            started = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for index in range(len(plan)):
                    nursery.start_soon(trajectory, index)
            wall = time.perf_counter() - started
        return Timed(wall_s=wall, outcomes=outcomes)

    def run_scale(self, plan: list[list[str]], sizes: Sizes) -> Timed:
        return trio.run(self._scale, plan, sizes)

    async def _scale(self, plan: list[list[str]], sizes: Sizes) -> Timed:
        from hermes_actors import ToolBackend

        started = time.perf_counter()
        config = self._config(len(plan), sizes.scale_slots_per_sandbox)
        async with ToolBackend(config) as backend:
            slots = await _acquire_all(backend, len(plan), "scale")
            held = backend.status().slots_held_by_caller
            results = await backend.execute_batch(
                [
                    (slot, "bash", {"command": commands[0]})
                    for slot, commands in zip(slots, plan, strict=True)
                ]
            )
            wall = time.perf_counter() - started
        outcomes = [[_outcome_of(result)] for result in results]
        if held != len(plan):
            outcomes[0][0] = (None, f"only {held} of {len(plan)} slots were held at once")
        return Timed(wall_s=wall, outcomes=outcomes)


async def _acquire_all(backend: Any, count: int, prefix: str) -> list[Any]:
    """`count` slots, acquired concurrently, in trajectory order."""
    slots: list[Any] = [None] * count

    async def take(index: int) -> None:
        slots[index] = await backend.acquire(f"{prefix}-{index}")

    async with trio.open_nursery() as nursery:
        for index in range(count):
            nursery.start_soon(take, index)
    return slots


def _outcome_of(result: Any) -> Outcome:
    exit_code = result.metadata.get("exit_code")
    if result.error is not None and exit_code is None:
        return (None, f"error: {result.error}")
    return (exit_code, result.output)


@contextmanager
def _environment(**values: str) -> Iterator[None]:
    """Set environment variables for the duration of the block, then restore them."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def empty_home() -> Iterator[str]:
    """Run with HOME pointing at a fresh empty directory, so no start-up file is read.

    Also keeps mini-swe-agent's import quiet and its global config inside that directory.
    """
    with (
        tempfile.TemporaryDirectory(prefix="hermes-bench-home-") as home,
        _environment(
            HOME=home,
            MSWEA_SILENT_STARTUP="1",
            MSWEA_GLOBAL_CONFIG_DIR=os.path.join(home, ".config", "mini-swe-agent"),
        ),
    ):
        yield home


# ---------------------------------------------------------------------------------------------
# Host memory of a process tree
# ---------------------------------------------------------------------------------------------

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def tree_pids(root: int) -> list[int]:
    """`root` and all its live descendants (through /proc/<pid>/task/<tid>/children)."""
    found = []
    pending = [root]
    while pending:
        pid = pending.pop()
        found.append(pid)
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{pid}/task/{task}/children") as handle:
                    pending.extend(int(child) for child in handle.read().split())
            except OSError:
                continue
    return found


def tree_rss_bytes(root: int) -> int:
    """The summed resident set size of `root` and all its descendants, in bytes."""
    return tree_memory(root)[0]


def tree_memory(root: int) -> tuple[int, int]:
    """Summed RSS and summed PSS of `root` and all its descendants, in bytes.

    RSS counts every page a process maps, so pages shared between processes (the interpreter,
    libraries, a forked child's copy-on-write pages, a vfork child's borrowed address space)
    count once per process: the sum is an upper bound of what the tree costs the host. PSS
    splits each shared page between the processes that share it, so its sum is the tree's share
    of host memory.
    """
    rss = pss = 0
    for pid in tree_pids(root):
        try:
            with open(f"/proc/{pid}/statm") as handle:
                resident = int(handle.read().split()[1]) * _PAGE_SIZE
            proportional = 0
            with open(f"/proc/{pid}/smaps_rollup") as handle:
                for line in handle:
                    if line.startswith("Pss:"):
                        proportional = int(line.split()[1]) * 1024
                        break
        except (OSError, IndexError, ValueError):
            continue  # the process exited between the listing and the reads
        rss += resident
        pss += proportional
    return rss, pss


class TreeMemorySampler:
    """Samples `tree_memory(root)` on a thread until stopped; keeps the peaks."""

    def __init__(self, root: int, interval_s: float = 0.01) -> None:
        self.root = root
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.peak_pss_bytes = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-memory", daemon=True)

    def _run(self) -> None:
        while True:
            rss, pss = tree_memory(self.root)
            self.peak_bytes = max(self.peak_bytes, rss)
            self.peak_pss_bytes = max(self.peak_pss_bytes, pss)
            self.samples += 1
            if self._stop.wait(self.interval_s):
                return

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> int:
        """Stop sampling and return the peak summed RSS, in bytes."""
        self._stop.set()
        self._thread.join()
        return self.peak_bytes


# ---------------------------------------------------------------------------------------------
# The harness
# ---------------------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Measurement:
    """One row's run of one workload in one repetition."""

    workload: str
    system: str
    repetition: int
    wall_s: float
    commands: int
    failures: int
    first_failure: str | None = None
    per_call_s: tuple[float, ...] = ()
    peak_rss_bytes: int | None = None
    peak_pss_bytes: int | None = None
    memory_samples: int = 0


@attrs.frozen(kw_only=True)
class RowInfo:
    name: str
    shell: str
    description: str
    unavailable: str | None


@attrs.frozen(kw_only=True)
class BenchResult:
    """Everything one run measured, and what it could not measure and why."""

    sizes: Sizes
    repetitions: int
    rows: tuple[RowInfo, ...]
    workloads: tuple[str, ...]
    measurements: tuple[Measurement, ...]
    #: (system, workload) -> why that cell was not run.
    skipped: Mapping[tuple[str, str], str]
    machine: Mapping[str, str]
    started_at: str
    duration_s: float


def check_outcomes(
    plan: Sequence[Sequence[Command]], outcomes: Sequence[Sequence[Outcome]]
) -> tuple[int, int, str | None]:
    """Commands run, commands that failed (wrong status or output, or missing), first failure."""
    total = sum(len(trajectory) for trajectory in plan)
    failures = 0
    first: str | None = None
    if len(outcomes) != len(plan):
        return total, total, f"{len(outcomes)} trajectories reported for {len(plan)}"
    for trajectory, reported in zip(plan, outcomes, strict=True):
        for index, command in enumerate(trajectory):
            if index >= len(reported):
                failures += 1
                first = first or f"{command.text!r}: no outcome reported"
                continue
            exit_code, output = reported[index]
            if exit_code != 0 or output.strip() != command.expected:
                failures += 1
                first = first or f"{command.text!r}: exit {exit_code}, output {output[:200]!r}"
        if len(reported) > len(trajectory):
            failures += len(reported) - len(trajectory)
            first = first or "more outcomes than commands"
    return total, failures, first


def run_workload(system: System, workload: str, sizes: Sizes, repetition: int) -> Measurement:
    """Run one workload on one row in this process (workload 5: in a child, see `run_scale`)."""
    plan = plan_for(workload, sizes)
    if workload == "scale":
        return run_scale_in_child(system, sizes, repetition)
    if workload in ("tiny", "external", "short"):
        timed = system.run_trajectories(texts(plan), sizes)
    elif workload == "latency":
        timed = system.run_latency(texts(plan)[0], sizes)
    elif workload == "churn":
        timed = system.run_churn(texts(plan), sizes.churn_slots, sizes)
    else:
        raise ValueError(f"unknown workload {workload!r}")
    commands, failures, first = check_outcomes(plan, timed.outcomes)
    return Measurement(
        workload=workload,
        system=system.name,
        repetition=repetition,
        wall_s=timed.wall_s,
        commands=commands,
        failures=failures,
        first_failure=first,
        per_call_s=timed.per_call_s,
    )


def run_scale_in_child(system: System, sizes: Sizes, repetition: int) -> Measurement:
    """Workload 5 in a child process, sampling its whole process tree's memory meanwhile."""
    plan = plan_for("scale", sizes)
    with tempfile.TemporaryDirectory(prefix="hermes-bench-scale-") as directory:
        result_path = os.path.join(directory, "result.json")
        argv = [
            sys.executable,
            "-m",
            "bench",
            "_scale-child",
            system.name,
            json.dumps(attrs.asdict(sizes)),
            result_path,
        ]
        child = subprocess.Popen(
            argv,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        sampler = TreeMemorySampler(child.pid)
        sampler.start()
        try:
            log, _ = child.communicate(timeout=900)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            peak = sampler.stop()
        if child.returncode != 0 or not os.path.exists(result_path):
            text = log.decode(errors="replace")[-2000:]
            return Measurement(
                workload="scale",
                system=system.name,
                repetition=repetition,
                wall_s=math.nan,
                commands=len(plan),
                failures=len(plan),
                first_failure=f"the child exited {child.returncode}: {text}",
                peak_rss_bytes=peak,
                peak_pss_bytes=sampler.peak_pss_bytes,
                memory_samples=sampler.samples,
            )
        with open(result_path) as handle:
            reported = json.load(handle)
    outcomes = [
        [(exit_code, output) for exit_code, output in trajectory]
        for trajectory in reported["outcomes"]
    ]
    commands, failures, first = check_outcomes(plan, outcomes)
    return Measurement(
        workload="scale",
        system=system.name,
        repetition=repetition,
        wall_s=float(reported["wall_s"]),
        commands=commands,
        failures=failures,
        first_failure=first,
        peak_rss_bytes=peak,
        peak_pss_bytes=sampler.peak_pss_bytes,
        memory_samples=sampler.samples,
    )


def scale_child(system: System, sizes_json: str, result_path: str) -> None:
    """The child side of workload 5: run it and write `{wall_s, outcomes}` to `result_path`."""
    import resource

    sizes = Sizes(**json.loads(sizes_json))
    # A thousand processes at once need more descriptors than the usual soft limit of 1024.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    timed = system.run_scale(texts(plan_for("scale", sizes)), sizes)
    with open(result_path, "w") as handle:
        json.dump({"wall_s": timed.wall_s, "outcomes": timed.outcomes}, handle)


def run_benchmark(
    systems: Sequence[System],
    sizes: Sizes,
    repetitions: int,
    *,
    workloads: Sequence[str] = WORKLOADS,
    skip: Mapping[tuple[str, str], str] | None = None,
    progress: Callable[[str], None] = lambda line: None,
) -> BenchResult:
    """Run every workload on every available row, `repetitions` times, interleaved.

    Rows that are unavailable here are reported with the reason; `skip` names cells not to
    run, with the reason the report gives. A row that raises is recorded as failing all its
    commands (with the error), and the run goes on.
    """
    started_at = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    began = time.perf_counter()
    skipped = dict(skip or {})
    rows = []
    with empty_home():
        machine = describe_machine()
        for system in systems:
            rows.append(
                RowInfo(
                    name=system.name,
                    shell=system.shell,
                    description=system.description,
                    unavailable=system.unavailable(),
                )
            )
        runnable = [s for s, row in zip(systems, rows, strict=True) if row.unavailable is None]
        measurements = []
        for repetition in range(repetitions):
            for workload in workloads:
                shift = repetition % max(1, len(runnable))
                for system in runnable[shift:] + runnable[:shift]:
                    if (system.name, workload) in skipped:
                        continue
                    progress(f"rep {repetition + 1}/{repetitions} {workload:8} {system.name}")
                    try:
                        measurement = run_workload(system, workload, sizes, repetition)
                    except Exception as exc:  # a broken row must not hide the others
                        total = sum(len(t) for t in plan_for(workload, sizes))
                        measurement = Measurement(
                            workload=workload,
                            system=system.name,
                            repetition=repetition,
                            wall_s=math.nan,
                            commands=total,
                            failures=total,
                            first_failure=describe_error(exc),
                        )
                    measurements.append(measurement)
                    progress(f"    {_summary(measurement)}")
    return BenchResult(
        sizes=sizes,
        repetitions=repetitions,
        rows=tuple(rows),
        workloads=tuple(workloads),
        measurements=tuple(measurements),
        skipped=skipped,
        machine=machine,
        started_at=started_at,
        duration_s=time.perf_counter() - began,
    )


def describe_error(error: BaseException) -> str:
    """`Type: message` of an error, or of the errors inside an exception group."""
    if isinstance(error, BaseExceptionGroup):
        return "; ".join(describe_error(inner) for inner in error.exceptions)
    return f"{type(error).__name__}: {error}"


def _summary(measurement: Measurement) -> str:
    parts = [f"{measurement.wall_s:.3f} s"]
    if measurement.per_call_s:
        parts.append(f"p50 {percentile(measurement.per_call_s, 50) * 1e3:.2f} ms")
    if measurement.peak_rss_bytes is not None:
        parts.append(
            f"peak RSS {measurement.peak_rss_bytes / 1e6:.0f} MB, "
            f"PSS {(measurement.peak_pss_bytes or 0) / 1e6:.0f} MB"
        )
    if measurement.failures:
        parts.append(
            f"{measurement.failures}/{measurement.commands} FAILED: {measurement.first_failure}"
        )
    return ", ".join(parts)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (linear interpolation between closest ranks)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


# ---------------------------------------------------------------------------------------------
# The machine
# ---------------------------------------------------------------------------------------------


def _read(path: str) -> str:
    try:
        with open(path) as handle:
            return handle.read()
    except OSError:
        return ""


def _command_output(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "not available"
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0] if text else "?"


def _version(distribution: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def describe_machine() -> dict[str, str]:
    """CPU model, cores, memory, kernel, python, shells and package versions."""
    import platform

    cpuinfo = _read("/proc/cpuinfo")
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in cpuinfo.splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown",
    )
    meminfo = _read("/proc/meminfo")
    total_kib = next(
        (int(line.split()[1]) for line in meminfo.splitlines() if line.startswith("MemTotal:")), 0
    )
    load = _read("/proc/loadavg").split()[:3]
    repository = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    commit = _command_output(["git", "-C", repository, "rev-parse", "--short", "HEAD"])
    changed = _command_output(["git", "-C", repository, "status", "--porcelain", "--", "src"])
    return {
        "cpu": model,
        "cores": str(os.cpu_count()),
        "memory": f"{total_kib / 2**20:.1f} GiB",
        "kernel": platform.release(),
        "os": _read("/etc/os-release").partition('PRETTY_NAME="')[2].partition('"')[0] or "?",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "bash": _command_output(["bash", "--version"]),
        "/bin/sh": os.path.realpath("/bin/sh"),
        "bubblewrap": _command_output(["bwrap", "--version"]),
        "load average at start": " ".join(load),
        "hermes-actors": f"{_version('hermes-actors')} at commit {commit}"
        + (" (src/ has uncommitted changes)" if changed != "?" else ""),
        "trio": _version("trio"),
        "swe-rex": _version("swe-rex"),
        "mini-swe-agent": _version("mini-swe-agent"),
        "matplotlib": _version("matplotlib"),
    }
