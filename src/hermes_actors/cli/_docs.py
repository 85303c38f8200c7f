"""Generated documentation: the profiles reference and the troubleshooting page.

    python -m hermes_actors.cli._docs            # rewrite docs/profiles.md, docs/troubleshooting.md
    python -m hermes_actors.cli._docs --check    # exit 1 if either is out of date

Both pages are derived from the code, so they cannot drift from it (a test runs `--check`):

* the profiles reference from `SandboxConfig`'s fields: the `#:` comment above each field, its
  type, its default, the environment variable that sets it, and an example (every example is
  loaded by a test, so each one is valid);
* the troubleshooting page from every error a user can meet: the messages of the `HermesError`
  classes built in the package (found in its syntax tree), the warnings its loggers emit, the
  agent's error codes, and the configuration problems the loader reports (found by feeding the
  loader one wrong value per field and one broken file per kind). Each kind of error has a
  section saying what to do; a kind without one fails the generation.
"""

from __future__ import annotations

import ast
import inspect
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Final, get_args

import attrs
import yaml

from hermes_actors._config import FIELD_ALIASES, SandboxConfig, load_profiles
from hermes_actors._errors import ConfigError
from hermes_actors._provenance import FIELD_ENVIRONMENT

PACKAGE: Final = Path(__file__).resolve().parent.parent
DOCS: Final = PACKAGE.parent.parent / "docs"

#: One example value per field of `SandboxConfig` (a test loads each one).
FIELD_EXAMPLES: Final[Mapping[str, object]] = {
    "name": "gpu",
    "backend": "modal",
    "image": "nvidia/cuda:12.4.1-runtime-ubuntu22.04",
    "cpu": 2.0,
    "memory": 8192,
    "gpu": "A10G",
    "slots_per_sandbox": 16,
    "min_sandboxes": 2,
    "max_sandboxes": 20,
    "idle_timeout": 300,
    "max_lifetime": 7200,
    "acquire_timeout_s": 120,
    "execution_timeout_s": 60,
    "secrets": ["huggingface"],
    "env_vars": {"PIP_NO_CACHE_DIR": "1"},
    "tags": {"team": "rl"},
    "workspace_base": "/workspace",
    "isolation": "bwrap",
    "network": True,
    "max_output_bytes": 200000,
    "app_name": "my-trainer",
    "max_starting": 8,
    "creates_per_second": 10.0,
    "reap_orphans": True,
    "reap_min_age_s": 600,
    "create_retry_budget_s": 120,
    "agent_ttl_s": 300,
    "shell": "fresh",
    "reuse_shell": True,
    "add_python": "3.11",
    "max_checkpoints": 16,
    "max_checkpoint_bytes": 2147483648,
}


# -- the profiles reference ------------------------------------------------------------------------


def field_comments(cls: type) -> dict[str, str]:
    """The `#:` comment above each field of an attrs class, joined into one paragraph."""
    comments: dict[str, str] = {}
    pending: list[str] = []
    previous: str | None = None  # the comment of the field on the line before
    for line in inspect.getsource(cls).splitlines():
        stripped = line.strip()
        if stripped.startswith("#:"):
            pending.append(stripped[2:].strip())
            continue
        match = re.match(r"([a-z_][a-z0-9_]*)\s*:", stripped)
        if match and (pending or previous):
            # A field right below another, without its own comment, shares that comment.
            comments[match.group(1)] = " ".join(pending) if pending else str(previous)
            previous = comments[match.group(1)]
        else:
            previous = None
        pending = []
    return comments


def _type_name(annotation: object) -> str:
    if isinstance(annotation, str):
        text = annotation
    elif get_args(annotation):
        text = str(annotation)
    else:
        text = getattr(annotation, "__name__", None) or str(annotation)
    return text.replace("typing.", "").replace("collections.abc.", "")


def _default_text(field: attrs.Attribute[Any]) -> str:
    default = field.default
    if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
        if field.name == "backend":
            return "`local` (`$TERMINAL_ENV` when set)"
        value = default.factory()  # type: ignore[union-attr]
        return f"`{_yaml_scalar(value)}`"
    return f"`{_yaml_scalar(default)}`"


def _yaml_scalar(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_yaml_scalar(item) for item in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{key}: {_yaml_scalar(item)}" for key, item in value.items()) + "}"
    if isinstance(value, str):
        return f'"{value}"' if value == "" or ":" in value else value
    return repr(value)


def _example_yaml(name: str, value: object) -> str:
    if name == "name":
        return "profiles:\n  gpu:        # a profile's name is its key\n    cpu: 2.0\n"
    text = yaml.safe_dump(value, default_flow_style=True, width=200).strip()
    text = text.removesuffix("\n...").strip()
    return f"profiles:\n  default:\n    {name}: {text}\n"


