"""Per-command cost of `exec("true")` through the client and the in-sandbox agent.

Compared in the same run, interleaved, against the raw limit: `trio.run_process(["bash", "-c",
"true"])` from the host with no sandbox. Sequential (latency per command) and 50-way concurrent
(throughput), for `isolation: none` and `bwrap`. Run: `python -m bench.agent_exec [--reps N]`.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Awaitable, Callable

import trio

from hermes_actors._client import SandboxClient
from hermes_actors._config import SandboxConfig
from hermes_actors.drivers._local import LocalDriver

Runner = Callable[[], Awaitable[None]]


async def raw_true() -> None:
    await trio.run_process(["bash", "-c", "true"])


def agent_runner(client: SandboxClient, slots: int) -> Callable[[int], Runner]:
    def make(index: int) -> Runner:
        async def run() -> None:
            result = await client.exec(index % slots, command="true")
            assert result.exit_code == 0

        return run

    return make


async def sequential(run: Runner, count: int) -> float:
    """Seconds per command, one after another."""
    started = time.perf_counter()
    for _ in range(count):
        await run()
    return (time.perf_counter() - started) / count


async def concurrent(make: Callable[[int], Runner], count: int, width: int) -> float:
    """Commands per second with `width` in flight at once."""
    limiter = trio.Semaphore(width)

    async def one(index: int) -> None:
        async with limiter:
            await make(index)()

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for index in range(count):
            nursery.start_soon(one, index)
    return count / (time.perf_counter() - started)


async def measure(
    reps: int, sequential_count: int, concurrent_count: int
) -> dict[str, list[float]]:
    driver = LocalDriver()
    figures: dict[str, list[float]] = {}
    async with trio.open_nursery() as nursery:
        clients = {}
        handles = []
        for isolation in ("none", "bwrap"):
            handle = await driver.create(
                SandboxConfig(name=f"bench-{isolation}", isolation=isolation, slots_per_sandbox=50)
            )
            handles.append(handle)
            client = SandboxClient(handle)
            await nursery.start(client.run)
            clients[isolation] = client
        try:
            for _ in range(reps):
                rows: list[tuple[str, Callable[[], Awaitable[float]]]] = [
                    ("raw seq s/cmd", lambda: sequential(raw_true, sequential_count)),
                    (
                        "raw 50-way cmd/s",
                        lambda: concurrent(lambda _i: raw_true, concurrent_count, 50),
                    ),
                ]
                for isolation, client in clients.items():
                    make = agent_runner(client, 50)
                    rows.append(
                        (
                            f"agent[{isolation}] seq s/cmd",
                            functools.partial(sequential, make(0), sequential_count),
                        )
                    )
                    rows.append(
                        (
                            f"agent[{isolation}] 50-way cmd/s",
                            functools.partial(concurrent, make, concurrent_count, 50),
                        )
                    )
                for name, run in rows:
                    figures.setdefault(name, []).append(await run())
        finally:
            for handle in handles:
                await handle.terminate()
            nursery.cancel_scope.cancel()
    return figures


def report(figures: dict[str, list[float]]) -> str:
    median = {name: statistics.median(values) for name, values in figures.items()}
    lines = [
        "| measure | median | min | max | vs raw |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, values in figures.items():
        if "seq" in name:
            raw = median["raw seq s/cmd"]
            ratio = raw / median[name]  # >1 means faster than raw
            shown = [f"{v * 1000:.2f} ms" for v in (median[name], min(values), max(values))]
        else:
            raw = median["raw 50-way cmd/s"]
            ratio = median[name] / raw
            shown = [f"{v:.0f}/s" for v in (median[name], min(values), max(values))]
        lines.append(f"| {name} | {shown[0]} | {shown[1]} | {shown[2]} | {ratio:.2f}x |")
    lines.append("")
    lines.append(
        "Ratios are speed relative to the raw limit (higher is better; 1.00x = as fast as raw)."
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--sequential", type=int, default=200)
    parser.add_argument("--concurrent", type=int, default=1000)
    args = parser.parse_args()
    figures = trio.run(measure, args.reps, args.sequential, args.concurrent)
    print(report(figures))


if __name__ == "__main__":
    main()
