"""Fault suite, soak: thousands of commands from 100 trajectories under random faults.

Per isolation mode, 50 trio trajectories (one `ToolBackend` in `async with`) and 50 asyncio
trajectories (another `ToolBackend`, through its portal, from an asyncio loop in a thread) run
at once, each sending `COMMANDS_PER_TRAJECTORY` requests: plain commands that echo a unique tag,
commands that hit a random timeout, calls the caller cancels at a random moment, multi-request
batches, and releases in mid-trajectory; meanwhile a chaos task SIGKILLs a random sandbox's agent
each time the run passes another fifth of its requests. The figures: every request is answered
exactly once (by its own result, or by the caller's cancellation), each plain command's answer
carries its own tag, and afterwards the process's fds, threads, child processes and temp
directories are back where they started, with RSS within a bound. The random choices are
seeded: the same faults are injected every run.
"""

from __future__ import annotations

import asyncio
import functools
import os
import random
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from fault_support import Reliability, Resources, descendants, is_sandbox_root, wait_for
from hermes_actors import (
    InfrastructureError,
    SandboxConfig,
    Slot,
    ToolBackend,
    profiles_from_mapping,
)

pytestmark = pytest.mark.faults

TRAJECTORIES_PER_LOOP = 50
COMMANDS_PER_TRAJECTORY = 25
#: Agent SIGKILLs per isolation mode, spread over the run.
AGENT_KILLS = 4
#: RSS the soak may add to the test process (buffers, caches, the portal's loop).
RSS_BOUND_KIB = 150 * 1024
SEED = 8
SLOTS_PER_SANDBOX = 10


@attrs.define
class Tally:
    """What the trajectories sent and got back."""

    requests: int = 0
    answered: int = 0
    cancelled: int = 0
    wrong: list[str] = attrs.field(factory=list)
    execution_ids: set[str] = attrs.field(factory=set)
    injected: Counter[str] = attrs.field(factory=Counter)
    infra_errors: Counter[str] = attrs.field(factory=Counter)
    kills: int = 0

    def take(self, requests: list[tuple[Slot, str, dict[str, Any]]], results: list[Any]) -> None:
        """Judge one batch's results against its requests."""
        if len(results) != len(requests):
            self.wrong.append(f"{len(requests)} requests got {len(results)} results")
        for (_, tool, args), result in zip(requests, results, strict=False):
            if result.execution_id in self.execution_ids:
                self.wrong.append(f"result {result.execution_id} delivered twice")
            self.execution_ids.add(result.execution_id)
            self.answered += 1
            infra = result.metadata.get("infra_error")
            if infra is not None:
                self.infra_errors[infra] += 1
                continue
            expected = args.get("expect")
            if expected == "timeout":
                if not result.metadata.get("timed_out") or result.success:
                    self.wrong.append(f"{args['command']!r} did not time out: {result}")
            elif expected is not None and (not result.success or result.output != expected):
                self.wrong.append(f"{tool} expected {expected!r}, got {result}")


def _request(slot: Slot, rng: random.Random, tag: str, tally: Tally) -> list[Any]:
    """One random step's batch: a plain command, a timeout, or a small multi-request batch."""
    roll = rng.random()
    if roll < 0.12:
        tally.injected["timeout"] += 1
        timeout = round(rng.uniform(0.05, 0.3), 3)
        command = f"sleep 5; echo {tag}"
        return [(slot, "bash", {"command": command, "timeout": timeout, "expect": "timeout"})]
    if roll < 0.24:
        return [
            (slot, "write_file", {"path": f"{tag}.txt", "content": tag}),
            (slot, "read_file", {"path": f"{tag}.txt", "expect": tag}),
            (slot, "bash", {"command": f"cat {tag}.txt; echo", "expect": f"{tag}\n"}),
        ]
    return [(slot, "bash", {"command": f"echo {tag}", "expect": f"{tag}\n"})]


