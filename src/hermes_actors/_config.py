"""Sandbox profiles: the typed configuration both facades share, and where it comes from.

A *profile* (`SandboxConfig`) says what one pool of sandboxes looks like: image, resources,
slots, pool bounds, timeouts, credentials and isolation. `Profiles` is a named set of them with
a default. Configuration is resolved in layers, later wins:

    defaults  <  YAML file  <  environment  <  explicit overrides

* The YAML file is `{default_profile?: str, profiles: {name: {field: value, ...}}}`, read from
  the `path` given, else from `TERMINAL_MODAL_PROFILES_FILE`, else `./modal_profiles.yaml` when
  it exists. With none, there is a single `default` profile built from the defaults.
* `TERMINAL_ENV` (`local` | `modal`) sets the backend of profiles that do not name one (else
  `local`; `modal` under the Modal names), and the pick is logged once with its reason;
  `TERMINAL_MODAL_IMAGE` and `TERMINAL_MODAL_APP_NAME` set `image` and `app_name` of every
  profile, over the file. An empty variable counts as unset.
* `overrides` (a mapping of fields) applies to every profile; `profile_overrides` (profile name
  to a mapping of fields) to one profile each, after `overrides`.

Values are checked strictly, with no silent coercion: `1.7` is not an int, `"false"` is not a
bool and a bool is not a number (an int is accepted where a float is expected); unknown keys are
rejected with the closest valid spelling; impossible values (`min_sandboxes > max_sandboxes`,
negative timeouts, unknown backends) are rejected. Every problem found is reported at once, in
one `ConfigError` with one line per problem, each naming its source and path::

    config/x.yaml: $.profiles.gpu.memory: expected int, got str ('lots')
    config/x.yaml: $.profiles.gpu: 'max_sandboxes' must be >= min_sandboxes (3): 1

Field problems name the field's path; problems of a whole profile (range and cross-field checks)
name the profile, in the layer that set the offending value. The terminal tool's older
spellings `min_pool` and `max_pool` are accepted for `min_sandboxes` and `max_sandboxes`.

Where the rules live: a field's type is its annotation, checked strictly on construction (the
cattrs converter that structures plain data never coerces, so nothing is checked twice); its
own rules are its attrs `validator` (`ge`, `gt`, or functions like them); rules relating fields
are the class's `relations`. Construction runs them all and raises one `ConfigError` listing
every problem (see `_SelfChecking`); the problems are cattrs validation errors, told as lines by
`cattrs.transform_error` from the root of the layer that set each value. A new field is one
line plus its rule.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, ClassVar, Final, Generic, Literal, Self, TypeVar, cast, get_args, get_origin

import attrs
import cattrs
import yaml
from attrs.validators import ge, gt
from cattrs.errors import (
    AttributeValidationNote,
    ClassValidationError,
    IterableValidationError,
    IterableValidationNote,
)

from hermes_actors._errors import ConfigError

logger = logging.getLogger("hermes_actors.config")

__all__ = [
    "Backend",
    "Isolation",
    "ModalSandboxConfig",
    "Profiles",
    "SandboxConfig",
    "load_profiles",
    "profiles_from_mapping",
    "structure_config",
    "unstructure_config",
]

Backend = Literal["local", "modal"]
Isolation = Literal["auto", "bwrap", "none"]
Shell = Literal["persistent", "fresh"]

ENV_BACKEND: Final = "TERMINAL_ENV"
ENV_IMAGE: Final = "TERMINAL_MODAL_IMAGE"
ENV_APP_NAME: Final = "TERMINAL_MODAL_APP_NAME"
ENV_PROFILES_FILE: Final = "TERMINAL_MODAL_PROFILES_FILE"
#: The original Hermes Atropos backend's app name prefix and environment prefix.
ATROPOS_APP_NAME: Final = "atropos-sandbox"
ATROPOS_ENV_PREFIX: Final = "ATROPOS_MODAL_"
#: Read from the working directory when no profiles file is named.
WORKING_DIRECTORY_PROFILES: Final = "modal_profiles.yaml"

#: Older spellings (the terminal tool's) accepted in YAML and mappings, and their field.
FIELD_ALIASES: Final[Mapping[str, str]] = {
    "min_pool": "min_sandboxes",
    "max_pool": "max_sandboxes",
}

# Modal's rule for object names (apps, secrets); profile names follow it too because they end up
# in app names (`with_app_name`) and tags.
_OBJECT_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_OBJECT_NAME_RULE = "1-64 letters, digits, '.', '-' or '_'"
# Modal's hard limit on a sandbox's lifetime (`timeout=`): 24 hours.
_MODAL_MAX_LIFETIME_S: Final = 24 * 60 * 60

_K = TypeVar("_K")
_V = TypeVar("_V")


class _FrozenMap(Mapping[_K, _V], Generic[_K, _V]):
    """A read-only, hashable, picklable mapping, so that frozen configs are frozen all the way."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[_K, _V]) -> None:
        self._data = dict(data)

    def __getitem__(self, key: _K) -> _V:
        return self._data[key]

    def __iter__(self) -> Iterator[_K]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return hash(frozenset(self._data.items()))

    def __repr__(self) -> str:
        return repr(self._data)

    def __getstate__(self) -> dict[_K, _V]:
        return self._data

    def __setstate__(self, state: dict[_K, _V]) -> None:
        self._data = state


def _freeze_mapping(value: Mapping[_K, _V]) -> Mapping[_K, _V]:
    # Anything that is not a mapping is left as is for validation to report (never coerced).
    if isinstance(value, Mapping) and not isinstance(value, _FrozenMap):
        return _FrozenMap(value)
    return value


# attrs' converters must not be generic for mypy's attrs plugin to type `__init__`.
def _freeze_str_mapping(value: Mapping[str, str]) -> Mapping[str, str]:
    return _freeze_mapping(value)


def _freeze_profiles(value: Mapping[str, SandboxConfig]) -> Mapping[str, SandboxConfig]:
    return _freeze_mapping(value)


def _freeze_sequence(value: Sequence[str]) -> tuple[str, ...]:
    # A list becomes a tuple; a str (which is a sequence too) is left for validation to reject.
    if isinstance(value, list):
        return tuple(value)
    return cast("tuple[str, ...]", value)


# ---------------------------------------------------------------------------------------------
# How a config checks itself, and how its problems are told.
#
# Checking: every field's validator (`_FieldCheck`, given to each field by `_checked_fields`)
# checks the value's type strictly, from the field's annotation, then the field's own rules
# (the attrs validators it was declared with: `ge`, `gt`, or functions like them). Then the
# class's relations (rules between fields) run, skipping fields already found wrong. attrs
# stops at the first validator that raises, so `_FieldCheck` never raises: it records what it
# found, and `__attrs_post_init__` raises everything at once. Each value is checked once, by
# the class: the converter that structures plain data passes values through as given.
#
# Telling: the problems travel as cattrs' own validation errors (a `ClassValidationError` whose
# wrong types carry an `AttributeValidationNote` naming their field, list items and mapping
# values an `IterableValidationNote` inside an `IterableValidationError`; broken rules have no
# note), and `cattrs.transform_error` turns them into paths. A loaded profile's values come
# from several layers (a file, environment variables, overrides), so each top-level error is
# transformed with the root of the layer that set its value: the value's own location for a
# wrong type (`config/x.yaml: $.profiles.gpu.memory`, `environment: TERMINAL_ENV`), the profile
# in the highest layer involved for a broken rule (`overrides: $ (profile 'gpu')`).
# ---------------------------------------------------------------------------------------------


