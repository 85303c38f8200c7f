"""Tests of the configuration: defaults, layering, strictness, error messages, shipped files."""

from __future__ import annotations

import copy
import logging
import pickle
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import hermes_actors._config as config_module
from hermes_actors._config import (
    ModalSandboxConfig,
    Profiles,
    SandboxConfig,
    load_profiles,
    load_profiles_with_origins,
    profiles_from_mapping,
    structure_config,
    unstructure_config,
)
from hermes_actors._errors import ConfigError, HermesError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"

WriteYaml = Callable[[str], str]

VALID_KEYS = (
    "acquire_timeout_s, add_python, agent_ttl_s, app_name, backend, cpu, create_retry_budget_s, "
    "creates_per_second, env_vars, execution_timeout_s, gpu, idle_timeout, image, isolation, "
    "max_checkpoint_bytes, max_checkpoints, max_lifetime, max_output_bytes, max_pool, "
    "max_sandboxes, max_starting, memory, min_pool, min_sandboxes, name, network, "
    "reap_min_age_s, reap_orphans, reuse_shell, secrets, shell, slots_per_sandbox, tags, "
    "workspace_base"
)


@pytest.fixture
def write_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> WriteYaml:
    """Write `config/x.yaml` under a temporary working directory; return its relative path."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config").mkdir()

    def write(text: str) -> str:
        (tmp_path / "config" / "x.yaml").write_text(textwrap.dedent(text), encoding="utf-8")
        return "config/x.yaml"

    return write


@pytest.fixture(autouse=True)
def _no_terminal_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # The process environment must not leak into tests that rely on the defaults.
    for variable in (
        "TERMINAL_ENV",
        "TERMINAL_MODAL_IMAGE",
        "TERMINAL_MODAL_APP_NAME",
        "TERMINAL_MODAL_PROFILES_FILE",
    ):
        monkeypatch.delenv(variable, raising=False)


def config_error(call: Callable[[], object]) -> str:
    with pytest.raises(ConfigError) as caught:
        call()
    return str(caught.value)


def load_error(path: str, **kwargs: Any) -> str:
    kwargs.setdefault("env", {})
    return config_error(lambda: load_profiles(path, **kwargs))


def one_profile(body: str) -> str:
    """A profiles document with one profile `p` whose settings are `body` (YAML lines)."""
    return "profiles:\n  p:\n" + textwrap.indent(textwrap.dedent(body), "    ")


# ---------------------------------------------------------------------------------------------
# Defaults
# ---------------------------------------------------------------------------------------------


def test_sandbox_config_defaults() -> None:
    """A config built from nothing has the documented defaults."""
    config = SandboxConfig()
    assert unstructure_config(config) == {
        "name": "default",
        "backend": "local",
        "image": "python:3.11",
        "cpu": 1.0,
        "memory": 2048,
        "gpu": None,
        "slots_per_sandbox": 10,
        "min_sandboxes": 1,
        "max_sandboxes": 5,
        "idle_timeout": 120.0,
        "max_lifetime": 3600.0,
        "acquire_timeout_s": 60.0,
        "execution_timeout_s": 30.0,
        "secrets": [],
        "env_vars": {},
        "tags": {},
        "workspace_base": "/data",
        "isolation": "auto",
        "shell": "persistent",
        "reuse_shell": False,
        "network": False,
        "max_output_bytes": 1_000_000,
        "app_name": "hermes-actors",
        "max_starting": 32,
        "creates_per_second": 4.0,
        "reap_orphans": True,
        "reap_min_age_s": 900.0,
        "max_checkpoints": 64,
        "max_checkpoint_bytes": 8 * 1024**3,
        "add_python": None,
        "create_retry_budget_s": 30.0,
        "agent_ttl_s": 60.0,
    }


def test_modal_sandbox_config_is_a_sandbox_config() -> None:
    """ModalSandboxConfig is a SandboxConfig with the same fields (only a default differs)."""
    assert issubclass(ModalSandboxConfig, SandboxConfig)
    names = [field.name for field in attrs.fields(SandboxConfig)]
    assert sorted(field.name for field in attrs.fields(ModalSandboxConfig)) == sorted(names)


@pytest.mark.parametrize(
    ("value", "backend"), [("modal", "modal"), ("local", "local"), ("", "local")]
)
def test_backend_default_follows_terminal_env(
    monkeypatch: pytest.MonkeyPatch, value: str, backend: str
) -> None:
    """The backend defaults to $TERMINAL_ENV, an empty value counting as unset."""
    monkeypatch.setenv("TERMINAL_ENV", value)
    assert SandboxConfig().backend == backend


def test_backend_default_rejects_unknown_terminal_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """An unknown $TERMINAL_ENV is a ConfigError naming the variable and the fix."""
    monkeypatch.setenv("TERMINAL_ENV", "docker")
    assert config_error(SandboxConfig) == (
        "environment: TERMINAL_ENV: expected one of 'local', 'modal', got str ('docker'); "
        "set it to 'local' or 'modal', or unset it"
    )


def test_no_file_gives_one_default_profile() -> None:
    """Without a file there is exactly one profile, `default`, made of the defaults."""
    profiles = load_profiles(env={})
    assert profiles.source is None
    assert profiles.default_profile == "default"
    assert dict(profiles.profiles) == {"default": SandboxConfig(backend="local")}


def test_config_errors_are_value_errors() -> None:
    """ConfigError belongs to the hierarchy and refines ValueError."""
    with pytest.raises(ValueError, match="'cpu' must be > 0: 0"):
        SandboxConfig(cpu=0)
    assert issubclass(ConfigError, HermesError)


# ---------------------------------------------------------------------------------------------
# Direct construction
# ---------------------------------------------------------------------------------------------


def test_direct_construction_reports_every_problem() -> None:
    """Constructing a config checks types and values and lists every problem at once."""
    message = config_error(
        lambda: SandboxConfig(
            name="gpu",
            memory="lots",  # type: ignore[arg-type]
            cpu=0,
            min_sandboxes=3,
            max_sandboxes=1,
            secrets="huggingface",
        )
    )
    assert message == (
        "invalid SandboxConfig 'gpu':\n"
        "  $.memory: expected int, got str ('lots')\n"
        "  $.secrets: expected a list of str, got str ('huggingface')\n"
        "  $: 'cpu' must be > 0: 0\n"
        "  $: 'max_sandboxes' must be >= min_sandboxes (3): 1"
    )


def test_direct_construction_accepts_lists_and_dicts() -> None:
    """Lists become tuples and dicts become read-only mappings."""
    config = SandboxConfig(secrets=["a", "b"], env_vars={"K": "v"})
    assert config.secrets == ("a", "b")
    assert config.env_vars == {"K": "v"}
    with pytest.raises(TypeError):
        config.env_vars["K"] = "w"  # type: ignore[index]


def test_configs_are_frozen_hashable_and_picklable() -> None:
    """A config cannot be changed, hashes by value, and survives pickle and deepcopy."""
    config = SandboxConfig(env_vars={"K": "v"}, tags={"team": "rl"}, secrets=("s",))
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        config.cpu = 2.0  # type: ignore[misc]
    assert hash(config) == hash(
        SandboxConfig(env_vars={"K": "v"}, tags={"team": "rl"}, secrets=("s",))
    )
    assert pickle.loads(pickle.dumps(config)) == config
    assert copy.deepcopy(config) == config


def test_evolve_checks_the_new_values() -> None:
    """attrs.evolve runs the same checks as construction."""
    with pytest.raises(ConfigError, match=r"'slots_per_sandbox' must be >= 1: 0"):
        attrs.evolve(SandboxConfig(), slots_per_sandbox=0)


# ---------------------------------------------------------------------------------------------
# with_app_name
# ---------------------------------------------------------------------------------------------


def test_with_app_name_appends_the_profile_name() -> None:
    """with_app_name returns a copy named `{base}-{name}` and leaves the original alone."""
    config = SandboxConfig(name="gpu", cpu=4.0)
    renamed = config.with_app_name("atropos-run-7")
    assert renamed.app_name == "atropos-run-7-gpu"
    assert config.app_name == "hermes-actors"
    assert attrs.evolve(renamed, app_name=config.app_name) == config


def test_with_app_name_rejects_invalid_app_names() -> None:
    """A base that makes the app name invalid (charset or length) is a ConfigError."""
    assert config_error(lambda: SandboxConfig(name="gpu").with_app_name("my run")) == (
        "invalid SandboxConfig 'gpu':\n"
        "  $: 'app_name' must be 1-64 letters, digits, '.', '-' or '_': 'my run-gpu'"
    )
    with pytest.raises(ConfigError, match="'app_name' must be 1-64"):
        SandboxConfig(name="gpu").with_app_name("x" * 61)
    assert SandboxConfig(name="gpu").with_app_name("x" * 60).app_name == "x" * 60 + "-gpu"


def test_profiles_with_app_name_renames_every_profile() -> None:
    """Profiles.with_app_name applies with_app_name to each profile."""
    profiles = profiles_from_mapping({"default": {}, "gpu": {"gpu": "A10G"}}, env={})
    renamed = profiles.with_app_name("run")
    assert {name: config.app_name for name, config in renamed.profiles.items()} == {
        "default": "run-default",
        "gpu": "run-gpu",
    }
    assert renamed.default_profile == "default"


# ---------------------------------------------------------------------------------------------
# YAML and precedence
# ---------------------------------------------------------------------------------------------


def test_yaml_values_override_defaults(write_yaml: WriteYaml) -> None:
    """Values in the file replace the defaults; the rest keep them."""
    path = write_yaml(
        one_profile(
            """
            image: ubuntu:24.04
            cpu: 2
            memory: 4096
            secrets: [a, b]
            env_vars: {K: v}
            network: true
            """
        )
    )
    profiles = load_profiles(path, env={})
    config = profiles.get_profile()
    assert profiles.source == "config/x.yaml"
    assert config == SandboxConfig(
        name="p",
        backend="local",
        image="ubuntu:24.04",
        cpu=2.0,
        memory=4096,
        secrets=("a", "b"),
        env_vars={"K": "v"},
        network=True,
    )
    assert type(config.cpu) is float


def test_terminal_env_sets_backend_only_where_the_file_does_not(write_yaml: WriteYaml) -> None:
    """$TERMINAL_ENV picks the backend of profiles that do not name one."""
    path = write_yaml(
        """
        profiles:
          unnamed: {}
          pinned: {backend: local}
        """
    )
    profiles = load_profiles(path, env={"TERMINAL_ENV": "modal"}, default_profile="unnamed")
    assert profiles.profiles["unnamed"].backend == "modal"
    assert profiles.profiles["pinned"].backend == "local"


def test_terminal_modal_image_beats_the_file(
    write_yaml: WriteYaml,
) -> None:
    """$TERMINAL_MODAL_IMAGE is the image of every profile, also where the file sets one."""
    path = write_yaml(
        """
        default_profile: unset
        profiles:
          unset: {}
          set: {image: "node:22"}
        """
    )
    assert load_profiles(path, env={}).profiles["set"].image == "node:22"
    profiles = load_profiles(path, env={"TERMINAL_MODAL_IMAGE": "python:3.12-slim"})
    assert profiles.profiles["unset"].image == "python:3.12-slim"
    assert profiles.profiles["set"].image == "python:3.12-slim"


def test_terminal_modal_app_name_beats_the_file(write_yaml: WriteYaml) -> None:
    """$TERMINAL_MODAL_APP_NAME sets app_name, even where the file sets one."""
    path = write_yaml(one_profile("app_name: from-file\n"))
    assert load_profiles(path, env={}).get_profile().app_name == "from-file"
    profiles = load_profiles(path, env={"TERMINAL_MODAL_APP_NAME": "from-env"})
    assert profiles.get_profile().app_name == "from-env"


def test_empty_environment_variables_count_as_unset(write_yaml: WriteYaml) -> None:
    """Empty TERMINAL_* variables change nothing."""
    path = write_yaml(one_profile("app_name: from-file\n"))
    env = {"TERMINAL_ENV": "", "TERMINAL_MODAL_IMAGE": "", "TERMINAL_MODAL_APP_NAME": ""}
    config = load_profiles(path, env=env).get_profile()
    assert (config.backend, config.image, config.app_name) == ("local", "python:3.11", "from-file")


def test_env_defaults_to_the_process_environment(
    write_yaml: WriteYaml, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without `env`, load_profiles reads os.environ."""
    path = write_yaml(one_profile("cpu: 2\n"))
    monkeypatch.setenv("TERMINAL_ENV", "modal")
    monkeypatch.setenv("TERMINAL_MODAL_IMAGE", "debian:12")
    config = load_profiles(path).get_profile()
    assert (config.backend, config.image) == ("modal", "debian:12")


