"""API calls per command and batch throughput on the modal backend, against one exec per command.

Through the Modal API emulator (`hermes_actors.testing.modal_emulator`) driven by the real
`modal` client, with an injected round-trip latency on every RPC (default 20 ms):

* **hermes-actors**: a `ToolBackend` with one `backend: modal` profile (2 sandboxes x 10 slots by
  default), all 20 slots held, then `execute_batch` of 200 `bash` calls (10 per slot). Each
  command travels over the agent's one long-lived exec: a stdin write (shared by every frame
  queued meanwhile, so a sandbox's whole batch can go in one) and the already open stdout
  stream.
* **baseline**: the original design, one provider exec per command: `sb.exec("bash", "-c",
  cmd)`, read its stdout, `wait()`, with as many commands in flight as there are slots (20),
  on sandboxes created up front.

Calls are counted from the emulator's per-method counters (every RPC the client made, stdin
writes and stdout reads included) over the measured window. The window excludes the one-off
calls (app/image lookup, sandbox create, the agent's exec start and bootstrap, terminate); the
"whole run" figure adds them back, spread over the batch's commands. Repetitions are
interleaved (hermes, baseline, hermes at no latency, ...) and medians reported.

Run: `python -m bench.modal_calls [--commands 200] [--sandboxes 2] [--slots 10]
[--latency-ms 20] [--reps 5] [--output bench/results/modal_calls.md]`. The output is a markdown
table, printed and written to `--output` (nothing is written with `--output ''`).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import trio

from bench._emulator import call_delta, emulator_environment

if TYPE_CHECKING:
    from hermes_actors.testing.modal_emulator import ModalEmulator

#: Targets from issue 5.
TARGET_CALLS_PER_COMMAND = 0.25
TARGET_SPEEDUP = 5.0

APP_NAME = "hermes-bench-modal-calls"
IMAGE = "python:3.11"
FLOOR_NAME = "hermes-actors, no injected latency (CPU floor)"
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "modal_calls.md"


@attrs.frozen(kw_only=True)
class Sizes:
    """How big one measurement is."""

    commands: int = 200
    sandboxes: int = 2
    slots_per_sandbox: int = 10
    latency_s: float = 0.02
    repetitions: int = 5

    @property
    def slots(self) -> int:
        return self.sandboxes * self.slots_per_sandbox


#: What the smoke test runs (no timing is asserted at this size).
SMOKE = Sizes(commands=8, sandboxes=1, slots_per_sandbox=4, latency_s=0.005, repetitions=1)


@attrs.frozen(kw_only=True)
class Run:
    """One measured batch: its wall time, and the RPCs the client made during it, by method."""

    wall_s: float
    calls: Mapping[str, int]
    failures: int

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())


@attrs.frozen(kw_only=True)
class SystemResult:
    """Every repetition of one system, and the calls of its whole run (setup to teardown)."""

    name: str
    runs: tuple[Run, ...]
    whole_run_calls: Mapping[str, int]
    commands: int

    @property
    def wall_s(self) -> float:
        return statistics.median(run.wall_s for run in self.runs)

    @property
    def throughput(self) -> float:
        """Commands per second (median repetition)."""
        return self.commands / self.wall_s

    @property
    def calls_per_command(self) -> float:
        """RPCs per command over the measured windows (one-off calls excluded)."""
        return sum(run.total_calls for run in self.runs) / (self.commands * len(self.runs))

    @property
    def whole_run_calls_per_command(self) -> float:
        """RPCs per command over the whole run, one-off calls included."""
        return sum(self.whole_run_calls.values()) / (self.commands * len(self.runs))

    @property
    def failures(self) -> int:
        return sum(run.failures for run in self.runs)


@attrs.frozen(kw_only=True)
class Result:
    sizes: Sizes
    hermes: SystemResult
    baseline: SystemResult
    floor: SystemResult

    @property
    def speedup(self) -> float:
        """hermes-actors' throughput over the baseline's (median repetitions)."""
        return self.hermes.throughput / self.baseline.throughput

    @property
    def bound_speedup(self) -> float:
        """The best speedup this machine allows: the CPU floor plus one stdin-write round trip."""
        return self.baseline.wall_s / (self.floor.wall_s + self.sizes.latency_s)


def _command(repetition: int, index: int) -> str:
    return f"echo r{repetition}-c{index}"


def _expected(repetition: int, index: int) -> str:
    return f"r{repetition}-c{index}\n"


# -- hermes-actors ---------------------------------------------------------------------------


class HermesRunner:
    """A started `ToolBackend` on the modal backend with every slot held."""

    name = "hermes-actors (agent over one exec)"

    def __init__(self, emulator: ModalEmulator, sizes: Sizes) -> None:
        self.emulator = emulator
        self.sizes = sizes
        self._backend: Any = None
        self._slots: list[Any] = []
        self._stack = contextlib.AsyncExitStack()

    async def start(self) -> None:
        from hermes_actors import SandboxConfig, ToolBackend

        config = SandboxConfig(
            name="bench",
            backend="modal",
            image=IMAGE,
            cpu=1.0,
            memory=512,
            slots_per_sandbox=self.sizes.slots_per_sandbox,
            min_sandboxes=self.sizes.sandboxes,
            max_sandboxes=self.sizes.sandboxes,
            max_starting=self.sizes.sandboxes,
            app_name=APP_NAME,
        )
        self._backend = ToolBackend(config, run_id="bench-hermes")
        # Structured (`async with`): the runtime runs in this trio run, not on a portal thread.
        await self._stack.enter_async_context(self._backend)
        self._slots = [
            await self._backend.acquire(f"trajectory-{index}") for index in range(self.sizes.slots)
        ]

    async def batch(self, repetition: int) -> int:
        """Run the batch; return how many commands failed or printed the wrong thing."""
        requests = [
            (
                self._slots[index % len(self._slots)],
                "bash",
                {"command": _command(repetition, index)},
            )
            for index in range(self.sizes.commands)
        ]
        results = await self._backend.execute_batch(requests)
        return sum(
            1
            for index, result in enumerate(results)
            if not result.success or result.output != _expected(repetition, index)
        )

    async def stop(self) -> None:
        await self._stack.aclose()


# -- the baseline: one provider exec per command ---------------------------------------------


class BaselineRunner:
    """Sandboxes created up front; each command is its own `sb.exec`, read, `wait`."""

    name = "baseline (one sb.exec per command)"

    def __init__(self, emulator: ModalEmulator, sizes: Sizes) -> None:
        self.emulator = emulator
        self.sizes = sizes
        self._sandboxes: list[Any] = []
        self._limiter = trio.CapacityLimiter(sizes.slots)

    async def start(self) -> None:
        await trio.to_thread.run_sync(self._create_all)

    def _create_all(self) -> None:
        import modal

        app = modal.App.lookup(APP_NAME, create_if_missing=True)
        image = modal.Image.from_registry(IMAGE)
        for _ in range(self.sizes.sandboxes):
            self._sandboxes.append(
                modal.Sandbox.create(app=app, image=image, cpu=1.0, memory=512, timeout=600)
            )

    @staticmethod
    def _exec(sandbox: Any, command: str) -> tuple[int, str]:
        process = sandbox.exec("bash", "-c", command)
        output: str = process.stdout.read()
        code: int = process.wait()
        return code, output

    async def batch(self, repetition: int) -> int:
        failures = 0

        async def one_slot(slot: int) -> None:
            nonlocal failures
            # Slot `slot` lives in sandbox slot // slots_per_sandbox, as in the hermes run.
            sandbox = self._sandboxes[slot // self.sizes.slots_per_sandbox]
            for index in range(slot, self.sizes.commands, self.sizes.slots):
                code, output = await trio.to_thread.run_sync(
                    self._exec, sandbox, _command(repetition, index), limiter=self._limiter
                )
                if code != 0 or output != _expected(repetition, index):
                    failures += 1

        async with trio.open_nursery() as nursery:
            for slot in range(self.sizes.slots):
                nursery.start_soon(one_slot, slot)
        return failures

    async def stop(self) -> None:
        for sandbox in self._sandboxes:
            await trio.to_thread.run_sync(sandbox.terminate)
        self._sandboxes.clear()


# -- measurement -----------------------------------------------------------------------------


async def measure(emulator: ModalEmulator, sizes: Sizes) -> Result:
    """Run both systems on `emulator` (whose modal client env is already exported).

    Each repetition runs, in order: hermes-actors, the baseline, then hermes-actors again with
    no injected latency (the CPU floor of this machine, where the emulator, the modal client
    and the agents share the cores).
    """
    hermes, baseline = HermesRunner(emulator, sizes), BaselineRunner(emulator, sizes)
    rows: list[tuple[str, HermesRunner | BaselineRunner, float]] = [
        (HermesRunner.name, hermes, sizes.latency_s),
        (BaselineRunner.name, baseline, sizes.latency_s),
        (FLOOR_NAME, hermes, 0.0),
    ]
    runs: dict[str, list[Run]] = {name: [] for name, _, _ in rows}
    # One-off calls are charged to the system that made them (the floor row shares hermes').
    one_off: dict[str, dict[str, int]] = {HermesRunner.name: {}, BaselineRunner.name: {}}
    emulator.set_latency(sizes.latency_s)
    try:
        for runner in (hermes, baseline):
            before = emulator.call_counts()
            await runner.start()
            _add(one_off[runner.name], call_delta(emulator.call_counts(), before))
        for repetition in range(sizes.repetitions):
            for name, runner, latency in rows:
                emulator.set_latency(latency)
                before = emulator.call_counts()
                started = time.perf_counter()
                failures = await runner.batch(repetition)
                wall = time.perf_counter() - started
                calls = call_delta(emulator.call_counts(), before)
                runs[name].append(Run(wall_s=wall, calls=calls, failures=failures))
    finally:
        emulator.set_latency(sizes.latency_s)
        for runner in (hermes, baseline):
            before = emulator.call_counts()
            await runner.stop()
            _add(one_off[runner.name], call_delta(emulator.call_counts(), before))
        emulator.set_latency(0.0)

    def system(name: str, one_off_calls: Mapping[str, int]) -> SystemResult:
        whole: dict[str, int] = dict(one_off_calls)
        for run in runs[name]:
            _add(whole, run.calls)
        return SystemResult(
            name=name, runs=tuple(runs[name]), whole_run_calls=whole, commands=sizes.commands
        )

    return Result(
        sizes=sizes,
        hermes=system(HermesRunner.name, one_off[HermesRunner.name]),
        baseline=system(BaselineRunner.name, one_off[BaselineRunner.name]),
        floor=system(FLOOR_NAME, {}),
    )


def _add(totals: dict[str, int], calls: Mapping[str, int]) -> None:
    for method, count in calls.items():
        totals[method] = totals.get(method, 0) + count


def render(result: Result) -> str:
    """The markdown report: figures, ratios against the baseline and the targets."""
    sizes = result.sizes
    hermes, baseline, floor = result.hermes, result.baseline, result.floor
    calls_ok = hermes.calls_per_command <= TARGET_CALLS_PER_COMMAND
    speed_ok = result.speedup >= TARGET_SPEEDUP

    def calls_breakdown(system: SystemResult) -> str:
        totals: dict[str, int] = {}
        for run in system.runs:
            _add(totals, run.calls)
        return ", ".join(f"{method} {count}" for method, count in totals.items()) or "none"

    lines = [
        "# Modal backend: API calls per command and batch throughput (issue 5)",
        "",
        f"{sizes.commands} `bash` commands over {sizes.slots} slots ({sizes.sandboxes} sandboxes "
        f"x {sizes.slots_per_sandbox} slots, {sizes.commands // max(1, sizes.slots)} commands "
        f"per slot), {sizes.slots} in flight; the real modal client against the Modal API "
        f"emulator with {sizes.latency_s * 1000:g} ms injected per RPC; median of "
        f"{sizes.repetitions} interleaved repetition(s).",
        "",
        "| system | calls/command (batch) | calls/command (whole run) | batch wall time "
        "| commands/s | failures |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in (hermes, baseline):
        lines.append(
            f"| {row.name} | {row.calls_per_command:.3f} | "
            f"{row.whole_run_calls_per_command:.3f} | {row.wall_s * 1000:.0f} ms | "
            f"{row.throughput:.0f} | {row.failures} |"
        )
    lines.append(
        f"| {floor.name} | {floor.calls_per_command:.3f} | | {floor.wall_s * 1000:.0f} ms | "
        f"{floor.throughput:.0f} | {floor.failures} |"
    )
    call_ratio = (
        baseline.calls_per_command / hermes.calls_per_command
        if hermes.calls_per_command
        else math.inf
    )
    lines += [
        "",
        "| ratio | measured | target | met |",
        "|---|---:|---:|:---:|",
        f"| hermes calls/command (batch) | {hermes.calls_per_command:.3f} | "
        f"<= {TARGET_CALLS_PER_COMMAND} | {'yes' if calls_ok else 'NO'} |",
        f"| throughput vs baseline | {result.speedup:.2f}x | >= {TARGET_SPEEDUP:g}x | "
        f"{'yes' if speed_ok else 'NO'} |",
        f"| baseline calls / hermes calls (batch) | {call_ratio:.1f}x | | |",
        f"| bound on this machine: baseline / (floor + one round trip) | "
        f"{result.bound_speedup:.2f}x | | |",
        "",
        f"Calls in the measured batches: hermes: {calls_breakdown(hermes)}; "
        f"baseline: {calls_breakdown(baseline)}.",
        "",
        "Whole run = the batches plus the one-off calls (app and image lookup, sandbox create, "
        "the agent's exec start and bootstrap, slot acquisition, terminate), per command of "
        "every repetition. The floor row is the same hermes-actors batch with no injected "
        "latency: what the shared cores cost per command (the emulator, the modal client and the "
        "agents all run here). `execute_batch` hands each slot's calls to the agent at once (the "
        "agent runs them in order), so a sandbox's whole batch can ride one stdin write: no "
        "batch beats the floor plus one round trip, and the bound row divides the baseline's "
        "time by that.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    defaults = Sizes()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commands", type=int, default=defaults.commands)
    parser.add_argument("--sandboxes", type=int, default=defaults.sandboxes)
    parser.add_argument("--slots", type=int, default=defaults.slots_per_sandbox)
    parser.add_argument("--latency-ms", type=float, default=defaults.latency_s * 1000)
    parser.add_argument("--reps", type=int, default=defaults.repetitions)
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT))
    args = parser.parse_args(argv)
    sizes = Sizes(
        commands=args.commands,
        sandboxes=args.sandboxes,
        slots_per_sandbox=args.slots,
        latency_s=args.latency_ms / 1000,
        repetitions=args.reps,
    )
    with emulator_environment() as emulator:
        result = trio.run(measure, emulator, sizes)
    report = render(result)
    print(report, end="")
    if args.output:
        output = Path(args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(report)


if __name__ == "__main__":
    main()
