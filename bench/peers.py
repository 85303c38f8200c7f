"""The baseline rows: the physical limit, SWE-ReX, mini-swe-agent and the original design.

Each adapter runs the workload's commands the way that tool's users run them, at the same
concurrency as every other row (see `bench.workloads.System`):

* `limit-bash` / `limit-sh`: `trio.run_process([shell, "-c", cmd])`, no isolation, nothing
  else. `/bin/sh` is dash here, which starts faster than bash: rows that run commands through
  `sh` are compared with `limit-sh`.
* `swerex-execute`: SWE-ReX's `LocalRuntime.execute(Command(command=cmd, shell=True))` (sh),
  awaited from asyncio with one coroutine per trajectory, as an async caller would. It calls
  `subprocess.run` inside the coroutine, so commands run one at a time.
* `swerex-session`: SWE-ReX bash sessions (`create_session` / `run_in_session`), one per
  trajectory, from asyncio. Starting a session sleeps 0.3 s and each call blocks on the pty, so
  they too run one at a time.
* `mini-swe-agent`: `LocalEnvironment.execute({"command": cmd})` (sh), one environment per
  trajectory, one thread per trajectory.
* `original-batch`: the design hermes-actors replaces: the batch's commands one after another,
  a new `bash -c` process each.

The peers' packages are imported lazily, so a row whose package is missing reports it instead
of breaking the run.
"""

from __future__ import annotations

import asyncio
import importlib
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import trio

from bench.workloads import (
    HermesSystem,
    Outcome,
    Sizes,
    System,
    Timed,
    warm_up,
    warm_up_async,
)

__all__ = [
    "LimitSystem",
    "MiniSweAgentSystem",
    "OriginalBatchSystem",
    "SweRexExecuteSystem",
    "SweRexSessionSystem",
    "all_systems",
    "systems_by_name",
]


def _missing(module: str, distribution: str) -> str | None:
    try:
        importlib.import_module(module)
    except ImportError as exc:
        return f"{distribution} is not installed ({exc}); `pip install -e '.[bench]'`"
    return None


