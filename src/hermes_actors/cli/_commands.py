"""The subcommands of `hermes-actors`, each built on the public facades.

Each takes the parsed arguments and returns the exit code; errors are raised as `HermesError`s
and mapped to exit codes by `main` (2 configuration or usage, 3 infrastructure).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import runpy
import shlex
import sys
import threading
import time
from pathlib import Path
from typing import Any

import trio

from hermes_actors._config import ENV_PROFILES_FILE, Profiles, load_profiles
from hermes_actors._errors import InfrastructureError
from hermes_actors._output import OutputBuffer, OutputChunk
from hermes_actors._progress import Progress
from hermes_actors._trio import collapse_exception_groups
from hermes_actors.cli._exit_codes import EXIT_INFRASTRUCTURE, EXIT_OK, UsageError
from hermes_actors.cli._render import format_profiles, format_runs, profiles_as_data

__all__ = [
    "demo_command",
    "profiles_command",
    "reap_command",
    "run_command",
    "shell_command",
    "status_command",
]

#: `run` exits with this when its command timed out (as `timeout(1)` does).
EXIT_TIMED_OUT = 124
#: How long `run` stays silent in a log before plain progress lines start, and their interval.
RUN_QUIET_S = 10.0

#: How long `run` waits for its slot's reset after the command, even when cancelled.
RELEASE_RESET_LIMIT_S = 30.0


def _profiles_path(explicit: str | None) -> str | None:
    """The profiles file: the option, else the variable, else ./modal_profiles.yaml if present."""
    if explicit is not None:
        return explicit
    if os.environ.get(ENV_PROFILES_FILE):
        return None  # load_profiles reads the variable and names it in its errors
    return "modal_profiles.yaml" if os.path.isfile("modal_profiles.yaml") else None


def _load_for_one_slot(arguments: argparse.Namespace) -> tuple[Profiles, str]:
    """The profiles for `run` and `shell`, and the profile to use.

    Nothing is pre-warmed: one slot is started on demand (`min_sandboxes` 0), with the
    `--image` override when given.
    """
    path = _profiles_path(arguments.profiles)
    profiles = load_profiles(path)
    name = profiles.get_profile(arguments.profile).name
    own: dict[str, Any] = {"min_sandboxes": 0}
    if getattr(arguments, "image", None):
        own["image"] = arguments.image
    profiles = load_profiles(path, profile_overrides={name: own})
    return profiles, name


# -- run -------------------------------------------------------------------------------------------


def _command_line(argv: list[str]) -> str:
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise UsageError("run needs a command after --, e.g. `hermes-actors run -- echo hello`")
    return argv[0] if len(argv) == 1 else shlex.join(argv)


def run_command(arguments: argparse.Namespace) -> int:
    command = _command_line(list(arguments.argv))
    if arguments.timeout is not None and not arguments.timeout > 0:
        raise UsageError(f"--timeout must be a number of seconds > 0: {arguments.timeout:g}")
    profiles, profile = _load_for_one_slot(arguments)
    result = trio.run(_run_one, profiles, profile, command, arguments.timeout, arguments.json)
    metadata = result.metadata
    if arguments.json:
        print(
            json.dumps(
                {
                    "exit_code": metadata.get("exit_code"),
                    "output": result.output,
                    "error": result.error,
                    "timed_out": metadata.get("timed_out", False),
                    "signal": metadata.get("signal"),
                    "duration_s": metadata.get("duration_s"),
                    "infra_error": metadata.get("infra_error"),
                }
            )
        )
    if "infra_error" in metadata:
        print(f"hermes-actors: {result.error}", file=sys.stderr)
        return EXIT_INFRASTRUCTURE
    if metadata.get("timed_out"):
        if not arguments.json:
            print(f"hermes-actors: {result.error}", file=sys.stderr)
        return EXIT_TIMED_OUT
    if metadata.get("signal"):
        return 128 + int(metadata["signal"])
    exit_code = metadata.get("exit_code")
    if exit_code is None:  # the tool failed before the command ran
        print(f"hermes-actors: {result.error}", file=sys.stderr)
        return EXIT_INFRASTRUCTURE
    return int(exit_code) & 0xFF


async def _tick(progress: Progress, interval_s: float) -> None:
    while True:
        await trio.sleep(interval_s)
        progress.tick()


async def _run_one(
    profiles: Profiles, profile: str, command: str, timeout_s: float | None, as_json: bool
) -> Any:
    # One command on its own: `bash -c` semantics (its `$$`, `exit` and signals are its own).
    arguments: dict[str, Any] = {"command": command, "shell": "fresh"}
    if timeout_s is not None:
        arguments["timeout"] = timeout_s
    title = command if len(command) <= 40 else command[:37] + "..."
    with (
        Progress(
            f"starting a {profile} sandbox",
            total=1,
            interval_s=RUN_QUIET_S,
            quiet_for_s=RUN_QUIET_S,
            summary=False,
        ) as progress,
        collapse_exception_groups(),
    ):
        return await _run_in_slot(profiles, profile, arguments, title, progress, as_json)


async def _run_in_slot(
    profiles: Profiles,
    profile: str,
    arguments: dict[str, Any],
    title: str,
    progress: Progress,
    as_json: bool,
) -> Any:
    from hermes_actors.facades import ToolBackend

    output = OutputBuffer()
    async with trio.open_nursery() as ticker:
        ticker.start_soon(_tick, progress, 1.0)
        async with ToolBackend(profiles) as backend:
            progress.start()
            slot = await backend.acquire("hermes-actors-run", profile=profile)
            if not as_json:
                # From here the command's own output, streamed as it is written, shows that it
                # runs: a live display would only be drawn over by it.
                progress.close_live()
            progress.set(description=f"running {title}")
            try:
                async with trio.open_nursery() as writer:
                    if not as_json:
                        writer.start_soon(_write_output, output)
                    try:
                        [result] = await backend.execute_batch(
                            [(slot, "bash", arguments)],
                            on_output=None if as_json else lambda _, chunk: output(chunk),
                        )
                    finally:
                        output.close()
            finally:
                # Bounded, as every shielded cleanup: the backend's exit terminates the sandbox
                # anyway if the reset does not finish in time.
                with (
                    trio.move_on_after(RELEASE_RESET_LIMIT_S, shield=True),
                    contextlib.suppress(InfrastructureError),
                ):
                    await backend.release(slot, reset_workspace=True)
            progress.finish(ok=result.success)
        ticker.cancel_scope.cancel()
    return result


async def _write_output(output: OutputBuffer) -> None:
    """Copy a streamed command's output to ours as it comes: stdout to stdout, stderr to stderr.

    Writes block (as a local command's would) when our reader is slow; meanwhile the buffer
    skips what does not fit and says how much, so memory stays bounded.
    """
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    async for chunk in output:
        target = sys.stdout.buffer if chunk.stream == "stdout" else sys.stderr.buffer
        if chunk.skipped:
            sys.stdout.buffer.flush()
            sys.stderr.buffer.write(
                f"\nhermes-actors: {chunk.skipped} bytes of {chunk.stream} not shown (the "
                "command wrote faster than they could be shown; its result keeps the head "
                "and tail)\n".encode()
            )
            sys.stderr.buffer.flush()
        if chunk.data:
            target.write(chunk.data)
            target.flush()


# -- shell -----------------------------------------------------------------------------------------


class _TerminalEcho:
    """Writes a `shell` command's output as it comes (called in the runtime's thread), and
    ends its last line, so the next prompt starts on a line of its own."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._line_open = False

    def __call__(self, _index: int, chunk: OutputChunk) -> None:
        with self._lock:
            target = sys.stdout.buffer if chunk.stream == "stdout" else sys.stderr.buffer
            if chunk.skipped:
                sys.stderr.buffer.write(
                    f"\n[{chunk.skipped} bytes of {chunk.stream} not shown]\n".encode()
                )
                self._line_open = False
            if chunk.data:
                target.write(chunk.data)
                target.flush()
                self._line_open = not chunk.data.endswith(b"\n")

    def end_line(self) -> None:
        with self._lock:
            if self._line_open:
                sys.stdout.write("\n")
                sys.stdout.flush()
                self._line_open = False


