"""`hermes-actors` command line, and `format_status`, the human view of `ToolBackend.status()`.

    hermes-actors status [--profiles FILE] [--start] [--json]

Without `--start` it shows the resolved profiles (nothing runs in a fresh process). With
`--start` it starts the pools, waits for the pre-warm, prints the live status and stops again:
a quick check that sandboxes can start on this machine with this configuration.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from hermes_actors._config import Profiles, load_profiles
from hermes_actors._errors import HermesError
from hermes_actors._status import BackendStatus

__all__ = ["format_profiles", "format_status", "main"]

_POOL_COLUMNS = (
    ("profile", "profile"),
    ("backend", "backend"),
    ("sandboxes", None),
    ("free", "slots_free"),
    ("held", "slots_held"),
    ("waiters", "waiters"),
    ("starting", "starting"),
    ("commands", "commands_run"),
    ("cmd fail", "command_failures"),
    ("infra fail", "infra_failures"),
    ("started", "sandboxes_started"),
    ("stopped", "sandboxes_stopped"),
    ("lost", "sandboxes_lost"),
)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    return [
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in (header, *rows)
    ]


def format_status(status: BackendStatus | Mapping[str, Any]) -> str:
    """Render a `ToolBackend.status()` snapshot as a table: one row per pool, then sandboxes."""
    if isinstance(status, BackendStatus):
        status = status.as_dict()
    pools: list[Mapping[str, Any]] = list(status.get("pools", ()))
    state = "running" if status.get("running") else "stopped"
    lines = [
        f"hermes-actors: {state}; profiles: {', '.join(status.get('profiles', ())) or '-'}"
        f" (default: {status.get('default_profile', '-')})"
    ]
    if not pools:
        lines.append("no pool has started")
        return "\n".join(lines)
    header = [title for title, _ in _POOL_COLUMNS]
    rows = []
    for pool in pools:
        rows.append(
            [
                str(len(pool.get("sandboxes", ()))) if key is None else str(pool.get(key, "-"))
                for _, key in _POOL_COLUMNS
            ]
        )
    lines.extend(_table(header, rows))
    for pool in pools:
        sandboxes = list(pool.get("sandboxes", ()))
        if not sandboxes:
            continue
        lines.append(f"sandboxes of {pool.get('profile')}:")
        sandbox_rows = [
            [
                "  " + str(sandbox["sandbox_id"]),
                str(sandbox["state"]),
                str(sandbox["slots_free"]),
                str(sandbox["slots_held"]),
                f"{float(sandbox['age_s']):.1f}s",
                str(sandbox["commands_run"]),
            ]
            for sandbox in sandboxes
        ]
        lines.extend(
            _table(["  sandbox", "state", "free", "held", "age", "commands"], sandbox_rows)
        )
    return "\n".join(lines)


def format_profiles(profiles: Profiles) -> str:
    """Render resolved profiles: what each pool would look like."""
    header = [
        "profile",
        "backend",
        "image",
        "cpu",
        "memory",
        "gpu",
        "slots",
        "sandboxes",
        "isolation",
        "network",
    ]
    rows = []
    for name, config in profiles.profiles.items():
        marker = " *" if name == profiles.default_profile else ""
        rows.append(
            [
                name + marker,
                config.backend,
                config.image,
                f"{config.cpu:g}",
                f"{config.memory}MiB",
                config.gpu or "-",
                str(config.slots_per_sandbox),
                f"{config.min_sandboxes}..{config.max_sandboxes}",
                config.isolation,
                "on" if config.network else "off",
            ]
        )
    source = profiles.source or "defaults and environment"
    return "\n".join([f"profiles from {source} (* = default):", *_table(header, rows)])


def _status_command(arguments: argparse.Namespace) -> int:
    profiles = load_profiles(arguments.profiles)
    if not arguments.start:
        if arguments.json:
            print(
                json.dumps(
                    {"profiles": list(profiles.names), "default_profile": profiles.default_profile}
                )
            )
        else:
            print(format_profiles(profiles))
        return 0
    from hermes_actors.facades._backend import ToolBackend

    backend = ToolBackend(profiles)
    try:
        backend.call_blocking(backend.start)
        default = profiles.get_profile()
        deadline = time.monotonic() + arguments.wait
        while time.monotonic() < deadline:
            ready = [
                sandbox
                for pool in backend.status().pools
                if pool.profile == default.name
                for sandbox in pool.sandboxes
                if sandbox.state == "ready"
            ]
            if len(ready) >= default.min_sandboxes:
                break
            time.sleep(0.05)
        status = backend.status()
    finally:
        backend.stop_sync()
    print(json.dumps(status.as_dict(), indent=2) if arguments.json else format_status(status))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `hermes-actors` command."""
    parser = argparse.ArgumentParser(prog="hermes-actors", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    status = commands.add_parser("status", help="show profiles, or start them and show pools")
    status.add_argument(
        "--profiles",
        help="YAML profiles file (default: $TERMINAL_MODAL_PROFILES_FILE, else built-in defaults)",
    )
    status.add_argument("--start", action="store_true", help="start the pools and show them")
    status.add_argument(
        "--wait",
        type=float,
        default=60.0,
        help="seconds to wait for the pre-warm with --start (default 60)",
    )
    status.add_argument("--json", action="store_true", help="print JSON")
    arguments = parser.parse_args(argv)
    try:
        return _status_command(arguments)
    except HermesError as exc:
        print(f"hermes-actors: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