def profiles_reference() -> str:
    """The text of docs/profiles.md."""
    comments = field_comments(SandboxConfig)
    fields = attrs.fields(SandboxConfig)
    aliases = {field: alias for alias, field in FIELD_ALIASES.items()}
    lines = [
        "# Profiles reference",
        "",
        "<!-- Generated by `python -m hermes_actors.cli._docs` from `SandboxConfig`; edit the",
        "     field comments in src/hermes_actors/_config.py, not this page. -->",
        "",
        "A profiles file names one or more profiles; each says what the sandboxes of one pool",
        "look like and how the pool behaves. `hermes-actors profiles check FILE` validates a file",
        "and shows every resolved value and where it came from.",
        "",
        "```yaml",
        "default_profile: default      # optional: else `default`, else the only profile",
        "profiles:",
        "  default:",
        "    backend: local",
        "    slots_per_sandbox: 10",
        "  gpu:",
        "    backend: modal",
        "    image: nvidia/cuda:12.4.1-runtime-ubuntu22.04",
        "    gpu: A10G",
        "    min_sandboxes: 0",
        "```",
        "",
        "Sources, later wins: the defaults below < the YAML file (`--profiles FILE`, else",
        "`$TERMINAL_MODAL_PROFILES_FILE`, else `./modal_profiles.yaml` when present) < the",
        "environment variables below < arguments given in code. Values are strict: no silent",
        "coercion, unknown keys rejected, every problem reported at once with its path (see",
        "[troubleshooting](troubleshooting.md#configuration)). Code written for the original",
        "Atropos backend can also build a profile with `ModalSandboxConfig.from_env(name)`, which",
        "reads `ATROPOS_MODAL_PROFILE_<NAME>_<KEY>` and `ATROPOS_MODAL_<KEY>` (see",
        "[migrating](migrating.md)).",
        "",
        "| field | type | default | environment |",
        "|---|---|---|---|",
    ]
    for field in fields:
        environment = (
            f"`{FIELD_ENVIRONMENT[field.name]}`" if field.name in FIELD_ENVIRONMENT else ""
        )
        lines.append(
            f"| [`{field.name}`](#{field.name}) | `{_type_name(field.type)}` | "
            f"{_default_text(field)} | {environment} |"
        )
    for field in fields:
        missing = field.name not in FIELD_EXAMPLES or field.name not in comments
        if missing:
            raise RuntimeError(
                f"SandboxConfig.{field.name} needs a `#:` comment and an entry in FIELD_EXAMPLES"
            )
        lines += ["", f"## `{field.name}`", "", comments[field.name], ""]
        lines.append(f"* type: `{_type_name(field.type)}`")
        lines.append(f"* default: {_default_text(field)}")
        if field.name in FIELD_ENVIRONMENT:
            lines.append(f"* environment: `{FIELD_ENVIRONMENT[field.name]}`")
        if field.name in aliases:
            lines.append(f"* also spelled `{aliases[field.name]}` (the terminal tool's name)")
        lines += [
            "",
            "```yaml",
            _example_yaml(field.name, FIELD_EXAMPLES[field.name]).rstrip(),
            "```",
        ]
    return "\n".join(lines) + "\n"


# -- troubleshooting -------------------------------------------------------------------------------

