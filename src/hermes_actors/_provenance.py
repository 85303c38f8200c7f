"""Where each resolved profile value came from: its default, the profiles file, or the environment.

The config loader knows the layer that set every value (`load_profiles_with_origins`); this
module gives that knowledge the shape `hermes-actors profiles check` shows next to each value.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Final, Literal

import attrs

from hermes_actors._config import (
    ENV_APP_NAME,
    ENV_BACKEND,
    ENV_IMAGE,
    Profiles,
    SandboxConfig,
    load_profiles_with_origins,
)

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


def resolve_profiles(
    path: str | os.PathLike[str] | None = None, *, env: Mapping[str, str] | None = None
) -> ResolvedProfiles:
    """`load_profiles(path, env=env)`, with the source of every value.

    Raises `ConfigError` as `load_profiles` does.
    """
    profiles, origins = load_profiles_with_origins(path, env=env)
    sources: dict[str, dict[str, Source]] = {}
    for name in profiles.profiles:
        given = origins.get(name, {})
        sources[name] = {}
        for field in attrs.fields(SandboxConfig):
            origin = given.get(field.name)
            # Without overrides (none are passed here) a value is the file's or the environment's.
            sources[name][field.name] = "default" if origin is None else _SOURCES[origin]
    return ResolvedProfiles(profiles=profiles, sources=sources)


_SOURCES: Final[Mapping[str, Source]] = {"file": "file", "environment": "environment"}