def _history_file() -> Path:
    from hermes_actors.runtime._publish import state_dir

    return state_dir() / "shell_history"


def shell_command(arguments: argparse.Namespace) -> int:
    from hermes_actors.facades import ToolBackend

    profiles, profile = _load_for_one_slot(arguments)
    readline: Any = None
    with contextlib.suppress(ImportError):
        import readline
    history = _history_file()
    if readline is not None:
        with contextlib.suppress(OSError):
            readline.read_history_file(history)
    backend = ToolBackend(profiles)
    try:
        print(f"hermes-actors shell: starting a {profile} sandbox...", file=sys.stderr)
        slot = backend.call_blocking(backend.acquire, "hermes-actors-shell", profile)
        print(
            f"slot {slot.slot_id} on {slot.sandbox_id}; Ctrl-C cancels a command, Ctrl-D leaves",
            file=sys.stderr,
        )
        while True:
            try:
                line = input(f"{profile}:{slot.slot_id}$ ")
            except EOFError:
                print(file=sys.stderr)
                break
            except KeyboardInterrupt:
                print(file=sys.stderr)
                continue
            if not line.strip():
                continue
            if line.strip() in ("exit", "logout"):
                break
            echo = _TerminalEcho()
            try:
                [result] = backend.call_blocking(
                    backend.execute_batch,
                    [(slot, "bash", {"command": line, "shell": "persistent"})],
                    on_output=echo,
                )
            except KeyboardInterrupt:
                echo.end_line()
                print("^C (command cancelled)", file=sys.stderr)
                continue
            echo.end_line()
            if "infra_error" in result.metadata:
                print(f"hermes-actors: {result.error}", file=sys.stderr)
                with contextlib.suppress(InfrastructureError):
                    backend.call_blocking(backend.release, slot, True)
                print("starting a new slot...", file=sys.stderr)
                slot = backend.call_blocking(backend.acquire, "hermes-actors-shell", profile)
            elif result.metadata.get("timed_out"):
                print(f"hermes-actors: {result.error}", file=sys.stderr)
    finally:
        if readline is not None:
            with contextlib.suppress(OSError):
                history.parent.mkdir(parents=True, exist_ok=True)
                readline.write_history_file(history)
        backend.stop_sync()
    return EXIT_OK