#: What to do, per kind of error. Every kind the code can raise must be here.
REMEDIES: Final[Mapping[str, str]] = {
    "ConfigError": (
        "A profile value, a profiles file or an environment variable is wrong. The message names "
        "the source (the file, `environment`, `overrides`) and the path of the value "
        "(`$.profiles.gpu.memory`). Run `hermes-actors profiles check FILE` to see every "
        "problem at once, fix each, and check again (exit code 2 until it is clean)."
    ),
    "UsageError": (
        "The command line is wrong (exit code 2). `hermes-actors COMMAND --help` shows the usage."
    ),
    "IsolationUnavailable": (
        "The profile asks for `isolation: bwrap` and bubblewrap cannot run here. Install it "
        "(`apt-get install -y bubblewrap`), or in a container allow user namespaces; or accept "
        "no isolation with `isolation: none` (or `auto`, which falls back with a warning)."
    ),
    "SandboxStartFailed": (
        "A sandbox could not start (exit code 3 from the CLI). The message says why: a wrong "
        "image or resource request (fix the profile), a quota or rate limit (retry later, lower "
        "`creates_per_second` / `max_starting`), or a provider outage (the pool retries). "
        "Retryable ones are marked `retryable` in `ExecutionResult.metadata`."
    ),
    "SandboxLost": (
        "The sandbox (or its agent) died while work was in flight: out of memory, killed from "
        "outside, the provider reclaimed it, or its lifetime ended. The pool replaces it; run "
        "the trajectory's step again on a fresh slot (the result carries `infra_error: "
        "sandbox_lost`, `retryable: true`, so a trainer masks it instead of scoring it). If it "
        "repeats, raise `memory`, and look at `hermes-actors status` and the logs with `-v`."
    ),
    "BackendUnavailable": (
        "The backend cannot be used at all: for Modal, `pip install 'hermes-actors[modal]'` "
        "and `modal token new` (or set `MODAL_TOKEN_ID` and `MODAL_TOKEN_SECRET`); or switch "
        "the profile to `backend: local`."
    ),
    "AcquireTimeout": (
        "Every slot stayed busy until the acquire deadline. Release slots sooner (every "
        "`acquire` needs its `release`; `terminal_tool` tasks need `cleanup_vm`), or raise "
        "`max_sandboxes`, `slots_per_sandbox` or `acquire_timeout_s`. `hermes-actors status` "
        "shows slots held and waiters."
    ),
    "RuntimeStopped": (
        "The backend stopped (or was never started) while the call was pending: a `stop()` "
        "from another task, Ctrl-C, or a crash logged before it. Start the backend again, and "
        "acquire new slots: slots of a stopped backend are gone."
    ),
    "InfrastructureError": "The sandbox infrastructure failed, not the command; retry.",
    "ArtifactTooLarge": (
        "The file or archive is larger than the `max_bytes` asked for. Pass a larger "
        "`max_bytes`, or read a narrower path."
    ),
    "AgentError": (
        "The agent inside the sandbox refused one operation; the sandbox is fine. The code in "
        "brackets says why (see the codes below)."
    ),
    "warning": (
        "Warnings are logged once per kind (repeats show with `-vv`). They do not stop the "
        "run; each says what was done instead and how to avoid it."
    ),
}

#: What each agent error code means for a user.
AGENT_CODES: Final[Mapping[str, str]] = {
    "bad_request": "a tool call's arguments are malformed: check the tool's argument types",
    "bad_config": "the sandbox agent was started wrongly: report it as a bug",
    "bad_frame": "the agent received a malformed frame: report it as a bug",
    "unknown_op": "host and agent disagree on the protocol: reinstall hermes-actors",
    "internal": "the agent hit an unexpected error in one operation: report it with the log",
    "cancelled": "the operation was cancelled before it ran (its caller gave up)",
    "path_escape": "the path leaves the slot's workspace: use a path inside it",
    "not_found": "no such file or directory in the workspace",
    "is_a_directory": "a file operation was given a directory",
    "not_a_file": "read_file was given something that is not a regular file",
    "not_a_directory": "a directory operation (or a parent of a path) is not a directory",
    "permission_denied": "the slot's user may not access that path",
    "symlink_loop": "the path goes through a symlink loop",
    "no_space": "the sandbox's disk is full: delete files, or use a larger sandbox",
    "read_only": "the path is on a read-only file system (only the workspace is writable)",
    "exists": "the path already exists",
    "io_error": "the file system reported an error (the message says which)",
    "archive_failed": "tar could not archive the path (the message has tar's error)",
    "missing_tool": "a program the operation needs (such as tar) is not in the image: "
    "install it in the image",
    "tar_failed": "tar failed inside the sandbox (checkpoint, restore, upload or download): "
    "the message has tar's error",
}

_ERROR_CLASSES: Final = frozenset(REMEDIES) - {"warning"}
_PLACEHOLDER: Final = re.compile(r"\{[^{}]*\}")


