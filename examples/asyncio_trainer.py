"""The same ToolBackend API from an asyncio program (an Atropos-style trainer).

    python examples/asyncio_trainer.py [--episodes 16] [--isolation auto]

asyncio code awaits the same methods as trio code; the runtime runs on a portal thread with its
own trio loop. Each episode acquires a slot, takes a few "policy" steps (tool calls), is scored,
and releases its slot; episodes run concurrently with `asyncio.gather`, and one episode is
cancelled midway to show that cancellation kills its command and frees its slot. Progress of the
episodes (done, failed: reward 0, in flight, rate) is live on a terminal, plain lines in a log.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from hermes_actors import Progress, SandboxConfig, ToolBackend, format_status


async def episode(backend: ToolBackend, index: int, progress: Progress) -> float:
    """One trajectory: returns its reward (1.0 when the program it wrote prints the answer)."""
    progress.start()
    reward = float("nan")
    try:
        reward = await scored_episode(backend, index)
        return reward
    finally:
        progress.finish(ok=reward == 1.0)


async def scored_episode(backend: ToolBackend, index: int) -> float:
    slot = await backend.acquire(trajectory_id=f"episode-{index}")
    try:
        steps = [
            (slot, "write_file", {"path": "policy.py", "content": f"print({index} * 2)\n"}),
            (slot, "bash", {"command": "python3 policy.py"}),
        ]
        _, run = await backend.execute_batch(steps)
        if "infra_error" in run.metadata:
            return float("nan")  # masked, not scored
        return 1.0 if run.success and run.output.strip() == str(index * 2) else 0.0
    finally:
        await backend.release(slot, reset_workspace=True)


async def cancelled_episode(backend: ToolBackend) -> str:
    """An episode whose trainer gives up on it: the command is killed, the slot comes back."""
    slot = await backend.acquire(trajectory_id="abandoned")
    try:
        task = asyncio.create_task(backend.execute_batch([(slot, "bash", {"command": "sleep 60"})]))
        await asyncio.sleep(0.3)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return "cancelled: the command was killed"
        return "finished before the cancel"
    finally:
        await backend.release(slot, reset_workspace=True)


async def train(episodes: int, isolation: str) -> int:
    config = SandboxConfig(
        backend="local",
        isolation=isolation,  # type: ignore[arg-type]
        slots_per_sandbox=8,
        min_sandboxes=1,
        max_sandboxes=4,
    )
    started = time.monotonic()
    async with ToolBackend(config) as backend:
        with Progress("episodes", total=episodes) as progress:
            rewards, note = await asyncio.gather(
                asyncio.gather(*(episode(backend, index, progress) for index in range(episodes))),
                cancelled_episode(backend),
            )
        status = backend.status()
    elapsed = time.monotonic() - started
    scored = [reward for reward in rewards if reward == reward]
    print(
        f"episodes: {episodes} in {elapsed:.2f}s; mean reward {sum(scored) / len(scored):.2f}; "
        f"masked (infrastructure) {episodes - len(scored)}"
    )
    print(f"abandoned episode: {note}")
    print(format_status(status))
    held = sum(pool.slots_held for pool in status.pools)
    print(f"slots still held after all episodes: {held}")
    return 0 if held == 0 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=16)
    parser.add_argument("--isolation", default="auto", choices=["auto", "bwrap", "none"])
    arguments = parser.parse_args()
    return asyncio.run(train(arguments.episodes, arguments.isolation))


if __name__ == "__main__":
    sys.exit(main())
