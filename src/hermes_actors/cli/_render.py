"""Rendering for people: status snapshots and resolved profiles as plain-text tables."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from hermes_actors._config import SandboxConfig
from hermes_actors._provenance import ResolvedProfiles
from hermes_actors._status import BackendStatus

__all__ = ["format_profiles", "format_runs", "format_status", "profiles_as_data", "table"]

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


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned columns two spaces apart, header first."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    return [
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in (header, *rows)
    ]


def format_status(status: BackendStatus) -> str:
    """Render a status snapshot as a table: one row per pool, then each pool's sandboxes."""
    state = "running" if status.running else "stopped"
    lines = [
        f"hermes-actors: {state}; profiles: {', '.join(status.profiles) or '-'}"
        f" (default: {status.default_profile})"
    ]
    if not status.pools:
        lines.append("no pool has started")
        return "\n".join(lines)
    header = [title for title, _ in _POOL_COLUMNS]
    rows = [
        [
            str(len(pool.sandboxes)) if key is None else str(getattr(pool, key))
            for _, key in _POOL_COLUMNS
        ]
        for pool in status.pools
    ]
    lines.extend(table(header, rows))
    for pool in status.pools:
        if not pool.sandboxes:
            continue
        lines.append(f"sandboxes of {pool.profile}:")
        sandbox_rows = [
            [
                "  " + sandbox.sandbox_id,
                sandbox.state,
                str(sandbox.slots_free),
                str(sandbox.slots_held),
                f"{sandbox.age_s:.1f}s",
                str(sandbox.commands_run),
            ]
            for sandbox in pool.sandboxes
        ]
        lines.extend(table(["  sandbox", "state", "free", "held", "age", "commands"], sandbox_rows))
    return "\n".join(lines)


def format_runs(runs: Sequence[Any], *, where: str) -> str:
    """Render every published run (`PublishedRun`s): a heading per run, then its status."""
    if not runs:
        return f"no running hermes-actors backend publishes its status under {where}"
    blocks = []
    for run in runs:
        age = time.time() - run.started_at
        blocks.append(
            f"run {run.run_id} (pid {run.pid}, up {age:.0f}s): {run.command}\n"
            + format_status(run.status)
        )
    return "\n\n".join(blocks)


_SOURCE_MARK = {"default": "", "file": "", "environment": " (env)"}


def _cell(resolved: ResolvedProfiles, name: str, field: str, text: str) -> str:
    return text + _SOURCE_MARK[resolved.sources[name][field]]


def format_profiles(resolved: ResolvedProfiles) -> str:
    """Render resolved profiles: one row per profile, then every value with its source."""
    profiles = resolved.profiles
    header = ["profile", "backend", "image", "cpu", "memory", "gpu", "slots", "sandboxes"]
    rows = []
    for name, config in profiles.profiles.items():
        marker = " *" if name == profiles.default_profile else ""
        rows.append(
            [
                name + marker,
                _cell(resolved, name, "backend", config.backend),
                _cell(resolved, name, "image", config.image),
                f"{config.cpu:g}",
                f"{config.memory} MiB",
                config.gpu or "-",
                str(config.slots_per_sandbox),
                f"{config.min_sandboxes}..{config.max_sandboxes}",
            ]
        )
    source = profiles.source or "built-in defaults"
    lines = [
        f"profiles from {source} (* = default profile, (env) = set by the environment):",
        *table(header, rows),
    ]
    for name, config in profiles.profiles.items():
        lines.append("")
        lines.append(f"profile {name}:")
        detail = [
            [
                "  " + field.name,
                _value_text(getattr(config, field.name)),
                resolved.sources[name][field.name],
            ]
            for field in attrs.fields(SandboxConfig)
            if field.name != "name"
        ]
        lines.extend(table(["  field", "value", "from"], detail))
    return "\n".join(lines)


def _value_text(value: object) -> str:
    if isinstance(value, Mapping):
        return ", ".join(f"{key}={item}" for key, item in value.items()) or "{}"
    if isinstance(value, tuple):
        return ", ".join(str(item) for item in value) or "[]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def profiles_as_data(resolved: ResolvedProfiles) -> dict[str, Any]:
    """Resolved profiles as JSON-able data: every field's value and source."""
    return {
        "source": resolved.profiles.source,
        "default_profile": resolved.profiles.default_profile,
        "profiles": {
            name: {
                field.name: {
                    "value": _plain(getattr(config, field.name)),
                    "from": resolved.sources[name][field.name],
                }
                for field in attrs.fields(SandboxConfig)
            }
            for name, config in resolved.profiles.profiles.items()
        },
    }


def _plain(value: object) -> object:
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, tuple):
        return list(value)
    return value
