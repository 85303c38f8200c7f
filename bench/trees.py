"""Fork, cross-sandbox fork and per-image acquire: the targets of issue 12, with ratios.

Three measurements, each against a baseline in the same run:

* **fork in one sandbox** (local backend): a workspace of `files` files / `megabytes` MB is
  forked into `branches` free slots of the source's sandbox (`ToolBackend.fork`). Baselines:
  the same copies made by one plain `cp -a` per branch in a shell command of the slot (the
  floor of an in-sandbox copy on this disk), and the peers' way: a fork per new sandbox (here
  the slots of other sandboxes, the tree streamed through the host).
* **provider calls** (Modal API emulator, real `modal` client): the RPCs the client makes
  during an in-sandbox fork, and during a cross-sandbox fork per target sandbox (attributed by
  the task id in the emulator's call log), with the source's once-per-fork calls apart; and
  during a restore of a checkpoint into another sandbox, the first and a second one.
* **acquire on a warm pool of a second image** (local backend): acquires of a slot of the
  profile's own image against acquires of a second image of the same profile, both pools warm,
  interleaved (rounds of one of each, the order alternating), `acquires` of each; the median
  per acquire of each image, its spread (10th to 90th percentile), and the ratio of the
  medians. An acquire from a warm pool takes about 0.1 ms: a handful of samples is noise at
  that scale, hence hundreds of them, interleaved so that load changes hit both images alike.

Run: `python -m bench.trees [--files 5000] [--megabytes 50] [--branches 8] [--reps 3]
[--acquires 300] [--output bench/results/trees.md]`. Prints a markdown report and writes it
to `--output`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import trio

from bench._emulator import emulator_environment

if TYPE_CHECKING:
    from hermes_actors.testing.modal_emulator import ModalEmulator

#: Targets from issue 12.
TARGET_FORK_MS = 300.0
TARGET_CROSS_CALLS_PER_TARGET = 3.0
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "trees.md"
#: The second image of the acquire measurement (locally any name but `host` is one more pool).
SECOND_IMAGE = "second-image:latest"


@attrs.frozen(kw_only=True)
class Sizes:
    files: int = 5000
    megabytes: int = 50
    branches: int = 8
    repetitions: int = 3
    #: The workspace forked across sandboxes through the emulator.
    cross_files: int = 200
    cross_megabytes: int = 10
    cross_targets: int = 3
    #: Acquires timed per image (interleaved with the other image's).
    acquires: int = 300


SMOKE = Sizes(
    files=50, megabytes=1, branches=2, repetitions=1, cross_files=5, cross_megabytes=1, acquires=3
)


def _populate(files: int, megabytes: int) -> str:
    """A shell command writing `files` files of `megabytes` MB in all under ./tree."""
    size = max(1, megabytes * 1024 * 1024 // max(1, files))
    per_dir = 100
    return (
        'python3 -c "import os\n'
        f"for i in range({files}):\n"
        f" d='tree/d%d' % (i // {per_dir})\n"
        " os.makedirs(d, exist_ok=True)\n"
        f" open(d + '/f%d' % i, 'wb').write(os.urandom({size}))\n\""
    )


async def _sh(backend: Any, slot: Any, command: str) -> str:
    [result] = await backend.execute_batch([(slot, "bash", {"command": command})])
    if not result.success:
        raise RuntimeError(f"{command!r} failed: {result.error}: {result.output}")
    return str(result.output)


@attrs.frozen(kw_only=True)
class AcquireTimes:
    """Acquires on a warm pool of one image: ms each, in the order taken."""

    samples_ms: tuple[float, ...]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def spread_ms(self) -> tuple[float, float]:
        """The 10th and 90th percentiles."""
        if len(self.samples_ms) < 2:
            return self.samples_ms[0], self.samples_ms[0]
        deciles = statistics.quantiles(self.samples_ms, n=10)
        return deciles[0], deciles[-1]

    def describe(self) -> str:
        low, high = self.spread_ms
        return f"{self.median_ms:.3f} ms (p10-p90 {low:.3f}-{high:.3f})"


@attrs.frozen(kw_only=True)
class LocalResult:
    fork_ms: tuple[float, ...]
    cp_ms: tuple[float, ...]
    cross_ms: tuple[float, ...]
    first_image: AcquireTimes
    second_image: AcquireTimes
    same_sandbox: int
    isolation: str

    @property
    def first_image_ms(self) -> float:
        return self.first_image.median_ms

    @property
    def second_image_ms(self) -> float:
        return self.second_image.median_ms


async def measure_local(sizes: Sizes, isolation: str = "auto") -> LocalResult:
    from hermes_actors import SandboxConfig, ToolBackend

    branches = sizes.branches
    config = SandboxConfig(
        backend="local",
        isolation=isolation,  # type: ignore[arg-type]
        slots_per_sandbox=branches + 1,
        min_sandboxes=1,
        max_sandboxes=2 + branches,
        idle_timeout=600.0,
        acquire_timeout_s=120.0,
        max_starting=branches,
        execution_timeout_s=600.0,
        # The `cp -a` baseline backgrounds 8 jobs: under bwrap with slot uids that kills the
        # sandbox in the persistent shell (reported to the shell's owner), so plain bash -c.
        shell="fresh",
    )
    fork_ms: list[float] = []
    cp_ms: list[float] = []
    cross_ms: list[float] = []
    async with ToolBackend(config) as backend:
        source = await backend.acquire("bench-source")
        await _sh(backend, source, _populate(sizes.files, sizes.megabytes))
        same = 0
        for _ in range(sizes.repetitions):
            started = time.perf_counter()
            forks = await backend.fork(source, branches)
            fork_ms.append((time.perf_counter() - started) * 1000)
            same = sum(fork.sandbox_id == source.sandbox_id for fork in forks)
            for fork in forks:
                await backend.release(fork)
            started = time.perf_counter()
            await _sh(
                backend,
                source,
                " & ".join(f"cp -a tree copy{index}" for index in range(branches)) + "; wait",
            )
            cp_ms.append((time.perf_counter() - started) * 1000)
            await _sh(backend, source, "rm -rf copy*")
        # Baseline: the branches in another sandbox (the peers give each branch a sandbox of
        # its own), the tree streamed through the host. The other sandbox is warmed first, so
        # only the copy is timed.
        fill = [await backend.acquire(f"bench-fill-{index}") for index in range(branches)]
        warm = [await backend.acquire(f"bench-warm-{index}") for index in range(branches)]
        for slot in warm:
            await backend.release(slot)
        for _ in range(sizes.repetitions):
            started = time.perf_counter()
            forks = await backend.fork(source, branches)
            cross_ms.append((time.perf_counter() - started) * 1000)
            assert all(fork.sandbox_id != source.sandbox_id for fork in forks)
            for slot in forks:
                await backend.release(slot)
        for slot in fill:
            await backend.release(slot)
        first, second = await _acquire_times(backend, sizes)
        isolation_used = str(getattr(source.lease.sandbox.handle, "isolation", isolation))
    return LocalResult(
        fork_ms=tuple(fork_ms),
        cp_ms=tuple(cp_ms),
        cross_ms=tuple(cross_ms),
        first_image=first,
        second_image=second,
        same_sandbox=same,
        isolation=isolation_used,
    )


async def _acquire_times(backend: Any, sizes: Sizes) -> tuple[AcquireTimes, AcquireTimes]:
    """Acquires on the profile's image and on a second image, both pools warm, interleaved:
    each round times one acquire of each, the order alternating between rounds."""
    images = (None, SECOND_IMAGE)
    for image in images:
        warm = await backend.acquire("bench-warm", image=image)
        await backend.release(warm)
    times: dict[str | None, list[float]] = {image: [] for image in images}
    for round_index in range(sizes.acquires):
        for image in images if round_index % 2 == 0 else images[::-1]:
            started = time.perf_counter()
            slot = await backend.acquire(f"bench-acquire-{round_index}", image=image)
            times[image].append((time.perf_counter() - started) * 1000)
            await backend.release(slot)
    first, second = (AcquireTimes(samples_ms=tuple(times[image])) for image in images)
    return first, second


# -- provider calls through the Modal emulator ---------------------------------------------------


#: Calls running all along in the background (the agent's stdout stream, the driver's
#: liveness long poll): in a window, but not made by what the window measures.
BACKGROUND_CALLS = frozenset({"SandboxWaitV2", "SandboxWait", "TaskExecStdioRead"})


@attrs.frozen(kw_only=True)
class ModalResult:
    #: Calls of the in-sandbox fork, background calls left out (`in_sandbox_background`).
    in_sandbox_calls: Mapping[str, int]
    in_sandbox_background: Mapping[str, int]
    #: How long the in-sandbox fork took (the client pings its agent every 20 s: a fork that
    #: long has those stdin writes in its window too).
    in_sandbox_s: float
    #: Calls of the cross-sandbox fork made once per fork (at the source sandbox) and in each
    #: target sandbox (by the target's task id); background calls left out.
    cross_source_calls: Mapping[str, int]
    cross_target_calls: tuple[Mapping[str, int], ...]
    cross_other_calls: Mapping[str, int]
    cross_targets: int
    cross_sandboxes: int
    #: Calls of a restore of a checkpoint into another sandbox's slot: the first one (the
    #: checkpoint snapshotted), then another (its snapshot kept); stdin writes included,
    #: background calls left out.
    restore_first_calls: Mapping[str, int]
    restore_again_calls: Mapping[str, int]

    @property
    def cross_calls(self) -> dict[str, int]:
        """Every call of the cross-sandbox fork, per method."""
        total: dict[str, int] = {}
        for calls in (self.cross_source_calls, self.cross_other_calls, *self.cross_target_calls):
            for method, count in calls.items():
                total[method] = total.get(method, 0) + count
        return dict(sorted(total.items()))

    @property
    def cross_calls_per_target(self) -> int:
        """Provider calls in the target sandbox that made the most."""
        return max((sum(calls.values()) for calls in self.cross_target_calls), default=0)

    @property
    def cross_calls_per_target_all_in(self) -> float:
        """Every call of the fork (the source's share included) per target sandbox."""
        return sum(self.cross_calls.values()) / max(1, self.cross_sandboxes)


def _without_background(calls: list[Any]) -> dict[str, int]:
    counted: dict[str, int] = {}
    for call in calls:
        if call.method not in BACKGROUND_CALLS:
            counted[call.method] = counted.get(call.method, 0) + 1
    return counted


def _split_calls(
    calls: list[Any], source_task: str, target_tasks: list[str]
) -> tuple[dict[str, int], list[dict[str, int]], dict[str, int], dict[str, int]]:
    """(at the source, per target, elsewhere, background) calls per method."""
    source: dict[str, int] = {}
    targets: list[dict[str, int]] = [{} for _ in target_tasks]
    other: dict[str, int] = {}
    background: dict[str, int] = {}
    for call in calls:
        task = call.fields.get("task_id")
        if call.method in BACKGROUND_CALLS:
            bucket = background
        elif task == source_task:
            bucket = source
        elif task in target_tasks:
            bucket = targets[target_tasks.index(task)]
        else:
            bucket = other
        bucket[call.method] = bucket.get(call.method, 0) + 1
    return source, targets, other, background


async def measure_modal(emulator: ModalEmulator, sizes: Sizes) -> ModalResult:
    from hermes_actors import SandboxConfig, ToolBackend

    targets = sizes.cross_targets
    common: dict[str, Any] = {
        "backend": "modal",
        "image": "python:3.11",
        "memory": 512,
        "app_name": "hermes-bench-trees",
        "acquire_timeout_s": 120.0,
        "idle_timeout": 600.0,
    }

    def task_of(sandbox_id: str) -> str:
        return next(s.task_id for s in emulator.sandboxes() if s.sandbox_id == sandbox_id)

    one_sandbox = SandboxConfig(
        name="bench-fork", slots_per_sandbox=sizes.branches + 1, min_sandboxes=1, **common
    )
    async with ToolBackend(one_sandbox, run_id="bench-trees") as backend:
        source = await backend.acquire("bench-source")
        await _sh(backend, source, _populate(sizes.files, sizes.megabytes))
        since = len(emulator.calls())
        started = time.perf_counter()
        forks = await backend.fork(source, sizes.branches)
        in_sandbox_s = time.perf_counter() - started
        window = emulator.calls()[since:]
        assert all(fork.sandbox_id == source.sandbox_id for fork in forks)
        at_source, _, elsewhere, in_background = _split_calls(
            window, task_of(source.sandbox_id), []
        )
        in_sandbox = {**elsewhere, **at_source}
    # One slot per sandbox, every sandbox warm: each fork target is another sandbox.
    spread = SandboxConfig(
        name="bench-spread",
        slots_per_sandbox=1,
        min_sandboxes=1 + targets,
        max_sandboxes=1 + targets,
        max_starting=1 + targets,
        **common,
    )
    async with ToolBackend(spread, run_id="bench-trees-spread") as backend:
        source = await backend.acquire("bench-source")
        await _sh(backend, source, _populate(sizes.cross_files, sizes.cross_megabytes))
        # Warm targets: every other sandbox is up before the window opens.
        held = [await backend.acquire(f"bench-warm-{index}") for index in range(targets)]
        for slot in held:
            await backend.release(slot)
        since = len(emulator.calls())
        cross = await backend.fork(source, targets)
        window = emulator.calls()[since:]
        target_ids = sorted({fork.sandbox_id for fork in cross})
        cross_source, per_target, cross_other, _ = _split_calls(
            window, task_of(source.sandbox_id), [task_of(each) for each in target_ids]
        )
        checkpoint = await backend.checkpoint(source)
        restores = []
        for target in cross[:2]:
            since = len(emulator.calls())
            await backend.restore(target, checkpoint)
            restores.append(_without_background(emulator.calls()[since:]))
        await backend.release_checkpoint(checkpoint)
    return ModalResult(
        in_sandbox_calls=in_sandbox,
        in_sandbox_background=in_background,
        in_sandbox_s=in_sandbox_s,
        cross_source_calls=cross_source,
        cross_target_calls=tuple(per_target),
        cross_other_calls=cross_other,
        restore_first_calls=restores[0],
        restore_again_calls=restores[-1],
        cross_targets=targets,
        cross_sandboxes=len(target_ids),
    )


def _control(calls: Mapping[str, int]) -> int:
    """Provider calls other than stdin writes to the agent."""
    return sum(count for method, count in calls.items() if method != "TaskExecStdinWrite")


def render(sizes: Sizes, local: LocalResult, modal: ModalResult | None) -> str:
    fork = statistics.median(local.fork_ms)
    cp = statistics.median(local.cp_ms)
    cross = statistics.median(local.cross_ms)
    lines = [
        "# Checkpoint, fork and per-task images (issue 12)",
        "",
        f"Workspace: {sizes.files} files, {sizes.megabytes} MB; {sizes.branches} branches; "
        f"median of {sizes.repetitions} repetition(s); local isolation {local.isolation}.",
        "",
        "| measurement | median | ratio | target | met |",
        "|---|---:|---:|---:|:---:|",
        f"| fork into {sizes.branches} slots of the source's sandbox ({local.same_sandbox} "
        f"landed there) | {fork:.0f} ms | 1.00 | <= {TARGET_FORK_MS:.0f} ms | "
        f"{'yes' if fork <= TARGET_FORK_MS else 'NO'} |",
        f"| baseline: {sizes.branches} x `cp -a` in the slot (disk floor) | {cp:.0f} ms | "
        f"{fork / cp:.2f}x (fork / floor) | | |",
        f"| baseline: fork into {sizes.branches} other sandboxes (through the host) | "
        f"{cross:.0f} ms | {cross / fork:.2f}x slower than in-sandbox | | |",
        f"| acquire on a warm pool, profile's image ({len(local.first_image.samples_ms)} "
        f"acquires) | {local.first_image.describe()} | 1.00 | | |",
        f"| acquire on a warm pool, second image ({len(local.second_image.samples_ms)} "
        f"acquires, interleaved) | {local.second_image.describe()} | "
        f"{local.second_image_ms / local.first_image_ms:.2f}x | <= 1x (10% noise) | "
        f"{'yes' if local.second_image_ms <= local.first_image_ms * 1.1 else 'NO'} |",
    ]
    if modal is not None:
        in_total = sum(modal.in_sandbox_calls.values())
        control = in_total - modal.in_sandbox_calls.get("TaskExecStdinWrite", 0)
        per_target = modal.cross_calls_per_target
        all_in = modal.cross_calls_per_target_all_in

        def listed(calls: Mapping[str, int]) -> str:
            return ", ".join(f"{method} {count}" for method, count in calls.items()) or "none"

        lines += [
            f"| Modal: provider calls per fork, in the source's sandbox ({sizes.branches} "
            f"slots) | {in_total} | | stdin writes only | {'yes' if control == 0 else 'NO'} |",
            f"| Modal: ... of which control plane (create, snapshot, mount, exec) | "
            f"{control} | | 0 | {'yes' if control == 0 else 'NO'} |",
            f"| Modal: provider calls per target sandbox, cross-sandbox fork "
            f"({modal.cross_targets} targets, {modal.cross_sandboxes} sandboxes, "
            f"{sizes.cross_files} files, {sizes.cross_megabytes} MB) | {per_target} | | <= "
            f"{TARGET_CROSS_CALLS_PER_TARGET:g} | "
            f"{'yes' if per_target <= TARGET_CROSS_CALLS_PER_TARGET else 'NO'} |",
            f"| Modal: ... with the source's once-per-fork calls shared out | {all_in:.2f} | | | |",
            f"| Modal: provider calls of a restore into another sandbox, first / again (stdin "
            f"writes included) | {sum(modal.restore_first_calls.values())} / "
            f"{sum(modal.restore_again_calls.values())} | | "
            f"<= {TARGET_CROSS_CALLS_PER_TARGET:g} + stdin writes | "
            f"{'yes' if _control(modal.restore_first_calls) <= 3 else 'NO'} |",
            "",
            f"Calls of the in-sandbox fork: {listed(modal.in_sandbox_calls)}, in "
            f"{modal.in_sandbox_s:.1f} s (the client's heartbeat writes its agent a ping every "
            f"20 s; in the background meanwhile: {listed(modal.in_sandbox_background)}).",
            f"Calls of the cross-sandbox fork: at the source, once: "
            f"{listed(modal.cross_source_calls)}; in each target sandbox: "
            + "; ".join(listed(calls) for calls in modal.cross_target_calls)
            + (f"; elsewhere: {listed(modal.cross_other_calls)}" if modal.cross_other_calls else "")
            + ".",
            "Calls of a restore into another sandbox: the first "
            f"{listed(modal.restore_first_calls)}; again {listed(modal.restore_again_calls)}.",
        ]
    lines += [
        "",
        "The in-sandbox fork is one request to the sandbox's agent. Where it may mount (root, "
        "locally), the agent freezes the source's tree in place as a layer and makes each "
        "workspace an overlay on it (idmapped for the other slot uids): no tree is copied. "
        "Elsewhere it copies the tree with `cp -a --reflink=auto` per branch (hard links kept; "
        "copy-on-write where the filesystem has reflinks) and hands each copy to its slot's uid. "
        "Provider calls are every RPC the modal client made in the window, stdin writes to the "
        "agent included; the agent's stdout stream and the driver's liveness long poll run all "
        "along and are listed apart. "
        "A fork into other sandboxes snapshots the source slot's directory once "
        "(`Sandbox.snapshot_directory`) and reads its shell state; each target sandbox mounts "
        "the snapshot (`mount_image`), copies it into its target slots with one request to its "
        "agent, and unmounts it: the count does not grow with the tree, which never passes "
        "through the host. A restore into another sandbox snapshots the checkpoint at its "
        "first use (kept as the checkpoint's copy, which also outlives its sandbox), then "
        "mounts, copies and unmounts like a fork's target.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    defaults = Sizes()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=defaults.files)
    parser.add_argument("--megabytes", type=int, default=defaults.megabytes)
    parser.add_argument("--branches", type=int, default=defaults.branches)
    parser.add_argument("--reps", type=int, default=defaults.repetitions)
    parser.add_argument("--acquires", type=int, default=defaults.acquires)
    parser.add_argument("--isolation", default="auto", choices=["auto", "bwrap", "none"])
    parser.add_argument("--no-modal", action="store_true", help="skip the emulator part")
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT))
    args = parser.parse_args(argv)
    sizes = attrs.evolve(
        defaults,
        files=args.files,
        megabytes=args.megabytes,
        branches=args.branches,
        repetitions=args.reps,
        acquires=args.acquires,
    )
    modal: ModalResult | None = None
    if not args.no_modal:
        with emulator_environment() as emulator:
            modal = trio.run(measure_modal, emulator, sizes)
    local = trio.run(measure_local, sizes, args.isolation)
    report = render(sizes, local, modal)
    print(report, end="")
    if args.output:
        output = Path(args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(report)


if __name__ == "__main__":
    main()