def test_profiles_file_comes_from_the_environment(write_yaml: WriteYaml) -> None:
    """With no path, $TERMINAL_MODAL_PROFILES_FILE names the file."""
    path = write_yaml(one_profile("memory: 512\n"))
    profiles = load_profiles(env={"TERMINAL_MODAL_PROFILES_FILE": path})
    assert profiles.source == path
    assert profiles.get_profile().memory == 512


def test_explicit_path_beats_the_profiles_file_variable(write_yaml: WriteYaml) -> None:
    """An explicit path wins over $TERMINAL_MODAL_PROFILES_FILE."""
    path = write_yaml(one_profile("memory: 512\n"))
    env = {"TERMINAL_MODAL_PROFILES_FILE": "does/not/exist.yaml"}
    assert load_profiles(path, env=env).get_profile().memory == 512


def test_overrides_beat_file_and_environment(write_yaml: WriteYaml) -> None:
    """`overrides` wins over the file and the environment, in every profile."""
    path = write_yaml(
        """
        profiles:
          default: {backend: local, cpu: 2, app_name: file}
          other: {image: "node:22"}
        """
    )
    profiles = load_profiles(
        path,
        env={"TERMINAL_ENV": "local", "TERMINAL_MODAL_APP_NAME": "env"},
        overrides={"backend": "modal", "cpu": 3, "app_name": "explicit", "image": "alpine:3"},
    )
    for config in profiles.profiles.values():
        assert (config.backend, config.cpu, config.app_name, config.image) == (
            "modal",
            3.0,
            "explicit",
            "alpine:3",
        )