def _template(node: ast.expr) -> str | None:
    """A message's text with each interpolated part as `<...>`, or None when not literal."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        parts = []
        for value in node.values:
            if isinstance(value, ast.Constant):
                parts.append(str(value.value))
            elif isinstance(value, ast.FormattedValue):
                parts.append("<" + ast.unparse(value.value).split(".")[-1].strip("()") + ">")
        return "".join(parts)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Mod):
        left = _template(node.left)
        if isinstance(node.op, ast.Mod):
            return re.sub(r"%[-#0-9.]*[sdrgf]", "<...>", left) if left is not None else None
        right = _template(node.right)
        return left + right if left is not None and right is not None else None
    return None


def _python_files() -> Iterator[Path]:
    for path in sorted(PACKAGE.rglob("*.py")):
        if "testing" not in path.relative_to(PACKAGE).parts:
            yield path


def error_messages() -> dict[str, list[str]]:
    """Every literal message of every error class built in the package, by class."""
    found: dict[str, set[str]] = {name: set() for name in REMEDIES}
    for path in _python_files():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.name in _ERROR_CLASSES:
                # Classes that build their own message: the text passed to the base class.
                for inner in ast.walk(node):
                    if (
                        isinstance(inner, ast.Call)
                        and isinstance(inner.func, ast.Attribute)
                        and inner.func.attr == "__init__"
                        and inner.args
                        and (text := _template(inner.args[0])) is not None
                    ):
                        found[node.name].add(text)
            if not isinstance(node, ast.Call) or not node.args:
                continue
            name = node.func.id if isinstance(node.func, ast.Name) else None
            if name in _ERROR_CLASSES and name != "AgentError":
                text = _template(node.args[0])
                if name in ("SandboxLost",) and len(node.args) > 1:
                    text = _template(node.args[1])
                    text = f"... was lost ({text}) ..." if text is not None else None
                if text is not None and text.strip():
                    found[name].add(text)
            if isinstance(node.func, ast.Attribute) and node.func.attr == "warning":
                text = _template(node.args[0])
                if text is not None:
                    found["warning"].add(re.sub(r"%[-#0-9.]*[sdrgf]", "<...>", text))
    # AgentError's own text is "<message> [<code>]": its codes are listed instead.
    del found["AgentError"]
    return {name: sorted(messages) for name, messages in found.items()}


def agent_codes() -> list[str]:
    """Every error code the agent (or the facade, for artifacts) can answer with."""
    codes: set[str] = set()
    for path in (PACKAGE / "_agent.py", PACKAGE / "facades" / "_core.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and node.args:
                name = node.func.id if isinstance(node.func, ast.Name) else None
                first = node.args[0]
                if name in ("OpError", "AgentError") and isinstance(first, ast.Constant):
                    codes.add(str(first.value))
                if name == "_error_reply" and len(node.args) > 1:
                    second = node.args[1]
                    if isinstance(second, ast.Constant):
                        codes.add(str(second.value))
            if isinstance(node, ast.Dict) and all(
                isinstance(value, ast.Constant) and isinstance(value.value, str)
                for value in node.values
            ):
                keys = [ast.unparse(key) for key in node.keys if key is not None]
                if keys and all(key.startswith("errno.") for key in keys):
                    codes.update(str(value.value) for value in node.values)  # type: ignore[attr-defined]
                    codes.add("io_error")
    return sorted(codes)


#: Wrong values fed to the loader, per type, to collect its messages.
_WRONG_VALUES: Final[Mapping[str, tuple[object, ...]]] = {
    "int": ("lots", 1.5, True, -1, 0),
    "float": ("fast", True, -1.0, 0.0, float("inf")),
    "bool": ("yes", 1),
    "str": (5, ""),
    "str | None": (5, ""),
}

_BROKEN_FILES: Final[tuple[str, ...]] = (
    "",
    "[1, 2]\n",
    "profile:\n  default: {}\n",
    "profiles: [a]\n",
    "profiles: {}\n",
    "profiles:\n  default: 5\n",
    "profiles:\n  a: {}\n  b: {}\n",
    "default_profile: gpu\nprofiles:\n  default: {}\n",
    "default_profile: 5\nprofiles:\n  default: {}\n",
    "profiles:\n  default: {cpu: 1}\n  default: {cpu: 2}\n",
    "profiles: [unclosed\n",
    "profiles:\n  default:\n    colour: red\n",
    "profiles:\n  default:\n    min_pool: 1\n    min_sandboxes: 1\n",
    "profiles:\n  default:\n    min_sandboxes: 3\n    max_sandboxes: 1\n",
    "profiles:\n  default:\n    backend: modal\n    max_lifetime: 100000\n",
    "profiles:\n  default:\n    name: other\n",
    "profiles:\n  default:\n    env_vars: {'A=B': x}\n",
    "profiles:\n  default:\n    secrets: ['bad name']\n",
    "profiles:\n  default:\n    workspace_base: data\n",
    "profiles:\n  default:\n    app_name: 'no spaces'\n",
    "profiles:\n  default:\n    isolation: docker\n",
    "profiles:\n  default:\n    backend: k8s\n",
    "profiles:\n  default:\n    env_vars: [a]\n",
    "profiles:\n  default:\n    secrets: a\n",
    "profiles:\n  default:\n    tags: {a: 1}\n",
    "profiles:\n  default:\n    gpu: ''\n",
)


def _general(message: str, path: str) -> str:
    """A loader message with the file name and quoted values made generic."""
    message = message.replace(path, "FILE")
    message = re.sub(r"line \d+, column \d+", "line <n>, column <n>", message)
    return message


def config_messages() -> list[str]:
    """The loader's messages for one wrong value per field and type, and broken files."""
    messages: set[str] = set()
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "profiles.yaml")

        def collect(text: str, env: Mapping[str, str] | None = None) -> None:
            Path(path).write_text(text)
            try:
                load_profiles(path, env=env or {})
            except ConfigError as error:
                messages.update(_general(line, path) for line in str(error).splitlines())

        for field in attrs.fields(SandboxConfig):
            for value in _WRONG_VALUES.get(_type_name(field.type), ()):
                collect(f"profiles:\n  default:\n    {field.name}: {_yaml_scalar_any(value)}\n")
        for text in _BROKEN_FILES:
            collect(text)
        collect("profiles:\n  default: {}\n", {"TERMINAL_ENV": "k8s"})
        try:
            load_profiles(os.path.join(directory, "missing.yaml"), env={})
        except ConfigError as error:
            messages.add(_general(str(error), os.path.join(directory, "missing.yaml")))
        try:
            load_profiles(None, env={"TERMINAL_MODAL_PROFILES_FILE": os.path.join(directory, "x")})
        except ConfigError as error:
            messages.add(_general(str(error), os.path.join(directory, "x")))
    return sorted(messages)