# -- profiles check ----------------------------------------------------------------------------


def profiles_command(arguments: argparse.Namespace) -> int:
    from hermes_actors._provenance import resolve_profiles

    resolved = resolve_profiles(_profiles_path(arguments.file))
    if arguments.json:
        print(json.dumps(profiles_as_data(resolved), indent=2))
    else:
        print(format_profiles(resolved))
    return EXIT_OK


# -- status ----------------------------------------------------------------------------------------


def _runs_as_data(runs: list[Any], where: Path) -> dict[str, Any]:
    return {
        "state_dir": os.fspath(where.parent),
        "runs": [
            {
                "pid": run.pid,
                "run_id": run.run_id,
                "started_at": run.started_at,
                "command": run.command,
                "status": run.status.as_dict(),
            }
            for run in runs
        ],
    }


def status_command(arguments: argparse.Namespace) -> int:
    from hermes_actors.runtime._publish import read_runs, runs_dir

    where = runs_dir()

    def show() -> str:
        runs = read_runs()
        if arguments.json:
            return json.dumps(_runs_as_data(runs, where))
        return format_runs(runs, where=os.fspath(where.parent))

    if arguments.watch is None:
        print(show())
        return EXIT_OK
    if not arguments.watch > 0:
        raise UsageError(f"--watch must be a number of seconds > 0: {arguments.watch:g}")
    try:
        if sys.stdout.isatty() and not arguments.json:
            from rich.live import Live
            from rich.text import Text

            with Live(Text(show()), auto_refresh=False, screen=False) as live:
                while True:
                    time.sleep(arguments.watch)
                    live.update(Text(show()), refresh=True)
        while True:
            print(show(), flush=True)
            if not arguments.json:
                print(flush=True)
            time.sleep(arguments.watch)
    except KeyboardInterrupt:
        return EXIT_OK