def test_profile_overrides_beat_overrides_in_their_profile_only(write_yaml: WriteYaml) -> None:
    """`profile_overrides` wins over `overrides`, and only in the profile it names."""
    path = write_yaml(
        """
        profiles:
          default: {}
          gpu: {gpu: A10G}
        """
    )
    profiles = load_profiles(
        path,
        env={},
        overrides={"memory": 1024},
        profile_overrides={"gpu": {"memory": 8192, "max_pool": 9}},
    )
    assert profiles.profiles["default"].memory == 1024
    assert profiles.profiles["default"].max_sandboxes == 5
    assert profiles.profiles["gpu"].memory == 8192
    assert profiles.profiles["gpu"].max_sandboxes == 9


def test_default_profile_argument_beats_the_file(write_yaml: WriteYaml) -> None:
    """The default_profile argument wins over the file's default_profile."""
    path = write_yaml(
        """
        default_profile: a
        profiles: {a: {}, b: {}}
        """
    )
    assert load_profiles(path, env={}).default_profile == "a"
    assert load_profiles(path, env={}, default_profile="b").default_profile == "b"


def test_single_profile_is_the_default(write_yaml: WriteYaml) -> None:
    """A file with one profile and no default_profile makes that profile the default."""
    path = write_yaml(one_profile("{}\n").replace("p:\n    {}", "p: {}"))
    assert load_profiles(path, env={}).default_profile == "p"


def test_profile_without_settings_takes_the_defaults(write_yaml: WriteYaml) -> None:
    """A profile written as an empty key (`name:`) is all defaults."""
    path = write_yaml("profiles:\n  default:\n")
    assert load_profiles(path, env={}).get_profile() == SandboxConfig(backend="local")


def test_yaml_anchors_and_merge_keys_work(write_yaml: WriteYaml) -> None:
    """Profiles can share settings through YAML anchors and merge keys."""
    path = write_yaml(
        """
        profiles:
          default: &base {cpu: 2, memory: 4096}
          big:
            <<: *base
            memory: 8192
        """
    )
    profiles = load_profiles(path, env={})
    assert (profiles.profiles["big"].cpu, profiles.profiles["big"].memory) == (2.0, 8192)


# ---------------------------------------------------------------------------------------------
# Aliases
# ---------------------------------------------------------------------------------------------


def test_min_pool_and_max_pool_are_aliases(write_yaml: WriteYaml) -> None:
    """min_pool and max_pool set min_sandboxes and max_sandboxes."""
    path = write_yaml(one_profile("min_pool: 2\nmax_pool: 7\n"))
    config = load_profiles(path, env={}).get_profile()
    assert (config.min_sandboxes, config.max_sandboxes) == (2, 7)


def test_both_spellings_at_once_are_rejected(write_yaml: WriteYaml) -> None:
    """Setting a field and its alias together is an error."""
    path = write_yaml(one_profile("min_pool: 2\nmin_sandboxes: 2\n"))
    assert load_error(path) == (
        "config/x.yaml: $.profiles.p: both 'min_pool' and 'min_sandboxes' are set; keep only "
        "'min_sandboxes' ('min_pool' is its older spelling)"
    )


def test_alias_errors_name_the_alias(write_yaml: WriteYaml) -> None:
    """A bad value under an alias is reported at the alias's path."""
    path = write_yaml(one_profile("max_pool: many\n"))
    assert load_error(path) == (
        "config/x.yaml: $.profiles.p.max_pool: expected int, got str ('many')"
    )


# ---------------------------------------------------------------------------------------------
# Strictness: each kind of error, with its exact message
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("memory: lots", "$.profiles.p.memory: expected int, got str ('lots')"),
        ("memory: 1.7", "$.profiles.p.memory: expected int, got float (1.7)"),
        ("memory: true", "$.profiles.p.memory: expected int, got bool (True)"),
        ("memory: null", "$.profiles.p.memory: expected int, got null"),
        ("cpu: true", "$.profiles.p.cpu: expected float, got bool (True)"),
        ("cpu: '2'", "$.profiles.p.cpu: expected float, got str ('2')"),
        ("cpu: .inf", "$.profiles.p.cpu: expected a finite float, got float (inf)"),
        ("network: 'false'", "$.profiles.p.network: expected bool, got str ('false')"),
        ("network: 0", "$.profiles.p.network: expected bool, got int (0)"),
        ("image: 3", "$.profiles.p.image: expected str, got int (3)"),
        ("gpu: 1", "$.profiles.p.gpu: expected str or null, got int (1)"),
        (
            "backend: docker",
            "$.profiles.p.backend: expected one of 'local', 'modal', got str ('docker')",
        ),
        (
            "isolation: gvisor",
            "$.profiles.p.isolation: expected one of 'auto', 'bwrap', 'none', got str ('gvisor')",
        ),
        ("secrets: hf", "$.profiles.p.secrets: expected a list of str, got str ('hf')"),
        ("secrets: [hf, 2]", "$.profiles.p.secrets[1]: expected str, got int (2)"),
        (
            "env_vars: [A]",
            "$.profiles.p.env_vars: expected a mapping of str to str, got list",
        ),
        ("env_vars: {PORT: 8080}", "$.profiles.p.env_vars['PORT']: expected str, got int"),
        ("tags: {a.b: 1}", "$.profiles.p.tags['a.b']: expected str, got int"),
    ],
)
def test_wrong_types_are_rejected_without_coercion(
    write_yaml: WriteYaml, line: str, message: str
) -> None:
    """A value of the wrong type is an error naming the file, the path and the value."""
    path = write_yaml(one_profile(line + "\n"))
    assert load_error(path) == f"config/x.yaml: {message}"