def _decode(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


class LimitSystem:
    """The physical limit: one `[shell, "-c", cmd]` process per command, from trio."""

    def __init__(self, shell: str) -> None:
        self.shell = shell
        self.name = f"limit-{shell}"
        self.description = f'raw `trio.run_process(["{shell}", "-c", cmd])`, no isolation'

    def unavailable(self) -> str | None:
        return None

    async def _run(self, command: str) -> Outcome:
        done = await trio.run_process(
            [self.shell, "-c", command], capture_stdout=True, capture_stderr=True, check=False
        )
        return (done.returncode, _decode(done.stdout) + _decode(done.stderr))

    def run_trajectories(self, plan: list[list[str]], sizes: Sizes) -> Timed:
        return trio.run(self._bounded, plan, len(plan))

    def run_churn(self, plan: list[list[str]], slots: int, sizes: Sizes) -> Timed:
        return trio.run(self._bounded, plan, slots)

    def run_scale(self, plan: list[list[str]], sizes: Sizes) -> Timed:
        return trio.run(self._bounded, plan, len(plan))

    async def _bounded(self, plan: list[list[str]], slots: int) -> Timed:
        """Every trajectory as a task; at most `slots` of them running at once."""
        outcomes: list[list[Outcome]] = [[] for _ in plan]
        limiter = trio.CapacityLimiter(slots)

        async def trajectory(index: int) -> None:
            async with limiter:
                for command in plan[index]:
                    outcomes[index].append(await self._run(command))

        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for index in range(len(plan)):
                nursery.start_soon(trajectory, index)
        return Timed(wall_s=time.perf_counter() - started, outcomes=outcomes)

    def run_latency(self, commands: list[str], sizes: Sizes) -> Timed:
        return trio.run(self._latency, commands)

    async def _latency(self, commands: list[str]) -> Timed:
        await warm_up_async(lambda: self._run("true"))  # as every row gets
        per_call = []
        outcomes = []
        for command in commands:
            started = time.perf_counter()
            outcomes.append(await self._run(command))
            per_call.append(time.perf_counter() - started)
        return Timed(wall_s=sum(per_call), outcomes=[outcomes], per_call_s=tuple(per_call))


class SweRexExecuteSystem:
    """SWE-ReX `LocalRuntime.execute`, awaited from asyncio, one coroutine per trajectory."""

    name = "swerex-execute"
    shell = "sh"
    description = "SWE-ReX `LocalRuntime.execute(Command(shell=True))`, asyncio"

    def unavailable(self) -> str | None:
        return _missing("swerex.runtime.local", "swe-rex")

    async def _run(self, runtime: Any, command: str) -> Outcome:
        from swerex.runtime.abstract import Command

        response = await runtime.execute(Command(command=command, shell=True))
        return (response.exit_code, response.stdout + response.stderr)

    def run_trajectories(self, plan: list[list[str]], sizes: Sizes) -> Timed:
        return asyncio.run(self._bounded(plan, len(plan)))

    def run_churn(self, plan: list[list[str]], slots: int, sizes: Sizes) -> Timed:
        return asyncio.run(self._bounded(plan, slots))

    def run_scale(self, plan: list[list[str]], sizes: Sizes) -> Timed:
        return asyncio.run(self._bounded(plan, len(plan)))

    async def _bounded(self, plan: list[list[str]], slots: int) -> Timed:
        from swerex.runtime.local import LocalRuntime

        runtime = LocalRuntime()
        outcomes: list[list[Outcome]] = [[] for _ in plan]
        semaphore = asyncio.Semaphore(slots)

        async def trajectory(index: int) -> None:
            async with semaphore:
                for command in plan[index]:
                    outcomes[index].append(await self._run(runtime, command))

        started = time.perf_counter()
        await asyncio.gather(*(trajectory(index) for index in range(len(plan))))
        wall = time.perf_counter() - started
        await runtime.close()
        return Timed(wall_s=wall, outcomes=outcomes)

    def run_latency(self, commands: list[str], sizes: Sizes) -> Timed:
        return asyncio.run(self._latency(commands))

    async def _latency(self, commands: list[str]) -> Timed:
        from swerex.runtime.local import LocalRuntime

        runtime = LocalRuntime()
        await warm_up_async(lambda: self._run(runtime, "true"))
        per_call = []
        outcomes = []
        for command in commands:
            started = time.perf_counter()
            outcomes.append(await self._run(runtime, command))
            per_call.append(time.perf_counter() - started)
        await runtime.close()
        return Timed(wall_s=sum(per_call), outcomes=[outcomes], per_call_s=tuple(per_call))


class SweRexSessionSystem:
    """SWE-ReX bash sessions: one session per trajectory, from asyncio."""

    name = "swerex-session"
    shell = "bash"
    description = "SWE-ReX `create_session` + `run_in_session`, one bash session per trajectory"

    def unavailable(self) -> str | None:
        return _missing("swerex.runtime.local", "swe-rex")

    async def _open(self, runtime: Any, session: str) -> None:
        from swerex.runtime.abstract import CreateBashSessionRequest

        await runtime.create_session(CreateBashSessionRequest(session=session))

    async def _close(self, runtime: Any, session: str) -> None:
        from swerex.runtime.abstract import CloseBashSessionRequest

        await runtime.close_session(CloseBashSessionRequest(session=session))

    async def _run(self, runtime: Any, session: str, command: str) -> Outcome:
        from swerex.runtime.abstract import BashAction

        observation = await runtime.run_in_session(
            BashAction(command=command, session=session, check="silent", timeout=120)
        )
        return (observation.exit_code, observation.output)

    def run_trajectories(self, plan: list[list[str]], sizes: Sizes) -> Timed:
        return asyncio.run(self._trajectories(plan))

    async def _trajectories(self, plan: list[list[str]]) -> Timed:
        from swerex.runtime.local import LocalRuntime

        runtime = LocalRuntime()
        sessions = [f"traj-{index}" for index in range(len(plan))]
        try:
            for session in sessions:  # not timed: the slots' equivalent of acquire
                await self._open(runtime, session)
            outcomes: list[list[Outcome]] = [[] for _ in plan]

            async def trajectory(index: int) -> None:
                for command in plan[index]:
                    outcomes[index].append(await self._run(runtime, sessions[index], command))

            started = time.perf_counter()
            await asyncio.gather(*(trajectory(index) for index in range(len(plan))))
            wall = time.perf_counter() - started
        finally:
            await runtime.close()
        return Timed(wall_s=wall, outcomes=outcomes)

    def run_churn(self, plan: list[list[str]], slots: int, sizes: Sizes) -> Timed:
        return asyncio.run(self._churn(plan, slots))

    async def _churn(self, plan: list[list[str]], slots: int) -> Timed:
        from swerex.runtime.local import LocalRuntime

        runtime = LocalRuntime()
        outcomes: list[list[Outcome]] = [[] for _ in plan]
        semaphore = asyncio.Semaphore(slots)

        async def trajectory(index: int) -> None:
            async with semaphore:
                session = f"churn-{index}"
                await self._open(runtime, session)
                try:
                    for command in plan[index]:
                        outcomes[index].append(await self._run(runtime, session, command))
                finally:
                    await self._close(runtime, session)

        started = time.perf_counter()
        try:
            await asyncio.gather(*(trajectory(index) for index in range(len(plan))))
        finally:
            wall = time.perf_counter() - started
            await runtime.close()
        return Timed(wall_s=wall, outcomes=outcomes)

    def run_scale(self, plan: list[list[str]], sizes: Sizes) -> Timed:
        return asyncio.run(self._scale(plan))

    async def _scale(self, plan: list[list[str]]) -> Timed:
        from swerex.runtime.local import LocalRuntime

        runtime = LocalRuntime()
        started = time.perf_counter()
        try:
            sessions = [f"scale-{index}" for index in range(len(plan))]
            for session in sessions:
                await self._open(runtime, session)
            outcomes = await asyncio.gather(
                *(
                    self._run(runtime, session, commands[0])
                    for session, commands in zip(sessions, plan, strict=True)
                )
            )
            wall = time.perf_counter() - started
        finally:
            await runtime.close()
        return Timed(wall_s=wall, outcomes=[[outcome] for outcome in outcomes])

    def run_latency(self, commands: list[str], sizes: Sizes) -> Timed:
        return asyncio.run(self._latency(commands))

    async def _latency(self, commands: list[str]) -> Timed:
        from swerex.runtime.local import LocalRuntime

        runtime = LocalRuntime()
        try:
            await self._open(runtime, "latency")
            await warm_up_async(lambda: self._run(runtime, "latency", "true"))
            per_call = []
            outcomes = []
            for command in commands:
                started = time.perf_counter()
                outcomes.append(await self._run(runtime, "latency", command))
                per_call.append(time.perf_counter() - started)
        finally:
            await runtime.close()
        return Timed(wall_s=sum(per_call), outcomes=[outcomes], per_call_s=tuple(per_call))


class MiniSweAgentSystem:
    """mini-swe-agent's `LocalEnvironment.execute`: one environment and thread per trajectory."""

    name = "mini-swe-agent"
    shell = "sh"
    description = 'mini-swe-agent `LocalEnvironment.execute({"command": cmd})`, threads'

    def unavailable(self) -> str | None:
        return _missing("minisweagent.environments.local", "mini-swe-agent")

    @staticmethod
    def _environment() -> Any:
        from minisweagent.environments.local import LocalEnvironment

        return LocalEnvironment(timeout=120)

    @staticmethod
    def _run(environment: Any, command: str) -> Outcome:
        result = environment.execute({"command": command})
        return (result["returncode"], result["output"])

    def run_trajectories(self, plan: list[list[str]], sizes: Sizes) -> Timed:
        environments = [self._environment() for _ in plan]
        outcomes: list[list[Outcome]] = [[] for _ in plan]

        def trajectory(index: int) -> None:
            for command in plan[index]:
                outcomes[index].append(self._run(environments[index], command))

        return Timed(wall_s=_in_threads(trajectory, len(plan)), outcomes=outcomes)

    def run_scale(self, plan: list[list[str]], sizes: Sizes) -> Timed:
        started = time.perf_counter()
        timed = self.run_trajectories(plan, sizes)
        return Timed(wall_s=time.perf_counter() - started, outcomes=timed.outcomes)

    def run_churn(self, plan: list[list[str]], slots: int, sizes: Sizes) -> Timed:
        outcomes: list[list[Outcome]] = [[] for _ in plan]

        def trajectory(index: int) -> None:
            environment = self._environment()
            for command in plan[index]:
                outcomes[index].append(self._run(environment, command))

        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=slots, thread_name_prefix="mini-churn") as pool:
            for future in [pool.submit(trajectory, index) for index in range(len(plan))]:
                future.result()
        return Timed(wall_s=time.perf_counter() - started, outcomes=outcomes)

    def run_latency(self, commands: list[str], sizes: Sizes) -> Timed:
        environment = self._environment()
        warm_up(lambda: self._run(environment, "true"))
        per_call = []
        outcomes = []
        for command in commands:
            started = time.perf_counter()
            outcomes.append(self._run(environment, command))
            per_call.append(time.perf_counter() - started)
        return Timed(wall_s=sum(per_call), outcomes=[outcomes], per_call_s=tuple(per_call))