def _strip(batch: list[Any]) -> list[Any]:
    """The requests as sent (`expect` is the test's own note)."""
    return [
        (slot, tool, {k: v for k, v in args.items() if k != "expect"}) for slot, tool, args in batch
    ]


CANCEL_SHARE = 0.08
RELEASE_SHARE = 0.05


@attrs.frozen
class Loop:
    """What differs between a trio and an asyncio trainer: names, sleeping, giving up."""

    name: str  # in the trajectories' seeds
    prefix: str  # of their trajectory ids and tags
    sleep: Callable[[float], Awaitable[object]]
    #: Await the call, or give up on it after the seconds given; True when it finished.
    within: Callable[[Callable[[], Awaitable[object]], float], Awaitable[bool]]


async def _trio_within(call: Callable[[], Awaitable[object]], seconds: float) -> bool:
    with trio.move_on_after(seconds) as scope:
        await call()
    return not scope.cancelled_caught


async def _asyncio_within(call: Callable[[], Awaitable[object]], seconds: float) -> bool:
    try:
        await asyncio.wait_for(call(), seconds)
    except TimeoutError:
        return False
    return True


TRIO = Loop(name="trio", prefix="trio", sleep=trio.sleep, within=_trio_within)
ASYNCIO = Loop(name="asyncio", prefix="aio", sleep=asyncio.sleep, within=_asyncio_within)


async def trajectory(loop: Loop, backend: ToolBackend, index: int, tally: Tally) -> None:
    rng = random.Random(f"{SEED}-{loop.name}-{index}")
    name = f"{loop.prefix}-{index}"
    slot = await _acquire(loop, backend, name, tally)
    for step in range(COMMANDS_PER_TRAJECTORY):
        tag = f"{loop.prefix}{index}x{step}"
        if rng.random() < RELEASE_SHARE:
            tally.injected["release"] += 1
            await backend.release(slot)
            slot = await _acquire(loop, backend, f"{name}-{step}", tally)
        if rng.random() < CANCEL_SHARE:
            tally.injected["cancel"] += 1
            tally.requests += 1
            request = [(slot, "bash", {"command": f"sleep 2; echo {tag}"})]
            call = functools.partial(backend.execute_batch, request, timeout_s=10)
            if await loop.within(call, rng.uniform(0.01, 0.2)):
                tally.answered += 1
            else:
                tally.cancelled += 1
            continue
        batch = _request(slot, rng, tag, tally)
        tally.requests += len(batch)
        results = await backend.execute_batch(_strip(batch), timeout_s=30)
        tally.take(batch, results)
        if any("infra_error" in result.metadata for result in results):
            await backend.release(slot, reset_workspace=False)
            slot = await _acquire(loop, backend, f"{name}-{step}-again", tally)
    await backend.release(slot)


async def _acquire(loop: Loop, backend: ToolBackend, trajectory: str, tally: Tally) -> Slot:
    while True:
        try:
            return await backend.acquire(trajectory)
        except InfrastructureError as exc:
            tally.infra_errors[f"acquire: {exc.kind}"] += 1
            await loop.sleep(0.1)


def run_asyncio_loop(profiles: Any, tally: Tally) -> None:
    async def main() -> None:
        backend = ToolBackend(profiles)
        try:
            await asyncio.gather(
                *(trajectory(ASYNCIO, backend, n, tally) for n in range(TRAJECTORIES_PER_LOOP))
            )
        finally:
            await backend.stop()

    asyncio.run(main())


def kill_one_agent(rng: random.Random) -> bool:
    """SIGKILL one sandbox of this process, chosen at random (its agent, or its bwrap)."""
    own = os.getpid()
    roots = [proc for proc in descendants(own) if proc.ppid == own and is_sandbox_root(proc)]
    if not roots:
        return False
    os.kill(rng.choice(roots).pid, signal.SIGKILL)
    return True


