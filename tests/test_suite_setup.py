"""The suite on a machine without bubblewrap: isolation cases are skipped with the reason.

`make test` installs bubblewrap when it can (root and apt-get); where it cannot, the isolation
cases must show up as skipped, saying why, never as failures. The check runs a few of them in a
pytest of their own whose PATH has every program of this one's but `bwrap`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent


def path_without_bwrap(directory: Path) -> str:
    """A PATH of one directory linking every program of this PATH except `bwrap`."""
    directory.mkdir()
    for entry in os.environ.get("PATH", "").split(os.pathsep):
        if not entry or not os.path.isdir(entry):
            continue
        for name in os.listdir(entry):
            link = directory / name
            if name != "bwrap" and not link.exists():
                link.symlink_to(os.path.join(entry, name))
    return str(directory)


@pytest.mark.skipif(os.geteuid() != 0, reason="the isolation cases chosen need root")
def test_isolation_cases_are_skipped_with_the_reason_where_bubblewrap_is_missing(
    tmp_path: Path,
) -> None:
    """Without bwrap, cases marked or parametrized bwrap are skipped with the reason, none fail."""
    env = {**os.environ, "PATH": path_without_bwrap(tmp_path / "bin")}
    selection = [
        f"{TESTS / 'test_escape.py'}::test_timeout_leaves_no_escapee",
        f"{TESTS / 'test_driver_contract.py'}::test_exit_codes_and_signals",
        f"{TESTS / 'test_local_driver.py'}::"
        "test_slot_users_have_a_name_and_their_workspace_as_home_under_bwrap",
    ]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-rs",
            "-p",
            "no:cacheprovider",
            f"--basetemp={tmp_path / 'inner'}",
            "-k",
            "bwrap",  # only the isolation cases: the others would start real sandboxes
            *selection,
        ],
        env=env,
        cwd=TESTS.parent,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert " failed" not in output, output
    assert " error" not in output, output
    reason = "isolation case skipped: bubblewrap (`bwrap`) is not installed; `make test` installs"
    # One bwrap case per selected test, each skipped with the reason.
    assert output.count(reason) == 3, output
    assert "3 skipped" in output, output
