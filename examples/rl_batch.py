"""An RL-style batch: many trajectories, each several tool calls, through `execute_batch` (trio).

    python examples/rl_batch.py [--trajectories 64] [--isolation auto]

Each trajectory acquires a slot, then on every turn all trajectories send their next tool call
together, as a trainer does between LLM turns: write a solution, run it with python, write a
test, run the test. Some "policies" write a buggy solution, so some tests fail: those are
command failures (a score), not infrastructure failures (to be masked). Progress (live on a
terminal, plain lines in a log) shows the pool starting and the turns; the summary gives
throughput, failures and the pools' status.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import trio

from hermes_actors import ExecutionResult, Progress, SandboxConfig, Slot, ToolBackend, format_status

TEST_CODE = """\
import unittest
from solution import add

class AddTest(unittest.TestCase):
    def test_add(self):
        self.assertEqual(add(2, 3), 5)
        self.assertEqual(add(-1, 1), 0)

if __name__ == "__main__":
    unittest.main()
"""


def solution_code(trajectory: int) -> str:
    # Every seventh policy is wrong, so the batch has honest command failures.
    operator = "-" if trajectory % 7 == 3 else "+"
    return f"def add(a, b):\n    return a {operator} b\n"


def turns(trajectory: int) -> list[tuple[str, dict[str, Any]]]:
    return [
        ("write_file", {"path": "solution.py", "content": solution_code(trajectory)}),
        ("bash", {"command": "python3 -c 'import solution; print(solution.add(2, 3))'"}),
        ("write_file", {"path": "test_solution.py", "content": TEST_CODE}),
        ("bash", {"command": "python3 -m unittest -q test_solution 2>&1 | tail -n 1"}),
        ("bash", {"command": "python3 -m unittest -q test_solution > /dev/null 2>&1"}),
    ]


async def run(trajectories: int, isolation: str, slots_per_sandbox: int) -> int:
    max_sandboxes = max(1, -(-trajectories // slots_per_sandbox))
    config = SandboxConfig(
        backend="local",
        isolation=isolation,  # type: ignore[arg-type]
        slots_per_sandbox=slots_per_sandbox,
        min_sandboxes=max_sandboxes,
        max_sandboxes=max_sandboxes,
        execution_timeout_s=60.0,
    )
    started = time.monotonic()
    async with ToolBackend(config) as backend:
        slots: list[Slot] = [None] * trajectories  # type: ignore[list-item]

        # Pool start-up: the sandboxes start while the slots are acquired.
        with Progress("acquiring slots", total=trajectories, stream=sys.stdout) as starting:

            async def acquire(index: int) -> None:
                starting.start()
                slots[index] = await backend.acquire(trajectory_id=f"traj-{index}")
                starting.finish()

            async with trio.open_nursery() as nursery:
                for index in range(trajectories):
                    nursery.start_soon(acquire, index)
        ready = time.monotonic()
        print(f"{trajectories} slots on {max_sandboxes} sandbox(es) in {ready - started:.2f}s")

        plans = [turns(index) for index in range(trajectories)]
        results: list[list[ExecutionResult]] = [[] for _ in range(trajectories)]
        total_turns = len(plans[0])
        # Live on a terminal; in a log, a line per second at most and a last one.
        with Progress(
            "tool calls", total=trajectories * total_turns, stream=sys.stdout
        ) as progress:
            for turn in range(total_turns):
                progress.set(description=f"turn {turn + 1}/{total_turns}")
                progress.start(trajectories)
                batch = [(slots[index], *plans[index][turn]) for index in range(trajectories)]
                for index, result in enumerate(await backend.execute_batch(batch)):
                    results[index].append(result)
                    progress.finish(ok=result.success)
        done, failures = progress.done, progress.failed
        elapsed = time.monotonic() - ready
        status = backend.status()
        async with trio.open_nursery() as nursery:
            for slot in slots:
                nursery.start_soon(backend.release, slot)

    infra = sum("infra_error" in r.metadata for rs in results for r in rs)
    passed = sum(rs[-1].success for rs in results)
    print(
        f"trajectories: {trajectories}, tool calls: {done} in {elapsed:.2f}s "
        f"({done / elapsed:.0f} calls/s)"
    )
    print(
        f"tests passed: {passed}/{trajectories}; failed tool calls: {failures} "
        f"(command failures {failures - infra}, infrastructure failures {infra})"
    )
    print(format_status(status))
    return 0 if infra == 0 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trajectories", type=int, default=64)
    parser.add_argument("--slots-per-sandbox", type=int, default=16)
    parser.add_argument("--isolation", default="auto", choices=["auto", "bwrap", "none"])
    arguments = parser.parse_args()
    return trio.run(run, arguments.trajectories, arguments.isolation, arguments.slots_per_sandbox)


if __name__ == "__main__":
    sys.exit(main())