def _yaml_scalar_any(value: object) -> str:
    if isinstance(value, float) and value == float("inf"):
        return ".inf"
    if isinstance(value, str):
        return repr(value)
    return _yaml_scalar(value)


def _item(message: str) -> str:
    """A message as a list item in code style (double backticks when it holds backticks)."""
    return f"* `` {message} ``" if "`" in message else f"* `{message}`"


def troubleshooting() -> str:
    """The text of docs/troubleshooting.md."""
    messages = error_messages()
    unknown = [code for code in agent_codes() if code not in AGENT_CODES]
    if unknown:
        raise RuntimeError(
            f"agent error codes without an explanation: {unknown}; add each to AGENT_CODES in "
            "src/hermes_actors/cli/_docs.py"
        )
    lines = [
        "# Troubleshooting",
        "",
        "<!-- Generated by `python -m hermes_actors.cli._docs` from the code: every message",
        "     below is one the package can produce. Edit REMEDIES in",
        "     src/hermes_actors/cli/_docs.py for the advice, never this page. -->",
        "",
        "Every error a user can meet, by kind, with what to do. In messages, `<name>` stands",
        "for a value filled in at run time. The command line exits 2 for configuration and",
        "usage errors and 3 for infrastructure errors; in a trainer, infrastructure failures",
        "come back as results with `metadata['infra_error']` and `metadata['retryable']`.",
        "",
        "First steps for any problem: `hermes-actors profiles check FILE`, `hermes-actors status`,",
        "`hermes-actors reap --dry-run`, and the logs with `-v` (info) or `-vv` (debug).",
        "",
        "## Configuration",
        "",
        REMEDIES["ConfigError"],
        "",
        "Messages of the profiles loader (`FILE` is the profiles file):",
        "",
    ]
    lines += [_item(message) for message in config_messages()]
    for name in sorted(messages):
        if name in ("warning", "AgentError") or not messages[name]:
            continue
        lines += ["", f"## {name}", "", REMEDIES[name], ""]
        lines += [_item(message) for message in messages[name]]
    lines += [
        "",
        "## AgentError",
        "",
        REMEDIES["AgentError"],
        "",
        "| code | meaning |",
        "|---|---|",
    ]
    lines += [f"| `{code}` | {AGENT_CODES[code]} |" for code in agent_codes()]
    lines += ["", "## Warnings", "", REMEDIES["warning"], ""]
    lines += [_item(message) for message in messages["warning"]]
    return "\n".join(lines) + "\n"


GENERATED: Final[Mapping[str, Any]] = {
    "profiles.md": profiles_reference,
    "troubleshooting.md": troubleshooting,
}


def main(argv: list[str] | None = None) -> int:
    """Write the generated pages, or with `--check` report the stale ones (exit 1)."""
    check = "--check" in (sys.argv[1:] if argv is None else argv)
    stale = []
    for name, generate in GENERATED.items():
        path = DOCS / name
        text = generate()
        current = path.read_text() if path.exists() else None
        if current != text:
            stale.append(name)
            if not check:
                path.parent.mkdir(exist_ok=True)
                path.write_text(text)
    if check and stale:
        print(
            f"out of date: {', '.join(stale)}; run `python -m hermes_actors.cli._docs`",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