# -- reap ------------------------------------------------------------------------------------------


def reap_command(arguments: argparse.Namespace) -> int:
    from hermes_actors.drivers._local_reap import find_local_leftovers, reap_local
    from hermes_actors.runtime._publish import read_runs

    verb = "would stop" if arguments.dry_run else "stopped"
    leftovers = find_local_leftovers(min_age_s=arguments.min_age)
    for sandbox_id, pids in leftovers.sandboxes.items():
        print(f"{verb} local sandbox {sandbox_id} (processes {', '.join(map(str, pids))})")
    for directory in leftovers.directories:
        print(f"{'would remove' if arguments.dry_run else 'removed'} local directory {directory}")
    if not arguments.dry_run:
        reap_local(leftovers)
    apps = list(arguments.app)
    if not apps:
        path = _profiles_path(arguments.profiles)
        if path is not None or os.environ.get(ENV_PROFILES_FILE):
            profiles = load_profiles(path)
            apps = sorted(
                {
                    config.app_name
                    for config in profiles.profiles.values()
                    if config.backend == "modal"
                }
            )
    reaped = 0
    if apps:
        live_runs = [run.run_id for run in read_runs()]
        reaped = trio.run(_reap_modal, apps, arguments.min_age, live_runs, arguments.dry_run, verb)
    found = len(leftovers.sandboxes) + len(leftovers.directories) + reaped
    print(
        f"{found} leftover(s) {'found' if arguments.dry_run else 'cleaned up'}"
        + (f"; Modal apps checked: {', '.join(apps)}" if apps else "; no Modal app to check")
    )
    return EXIT_OK


async def _reap_modal(
    apps: list[str], min_age_s: float, live_runs: list[str], dry_run: bool, verb: str
) -> int:
    import secrets

    from hermes_actors.drivers._modal import TAG_RUN, ModalDriver

    driver = ModalDriver(run_id=f"reaper-{secrets.token_hex(6)}")
    count = 0
    try:
        for app in apps:
            for sandbox in await driver.reap(
                app, min_age_s=min_age_s, spare_runs=live_runs, dry_run=dry_run
            ):
                count += 1
                print(
                    f"{verb} Modal sandbox {sandbox.sandbox_id} of app {app} "
                    f"(run {sandbox.tags.get(TAG_RUN, '?')})"
                )
    finally:
        await driver.aclose()
    return count


# -- demo ------------------------------------------------------------------------------------------


def _demo_script() -> Path:
    # A source checkout: src/hermes_actors/cli/ -> the repository's examples/.
    script = Path(__file__).resolve().parents[3] / "examples" / "rl_batch.py"
    if not script.is_file():
        raise UsageError(
            f"the demo needs the repository's examples/ ({script} is missing); run it from a "
            "clone of hermes-actors"
        )
    return script


def demo_command(arguments: argparse.Namespace) -> int:
    script = _demo_script()
    extra = [argument for argument in arguments.arguments if argument != "--"]
    saved = sys.argv
    sys.argv = [os.fspath(script), *extra]
    os.environ.setdefault("TERMINAL_ENV", "local")
    try:
        runpy.run_path(os.fspath(script), run_name="__main__")
    except SystemExit as done:
        code = done.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        sys.argv = saved
    return EXIT_OK