def test_int_is_accepted_for_a_float_field(write_yaml: WriteYaml) -> None:
    """An int where a float is expected is read as that float."""
    path = write_yaml(one_profile("cpu: 2\nidle_timeout: 0\n"))
    config = load_profiles(path, env={}).get_profile()
    assert (config.cpu, config.idle_timeout) == (2.0, 0.0)
    assert type(config.cpu) is float


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ("slots_per_sandbox: 0", "'slots_per_sandbox' must be >= 1: 0"),
        ("min_sandboxes: -1", "'min_sandboxes' must be >= 0: -1"),
        ("max_sandboxes: 0", "'max_sandboxes' must be >= 1: 0"),
        ("min_sandboxes: 3\nmax_sandboxes: 1", "'max_sandboxes' must be >= min_sandboxes (3): 1"),
        ("cpu: 0", "'cpu' must be > 0: 0.0"),
        ("memory: -5", "'memory' must be > 0: -5"),
        ("idle_timeout: -1", "'idle_timeout' must be >= 0: -1.0"),
        ("max_lifetime: 0", "'max_lifetime' must be > 0: 0.0"),
        ("acquire_timeout_s: -0.5", "'acquire_timeout_s' must be > 0: -0.5"),
        ("execution_timeout_s: 0", "'execution_timeout_s' must be > 0: 0.0"),
        ("max_output_bytes: 0", "'max_output_bytes' must be > 0: 0"),
        ("max_starting: 0", "'max_starting' must be >= 1: 0"),
        ("creates_per_second: 0", "'creates_per_second' must be > 0: 0.0"),
        ("image: ''", "'image' must not be empty"),
        ("gpu: ''", "'gpu' must not be empty (use null for none)"),
        ("workspace_base: data", "'workspace_base' must be an absolute path: 'data'"),
        (
            "app_name: my app",
            "'app_name' must be 1-64 letters, digits, '.', '-' or '_': 'my app'",
        ),
        (
            "secrets: [ok, 'not ok']",
            "'secrets' must each be 1-64 letters, digits, '.', '-' or '_': ['ok', 'not ok']",
        ),
        (
            "env_vars: {'A=B': x}",
            "'env_vars' keys must be non-empty, without '=' or NUL, values without NUL: 'A=B'",
        ),
        (
            "backend: modal\nmax_lifetime: 86401",
            "'max_lifetime' must be <= 86400 (Modal's 24 h limit) on backend 'modal': 86401.0",
        ),
    ],
)
def test_impossible_values_are_rejected(write_yaml: WriteYaml, lines: str, message: str) -> None:
    """A value out of its range is an error naming the file, the profile and the rule."""
    path = write_yaml(one_profile(lines + "\n"))
    assert load_error(path) == f"config/x.yaml: $.profiles.p: {message}"


def test_long_lifetimes_are_fine_on_the_local_backend(write_yaml: WriteYaml) -> None:
    """Modal's 24 h lifetime limit does not apply to the local backend."""
    path = write_yaml(one_profile("backend: local\nmax_lifetime: 100000\n"))
    assert load_profiles(path, env={}).get_profile().max_lifetime == 100000.0


def test_unknown_key_suggests_the_closest_field(write_yaml: WriteYaml) -> None:
    """An unknown key close to a field's name is reported with that name."""
    path = write_yaml(one_profile("memroy: 3\n"))
    assert load_error(path) == (
        "config/x.yaml: $.profiles.p.memroy: unknown key; did you mean 'memory'?"
    )


def test_unknown_key_lists_the_valid_keys(write_yaml: WriteYaml) -> None:
    """An unknown key like no field is reported with the list of valid keys."""
    path = write_yaml(one_profile("zzz: 3\n"))
    assert load_error(path) == (
        "config/x.yaml: $.profiles.p.zzz: unknown key; valid keys: " + VALID_KEYS
    )


def test_name_inside_a_profile_must_match_its_key(write_yaml: WriteYaml) -> None:
    """A `name` inside a profile must equal the profile's key."""
    path = write_yaml(one_profile("name: p\n"))
    assert load_profiles(path, env={}).get_profile().name == "p"
    path = write_yaml(one_profile("name: q\n"))
    assert load_error(path) == (
        "config/x.yaml: $.profiles.p.name: must equal the profile's key 'p', got str ('q')"
    )


def test_profile_names_must_be_valid(write_yaml: WriteYaml) -> None:
    """A profile name outside Modal's object-name charset is rejected."""
    path = write_yaml("profiles:\n  'my profile': {}\n")
    assert load_error(path) == (
        "config/x.yaml: $.profiles['my profile']: 'name' must be 1-64 letters, digits, '.', '-' "
        "or '_': 'my profile'"
    )


def test_every_error_of_a_file_is_reported_at_once(write_yaml: WriteYaml) -> None:
    """One ConfigError lists every problem of every profile, one per line, in file order."""
    path = write_yaml(
        """
        profiles:
          gpu:
            memory: lots
            cpu: true
            memroy: 3
            env_vars: {A: 1}
          bad:
            backend: docker
            min_sandboxes: 3
            max_sandboxes: 1
            slots_per_sandbox: 0
          fine: {}
        """
    )
    assert load_error(path).splitlines() == [
        "config/x.yaml: $.profiles.gpu.cpu: expected float, got bool (True)",
        "config/x.yaml: $.profiles.gpu.memory: expected int, got str ('lots')",
        "config/x.yaml: $.profiles.gpu.env_vars['A']: expected str, got int",
        "config/x.yaml: $.profiles.gpu.memroy: unknown key; did you mean 'memory'?",
        "config/x.yaml: $.profiles.bad.backend: expected one of 'local', 'modal', got str "
        "('docker')",
        "config/x.yaml: $.profiles.bad: 'slots_per_sandbox' must be >= 1: 0",
        "config/x.yaml: $.profiles.bad: 'max_sandboxes' must be >= min_sandboxes (3): 1",
        "config/x.yaml: $.default_profile: no 'default' profile, so 'default_profile' must name "
        "one of 'gpu', 'bad', 'fine'",
    ]


