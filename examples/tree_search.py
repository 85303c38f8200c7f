"""Tree search over a workspace: prepare once, fork into 8 slots, try a candidate in each.

    python examples/tree_search.py [--branches 8] [--files 2000] [--isolation auto]

The expensive part of a software task (cloning a repository, installing its dependencies) is
done once in one slot. The slot is then forked: each fork starts with the same files (and the
same shell state), inside the same warm sandbox, with no new sandbox and no provider call. Each
branch tries a different candidate fix, runs the tests, and reports a score; the best branch is
kept (its workspace becomes the source's through a checkpoint) and the others are released.
Timings of each phase are printed.
"""

from __future__ import annotations

import argparse
import time

import trio

from hermes_actors import SandboxConfig, Slot, ToolBackend

#: The buggy function every branch tries to fix, and the test that scores a candidate.
MODULE = "def clamp(x, low, high):\n    return x\n"
TESTS = """\
from mathlib import clamp
cases = [((5, 0, 10), 5), ((-3, 0, 10), 0), ((42, 0, 10), 10), ((0, 0, 0), 0), ((7, 7, 9), 7)]
passed = sum(clamp(*args) == want for args, want in cases)
print(f"{passed}/{len(cases)}")
"""
#: One candidate body per branch (a policy would propose these).
CANDIDATES = [
    "return x",
    "return max(x, low)",
    "return min(x, high)",
    "return max(low, min(x, high))",
    "return min(low, max(x, high))",
    "return low if x < low else x",
    "return high if x > high else x",
    "return sorted((low, x, high))[1]",
]


async def run(backend: ToolBackend, slot: Slot, command: str) -> str:
    [result] = await backend.execute_batch([(slot, "bash", {"command": command})])
    if not result.success:
        raise SystemExit(f"command failed in {slot.slot_id}: {command!r}: {result.error}")
    return result.output


async def write(backend: ToolBackend, slot: Slot, path: str, content: str) -> None:
    [result] = await backend.execute_batch(
        [(slot, "write_file", {"path": path, "content": content})]
    )
    if not result.success:
        raise SystemExit(f"writing {path} failed in {slot.slot_id}: {result.error}")


async def main(branches: int, files: int, isolation: str) -> None:
    config = SandboxConfig(
        backend="local",
        isolation=isolation,  # type: ignore[arg-type]
        slots_per_sandbox=branches + 1,
        min_sandboxes=1,
        max_sandboxes=2,
    )
    async with ToolBackend(config) as backend:
        timings: dict[str, float] = {}
        started = time.perf_counter()
        source = await backend.acquire("search-root")
        # "Clone and install": the module, its tests, and a pile of vendored files.
        await write(backend, source, "repo/mathlib.py", MODULE)
        await write(backend, source, "repo/test_mathlib.py", TESTS)
        await run(
            backend,
            source,
            f"mkdir -p repo/vendor && for i in $(seq {files}); do echo $i > repo/vendor/f$i; done",
        )
        timings["prepare"] = time.perf_counter() - started

        started = time.perf_counter()
        forks = await backend.fork(source, branches)
        timings["fork"] = time.perf_counter() - started
        same_sandbox = sum(fork.sandbox_id == source.sandbox_id for fork in forks)

        started = time.perf_counter()
        candidates = [CANDIDATES[index % len(CANDIDATES)] for index in range(branches)]
        writes = [
            (
                fork,
                "write_file",
                {"path": "repo/mathlib.py", "content": MODULE.replace("return x", body)},
            )
            for fork, body in zip(forks, candidates, strict=True)
        ]
        tests = [
            (fork, "bash", {"command": "cd ~/repo && python3 test_mathlib.py && ls vendor | wc -l"})
            for fork in forks
        ]
        results = (await backend.execute_batch(writes + tests))[branches:]
        timings["try candidates"] = time.perf_counter() - started

        scores = []
        for index, result in enumerate(results):
            score_line, count_line = result.output.split()
            passed, total = (int(part) for part in score_line.split("/"))
            scores.append((passed / total, index))
            print(
                f"branch {index}: {candidates[index]:<36} "
                f"score {score_line} (vendor files: {count_line})"
            )
        best_score, best = max(scores)

        started = time.perf_counter()
        checkpoint = await backend.checkpoint(forks[best])
        await backend.restore(source, checkpoint)
        await backend.release_checkpoint(checkpoint)
        for fork in forks:
            await backend.release(fork)
        timings["keep the best"] = time.perf_counter() - started

        kept = await run(backend, source, "cd ~/repo && python3 test_mathlib.py && cat mathlib.py")
        print(f"kept branch {best} (score {best_score:.2f}); the source now has:\n{kept}", end="")
        print(
            f"{branches} forks of {files + 2} files, {same_sandbox} in the source's sandbox; "
            + ", ".join(f"{name}: {seconds * 1000:.0f} ms" for name, seconds in timings.items())
        )
        await backend.release(source)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--branches", type=int, default=8)
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--isolation", default="auto", choices=["auto", "bwrap", "none"])
    options = parser.parse_args()
    trio.run(main, options.branches, options.files, options.isolation)