def _in_threads(work: Callable[[int], None], count: int) -> float:
    """Run `work(i)` for every i on its own thread, all released at once; the wall time."""
    gate = threading.Barrier(count + 1)
    errors: list[BaseException] = []

    def body(index: int) -> None:
        gate.wait()
        try:
            work(index)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(index,), daemon=True) for index in range(count)]
    for thread in threads:
        thread.start()
    gate.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if errors:
        raise errors[0]
    return wall


class OriginalBatchSystem:
    """The original design's batch: every command after the previous one, a new `bash -c`."""

    name = "original-batch"
    shell = "bash"
    description = "the original design: a batch's commands one after another (`bash -c` each)"

    def unavailable(self) -> str | None:
        return None

    @staticmethod
    def _run(command: str) -> Outcome:
        done = subprocess.run(["bash", "-c", command], capture_output=True, check=False)
        return (done.returncode, _decode(done.stdout) + _decode(done.stderr))

    def run_trajectories(self, plan: list[list[str]], sizes: Sizes) -> Timed:
        outcomes: list[list[Outcome]] = [[] for _ in plan]
        started = time.perf_counter()
        # A batch holds one step of every trajectory; the next step is the next batch.
        for step in range(max((len(commands) for commands in plan), default=0)):
            for index, commands in enumerate(plan):
                if step < len(commands):
                    outcomes[index].append(self._run(commands[step]))
        return Timed(wall_s=time.perf_counter() - started, outcomes=outcomes)

    def run_churn(self, plan: list[list[str]], slots: int, sizes: Sizes) -> Timed:
        return self.run_trajectories(plan, sizes)

    def run_scale(self, plan: list[list[str]], sizes: Sizes) -> Timed:
        return self.run_trajectories(plan, sizes)

    def run_latency(self, commands: list[str], sizes: Sizes) -> Timed:
        warm_up(lambda: self._run("true"))
        per_call = []
        outcomes = []
        for command in commands:
            started = time.perf_counter()
            outcomes.append(self._run(command))
            per_call.append(time.perf_counter() - started)
        return Timed(wall_s=sum(per_call), outcomes=[outcomes], per_call_s=tuple(per_call))


def all_systems() -> list[System]:
    """Every row, in table order."""
    return [
        LimitSystem("bash"),
        LimitSystem("sh"),
        HermesSystem("none"),
        HermesSystem("bwrap"),
        HermesSystem("none", shell="persistent"),
        HermesSystem("bwrap", shell="persistent"),
        SweRexExecuteSystem(),
        SweRexSessionSystem(),
        MiniSweAgentSystem(),
        OriginalBatchSystem(),
    ]


def systems_by_name() -> dict[str, System]:
    return {system.name: system for system in all_systems()}
