"""The documentation works: every code block in docs/ and the README runs, generated pages are
current, and every link leads somewhere."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cli_support import clean_environment
from hermes_actors import load_profiles
from hermes_actors.cli import _docs

ROOT = Path(__file__).resolve().parent.parent
PAGES = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
FENCE = re.compile(r"(?P<before>[^\n]*)\n```(?P<language>[a-z]*)\n(?P<code>.*?)\n```", re.DOTALL)
NOT_RUN = re.compile(r"<!-- not run: (?P<reason>[^>]+) -->")


def code_blocks() -> list[tuple[str, str, str, str | None]]:
    """(page:line, language, code, reason not run) for every fenced block of the pages."""
    blocks = []
    for page in PAGES:
        text = "\n" + page.read_text()
        for match in FENCE.finditer(text):
            line = text[: match.start("code")].count("\n")
            skip = NOT_RUN.fullmatch(match.group("before").strip())
            blocks.append(
                (
                    f"{page.relative_to(ROOT)}:{line}",
                    match.group("language"),
                    match.group("code"),
                    skip.group("reason") if skip else None,
                )
            )
    return blocks


BLOCKS = code_blocks()


@pytest.fixture(scope="module")
def command_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with a `hermes-actors` that runs this checkout's command line."""
    directory = tmp_path_factory.mktemp("bin")
    script = directory / "hermes-actors"
    script.write_text(f'#!/bin/sh\nexec {sys.executable} -m hermes_actors.cli "$@"\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return directory


@pytest.mark.parametrize(
    ("where", "language", "code", "reason"), BLOCKS, ids=[block[0] for block in BLOCKS]
)
def test_code_block_runs(
    where: str, language: str, code: str, reason: str | None, tmp_path: Path, command_dir: Path
) -> None:
    """Each code block runs as written: shell and Python exit 0, YAML profiles load."""
    if reason is not None:
        pytest.skip(f"not run: {reason}")
    env = clean_environment(PATH=f"{command_dir}:{os.environ['PATH']}")
    if language in ("sh", "bash"):
        done = subprocess.run(
            ["bash", "-e", "-o", "pipefail", "-c", code],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        assert done.returncode == 0, f"{where}:\n{done.stdout}\n{done.stderr}"
    elif language == "python":
        done = subprocess.run(
            [sys.executable, "-c", code],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        assert done.returncode == 0, f"{where}:\n{done.stdout}\n{done.stderr}"
    elif language == "yaml":
        document = yaml.safe_load(code)
        assert isinstance(document, dict)
        assert "profiles" in document, f"{where}: a YAML block is a profiles file"
        path = tmp_path / "profiles.yaml"
        path.write_text(code)
        load_profiles(path, env={})
    elif language in ("text", "json"):
        pass  # shown output and formats, not code
    else:
        pytest.fail(f"{where}: unknown block language {language!r}: run it here or mark it")


def test_blocks_not_run_say_why() -> None:
    """A block is skipped only with a reason; most blocks run."""
    skipped = [block for block in BLOCKS if block[3] is not None]
    assert all(block[3].strip() for block in skipped)
    assert len(skipped) * 3 < len(BLOCKS)


def test_generated_pages_are_current() -> None:
    """docs/profiles.md and docs/troubleshooting.md match what the code generates."""
    assert _docs.main(["--check"]) == 0, "run `python -m hermes_actors.cli._docs`"


def test_profiles_reference_covers_every_field() -> None:
    """Each config field has its section, type, default and a valid example in the reference."""
    text = (ROOT / "docs" / "profiles.md").read_text()
    import attrs

    from hermes_actors import SandboxConfig

    for field in attrs.fields(SandboxConfig):
        assert f"## `{field.name}`" in text
    assert "* environment: `TERMINAL_ENV`" in text


def test_troubleshooting_lists_every_error_the_code_builds() -> None:
    """Every message template found in the code appears on the troubleshooting page."""
    text = (ROOT / "docs" / "troubleshooting.md").read_text()
    messages = _docs.error_messages()
    assert messages["SandboxLost"]
    assert messages["ConfigError"]
    assert messages["warning"]
    for found in messages.values():
        for message in found:
            assert message in text
    for message in _docs.config_messages():
        assert message in text
    for code in _docs.agent_codes():
        assert f"| `{code}` |" in text


def test_every_link_between_pages_resolves() -> None:
    """Relative links in docs/ and the README point at files that exist."""
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.name}: broken link {target}"


def test_index_links_every_page() -> None:
    """docs/index.md links every page in docs/."""
    index = (ROOT / "docs" / "index.md").read_text()
    for page in (ROOT / "docs").glob("*.md"):
        if page.name != "index.md":
            assert f"({page.name})" in index, page.name
