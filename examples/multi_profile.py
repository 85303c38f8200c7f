"""Several profiles behind one backend: each trajectory picks the sandbox shape it needs.

    python examples/multi_profile.py [--isolation auto]

Two profiles, `small` (many slots per sandbox) and `big` (one slot per sandbox, its own
environment), served by one `ToolBackend.with_profiles(...)`. Profiles can also come from YAML
(`load_profiles("config/local.yaml")`); here they are given in code. One batch spans both,
its output streamed while it runs (`on_output`) into the progress display.
"""

from __future__ import annotations

import argparse
import sys

import trio

from hermes_actors import OutputChunk, Progress, ToolBackend, format_status


async def run(isolation: str) -> int:
    backend = ToolBackend.with_profiles(
        app_name="multi-profile-demo",
        default_profile="small",
        profiles={
            "small": {
                "backend": "local",
                "isolation": isolation,
                "slots_per_sandbox": 8,
                "min_sandboxes": 1,
                "max_sandboxes": 2,
                "env_vars": {"SANDBOX_SIZE": "small"},
            },
            "big": {
                "backend": "local",
                "isolation": isolation,
                "slots_per_sandbox": 1,
                "min_sandboxes": 0,
                "max_sandboxes": 2,
                "cpu": 2.0,
                "memory": 4096,
                "env_vars": {"SANDBOX_SIZE": "big"},
            },
        },
    )
    async with backend:
        small = [await backend.acquire(f"small-{index}") for index in range(3)]
        big = [await backend.acquire(f"big-{index}", profile="big") for index in range(2)]
        slots = small + big
        with Progress("tool calls", total=len(slots)) as progress:
            progress.start(len(slots))

            def on_output(index: int, chunk: OutputChunk) -> None:
                # Each call's output as it comes, before the batch ends.
                progress.set(description=f"{slots[index].profile}: {chunk.data.decode().strip()}")

            results = await backend.execute_batch(
                [(slot, "bash", {"command": "echo $SANDBOX_SIZE"}) for slot in slots],
                on_output=on_output,
            )
            for result in results:
                progress.finish(ok=result.success)
            progress.set(description="tool calls")
        for slot, result in zip(slots, results, strict=True):
            print(
                f"{slot.trajectory_id:8} profile={slot.profile:5} sandbox={slot.sandbox_id:28} "
                f"says {result.output.strip()}"
            )
        print(format_status(backend.status()))
        wrong = [
            slot.slot_id
            for slot, result in zip(slots, results, strict=True)
            if result.output.strip() != slot.profile
        ]
        for slot in slots:
            await backend.release(slot)
    return 1 if wrong else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--isolation", default="auto", choices=["auto", "bwrap", "none"])
    return trio.run(run, parser.parse_args().isolation)


if __name__ == "__main__":
    sys.exit(main())
