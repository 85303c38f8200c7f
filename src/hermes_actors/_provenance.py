"""Where each resolved profile value came from: its default, the profiles file, or the environment.

Beside the config loader, and built only on its public behaviour (`load_profiles` with an
explicit `env`): a value is the environment's when resolving without the environment variables
the config reads changes it; otherwise it is the file's when the file's profile sets it (under
its name or an older alias); otherwise it is the default. `hermes-actors profiles check` shows
these next to each value.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Final, Literal

import attrs
import yaml

from hermes_actors._config import (
    ENV_APP_NAME,
    ENV_BACKEND,
    ENV_IMAGE,
    ENV_PROFILES_FILE,
    FIELD_ALIASES,
    Profiles,
    SandboxConfig,
    load_profiles,
)
from hermes_actors._errors import ConfigError

__all__ = ["FIELD_ENVIRONMENT", "ResolvedProfiles", "Source", "resolve_profiles"]

Source = Literal["default", "file", "environment"]

#: The environment variable that sets each field, for the fields one sets.
FIELD_ENVIRONMENT: Final[Mapping[str, str]] = {
    "backend": ENV_BACKEND,
    "image": ENV_IMAGE,
    "app_name": ENV_APP_NAME,
}


@attrs.frozen(kw_only=True)
class ResolvedProfiles:
    """Resolved profiles, and for each profile and field where its value came from."""

    #: The profiles exactly as `load_profiles` resolves them.
    profiles: Profiles
    #: Profile name -> field name -> `default`, `file` or `environment`.
    sources: Mapping[str, Mapping[str, Source]]


def _file_keys(path: str | None) -> Mapping[str, frozenset[str]]:
    """The fields each profile of the file sets (aliases resolved)."""
    if path is None:
        return {}
    with open(path, encoding="utf-8") as file:
        document = yaml.safe_load(file)  # already read strictly by load_profiles
    raw = document.get("profiles") if isinstance(document, Mapping) else None
    if not isinstance(raw, Mapping):
        return {}
    return {
        str(name): frozenset(FIELD_ALIASES.get(key, key) for key in settings)
        for name, settings in raw.items()
        if isinstance(settings, Mapping)
    }


def resolve_profiles(
    path: str | os.PathLike[str] | None = None, *, env: Mapping[str, str] | None = None
) -> ResolvedProfiles:
    """`load_profiles(path, env=env)`, with the source of every value.

    Raises `ConfigError` as `load_profiles` does.
    """
    environment = dict(os.environ if env is None else env)
    profiles = load_profiles(path, env=environment)
    without = {
        key: value for key, value in environment.items() if key not in FIELD_ENVIRONMENT.values()
    }
    try:
        baseline: Profiles | None = load_profiles(path, env=without)
    except ConfigError:
        # Only the environment made these profiles valid: every value it sets is its own.
        baseline = None
    file_path = os.fspath(path) if path is not None else environment.get(ENV_PROFILES_FILE) or None
    set_in_file = _file_keys(profiles.source if profiles.source is not None else file_path)
    sources: dict[str, dict[str, Source]] = {}
    for name, config in profiles.profiles.items():
        before = baseline.profiles.get(name) if baseline is not None else None
        fields: dict[str, Source] = {}
        for field in attrs.fields(SandboxConfig):
            value = getattr(config, field.name)
            if field.name in FIELD_ENVIRONMENT and (
                FIELD_ENVIRONMENT[field.name] in environment
                and (before is None or getattr(before, field.name) != value)
            ):
                fields[field.name] = "environment"
            elif field.name in set_in_file.get(name, frozenset()):
                fields[field.name] = "file"
            else:
                fields[field.name] = "default"
        sources[name] = fields
    return ResolvedProfiles(profiles=profiles, sources=sources)