class _WrongType(TypeError):
    """A value of the wrong type (the message says what was expected and what came)."""


class _BrokenRule(ValueError):
    """A value against a rule of its field or of the class; `fields` are the fields involved."""

    def __init__(self, message: str, fields: tuple[str, ...]) -> None:
        super().__init__(message)
        self.fields = fields


def _describe(value: object) -> str:
    if value is None:
        return "null"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} ({text})"


def _child(path: str, key: object) -> str:
    if isinstance(key, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", key):
        return f"{path}.{key}"
    return f"{path}[{key!r}]"


def _check_int(value: Any) -> None:
    if type(value) is not int:  # bool is an int subclass and is rejected on purpose
        raise _WrongType(f"expected int, got {_describe(value)}")


def _check_float(value: Any) -> None:
    if type(value) is not float and type(value) is not int:
        raise _WrongType(f"expected float, got {_describe(value)}")
    if not math.isfinite(value):
        raise _WrongType(f"expected a finite float, got {_describe(value)}")


def _check_bool(value: Any) -> None:
    if type(value) is not bool:
        raise _WrongType(f"expected bool, got {_describe(value)}")


def _check_str(value: Any) -> None:
    if not isinstance(value, str):
        raise _WrongType(f"expected str, got {_describe(value)}")


def _check_optional_str(value: Any) -> None:
    if value is not None and not isinstance(value, str):
        raise _WrongType(f"expected str or null, got {_describe(value)}")


def _literal_checker(type_: Any) -> Callable[[Any], None]:
    choices = get_args(type_)
    expected = ", ".join(repr(choice) for choice in choices)

    def check(value: Any) -> None:
        if not isinstance(value, str) or value not in choices:
            raise _WrongType(f"expected one of {expected}, got {_describe(value)}")

    return check


def _wrong_item(message: str, index: int | str, type_: type) -> _WrongType:
    error = _WrongType(message)
    error.add_note(IterableValidationNote(f"item {index!r}", index, type_))
    return error


def _check_str_tuple(value: Any) -> None:
    if not isinstance(value, list | tuple):
        raise _WrongType(f"expected a list of str, got {_describe(value)}")
    wrong = [
        _wrong_item(f"expected str, got {_describe(item)}", index, str)
        for index, item in enumerate(value)
        if not isinstance(item, str)
    ]
    if wrong:
        raise IterableValidationError("wrong items", wrong, tuple[str, ...])


def _check_str_mapping(value: Any) -> None:
    # Type names only in the messages: these mappings hold environment values, often secrets.
    if not isinstance(value, Mapping):
        raise _WrongType(f"expected a mapping of str to str, got {type(value).__name__}")
    wrong: list[Exception] = []
    for key, item in value.items():
        if not isinstance(key, str):  # no note: reported at the mapping itself
            wrong.append(_WrongType(f"expected str keys, got key of type {type(key).__name__}"))
        elif not isinstance(item, str):
            wrong.append(_wrong_item(f"expected str, got {type(item).__name__}", key, str))
    if wrong:
        raise IterableValidationError("wrong items", wrong, Mapping[str, str])


_CHECKERS: Final[Mapping[Any, Callable[[Any], None]]] = {
    int: _check_int,
    float: _check_float,
    bool: _check_bool,
    str: _check_str,
    str | None: _check_optional_str,
    tuple[str, ...]: _check_str_tuple,
    Mapping[str, str]: _check_str_mapping,
}


def _checker_for(type_: Any) -> Callable[[Any], None] | None:
    """The strict check for one of the field types configs use, or None for other types."""
    if get_origin(type_) is Literal:
        return _literal_checker(type_)
    try:
        return _CHECKERS.get(type_)
    except TypeError:  # an unhashable type form: not one of ours
        return None


def _fields_of(error: BaseException) -> tuple[str, ...]:
    """The fields a config's top-level error is about: a broken rule's, or the one named by a
    wrong type's `AttributeValidationNote`."""
    if isinstance(error, _BrokenRule):
        return error.fields
    notes = getattr(error, "__notes__", ())
    return tuple(note.name for note in notes if isinstance(note, AttributeValidationNote))


def _transform(error: BaseException, root: str) -> list[str]:
    """`cattrs.transform_error` with our line format, `{path}: {message}`, under `root`.

    transform_error writes `{description} @ {path}`; a description may contain " @ " (it shows
    the value given), so ours is a number standing for the message, which holds no " @ " and
    is split off the path exactly.
    """
    messages: list[str] = []

    def describe(exception: BaseException, type_: object) -> str:
        messages.append(str(exception))
        return str(len(messages) - 1)

    lines = []
    for line in cattrs.transform_error(error, path=root, format_exception=describe):
        number, _, path = line.partition(" @ ")
        lines.append(f"{path}: {messages[int(number)]}")
    return lines


class _InvalidConfig(ConfigError):
    """A config failed its checks; `errors` holds each problem, as cattrs' validation errors."""

    def __init__(self, what: str, errors: ClassValidationError) -> None:
        lines = "\n".join(f"  {line}" for line in _transform(errors, "$"))
        super().__init__(f"invalid {what}:\n{lines}")
        self.errors = errors


#: The problems found in configs being built, by the instance's id: its fields' validators add
#: to them and its `__attrs_post_init__`, which attrs runs right after them, raises them all
#: (see `_SelfChecking`). A config without problems has no entry.
_being_built: dict[int, list[Exception]] = {}


@attrs.frozen
class _FieldCheck:
    """A config field's validator: its type (strictly, from its annotation), then `rules`.

    It never raises: what it finds goes to `_being_built`, so that every field is checked.
    """

    rules: Callable[[Any, attrs.Attribute[Any], Any], Any] | None

    def __call__(self, instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
        found: Exception | None = None
        checker = _checker_for(attribute.type)
        try:
            if checker is not None:
                checker(value)
        except (_WrongType, IterableValidationError) as wrong:
            wrong.add_note(AttributeValidationNote(attribute.name, attribute.name, attribute.type))
            found = wrong
        else:
            if self.rules is not None:
                try:
                    self.rules(instance, attribute, value)
                except ValueError as error:
                    found = _BrokenRule(str(error), (attribute.name,))
        if found is not None:
            _being_built.setdefault(id(instance), []).append(found)


def _checked_fields(cls: type, fields: list[attrs.Attribute[Any]]) -> list[attrs.Attribute[Any]]:
    """attrs' field transformer of the config classes: every field gets `_FieldCheck`.

    The class must then go through `attrs.resolve_types`: its annotations are strings until
    then, and a string names no type to check.
    """
    return [
        field
        if isinstance(field.validator, _FieldCheck)
        else field.evolve(validator=_FieldCheck(field.validator))
        for field in fields
    ]


_Relation = tuple[tuple[str, ...], Callable[[Any], "str | None"]]


class _SelfChecking:
    """Base of the config classes: building one checks every field (`_FieldCheck`), then the
    class's `relations` (the fields involved, and a function giving a problem or None), and
    raises one `ConfigError` listing every problem: wrong types first, then broken rules."""

    __slots__ = ()
    relations: ClassVar[tuple[_Relation, ...]] = ()

    def __attrs_pre_init__(self) -> None:
        # A fresh start: an `attrs.validate` of a dead object with this id may have left some.
        _being_built.pop(id(self), None)

    def __attrs_post_init__(self) -> None:
        problems = _being_built.pop(id(self), [])
        wrong = {field for problem in problems for field in _fields_of(problem)}
        for involved, relation in self.relations:
            if wrong.isdisjoint(involved) and (message := relation(self)) is not None:
                problems.append(_BrokenRule(message, involved))
        if problems:
            problems.sort(key=lambda problem: isinstance(problem, _BrokenRule))
            what = self._checked_as()
            raise _InvalidConfig(
                what, ClassValidationError(f"invalid {what}", problems, type(self))
            )

    def _checked_as(self) -> str:
        return type(self).__name__


def _names_only(variables: Mapping[str, str]) -> str:
    """A repr of environment variables that shows their names, never their values."""
    try:
        names = sorted(str(name) for name in variables)
    except TypeError:  # not a mapping: validation reports it (without the value)
        return "<invalid>"
    return "{" + ", ".join(f"{name!r}: '***'" for name in names) + "}"


def _object_name(instance: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if _OBJECT_NAME.fullmatch(value) is None:
        raise ValueError(f"{attribute.name!r} must be {_OBJECT_NAME_RULE}: {value!r}")


def _not_empty(instance: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if value == "":
        raise ValueError(f"{attribute.name!r} must not be empty")


def _gpu_not_empty(instance: object, attribute: attrs.Attribute[Any], value: str | None) -> None:
    if value == "":
        raise ValueError(f"{attribute.name!r} must not be empty (use null for none)")


def _secret_names(
    instance: object, attribute: attrs.Attribute[Any], value: tuple[str, ...]
) -> None:
    if not all(_OBJECT_NAME.fullmatch(secret) for secret in value):
        raise ValueError(f"{attribute.name!r} must each be {_OBJECT_NAME_RULE}: {list(value)!r}")


def _variable_names(
    instance: object, attribute: attrs.Attribute[Any], value: Mapping[str, str]
) -> None:
    # Names only in the message: the values may be secrets.
    bad = [
        key for key, item in value.items() if key == "" or "=" in key or "\0" in key or "\0" in item
    ]
    if bad:
        raise ValueError(
            f"{attribute.name!r} keys must be non-empty, without '=' or NUL, values without NUL: "
            + ", ".join(repr(key) for key in bad)
        )


def _python_version(instance: object, attribute: attrs.Attribute[Any], value: str | None) -> None:
    if value is not None and re.fullmatch(r"3\.\d{1,2}", value) is None:
        raise ValueError(
            f"{attribute.name!r} must be a Python version like '3.11', or null: {value!r}"
        )


def _absolute_path(instance: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if not value.startswith("/"):
        raise ValueError(f"{attribute.name!r} must be an absolute path: {value!r}")


def _max_at_least_min(c: SandboxConfig) -> str | None:
    if c.max_sandboxes >= c.min_sandboxes:
        return None
    return f"'max_sandboxes' must be >= min_sandboxes ({c.min_sandboxes}): {c.max_sandboxes}"


def _modal_lifetime(c: SandboxConfig) -> str | None:
    if c.backend != "modal" or c.max_lifetime <= _MODAL_MAX_LIFETIME_S:
        return None
    return (
        f"'max_lifetime' must be <= {_MODAL_MAX_LIFETIME_S} (Modal's 24 h limit) on "
        f"backend 'modal': {c.max_lifetime!r}"
    )


_announced: set[tuple[str, str]] = set()
_announced_lock = threading.Lock()


def announce_backend(backend: str, reason: str) -> None:
    """Log, once per process for each backend and reason, a backend picked implicitly."""
    with _announced_lock:
        if (backend, reason) in _announced:
            return
        _announced.add((backend, reason))
    logger.info("hermes-actors: using the %s backend (%s)", backend, reason)


def _implicit_backend(default: Backend, default_reason: str) -> Backend:
    """`$TERMINAL_ENV` when set, else `default`; the pick is logged once with its reason."""
    value = os.environ.get(ENV_BACKEND, "")
    if value == "":
        announce_backend(default, default_reason)
        return default
    if value not in get_args(Backend):
        raise ConfigError(
            f"environment: {ENV_BACKEND}: expected one of 'local', 'modal', got "
            f"{_describe(value)}; set it to 'local' or 'modal', or unset it"
        )
    announce_backend(value, f"{ENV_BACKEND}={value}")
    return cast(Backend, value)


def _backend_from_environment() -> Backend:
    return _implicit_backend("local", f"{ENV_BACKEND} is unset and no backend was given")


def _modal_backend_from_environment() -> Backend:
    return _implicit_backend(
        "modal", f"the Modal names default to Modal; {ENV_BACKEND} is unset and no backend given"
    )


@attrs.frozen(kw_only=True, field_transformer=_checked_fields)
class SandboxConfig(_SelfChecking):
    """One profile: what each sandbox of a pool looks like and how the pool behaves.

    Immutable; derive variants with `attrs.evolve` or `with_app_name`. Construction checks every
    value (types included) and raises `ConfigError` listing all the problems found.

    A field's type is its annotation (checked strictly); its own rules are its `validator`;
    rules relating fields are `relations`. A new field is one line plus its rule.
    """

    #: The profile's name (its key in `Profiles`); it also ends up in app names and tags.
    name: str = attrs.field(default="default", validator=_object_name)
    #: Where sandboxes run. Default: `$TERMINAL_ENV` when set (and not empty), else `local`.
    backend: Backend = attrs.field(factory=_backend_from_environment)
    #: Container image (modal: a registry reference; local: an absolute path names a root
    #: filesystem directory used as `/` under bwrap, anything else means the host's own).
    #: `acquire(..., image=)` runs a slot in another image of the same profile.
    image: str = attrs.field(default="python:3.11", validator=_not_empty)
    #: CPU cores reserved per sandbox.
    cpu: float = attrs.field(default=1.0, validator=gt(0))
    #: Memory per sandbox, in MiB.
    memory: int = attrs.field(default=2048, validator=gt(0))
    #: GPU request in the provider's syntax (`"A10G"`, `"H100:2"`); ignored by the local backend.
    gpu: str | None = attrs.field(default=None, validator=_gpu_not_empty)
    #: Trajectories served at once by one sandbox, each in its own workspace.
    slots_per_sandbox: int = attrs.field(default=10, validator=ge(1))
    #: Sandboxes kept running (pre-warmed) even when idle.
    min_sandboxes: int = attrs.field(default=1, validator=ge(0))
    #: Sandboxes the pool may run at once.
    max_sandboxes: int = attrs.field(default=5, validator=ge(1))
    #: Seconds a sandbox above `min_sandboxes` may stay idle before it is stopped (0: at once).
    idle_timeout: float = attrs.field(default=120.0, validator=ge(0))
    #: Seconds a sandbox may live; the pool rotates it before then (modal: at most 24 h).
    max_lifetime: float = attrs.field(default=3600.0, validator=gt(0))
    #: Seconds `acquire` waits for a free slot before `AcquireTimeout`.
    acquire_timeout_s: float = attrs.field(default=60.0, validator=gt(0))
    #: Default per-command timeout, in seconds, when a call gives none. 30 s as in the original
    #: Hermes backend, whose executor groups and bounds its batches by it.
    execution_timeout_s: float = attrs.field(default=30.0, validator=gt(0))
    #: Provider secret names whose variables are injected into every sandbox (modal).
    secrets: tuple[str, ...] = attrs.field(
        default=(), converter=_freeze_sequence, validator=_secret_names
    )
    #: Environment variables set for every command. Their values never appear in a repr, a log
    #: line, an error or a status (they often hold credentials).
    env_vars: Mapping[str, str] = attrs.field(
        factory=dict,
        converter=_freeze_str_mapping,
        repr=_names_only,
        validator=_variable_names,
    )
    #: Extra provider tags on every sandbox, for finding them in dashboards and listings.
    tags: Mapping[str, str] = attrs.field(
        factory=dict, converter=_freeze_str_mapping, validator=_variable_names
    )
    #: Directory under which slot workspaces live inside the sandbox (absolute).
    workspace_base: str = attrs.field(default="/data", validator=_absolute_path)
    #: Local isolation: `bwrap`, `none`, or `auto` (bwrap when it works, else none with a warning).
    isolation: Isolation = "auto"
    #: How `bash` commands run: `persistent` (one long-lived shell per slot: cwd, variables,
    #: functions and aliases carry over from call to call, as in a terminal) or `fresh` (each
    #: call its own `bash -c` in the workspace). A call may override it. With `persistent`,
    #: each slot's shell is started with its sandbox, and again as soon as a release has
    #: ended it, so a lease's first call does not wait for one (about 3 MB per slot, with the
    #: slot's keeper process).
    shell: Shell = "persistent"
    #: At release, keep a slot's idle persistent bash for the slot's next lease, set back to
    #: its first state and checked, instead of starting a new one (saves about a process start
    #: per lease). Off by default: a command that deliberately subverts its own shell (a DEBUG
    #: trap with `extdebug` can fake the check) could then reach the next lease of that slot.
    #: Turn it on when every lease of the backend comes from one party (an RL trainer).
    reuse_shell: bool = False
    #: Whether sandboxes may reach the network. Off by default (least privilege, and the same on
    #: both backends); profiles that install packages or download models turn it on.
    network: bool = False
    #: Cap on captured bytes per stream (stdout, stderr) per command; the rest is dropped and
    #: counted.
    max_output_bytes: int = attrs.field(default=1_000_000, validator=gt(0))
    #: Provider app the sandboxes belong to (modal).
    app_name: str = attrs.field(default="hermes-actors", validator=_object_name)
    #: Sandboxes of this profile being started at once; more requests wait their turn. Creation
    #: runs at `creates_per_second` only with about rate x slow-tail latency in flight (Modal:
    #: 4/s x 12 s p95); 4 held a simulated 1,024-trajectory batch to ~1 create/s (docs/sizing.md).
    max_starting: int = attrs.field(default=32, validator=ge(1))
    #: Sandbox creations per second at most (provider rate limits).
    creates_per_second: float = attrs.field(default=4.0, validator=gt(0))
    #: At start, terminate this app's sandboxes left running by other (dead) runs (modal).
    #: Runs sharing an app name at the same time must keep their sandboxes younger than
    #: `reap_min_age_s`, or use their own app name (`with_app_name`).
    reap_orphans: bool = True
    #: With `reap_orphans`, only sandboxes older than this many seconds are reaped.
    reap_min_age_s: float = attrs.field(default=900.0, validator=ge(0))
    #: Checkpoints the profile's pool may hold at once, and the bytes they may store together.
    max_checkpoints: int = attrs.field(default=64, validator=ge(0))
    max_checkpoint_bytes: int = attrs.field(default=8 * 1024**3, validator=ge(0))
    #: Modal: add this Python version ("3.11") to every image of the profile, the way Modal's
    #: `Image.from_registry(add_python=...)` does, for images without a python3 (the sandbox
    #: agent needs one). None: the image must have python3. The local backend ignores it.
    add_python: str | None = attrs.field(default=None, validator=_python_version)
    #: Seconds a driver may keep retrying a failed sandbox create (its waits included) before
    #: it reports the failure. The pool keeps it inside the acquire deadline, so a create that
    #: keeps failing reaches the waiting callers as its cause, not as an acquire timeout.
    create_retry_budget_s: float = attrs.field(default=30.0, validator=ge(0))
    #: The agent's dead-man timeout: seconds without a frame from the host after which the
    #: agent in a sandbox kills everything it started and exits (the host pings at a third of
    #: it), so a crashed host leaves nothing running.
    agent_ttl_s: float = attrs.field(default=60.0, validator=gt(0))

    relations = (
        (("max_sandboxes", "min_sandboxes"), _max_at_least_min),
        (("max_lifetime", "backend"), _modal_lifetime),
    )

    def _checked_as(self) -> str:
        return f"SandboxConfig {self.name!r}"

    def with_app_name(self, base: str) -> SandboxConfig:
        """Return a copy whose `app_name` is `f"{base}-{name}"`.

        One app per profile keeps each profile's sandboxes together in the provider's listings
        and dashboards, and lets two profiles of one run never be confused. Raises
        `ConfigError` when the result is not a valid app name (charset, 64 characters).
        """
        return attrs.evolve(self, app_name=f"{base}-{self.name}")

    def get_app_name(self, fallback: str = ATROPOS_APP_NAME) -> str:
        """The provider app this profile's sandboxes belong to (the original's accessor).

        A config always has one here (`app_name`), so `fallback` is accepted only for callers
        of the original; the original's own constructors (`from_dict`, `from_env`) name the
        app `atropos-sandbox-<name>` as it did.
        """
        del fallback
        return self.app_name

    # -- the original Hermes Atropos backend's constructors ---------------------------------

    @classmethod
    def from_dict(cls, name: str, data: Mapping[str, Any]) -> Self:
        """A profile named `name` from a mapping of fields, as the original's YAML loader made
        them; checked as strictly as a YAML profile. Without `app_name` the app is
        `atropos-sandbox-<name>`, as in the original.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"from_dict({name!r}): expected a mapping of settings, got {_describe(data)}"
            )
        settings = {"app_name": f"{ATROPOS_APP_NAME}-{name}", **data, "name": name}
        return cls._from_settings(settings, source=f"from_dict({name!r})")

    @classmethod
    def from_env(cls, profile_name: str = "default") -> Self:
        """A profile from `ATROPOS_MODAL_PROFILE_<NAME>_<KEY>`, else `ATROPOS_MODAL_<KEY>`.

        Keys as in the original: IMAGE, GPU, CPU, MEMORY, SLOTS_PER_SANDBOX, MIN_SANDBOXES,
        MAX_SANDBOXES, IDLE_TIMEOUT, MAX_LIFETIME, ACQUIRE_TIMEOUT, EXECUTION_TIMEOUT, SECRETS
        (comma separated), ENV_VARS (`K=V;K2=V2`), WORKSPACE_BASE. Unset keys take the
        defaults. A value that does not parse is a `ConfigError` naming the variable.
        """
        profile_prefix = f"{ATROPOS_ENV_PREFIX}PROFILE_{profile_name.upper().replace('-', '_')}_"
        settings: dict[str, Any] = {"name": profile_name}
        settings["app_name"] = f"{ATROPOS_APP_NAME}-{profile_name}"
        problems: list[str] = []
        for field, key, _ in _ATROPOS_KEYS:
            for variable in (profile_prefix + key, ATROPOS_ENV_PREFIX + key):
                text = os.environ.get(variable)
                if text is not None:
                    try:
                        settings[field] = _parse_atropos_text(field, text)
                    except ValueError as error:
                        problems.append(f"environment: {variable}: {error}")
                    break
        _raise_problems(problems)
        return cls._from_settings(settings, source=f"from_env({profile_name!r})")

    @classmethod
    def from_agent_env_config(cls, cfg: Any) -> Self:
        """The `default` profile from an Atropos `AgentEnvConfig` (its `modal_*` attributes);
        attributes it lacks take the original's defaults.
        """
        settings: dict[str, Any] = {"name": "default"}
        app_name = getattr(cfg, "modal_app_name", None)
        settings["app_name"] = ATROPOS_APP_NAME if app_name in (None, "") else app_name
        problems: list[str] = []
        for field, _, attribute in _ATROPOS_KEYS:
            if not hasattr(cfg, attribute):
                continue
            value = getattr(cfg, attribute)
            if field in ("secrets", "env_vars") or (field == "gpu" and value == ""):
                try:
                    value = _parse_atropos_text(field, "" if value is None else str(value))
                except ValueError as error:
                    problems.append(f"agent env config: {attribute}: {error}")
                    continue
            settings[field] = value
        _raise_problems(problems)
        return cls._from_settings(settings, source="agent env config")

    @classmethod
    def load_profiles(cls, config_file: str | None = None) -> dict[str, Self]:
        """The original's profile loading: a dict of profile name to config.

        From `config_file`, else `$ATROPOS_MODAL_PROFILES_FILE` (YAML with a `profiles`
        mapping, each profile read by `from_dict`); else from the environment: the profiles
        named in `$ATROPOS_MODAL_PROFILES` (comma separated, default `default`) by `from_env`,
        plus `default`. Unlike the original, a named file that is missing or invalid is a
        `ConfigError`, not a silent fallback. (`hermes_actors.load_profiles` is this
        library's own loader.)
        """
        path = config_file or os.environ.get(ATROPOS_ENV_PREFIX + "PROFILES_FILE") or None
        if path is not None:
            problems: list[str] = []
            document = _read_yaml(path, from_environment=config_file is None)
            raw, _ = _read_document(document, path, problems)
            _raise_problems(problems)
            return {
                name: cls.from_dict(name, cast("Mapping[str, Any]", {} if data is None else data))
                for name, data in raw.items()
            }
        listed = os.environ.get(ATROPOS_ENV_PREFIX + "PROFILES", "default")
        names = [name.strip() for name in listed.split(",") if name.strip()]
        profiles = {name: cls.from_env(name) for name in names}
        if "default" not in profiles:
            profiles["default"] = cls.from_env("default")
        return profiles

    @classmethod
    def _from_settings(cls, settings: Mapping[str, Any], *, source: str) -> Self:
        return _structure(settings, source, cls)


#: The original's settings: field, `ATROPOS_MODAL_<KEY>` key, `AgentEnvConfig` attribute.
_ATROPOS_KEYS: Final = (
    ("image", "IMAGE", "modal_image"),
    ("gpu", "GPU", "modal_gpu"),
    ("cpu", "CPU", "modal_cpu"),
    ("memory", "MEMORY", "modal_memory"),
    ("slots_per_sandbox", "SLOTS_PER_SANDBOX", "modal_slots_per_sandbox"),
    ("min_sandboxes", "MIN_SANDBOXES", "modal_min_sandboxes"),
    ("max_sandboxes", "MAX_SANDBOXES", "modal_max_sandboxes"),
    ("idle_timeout", "IDLE_TIMEOUT", "modal_idle_timeout"),
    ("max_lifetime", "MAX_LIFETIME", "modal_max_lifetime"),
    ("acquire_timeout_s", "ACQUIRE_TIMEOUT", "modal_acquire_timeout"),
    ("execution_timeout_s", "EXECUTION_TIMEOUT", "modal_execution_timeout"),
    ("secrets", "SECRETS", "modal_secrets"),
    ("env_vars", "ENV_VARS", "modal_env_vars"),
    ("workspace_base", "WORKSPACE_BASE", "modal_workspace_base"),
)
_ATROPOS_INTS: Final = frozenset({"memory", "slots_per_sandbox", "min_sandboxes", "max_sandboxes"})
_ATROPOS_FLOATS: Final = frozenset(
    {"cpu", "idle_timeout", "max_lifetime", "acquire_timeout_s", "execution_timeout_s"}
)


def _parse_atropos_text(field: str, text: str) -> Any:
    """A value of the original's text spellings: numbers, `a,b` lists, `K=V;K2=V2` maps."""
    if field in _ATROPOS_INTS:
        try:
            return int(text.strip())
        except ValueError:
            raise ValueError(f"expected an int, got {text!r}") from None
    if field in _ATROPOS_FLOATS:
        try:
            value = float(text.strip())
        except ValueError:
            raise ValueError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise ValueError(f"expected a finite number, got {text!r}")
        return value
    if field == "gpu":
        return text.strip() or None
    if field == "secrets":
        return [name.strip() for name in text.split(",") if name.strip()]
    if field == "env_vars":
        variables: dict[str, str] = {}
        for pair in text.split(";"):
            if not pair.strip():
                continue
            if "=" not in pair:
                raise ValueError(f"expected KEY=VALUE pairs separated by ';', got {pair!r}")
            key, setting = pair.split("=", 1)
            variables[key.strip()] = setting.strip()
        return variables
    return text


@attrs.frozen(kw_only=True, field_transformer=_checked_fields)
class ModalSandboxConfig(SandboxConfig):
    """The seed's name for `SandboxConfig`: the same profile, whose backend defaults to modal.

    `backend` is `$TERMINAL_ENV` when set, else `modal` (the original ran on Modal only).
    """

    #: Where sandboxes run. Default: `$TERMINAL_ENV` when set (and not empty), else `modal`.
    backend: Backend = attrs.field(factory=_modal_backend_from_environment)


attrs.resolve_types(SandboxConfig)
attrs.resolve_types(ModalSandboxConfig)
_FIELD_NAMES: Final[tuple[str, ...]] = tuple(field.name for field in attrs.fields(SandboxConfig))


def _named_configs(
    instance: object, attribute: attrs.Attribute[Any], value: Mapping[str, SandboxConfig]
) -> None:
    if not isinstance(value, Mapping) or not value:
        raise ValueError("'profiles' must be a non-empty mapping")
    wrong = [
        f"profile {key!r} must be a SandboxConfig, got {_describe(config)}"
        if not isinstance(config, SandboxConfig)
        else f"profile {key!r} holds a config named {config.name!r}"
        for key, config in value.items()
        if not isinstance(config, SandboxConfig) or config.name != key
    ]
    if wrong:
        raise ValueError("; ".join(wrong))


def _one_of_the_profiles(instance: Profiles, attribute: attrs.Attribute[Any], value: str) -> None:
    profiles = instance.profiles
    if isinstance(profiles, Mapping) and profiles and value not in profiles:
        raise ValueError(f"{attribute.name!r} must name a profile ({_known(profiles)}): {value!r}")


@attrs.frozen(kw_only=True, field_transformer=_checked_fields)
class Profiles(_SelfChecking):
    """A named set of profiles and the one used when a caller names none."""

    #: Profile name to config; each config's `name` equals its key. Read-only, in file order.
    profiles: Mapping[str, SandboxConfig] = attrs.field(
        converter=_freeze_profiles, validator=_named_configs
    )
    #: The profile used when none is named; one of `profiles`.
    default_profile: str = attrs.field(validator=_one_of_the_profiles)
    #: The file the profiles were read from, if any.
    source: str | None = None

    @property
    def names(self) -> tuple[str, ...]:
        """The profile names, in definition order."""
        return tuple(self.profiles)

    def get_profile(self, name: str | None = None) -> SandboxConfig:
        """The profile called `name`, or the default profile when `name` is None.

        Raises `ConfigError` naming the known profiles (and the closest one) when there is none.
        """
        key = self.default_profile if name is None else name
        try:
            return self.profiles[key]
        except KeyError:
            raise ConfigError(
                f"no profile named {key!r}{_did_you_mean(key, self.profiles)}; "
                f"{_known(self.profiles)}"
            ) from None

    def with_app_name(self, base: str) -> Profiles:
        """Return a copy in which every profile's `app_name` is `f"{base}-{name}"`."""
        return attrs.evolve(
            self,
            profiles={key: config.with_app_name(base) for key, config in self.profiles.items()},
        )


attrs.resolve_types(Profiles)


def _known(names: Iterable[str]) -> str:
    return "known profiles: " + ", ".join(repr(name) for name in names)


def _closest(key: object, choices: Iterable[str]) -> str | None:
    if not isinstance(key, str):
        return None
    matches = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.6)
    return matches[0] if matches else None


def _did_you_mean(key: object, choices: Iterable[str]) -> str:
    close = _closest(key, choices)
    return f" (did you mean {close!r}?)" if close else ""


# ---------------------------------------------------------------------------------------------
# The converter.
# ---------------------------------------------------------------------------------------------


def _as_given(value: Any, type_: Any) -> Any:
    return value


def _int_as_float(value: Any, type_: Any) -> Any:
    return float(value) if type(value) is int else value


def _make_converter() -> cattrs.Converter:
    """The converter of the config classes: it never coerces a value (the classes check their
    values' types themselves, once); an int where a float is expected becomes that float."""
    converter = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    # Plain classes go through cattrs' single dispatch, which outranks predicate hooks.
    for plain in (int, bool, str):
        converter.register_structure_hook(plain, _as_given)
    converter.register_structure_hook(float, _int_as_float)
    converter.register_structure_hook_func(lambda type_: _checker_for(type_) is not None, _as_given)
    # Plain data out: lists and dicts, so the result dumps to YAML and loads back unchanged.
    converter.register_unstructure_hook_func(
        lambda type_: type_ == tuple[str, ...], lambda value: list(value)
    )
    converter.register_unstructure_hook_func(
        lambda type_: type_ == Mapping[str, str], lambda value: dict(value)
    )
    return converter


_converter: Final = _make_converter()


def unstructure_config(config: SandboxConfig) -> dict[str, Any]:
    """The config as plain data (dicts, lists, scalars) that `structure_config` reads back."""
    return cast("dict[str, Any]", _converter.unstructure(config, SandboxConfig))


def structure_config(data: Mapping[str, Any], *, source: str = "config") -> SandboxConfig:
    """Build one `SandboxConfig` from plain data, as strictly as a YAML profile.

    Fields left out take their defaults (the backend's default reads `TERMINAL_ENV`). Raises
    `ConfigError` listing every problem, each as `{source}: $.field: ...`.
    """
    return _structure(data, source, SandboxConfig)


_C = TypeVar("_C", bound=SandboxConfig)


def _structure(data: Mapping[str, Any], source: str, cls: type[_C]) -> _C:
    problems: list[str] = []
    layer = _Layer(_RANK_FILE, source, "$")
    settings = _settings_from_mapping(data, layer, problems)
    config = None if problems else _build_config(settings, layer, problems, cls=cls)
    _raise_problems(problems)
    assert config is not None
    return config


# ---------------------------------------------------------------------------------------------
# Layers: where each value comes from, so that problems name the right source.
# ---------------------------------------------------------------------------------------------

_RANK_FILE: Final = 1
_RANK_ENVIRONMENT: Final = 2
_RANK_OVERRIDES: Final = 3
_RANK_PROFILE_OVERRIDES: Final = 4

#: Where a profile's value came from, when not from the defaults.
Origin = Literal["file", "environment", "overrides", "profile_overrides"]
_ORIGINS: Final[Mapping[int, Origin]] = {
    _RANK_FILE: "file",
    _RANK_ENVIRONMENT: "environment",
    _RANK_OVERRIDES: "overrides",
    _RANK_PROFILE_OVERRIDES: "profile_overrides",
}


@attrs.frozen
class _Layer:
    """One source of values for one profile, and where that profile sits in it."""

    rank: int
    source: str
    #: Path of the profile's mapping inside the source (`$.profiles.gpu`; for overrides of
    #: every profile, `$ (profile 'gpu')`).
    path: str

    def at(self, path: str | None = None) -> str:
        return f"{self.source}: {self.path if path is None else path}"


@attrs.frozen
class _Setting:
    """One field's value for one profile, with where it came from."""

    value: Any
    #: Where the value itself is (`config/x.yaml: $.profiles.gpu.memory`, `environment: VAR`).
    location: str
    layer: _Layer


def _settings_from_mapping(data: object, layer: _Layer, problems: list[str]) -> dict[str, _Setting]:
    """A layer's settings for one profile, with aliases resolved to their field names."""
    if data is None:  # `gpu:` with nothing under it in YAML: a profile of defaults
        return {}
    if not isinstance(data, Mapping):
        problems.append(f"{layer.at()}: expected a mapping of settings, got {_describe(data)}")
        return {}
    settings: dict[str, _Setting] = {}
    for key, value in data.items():
        location = layer.at(_child(layer.path, key))
        if not isinstance(key, str):
            problems.append(f"{layer.at()}: keys must be str, got {_describe(key)}")
            continue
        field = FIELD_ALIASES.get(key, key)
        if field != key and field in data:
            problems.append(
                f"{layer.at()}: both {key!r} and {field!r} are set; keep only {field!r} "
                f"({key!r} is its older spelling)"
            )
            continue
        settings[field] = _Setting(value, location, layer)
    return settings


def _environment_settings(
    env: Mapping[str, str], given: Mapping[str, _Setting], *, from_arguments: bool
) -> dict[str, _Setting]:
    """The environment's layer: fills `backend` when not given, sets `image` and `app_name`.

    When the profiles were passed as arguments (`from_arguments`), which outrank the
    environment, `image` and `app_name` are only filled in too.
    """
    settings: dict[str, _Setting] = {}
    for variable, field, fill_only in (
        (ENV_BACKEND, "backend", True),
        (ENV_IMAGE, "image", from_arguments),
        (ENV_APP_NAME, "app_name", from_arguments),
    ):
        value = env.get(variable, "")
        if value != "" and not (fill_only and field in given):
            layer = _Layer(_RANK_ENVIRONMENT, "environment", variable)
            settings[field] = _Setting(value, layer.at(), layer)
    return settings


def _build_config(
    settings: Mapping[str, _Setting],
    base: _Layer,
    problems: list[str],
    *,
    name: str | None = None,
    default_backend: Backend = "local",
    cls: type[_C],
) -> _C | None:
    """Structure one config from its merged settings, reporting problems where they came from:
    wrong types first, then unknown keys, then broken rules.

    With `name` (a profile's key), a `name` setting must equal it, and the backend defaults to
    `default_backend`: the environment's `TERMINAL_ENV` is one of the layers already merged.
    """
    data: dict[str, Any] = {}
    if name is not None:
        data = {"name": name, "backend": default_backend}
        backend = settings.get("backend")
        if backend is None:
            announce_backend(
                default_backend, f"no profile sets a backend and {ENV_BACKEND} is unset"
            )
        elif backend.layer.rank == _RANK_ENVIRONMENT:
            announce_backend(str(backend.value), f"{ENV_BACKEND}={backend.value}")
    unknown: list[str] = []
    for field, setting in settings.items():
        if field not in _FIELD_NAMES:
            unknown.append(f"{setting.location}: unknown key{_unknown_key_hint(field)}")
        elif field == "name" and name is not None:
            if setting.value != name:
                problems.append(
                    f"{setting.location}: must equal the profile's key {name!r}, got "
                    f"{_describe(setting.value)}"
                )
        else:
            data[field] = setting.value
    try:
        config = _converter.structure(data, cls)
    except ClassValidationError as group:
        wrong_types, broken_rules = _locate_problems(group.exceptions, settings, base)
        problems.extend([*wrong_types, *unknown, *broken_rules])
        return None
    problems.extend(unknown)
    return None if unknown else config


def _locate_problems(
    errors: Iterable[BaseException], settings: Mapping[str, _Setting], base: _Layer
) -> tuple[list[str], list[str]]:
    """Problem lines of a config's errors, each where its value came from: `(wrong types,
    broken rules)`. A wrong type is transformed from the value's own location; a broken rule
    from the profile, in the highest layer that set one of the values involved."""
    wrong_types: list[str] = []
    broken_rules: list[str] = []
    for error in errors:
        if not isinstance(error, _InvalidConfig):  # the backend's default: a bad TERMINAL_ENV
            broken_rules.append(f"{base.at()}: {error}")
            continue
        for problem in error.errors.exceptions:
            fields = _fields_of(problem)
            if isinstance(problem, _BrokenRule):
                layers = [settings[field].layer for field in fields if field in settings]
                layer = max(layers, key=lambda each: each.rank, default=base)
                broken_rules.extend(_transform(problem, layer.at()))
            else:
                given = settings.get(fields[0])
                root = given.location if given else base.at(_child(base.path, fields[0]))
                wrong_types.extend(_transform(problem, root))
    return wrong_types, broken_rules


def _unknown_key_hint(key: str) -> str:
    valid = [*_FIELD_NAMES, *FIELD_ALIASES]
    close = _closest(key, valid)
    if close:
        return f"; did you mean {close!r}?"
    return "; valid keys: " + ", ".join(sorted(valid))


def _raise_problems(problems: Sequence[str]) -> None:
    if problems:
        unique = list(dict.fromkeys(problems))
        raise ConfigError("\n".join(unique))


# ---------------------------------------------------------------------------------------------
# Reading YAML.
# ---------------------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """A safe loader that rejects duplicate keys (PyYAML silently keeps the last one)."""


def _construct_mapping_once(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _value_node in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden below it
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:  # an unhashable key: the base constructor reports it
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}; keep only one", key_node.start_mark
            )
    loader.flatten_mapping(node)
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping_once
)


def _read_yaml(path: str, *, from_environment: bool) -> object:
    hint = (
        f"fix or unset {ENV_PROFILES_FILE}"
        if from_environment
        else f"pass an existing file, or set {ENV_PROFILES_FILE}"
    )
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such profiles file; {hint}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text ({error.reason}); save it as UTF-8") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read ({error.strerror}); {hint}") from None
    try:
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass: safe
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = error.problem or error.context or "unreadable"
        if problem.startswith("duplicate key"):
            raise ConfigError(f"{path}: {where}{problem}") from None
        raise ConfigError(f"{path}: {where}invalid YAML: {problem}; fix the syntax there") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: invalid YAML: {error}; fix the syntax") from None


_DOCUMENT_KEYS: Final = ("default_profile", "profiles")


def _read_document(
    document: object, source: str, problems: list[str]
) -> tuple[dict[str, object], str | None]:
    """The profiles' raw settings and the default profile named in a profiles document."""
    if document is None:
        problems.append(f"{source}: $: the file is empty; it needs a 'profiles' mapping")
        return {}, None
    if not isinstance(document, Mapping):
        problems.append(
            f"{source}: $: expected a mapping with a 'profiles' key, got {_describe(document)}"
        )
        return {}, None
    for key in document:
        if key not in _DOCUMENT_KEYS:
            close = _closest(key, _DOCUMENT_KEYS)
            hint = f"did you mean {close!r}?" if close else "valid keys: default_profile, profiles"
            problems.append(f"{source}: {_child('$', key)}: unknown key; {hint}")
    default = document.get("default_profile")
    if default is not None and not isinstance(default, str):
        problems.append(f"{source}: $.default_profile: expected str, got {_describe(default)}")
        default = None
    if "profiles" not in document:
        problems.append(f"{source}: $: missing key 'profiles' (a mapping of profile names)")
        return {}, default
    raw = document["profiles"]
    if not isinstance(raw, Mapping):
        problems.append(
            f"{source}: $.profiles: expected a mapping of profile names to settings, got "
            f"{_describe(raw)}"
        )
        return {}, default
    if not raw:
        problems.append(f"{source}: $.profiles: no profiles defined; add at least one")
    profiles: dict[str, object] = {}
    for name, data in raw.items():
        if not isinstance(name, str):
            problems.append(
                f"{source}: $.profiles: profile names must be str, got {_describe(name)}"
            )
            continue
        profiles[name] = data
    return profiles, default


def _choose_default(
    names: Sequence[str], requested: str | None, location: str, problems: list[str]
) -> str | None:
    if not names:  # no profiles: already reported, and nothing could be named
        return None
    if requested is not None:
        if requested in names:
            return requested
        problems.append(
            f"{location}: no profile named {requested!r}{_did_you_mean(requested, names)}; "
            f"{_known(names)}"
        )
        return None
    if "default" in names:
        return "default"
    if len(names) == 1:
        return names[0]
    problems.append(
        f"{location}: no 'default' profile, so 'default_profile' must name one of "
        f"{', '.join(repr(name) for name in names)}"
    )
    return None


def load_profiles(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    profile_overrides: Mapping[str, Mapping[str, Any]] | None = None,
    default_profile: str | None = None,
    default_backend: Backend = "local",
) -> Profiles:
    """Resolve the profiles: defaults < YAML file < environment < overrides.

    `path` is the YAML file; when None, `$TERMINAL_MODAL_PROFILES_FILE` is used, else
    `./modal_profiles.yaml` when it exists (as the original terminal tool did), and without
    any there is one `default` profile made of the defaults. Profiles that name no backend get
    `$TERMINAL_ENV`, else `default_backend` (the Modal names pass `modal`). `env` stands for
    the environment (default `os.environ`). `overrides` sets fields of every profile;
    `profile_overrides` (profile name to fields) sets fields of one profile each and wins over
    `overrides`.
    `default_profile` wins over the file's; without either, the default profile is `default`
    when there is one, else the only profile (several profiles and no default is an error).

    Raises `ConfigError` listing every problem found, one per line, each naming its source
    (the file, `environment`, `overrides`, `profile_overrides`) and the path of the value.
    """
    return load_profiles_with_origins(
        path,
        env=env,
        overrides=overrides,
        profile_overrides=profile_overrides,
        default_profile=default_profile,
        default_backend=default_backend,
    )[0]


def load_profiles_with_origins(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    profile_overrides: Mapping[str, Mapping[str, Any]] | None = None,
    default_profile: str | None = None,
    default_backend: Backend = "local",
) -> tuple[Profiles, Mapping[str, Mapping[str, Origin]]]:
    """`load_profiles`, and where each profile's values came from: profile name -> field ->
    origin, for the fields not left to their defaults."""
    environment = os.environ if env is None else env
    problems: list[str] = []
    source: str | None
    if path is not None:
        source = os.fspath(path)
        document = _read_yaml(source, from_environment=False)
    elif environment.get(ENV_PROFILES_FILE, "") != "":
        source = environment[ENV_PROFILES_FILE]
        document = _read_yaml(source, from_environment=True)
    elif os.path.isfile(WORKING_DIRECTORY_PROFILES):
        source = WORKING_DIRECTORY_PROFILES
        logger.info(
            "hermes-actors: reading profiles from ./%s (%s is unset)",
            WORKING_DIRECTORY_PROFILES,
            ENV_PROFILES_FILE,
        )
        document = _read_yaml(source, from_environment=False)
    else:
        source = None
        document = {"profiles": {"default": {}}}
    file_label = source if source is not None else "defaults"
    raw_profiles, file_default = _read_document(document, file_label, problems)

    global_layer = _Layer(_RANK_OVERRIDES, "overrides", "$")
    global_settings = _settings_from_mapping(overrides or {}, global_layer, problems)
    if "name" in global_settings:
        problems.append(
            f"{global_settings.pop('name').location}: a profile's name is its key; it cannot be "
            "overridden"
        )
    per_profile = profile_overrides or {}
    for name in per_profile:
        if name not in raw_profiles:
            problems.append(
                f"profile_overrides: {_child('$', name)}: no such profile"
                f"{_did_you_mean(name, raw_profiles)}; {_known(raw_profiles)}"
            )

    configs: dict[str, SandboxConfig] = {}
    origins: dict[str, dict[str, Origin]] = {}
    for name, data in raw_profiles.items():
        file_layer = _Layer(_RANK_FILE, file_label, _child("$.profiles", name))
        settings = _settings_from_mapping(data, file_layer, problems)
        settings.update(_environment_settings(environment, settings, from_arguments=False))
        # Profile-level problems caused by an override of every profile say which profile.
        layer = attrs.evolve(global_layer, path=f"$ (profile {name!r})")
        for field, setting in global_settings.items():
            settings[field] = attrs.evolve(setting, layer=layer)
        own_layer = _Layer(_RANK_PROFILE_OVERRIDES, "profile_overrides", _child("$", name))
        own = _settings_from_mapping(per_profile.get(name, {}), own_layer, problems)
        if "name" in own:
            problems.append(
                f"{own.pop('name').location}: a profile's name is its key; it cannot be overridden"
            )
        settings.update(own)
        origins[name] = {
            field: _ORIGINS[setting.layer.rank]
            for field, setting in settings.items()
            if field in _FIELD_NAMES
        }
        config = _build_config(
            settings,
            file_layer,
            problems,
            name=name,
            default_backend=default_backend,
            cls=SandboxConfig,
        )
        if config is not None:
            configs[name] = config

    if default_profile is not None:
        chosen = _choose_default(list(raw_profiles), default_profile, "default_profile", problems)
    else:
        chosen = _choose_default(
            list(raw_profiles),
            file_default,
            f"{file_label}: $.default_profile",
            problems,
        )
    _raise_problems(problems)
    assert chosen is not None
    return Profiles(profiles=configs, default_profile=chosen, source=source), origins


def profiles_from_mapping(
    profiles: Mapping[str, SandboxConfig | Mapping[str, Any]],
    *,
    default_profile: str | None = None,
    env: Mapping[str, str] | None = None,
    source: str = "profiles",
    default_backend: Backend = "local",
) -> Profiles:
    """Build `Profiles` from configs or plain mappings given as arguments, as strictly as YAML.

    A `SandboxConfig` is taken as it is, except that one still carrying the default name
    `"default"` takes its key's name; any other name must equal its key. A mapping is read like
    a YAML profile (aliases accepted, unknown keys rejected); fields it leaves out come from the
    environment (`TERMINAL_ENV`, `TERMINAL_MODAL_IMAGE`, `TERMINAL_MODAL_APP_NAME`, which only
    fill in: arguments outrank the environment) and then the defaults (`default_backend` for
    the backend). `default_profile` as in `load_profiles`. Problems are reported as
    `{source}: $.name...: ...`.
    """
    environment = os.environ if env is None else env
    problems: list[str] = []
    if not isinstance(profiles, Mapping) or not profiles:
        raise ConfigError(f"{source}: $: expected a non-empty mapping of profile names to configs")
    configs: dict[str, SandboxConfig] = {}
    for name, value in profiles.items():
        layer = _Layer(_RANK_FILE, source, _child("$", name))
        if not isinstance(name, str):
            problems.append(f"{source}: $: profile names must be str, got {_describe(name)}")
        elif isinstance(value, SandboxConfig):
            if value.name == name:
                configs[name] = value
            elif value.name == "default":
                try:
                    configs[name] = attrs.evolve(value, name=name)
                except _InvalidConfig as invalid:
                    wrong_types, broken_rules = _locate_problems([invalid], {}, layer)
                    problems.extend([*wrong_types, *broken_rules])
            else:
                problems.append(
                    f"{layer.at()}: the config is named {value.name!r}; name it {name!r} or "
                    f"use the key {value.name!r}"
                )
        else:
            settings = _settings_from_mapping(value, layer, problems)
            settings.update(_environment_settings(environment, settings, from_arguments=True))
            config = _build_config(
                settings,
                layer,
                problems,
                name=name,
                default_backend=default_backend,
                cls=SandboxConfig,
            )
            if config is not None:
                configs[name] = config
    names = [name for name in profiles if isinstance(name, str)]
    chosen = _choose_default(names, default_profile, "default_profile", problems)
    _raise_problems(problems)
    assert chosen is not None
    return Profiles(profiles=configs, default_profile=chosen, source=None)
