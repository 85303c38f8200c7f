"""A command far past the kernel's argument limit (3 MiB of script) through the agent.

Each row runs the same script: a here-document of `size` bytes piped to `wc -l`, then `cat`
(which must find stdin empty). The baseline, in the same run and interleaved with the rows, is
raw `bash FILE` reading that script from a regular file on this machine, with no sandbox; a row
for raw `bash /dev/stdin` fed from a pipe shows what a script on a pipe costs (bash must read
a pipe one byte at a time, so as not to read past the command it runs). The hermes rows go
through the client and the in-sandbox agent, for `isolation: none` and `bwrap`, with a fresh
`bash` per command and with the slot's persistent shell. Figures are medians of the round trip;
the ratio is the row's time over raw `bash FILE` (1.00x: as fast as bash reading a file).
Run: `python -m bench.big_command [--size BYTES] [--reps N]`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable

import trio

from hermes_actors._client import SandboxClient
from hermes_actors._config import Isolation, SandboxConfig
from hermes_actors.drivers._local import LocalDriver, bwrap_problem

DEFAULT_SIZE = 3 * 1024 * 1024
RAW_FILE = "raw bash FILE"
RAW_PIPE = "raw bash /dev/stdin (pipe)"


def script(size: int) -> tuple[str, bytes]:
    """The command of `size` bytes, and the output it must give."""
    body = "x" * 100 + "\n"
    lines = size // len(body)
    command = "cat <<'EOF' | wc -l\n" + body * lines + 'EOF\ncat; echo "stdin done"'
    return command, f"{lines}\nstdin done\n".encode()


async def timed(run: Callable[[], Awaitable[bytes]], expected: bytes) -> float:
    started = time.perf_counter()
    output = await run()
    elapsed = time.perf_counter() - started
    if output != expected:
        raise AssertionError(f"wrong output: {output[:200]!r}")
    return elapsed


async def measure(size: int, reps: int) -> dict[str, list[float]]:
    command, expected = script(size)
    isolations: list[Isolation] = ["none"] if await bwrap_problem() else ["none", "bwrap"]
    figures: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="hermes-bench-big-") as directory:
        path = os.path.join(directory, "script.sh")
        await trio.Path(path).write_text(command, encoding="utf-8")

        async def raw_file() -> bytes:
            done = await trio.run_process(["bash", path], stdin=b"", capture_stdout=True)
            return bytes(done.stdout)

        async def raw_pipe() -> bytes:
            # The script on stdin: `cat` then reads the rest of the script's own stdin, which
            # bash has consumed up to where it runs (nothing is left after the last line).
            done = await trio.run_process(
                ["bash", "/dev/stdin"], stdin=command.encode(), capture_stdout=True
            )
            return bytes(done.stdout)

        rows: list[tuple[str, Callable[[], Awaitable[bytes]]]] = [
            (RAW_FILE, raw_file),
            (RAW_PIPE, raw_pipe),
        ]
        driver = LocalDriver()
        async with trio.open_nursery() as nursery:
            handles = []
            try:
                for isolation in isolations:
                    handle = await driver.create(
                        SandboxConfig(name=f"bench-big-{isolation}", isolation=isolation)
                    )
                    handles.append(handle)
                    client = SandboxClient(handle)
                    await nursery.start(client.run)
                    for slot, shell in enumerate(("fresh", "persistent")):

                        async def through_agent(
                            client: SandboxClient = client, slot: int = slot, shell: str = shell
                        ) -> bytes:
                            result = await client.exec(slot, command=command, shell=shell)
                            if result.exit_code != 0:
                                raise AssertionError(f"exit {result.exit_code}: {result.stderr!r}")
                            return result.stdout

                        await client.exec(slot, command="true", shell=shell)  # warm: shell up
                        rows.append((f"hermes[{isolation}] {shell}", through_agent))
                for _ in range(reps):
                    for name, run in rows:
                        figures.setdefault(name, []).append(await timed(run, expected))
            finally:
                for handle in handles:
                    await handle.terminate()
                nursery.cancel_scope.cancel()
    return figures


def report(figures: dict[str, list[float]], size: int) -> str:
    raw = statistics.median(figures[RAW_FILE])
    lines = [
        f"A {size / 1024 / 1024:.1f} MiB command (here-document, then an empty stdin), "
        f"{len(figures[RAW_FILE])} runs each",
        "",
        "| row | median | min | max | time vs raw bash FILE |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, values in figures.items():
        median = statistics.median(values)
        shown = [f"{value * 1000:.1f} ms" for value in (median, min(values), max(values))]
        lines.append(f"| {name} | {shown[0]} | {shown[1]} | {shown[2]} | {median / raw:.2f}x |")
    lines.append("")
    lines.append("The ratio is time over raw `bash FILE` (lower is better; 1.00x = as fast).")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help="bytes of script")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    figures = trio.run(measure, args.size, args.reps)
    print(report(figures, args.size))


if __name__ == "__main__":
    main()
