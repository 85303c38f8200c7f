"""hermes-actors: run commands in sandboxes, check profiles, watch and clean up running backends.

Exit codes scripts can rely on: 0 success; `run` exits with its command's own code (124 when it
timed out, 128+N when a signal N killed it); 2 a usage or configuration error; 3 an
infrastructure error (a sandbox could not start or was lost, a backend is unavailable); 130
interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

from hermes_actors._errors import ConfigError, HermesError
from hermes_actors.cli._exit_codes import (
    EXIT_BROKEN_PIPE,
    EXIT_CONFIG,
    EXIT_INFRASTRUCTURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    UsageError,
)

__all__ = ["EXIT_CONFIG", "EXIT_INFRASTRUCTURE", "EXIT_INTERRUPTED", "EXIT_OK", "main"]

logger = logging.getLogger("hermes_actors.cli")


def _add_profiles_options(parser: argparse.ArgumentParser, *, profile: bool = True) -> None:
    parser.add_argument(
        "--profiles",
        metavar="FILE",
        help="YAML profiles file (default: $TERMINAL_MODAL_PROFILES_FILE, else "
        "./modal_profiles.yaml when present, else the built-in defaults)",
    )
    if profile:
        parser.add_argument(
            "--profile", metavar="NAME", help="profile to use (default: the default profile)"
        )


def _add_verbosity(parser: argparse.ArgumentParser, *, top: bool = False) -> None:
    # Accepted before and after the subcommand; a subcommand's default must not reset the
    # top level's count.
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0 if top else argparse.SUPPRESS,
        help="log more: -v info, -vv debug (default: warnings only)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The whole command line, subcommands included."""
    parser = argparse.ArgumentParser(
        prog="hermes-actors",
        description=__doc__.splitlines()[0],
        epilog="exit codes: 0 ok, run: the command's own, 2 usage or configuration error, "
        "3 infrastructure error, 130 interrupted",
    )
    _add_verbosity(parser, top=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="run one command in a fresh slot; exit with its exit code",
        description="Run one command in a fresh slot and exit with its exit code (124 on "
        "timeout). One argument after -- is a shell command line (`-- 'ls | wc -l'`); several "
        "are one command and its arguments, quoted for the shell.",
    )
    _add_profiles_options(run)
    run.add_argument("--image", help="container image for this command (overrides the profile's)")
    run.add_argument(
        "--timeout",
        type=float,
        metavar="S",
        help="seconds before the command is killed (default: the profile's execution_timeout_s)",
    )
    run.add_argument(
        "--json", action="store_true", help="print one JSON object instead of the output"
    )
    run.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND...")
    _add_verbosity(run)

    shell = commands.add_parser(
        "shell",
        help="an interactive prompt in one slot",
        description="An interactive prompt whose commands run in one slot. Ctrl-C cancels the "
        "running command only; Ctrl-D (or `exit`) leaves and releases the slot.",
    )
    _add_profiles_options(shell)
    _add_verbosity(shell)

    profiles = commands.add_parser("profiles", help="profiles: check a file")
    profile_commands = profiles.add_subparsers(dest="profiles_command", required=True)
    check = profile_commands.add_parser(
        "check",
        help="validate a profiles file and show the resolved profiles",
        description="Validate a profiles file: print the resolved profiles and where each value "
        "came from (default, file, environment), or every error with its path (exit 2).",
    )
    check.add_argument("file", nargs="?", metavar="FILE", help="the profiles file")
    check.add_argument("--json", action="store_true", help="print JSON")
    _add_verbosity(check)

    status = commands.add_parser(
        "status",
        help="status of the backends running in other processes",
        description="Pools, sandboxes, slots held and free, waiters and counters of every "
        "running backend on this machine (each publishes its status under the state "
        "directory, $HERMES_ACTORS_STATE_DIR).",
    )
    status.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=1.0,
        metavar="S",
        help="refresh every S seconds (default 1) until Ctrl-C",
    )
    status.add_argument("--json", action="store_true", help="print JSON")
    _add_verbosity(status)

    reap = commands.add_parser(
        "reap",
        help="stop sandboxes left by dead runs (local and Modal)",
        description="Stop what dead runs left behind: local sandbox processes and directories "
        "of hosts that are gone, and Modal sandboxes of other runs in the profiles' apps (or "
        "--app). Runs alive on this machine are spared.",
    )
    _add_profiles_options(reap, profile=False)
    reap.add_argument(
        "--app", action="append", default=[], metavar="NAME", help="Modal app to reap (repeatable)"
    )
    reap.add_argument("--dry-run", action="store_true", help="list what would be stopped")
    reap.add_argument(
        "--min-age",
        type=float,
        default=60.0,
        metavar="S",
        help="spare what is younger than S seconds (default 60)",
    )
    _add_verbosity(reap)

    demo = commands.add_parser(
        "demo",
        help="what `make demo` runs: RL-style trajectories on the local backend",
        description="Run examples/rl_batch.py: 64 RL-style trajectories through execute_batch.",
    )
    demo.add_argument("arguments", nargs=argparse.REMAINDER, help="passed to rl_batch.py")
    _add_verbosity(demo)
    return parser


def _commands() -> dict[str, Callable[[argparse.Namespace], int]]:
    from hermes_actors.cli import _commands

    return {
        "run": _commands.run_command,
        "shell": _commands.shell_command,
        "profiles": _commands.profiles_command,
        "status": _commands.status_command,
        "reap": _commands.reap_command,
        "demo": _commands.demo_command,
    }


def exit_code_for(error: BaseException) -> int:
    """The exit code an error ends the command with."""
    if isinstance(error, ConfigError | UsageError):
        return EXIT_CONFIG
    return EXIT_INFRASTRUCTURE


def _meaningful(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error to report from a group: an interrupt first, else the first HermesError."""
    for kind in (KeyboardInterrupt, HermesError):
        found = group.subgroup(lambda error, kind=kind: isinstance(error, kind))  # type: ignore[misc]
        while found is not None and isinstance(found, BaseExceptionGroup):
            found = found.exceptions[0]  # type: ignore[assignment]
        if found is not None:
            return found
    return group


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `hermes-actors` command; returns the exit code."""
    from hermes_actors._logging import configure_logging

    parser = build_parser()
    arguments = parser.parse_args(argv)
    configure_logging(arguments.verbose)
    try:
        try:
            return _commands()[arguments.command](arguments)
        except BaseExceptionGroup as group:
            raise _meaningful(group) from None
    except HermesError as error:
        for line in str(error).splitlines():
            print(f"hermes-actors: {line}", file=sys.stderr)
        return exit_code_for(error)
    except KeyboardInterrupt:
        print("hermes-actors: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader left (`| head`): say nothing more, and let the exit not flush into it.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
