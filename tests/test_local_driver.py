"""Local driver specifics beyond the contract suite: failed or cancelled starts leave nothing."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import trio

from hermes_actors._config import SandboxConfig
from hermes_actors._errors import SandboxStartFailed
from hermes_actors.drivers import _local
from hermes_actors.drivers._local import LocalDriver


async def test_a_start_that_fails_leaves_no_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the agent process cannot be started, the sandbox directory is removed."""

    async def cannot_start(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(13, "Permission denied", "python3")

    monkeypatch.setattr(_local.trio.lowlevel, "open_process", cannot_start)
    with pytest.raises(SandboxStartFailed, match="Permission denied"):
        await LocalDriver(root_dir=str(tmp_path)).create(SandboxConfig(name="p", isolation="none"))
    assert os.listdir(tmp_path) == []


async def test_a_start_cancelled_while_spawning_leaves_no_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A create cancelled in the middle still removes the directory it made."""
    with trio.CancelScope() as scope:

        async def cancelled_spawn(*args: Any, **kwargs: Any) -> Any:
            scope.cancel()
            await trio.lowlevel.checkpoint()

        monkeypatch.setattr(_local.trio.lowlevel, "open_process", cancelled_spawn)
        await LocalDriver(root_dir=str(tmp_path)).create(SandboxConfig(name="p", isolation="none"))
    assert scope.cancelled_caught
    assert os.listdir(tmp_path) == []


def test_removing_a_sandbox_directory_never_touches_its_parent(tmp_path: Path) -> None:
    """Removing a directory twice, or a read-only one, leaves the parent's mode as it was."""
    tmp_path.chmod(0o1777)
    gone = tmp_path / "hermes-gone"
    _local._remove_tree(str(gone))
    locked = tmp_path / "hermes-locked"
    (locked / "ro").mkdir(parents=True)
    (locked / "ro" / "f").write_text("x")
    (locked / "ro").chmod(0o500)
    _local._remove_tree(str(locked))
    _local._remove_tree(str(locked))
    assert not locked.exists()
    assert tmp_path.stat().st_mode & 0o7777 == 0o1777