def test_value_checks_skip_fields_that_failed_their_type(write_yaml: WriteYaml) -> None:
    """A field with a wrong type is reported once, not again by the checks relating it."""
    path = write_yaml(one_profile("min_sandboxes: many\nmax_sandboxes: 0\n"))
    assert load_error(path).splitlines() == [
        "config/x.yaml: $.profiles.p.min_sandboxes: expected int, got str ('many')",
        "config/x.yaml: $.profiles.p: 'max_sandboxes' must be >= 1: 0",
    ]


def test_each_value_is_checked_once(write_yaml: WriteYaml, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a profile checks each value's type once, also when other values are wrong."""
    seen: list[object] = []
    check_int = config_module._CHECKERS[int]

    def counting(value: object) -> None:
        seen.append(value)
        check_int(value)

    monkeypatch.setitem(config_module._CHECKERS, int, counting)  # type: ignore[index]
    load_profiles(write_yaml(one_profile("memory: 4099\n")), env={})
    assert seen.count(4099) == 1
    seen.clear()
    load_error(write_yaml(one_profile("memory: 4099\nmax_starting: '1'\ncpu: 0\nzzz: 1\n")))
    assert (seen.count(4099), seen.count("1")) == (1, 1)


def test_checking_leaves_nothing_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    """Configs built, rejected or failing on $TERMINAL_ENV leave no pending problems behind."""
    SandboxConfig(memory=1)
    config_error(lambda: SandboxConfig(memory=0, cpu="x"))  # type: ignore[arg-type]
    config_error(lambda: Profiles(profiles={}, default_profile="a"))
    monkeypatch.setenv("TERMINAL_ENV", "docker")
    config_error(lambda: SandboxConfig(memory=0))
    assert config_module._being_built == {}


# ---------------------------------------------------------------------------------------------
# Errors in the other layers
# ---------------------------------------------------------------------------------------------


def test_environment_errors_name_the_variable() -> None:
    """A bad environment value is reported once, under the variable's name."""
    message = config_error(
        lambda: load_profiles(env={"TERMINAL_ENV": "docker", "TERMINAL_MODAL_APP_NAME": "a b"})
    )
    assert message.splitlines() == [
        "environment: TERMINAL_ENV: expected one of 'local', 'modal', got str ('docker')",
        "environment: TERMINAL_MODAL_APP_NAME: 'app_name' must be 1-64 letters, digits, '.', '-' "
        "or '_': 'a b'",
    ]


def test_override_errors_name_the_overrides(write_yaml: WriteYaml) -> None:
    """Problems caused by overrides name `overrides` or `profile_overrides`, not the file."""
    path = write_yaml(
        """
        profiles:
          default: {max_sandboxes: 4}
          gpu: {max_sandboxes: 8}
        """
    )
    message = load_error(
        path,
        overrides={"memory": 1.5, "min_pool": 6, "colour": "red"},
        profile_overrides={"gpu": {"cpu": 0}, "gpux": {}},
    )
    assert message.splitlines() == [
        "profile_overrides: $.gpux: no such profile (did you mean 'gpu'?); known profiles: "
        "'default', 'gpu'",
        "overrides: $.memory: expected int, got float (1.5)",
        "overrides: $.colour: unknown key; valid keys: " + VALID_KEYS,
        "overrides: $ (profile 'default'): 'max_sandboxes' must be >= min_sandboxes (6): 4",
        "profile_overrides: $.gpu: 'cpu' must be > 0: 0.0",
    ]


def test_every_problem_of_every_layer_is_reported_at_once(write_yaml: WriteYaml) -> None:
    """One ConfigError lists the file's, the environment's and the overrides' problems, each
    under the layer that set the value."""
    path = write_yaml(
        """
        profiles:
          default: {memory: lots, secrets: [ok, 2], min_sandboxes: 4}
          gpu: {cpu: 0, tags: {team: 5}}
        """
    )
    message = load_error(
        path,
        env={"TERMINAL_ENV": "docker", "TERMINAL_MODAL_APP_NAME": "a b"},
        overrides={"max_sandboxes": 2},
        profile_overrides={"gpu": {"env_vars": {"K": 1}, "memory": 1.5}},
    )
    assert message.splitlines() == [
        "environment: TERMINAL_ENV: expected one of 'local', 'modal', got str ('docker')",
        "config/x.yaml: $.profiles.default.memory: expected int, got str ('lots')",
        "config/x.yaml: $.profiles.default.secrets[1]: expected str, got int (2)",
        "environment: TERMINAL_MODAL_APP_NAME: 'app_name' must be 1-64 letters, digits, '.', '-' "
        "or '_': 'a b'",
        "overrides: $ (profile 'default'): 'max_sandboxes' must be >= min_sandboxes (4): 2",
        "profile_overrides: $.gpu.memory: expected int, got float (1.5)",
        "profile_overrides: $.gpu.env_vars['K']: expected str, got int",
        "config/x.yaml: $.profiles.gpu.tags['team']: expected str, got int",
        "config/x.yaml: $.profiles.gpu: 'cpu' must be > 0: 0.0",
    ]


def test_paths_and_values_holding_at_signs_are_reported_whole(write_yaml: WriteYaml) -> None:
    """Keys and values containing " @ " (the separator of cattrs' own lines) stay intact."""
    path = write_yaml(one_profile("tags: {'a @ b': 1}\nimage: 5\nsecrets: ['x @ $.y', 2]\n"))
    assert load_error(path).splitlines() == [
        "config/x.yaml: $.profiles.p.image: expected str, got int (5)",
        "config/x.yaml: $.profiles.p.secrets[1]: expected str, got int (2)",
        "config/x.yaml: $.profiles.p.tags['a @ b']: expected str, got int",
    ]
    assert config_error(lambda: SandboxConfig(gpu=" @ $.cpu", cpu="1 @ $")) == (  # type: ignore[arg-type]
        "invalid SandboxConfig 'default':\n  $.cpu: expected float, got str ('1 @ $')"
    )


def test_a_profiles_name_cannot_be_overridden() -> None:
    """Overriding `name` is rejected in both kinds of overrides."""
    message = config_error(
        lambda: load_profiles(
            env={}, overrides={"name": "x"}, profile_overrides={"default": {"name": "y"}}
        )
    )
    assert message.splitlines() == [
        "overrides: $.name: a profile's name is its key; it cannot be overridden",
        "profile_overrides: $.default.name: a profile's name is its key; it cannot be overridden",
    ]


# ---------------------------------------------------------------------------------------------
# File-level errors
# ---------------------------------------------------------------------------------------------


def test_missing_file_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing file is a ConfigError naming it and the way out."""
    monkeypatch.chdir(tmp_path)
    assert load_error("config/x.yaml") == (
        "config/x.yaml: no such profiles file; pass an existing file, or set "
        "TERMINAL_MODAL_PROFILES_FILE"
    )
    assert (
        config_error(lambda: load_profiles(env={"TERMINAL_MODAL_PROFILES_FILE": "config/x.yaml"}))
        == "config/x.yaml: no such profiles file; fix or unset TERMINAL_MODAL_PROFILES_FILE"
    )


def test_directory_instead_of_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A path that cannot be read as a file is a ConfigError naming it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config").mkdir()
    assert load_error("config") == (
        "config: cannot read (Is a directory); pass an existing file, or set "
        "TERMINAL_MODAL_PROFILES_FILE"
    )


def test_yaml_syntax_error_names_the_line(write_yaml: WriteYaml) -> None:
    """Invalid YAML is a ConfigError with the line and column and what to do."""
    path = write_yaml("profiles:\n  p:\n    cpu: 1\n   memory: 2\n")
    assert load_error(path) == (
        "config/x.yaml: line 4, column 4: invalid YAML: expected <block end>, but found "
        "'<block mapping start>'; fix the syntax there"
    )
    path = write_yaml("profiles: {p: [}\n")
    assert load_error(path) == (
        "config/x.yaml: line 1, column 16: invalid YAML: expected the node content, but found "
        "'}'; fix the syntax there"
    )


def test_duplicate_keys_are_rejected(write_yaml: WriteYaml) -> None:
    """A key given twice in one mapping is an error at the second occurrence."""
    path = write_yaml(one_profile("memory: 1024\ncpu: 2\nmemory: 4096\n"))
    assert load_error(path) == (
        "config/x.yaml: line 5, column 5: duplicate key 'memory'; keep only one"
    )


def test_invalid_utf8_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file that is not UTF-8 is a ConfigError saying so."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.yaml").write_bytes(b"profiles: {p: {image: \xff}}\n")
    assert load_error("x.yaml") == ("x.yaml: not UTF-8 text (invalid start byte); save it as UTF-8")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "$: the file is empty; it needs a 'profiles' mapping"),
        ("- a\n", "$: expected a mapping with a 'profiles' key, got list (['a'])"),
        ("default_profile: a\n", "$: missing key 'profiles' (a mapping of profile names)"),
        (
            "profiles: [a]\n",
            "$.profiles: expected a mapping of profile names to settings, got list (['a'])",
        ),
        ("profiles: {}\n", "$.profiles: no profiles defined; add at least one"),
        ("profiles: {p: 3}\n", "$.profiles.p: expected a mapping of settings, got int (3)"),
        ("profiles: {1: {}}\n", "$.profiles: profile names must be str, got int (1)"),
        (
            "profile: {p: {}}\nprofiles: {p: {}}\n",
            "$.profile: unknown key; did you mean 'profiles'?",
        ),
        ("default_profile: 1\nprofiles: {p: {}}\n", "$.default_profile: expected str, got int (1)"),
        (
            "default_profile: gpux\nprofiles: {default: {}, gpu: {}}\n",
            "$.default_profile: no profile named 'gpux' (did you mean 'gpu'?); known profiles: "
            "'default', 'gpu'",
        ),
        (
            "profiles: {a: {}, b: {}}\n",
            "$.default_profile: no 'default' profile, so 'default_profile' must name one of "
            "'a', 'b'",
        ),
    ],
)
def test_malformed_documents_are_rejected(write_yaml: WriteYaml, text: str, message: str) -> None:
    """A document that is not a profiles document is reported at the offending path."""
    path = write_yaml(text)
    assert load_error(path) == f"config/x.yaml: {message}"


def test_unknown_default_profile_argument() -> None:
    """A default_profile argument naming no profile is an error naming the argument."""
    assert config_error(lambda: load_profiles(env={}, default_profile="gpu")) == (
        "default_profile: no profile named 'gpu'; known profiles: 'default'"
    )


def test_origins_name_the_layer_that_set_each_value(write_yaml: WriteYaml) -> None:
    """Each value not left to its default is traced to the layer that set it last."""
    path = write_yaml(
        """
        profiles:
          default: {max_pool: 3, image: "node:22"}
          gpu: {backend: local}
        """
    )
    profiles, origins = load_profiles_with_origins(
        path,
        env={"TERMINAL_ENV": "modal", "TERMINAL_MODAL_IMAGE": "img:2"},
        overrides={"cpu": 2},
        profile_overrides={"gpu": {"memory": 512}},
    )
    assert origins["default"] == {
        "max_sandboxes": "file",
        "image": "environment",
        "backend": "environment",
        "cpu": "overrides",
    }
    assert origins["gpu"] == {
        "backend": "file",
        "image": "environment",
        "cpu": "overrides",
        "memory": "profile_overrides",
    }
    assert profiles == load_profiles(
        path,
        env={"TERMINAL_ENV": "modal", "TERMINAL_MODAL_IMAGE": "img:2"},
        overrides={"cpu": 2},
        profile_overrides={"gpu": {"memory": 512}},
    )


# ---------------------------------------------------------------------------------------------
# Profiles
# ---------------------------------------------------------------------------------------------


def test_get_profile_by_name_and_default() -> None:
    """get_profile returns the named profile, or the default one for None."""
    profiles = profiles_from_mapping({"default": {}, "gpu": {"gpu": "A10G"}}, env={})
    assert profiles.get_profile().name == "default"
    assert profiles.get_profile("gpu").gpu == "A10G"
    assert profiles.names == ("default", "gpu")


def test_get_profile_unknown_name() -> None:
    """An unknown profile name is a ConfigError listing the known ones and the closest."""
    profiles = profiles_from_mapping({"default": {}, "gpu": {}}, env={})
    assert config_error(lambda: profiles.get_profile("gpux")) == (
        "no profile named 'gpux' (did you mean 'gpu'?); known profiles: 'default', 'gpu'"
    )


def test_profiles_checks_its_invariants() -> None:
    """Profiles rejects a missing default, mismatched names, an empty set and wrong types."""
    assert config_error(
        lambda: Profiles(profiles={"a": SandboxConfig(name="b")}, default_profile="c")
    ) == (
        "invalid Profiles:\n"
        "  $: profile 'a' holds a config named 'b'\n"
        "  $: 'default_profile' must name a profile (known profiles: 'a'): 'c'"
    )
    assert config_error(lambda: Profiles(profiles={}, default_profile="a")) == (
        "invalid Profiles:\n  $: 'profiles' must be a non-empty mapping"
    )
    assert config_error(
        lambda: Profiles(profiles={"a": SandboxConfig(name="a")}, default_profile=1)  # type: ignore[arg-type]
    ) == ("invalid Profiles:\n  $.default_profile: expected str, got int (1)")


def test_profiles_mapping_is_read_only() -> None:
    """The profiles of a Profiles cannot be changed in place."""
    profiles = load_profiles(env={})
    with pytest.raises(TypeError):
        profiles.profiles["x"] = SandboxConfig()  # type: ignore[index]


# ---------------------------------------------------------------------------------------------
# profiles_from_mapping (what ModalToolBackend.with_profiles calls)
# ---------------------------------------------------------------------------------------------


def test_profiles_from_mapping_mixes_configs_and_dicts() -> None:
    """Configs are kept, dicts are read like YAML profiles, aliases included."""
    gpu = SandboxConfig(name="gpu", gpu="A10G", backend="modal")
    profiles = profiles_from_mapping(
        {"gpu": gpu, "small": {"memory": 512, "max_pool": 2}}, default_profile="small", env={}
    )
    assert profiles.profiles["gpu"] is gpu
    assert profiles.profiles["small"] == SandboxConfig(
        name="small", backend="local", memory=512, max_sandboxes=2
    )
    assert profiles.default_profile == "small"
    assert profiles.source is None


def test_profiles_from_mapping_names_unnamed_configs_after_their_key() -> None:
    """A config still named `default` takes its key's name; another name must match."""
    profiles = profiles_from_mapping({"gpu": SandboxConfig(gpu="A10G")}, env={})
    assert profiles.profiles["gpu"].name == "gpu"
    assert profiles.default_profile == "gpu"
    assert (
        config_error(lambda: profiles_from_mapping({"gpu": SandboxConfig(name="cpu")}, env={}))
        == "profiles: $.gpu: the config is named 'cpu'; name it 'gpu' or use the key 'cpu'"
    )
    assert (
        config_error(lambda: profiles_from_mapping({"a b": SandboxConfig()}, env={}))
        == "profiles: $['a b']: 'name' must be 1-64 letters, digits, '.', '-' or '_': 'a b'"
    )


def test_profiles_from_mapping_is_as_strict_as_yaml() -> None:
    """Dicts get the same checks and messages, under the `profiles` source."""
    message = config_error(
        lambda: profiles_from_mapping(
            {"gpu": {"memory": "lots", "min_sandboxes": 3, "max_sandboxes": 1}, "x": 5},  # type: ignore[dict-item]
            env={},
        )
    )
    assert message.splitlines() == [
        "profiles: $.gpu.memory: expected int, got str ('lots')",
        "profiles: $.gpu: 'max_sandboxes' must be >= min_sandboxes (3): 1",
        "profiles: $.x: expected a mapping of settings, got int (5)",
        "default_profile: no 'default' profile, so 'default_profile' must name one of 'gpu', 'x'",
    ]
    assert config_error(lambda: profiles_from_mapping({}, env={})) == (
        "profiles: $: expected a non-empty mapping of profile names to configs"
    )


def test_profiles_from_mapping_lets_arguments_outrank_the_environment() -> None:
    """The environment fills in what the dicts leave out, and never replaces what they set."""
    env = {"TERMINAL_ENV": "modal", "TERMINAL_MODAL_IMAGE": "img:1", "TERMINAL_MODAL_APP_NAME": "e"}
    profiles = profiles_from_mapping(
        {"default": {}, "set": {"backend": "local", "image": "img:2", "app_name": "arg"}}, env=env
    )
    unset, given_values = profiles.profiles["default"], profiles.profiles["set"]
    assert (unset.backend, unset.image, unset.app_name) == ("modal", "img:1", "e")
    assert (given_values.backend, given_values.image, given_values.app_name) == (
        "local",
        "img:2",
        "arg",
    )


# ---------------------------------------------------------------------------------------------
# structure_config / unstructure_config
# ---------------------------------------------------------------------------------------------


def test_structure_config_reports_paths_from_the_root() -> None:
    """structure_config reports problems under `$` of the given source."""
    assert config_error(
        lambda: structure_config(
            {"memory": "lots", "name": "g", "slots_per_sandbox": 0}, source="arg"
        )
    ).splitlines() == [
        "arg: $.memory: expected int, got str ('lots')",
        "arg: $: 'slots_per_sandbox' must be >= 1: 0",
    ]


def test_structure_config_uses_the_backend_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a backend, structure_config takes the default, which follows $TERMINAL_ENV."""
    assert structure_config({}).backend == "local"
    monkeypatch.setenv("TERMINAL_ENV", "modal")
    assert structure_config({}).backend == "modal"


# ---------------------------------------------------------------------------------------------
# Shipped files
# ---------------------------------------------------------------------------------------------


def test_shipped_modal_profiles() -> None:
    """config/modal_profiles.yaml holds the default and gpu profiles, backend left to the env."""
    path = CONFIG_DIR / "modal_profiles.yaml"
    profiles = load_profiles(path, env={})
    assert profiles.source == str(path)
    assert profiles.default_profile == "default"
    assert dict(profiles.profiles) == {
        "default": SandboxConfig(
            name="default",
            backend="local",
            image="python:3.11",
            cpu=1.0,
            memory=2048,
            min_sandboxes=1,
            max_sandboxes=5,
            slots_per_sandbox=10,
            idle_timeout=120,
            network=True,
        ),
        "gpu": SandboxConfig(
            name="gpu",
            backend="local",
            image="pytorch/pytorch:2.4.0-cuda12.1-cudnn9-runtime",
            gpu="A10G",
            cpu=4.0,
            memory=16384,
            min_sandboxes=0,
            max_sandboxes=2,
            slots_per_sandbox=2,
            idle_timeout=300,
            max_lifetime=7200,
            secrets=("huggingface",),
            env_vars={"HF_HOME": "/data/.cache/huggingface", "TOKENIZERS_PARALLELISM": "false"},
            network=True,
        ),
    }
    on_modal = load_profiles(path, env={"TERMINAL_ENV": "modal"})
    assert {config.backend for config in on_modal.profiles.values()} == {"modal"}


def test_shipped_local_profiles() -> None:
    """config/local.yaml holds local default and fast profiles that ignore TERMINAL_ENV."""
    path = CONFIG_DIR / "local.yaml"
    profiles = load_profiles(path, env={"TERMINAL_ENV": "modal"})
    assert profiles.default_profile == "default"
    assert dict(profiles.profiles) == {
        "default": SandboxConfig(
            name="default",
            backend="local",
            isolation="auto",
            slots_per_sandbox=10,
            min_sandboxes=1,
            max_sandboxes=2,
            idle_timeout=120,
            execution_timeout_s=300,
        ),
        "fast": SandboxConfig(
            name="fast",
            backend="local",
            isolation="auto",
            slots_per_sandbox=32,
            min_sandboxes=1,
            max_sandboxes=4,
            idle_timeout=60,
            execution_timeout_s=30,
            max_output_bytes=100_000,
        ),
    }


# ---------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------

_names = st.from_regex(r"[A-Za-z0-9._-]{1,20}", fullmatch=True)
_positive_floats = st.floats(min_value=1e-3, max_value=1e6) | st.integers(1, 10**6)
# PyYAML turns the Unicode line breaks NEL, LS and PS inside plain scalars into spaces (a PyYAML
# quirk, not ours), so strings meant for a YAML file leave them out.
_YAML_MANGLED = "\x85\u2028\u2029"


@st.composite
def valid_configs(draw: st.DrawFn, *, yaml_safe: bool = False) -> SandboxConfig:
    excluded = "\0" + (_YAML_MANGLED if yaml_safe else "")
    text = st.text(st.characters(codec="utf-8", exclude_characters=excluded), max_size=20)
    variable_names = text.filter(lambda key: key != "" and "=" not in key)
    max_sandboxes = draw(st.integers(1, 50))
    return SandboxConfig(
        name=draw(_names),
        backend=draw(st.sampled_from(["local", "modal"])),
        image=draw(text.filter(bool)),
        cpu=draw(_positive_floats),
        memory=draw(st.integers(1, 10**7)),
        gpu=draw(st.none() | text.filter(bool)),
        slots_per_sandbox=draw(st.integers(1, 1000)),
        min_sandboxes=draw(st.integers(0, max_sandboxes)),
        max_sandboxes=max_sandboxes,
        idle_timeout=draw(st.floats(min_value=0, max_value=1e5) | st.integers(0, 10**5)),
        max_lifetime=draw(st.floats(min_value=1e-3, max_value=86400)),
        acquire_timeout_s=draw(_positive_floats),
        execution_timeout_s=draw(_positive_floats),
        secrets=draw(st.lists(_names, max_size=3).map(tuple)),
        env_vars=draw(st.dictionaries(variable_names, text, max_size=3)),
        tags=draw(st.dictionaries(variable_names, text, max_size=3)),
        workspace_base="/" + draw(text),
        isolation=draw(st.sampled_from(["auto", "bwrap", "none"])),
        network=draw(st.booleans()),
        max_output_bytes=draw(st.integers(1, 10**9)),
        app_name=draw(st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True)),
        max_starting=draw(st.integers(1, 512)),
        creates_per_second=draw(_positive_floats),
    )


@settings(database=None, max_examples=150)
@given(valid_configs())
def test_valid_configs_round_trip_through_plain_data(config: SandboxConfig) -> None:
    """unstructure then structure gives back an equal config."""
    assert structure_config(unstructure_config(config)) == config


@settings(database=None, max_examples=75)
@given(valid_configs(yaml_safe=True))
def test_valid_configs_round_trip_through_a_yaml_file(
    tmp_path_factory: pytest.TempPathFactory, config: SandboxConfig
) -> None:
    """A config dumped into a profiles file loads back equal."""
    path = tmp_path_factory.mktemp("roundtrip") / "profiles.yaml"
    document = {"profiles": {config.name: unstructure_config(config)}}
    path.write_text(yaml.safe_dump(document, allow_unicode=True), encoding="utf-8")
    assert load_profiles(path, env={}).profiles[config.name] == config


_INT_FIELDS = ("memory", "slots_per_sandbox", "min_sandboxes", "max_sandboxes", "max_starting")
_not_ints = (
    st.floats() | st.booleans() | st.text() | st.none() | st.lists(st.integers(), max_size=2)
)


@settings(database=None, max_examples=100)
@given(st.sampled_from(_INT_FIELDS), _not_ints)
def test_non_ints_are_never_accepted_for_int_fields(field: str, value: object) -> None:
    """Whatever the non-int value, an int field rejects it at its own path."""
    message = config_error(lambda: profiles_from_mapping({"p": {field: value}}, env={}))
    assert message.startswith(f"profiles: $.p.{field}: expected int, got ")


def test_reprs_and_errors_never_show_environment_values(write_yaml: WriteYaml) -> None:
    """repr/str of configs and profiles, and config errors, name env vars but hide values."""
    secret = "s3cr3t-value-42"
    config = SandboxConfig(env_vars={"API_TOKEN": secret})
    profiles = profiles_from_mapping({"default": config})
    for text in (repr(config), str(config), repr(profiles), str(profiles)):
        assert "API_TOKEN" in text
        assert secret not in text
    path = write_yaml(one_profile(f"env_vars: {{API_TOKEN: 12345678, OTHER: '{secret}\\0'}}\n"))
    with pytest.raises(ConfigError) as bad:
        load_profiles(path, env={})
    assert "API_TOKEN" in str(bad.value)
    assert "12345678" not in str(bad.value)
    assert secret not in str(bad.value)
    with pytest.raises(ConfigError) as not_a_mapping:
        SandboxConfig(env_vars=f"API_TOKEN={secret}")  # type: ignore[arg-type]
    assert secret not in str(not_a_mapping.value)


def test_working_directory_profiles_file_is_read_when_no_file_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a path or $TERMINAL_MODAL_PROFILES_FILE, ./modal_profiles.yaml is read."""
    (tmp_path / "modal_profiles.yaml").write_text("profiles:\n  default: {memory: 640}\n")
    monkeypatch.chdir(tmp_path)
    profiles = load_profiles(env={})
    assert profiles.source == "modal_profiles.yaml"
    assert profiles.get_profile().memory == 640
    (tmp_path / "modal_profiles.yaml").unlink()
    assert load_profiles(env={}).source is None


def test_modal_names_default_to_the_modal_backend(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """ModalSandboxConfig defaults to modal, SandboxConfig to local; $TERMINAL_ENV wins both."""
    monkeypatch.delenv("TERMINAL_ENV", raising=False)
    monkeypatch.setattr(config_module, "_announced", set())  # each pick is logged once per process
    caplog.set_level(logging.INFO, logger="hermes_actors.config")
    assert ModalSandboxConfig().backend == "modal"
    assert isinstance(ModalSandboxConfig(), SandboxConfig)
    assert SandboxConfig().backend == "local"
    assert ModalSandboxConfig(backend="local").backend == "local"
    assert "using the modal backend" in caplog.text
    monkeypatch.setenv("TERMINAL_ENV", "local")
    assert ModalSandboxConfig().backend == "local"
    assert load_profiles(env={}, default_backend="modal").get_profile().backend == "modal"