async def chaos(tally: Tally, done: trio.Event) -> None:
    """SIGKILL a random sandbox each time the run passes one more share of its requests."""
    rng = random.Random(f"{SEED}-chaos")
    expected = 2 * TRAJECTORIES_PER_LOOP * COMMANDS_PER_TRAJECTORY
    thresholds = [expected * (n + 1) // (AGENT_KILLS + 1) for n in range(AGENT_KILLS)]
    while tally.kills < AGENT_KILLS and not done.is_set():
        with trio.move_on_after(0.05):
            await done.wait()
        if tally.requests >= thresholds[tally.kills] and kill_one_agent(rng):
            tally.kills += 1


@pytest.mark.parametrize("isolation", ["none", "bwrap"])
async def test_soak_under_random_faults(
    isolation: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    reliability: Reliability,
) -> None:
    """Every request is answered once, correctly; fds, threads, processes and dirs come back."""
    sandboxes_dir = tmp_path / "sandboxes"
    sandboxes_dir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(sandboxes_dir))
    config = SandboxConfig(
        name="soak",
        backend="local",
        isolation=isolation,  # type: ignore[arg-type]
        slots_per_sandbox=SLOTS_PER_SANDBOX,
        min_sandboxes=0,
        max_sandboxes=8,
        max_starting=4,
        acquire_timeout_s=60,
    )
    profiles = profiles_from_mapping({"soak": config}, default_profile="soak")
    start = Resources.now(sandboxes_dir)
    tally = Tally()
    started = time.monotonic()
    async with ToolBackend(profiles) as backend:
        done = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(chaos, tally, done)

            async def trio_side() -> None:
                async with trio.open_nursery() as trajectories:
                    for n in range(TRAJECTORIES_PER_LOOP):
                        trajectories.start_soon(trajectory, TRIO, backend, n, tally)

            async def asyncio_side() -> None:
                await trio.to_thread.run_sync(run_asyncio_loop, profiles, tally)

            async with trio.open_nursery() as sides:
                sides.start_soon(trio_side)
                sides.start_soon(asyncio_side)
            done.set()
    elapsed = time.monotonic() - started

    seen: list[dict[str, int]] = []

    def settled_now() -> bool:
        seen.append(Resources.now(sandboxes_dir).leaks_against(start))
        return not seen[-1]

    settled = await trio.to_thread.run_sync(lambda: wait_for(settled_now, 10, interval_s=0.1))
    end = Resources.now(sandboxes_dir)
    leaks = seen[-1]
    rss_growth = end.rss_kib - start.rss_kib
    area = f"soak ({isolation})"
    reliability.record(area, "random command timeouts", injected=tally.injected["timeout"])
    reliability.record(area, "caller cancellations", injected=tally.injected["cancel"])
    reliability.record(area, "slot releases mid-trajectory", injected=tally.injected["release"])
    reliability.record(area, "agent SIGKILLed under load", injected=tally.kills)
    reliability.record(
        area,
        "all soak requests (100 trajectories, trio and asyncio)",
        injected=0,
        requests=tally.requests,
        answered=tally.answered + tally.cancelled,
        leaks=sum(leaks.values()) + len(tally.wrong),
    )
    summary = (
        f"{tally.requests} requests in {elapsed:.1f} s, {tally.answered} answered, "
        f"{tally.cancelled} cancelled, infra errors {dict(tally.infra_errors)}, "
        f"injected {dict(tally.injected)}, kills {tally.kills}, RSS +{rss_growth} KiB"
    )
    print(summary)
    assert tally.wrong == [], tally.wrong[:10]
    assert tally.answered + tally.cancelled == tally.requests, summary
    assert tally.requests >= 2 * TRAJECTORIES_PER_LOOP * COMMANDS_PER_TRAJECTORY
    assert tally.kills == AGENT_KILLS
    # Losses come from the kills only: at most every request of a killed sandbox's slots.
    assert tally.infra_errors["sandbox_lost"] <= tally.kills * SLOTS_PER_SANDBOX * 3, summary
    assert settled, f"left after the soak: {leaks}"
    assert rss_growth < RSS_BOUND_KIB, summary
