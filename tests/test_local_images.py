"""Per-task images on the local backend: a root filesystem directory used as `/` under bwrap."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from hermes_actors import SandboxConfig, SandboxStartFailed, ToolBackend
from hermes_actors.drivers._local import bwrap_problem
from hermes_actors.terminal_tool import (
    cleanup_vm,
    register_task_image,
    shutdown_terminal_backend,
    terminal_tool,
)
from rootfs_support import build_rootfs

pytestmark = pytest.mark.skipif(
    trio.run(bwrap_problem) is not None, reason="bubblewrap is not usable here"
)


@pytest.fixture(scope="module")
def images() -> Iterator[dict[str, str]]:
    """Two small root filesystems built from host files (no network), and one without python."""
    base = Path(tempfile.mkdtemp(prefix="hermes-rootfs-"))
    base.chmod(0o755)
    built = {
        "alpha": str(build_rootfs(base / "alpha", "alpha")),
        "beta": str(build_rootfs(base / "beta", "beta")),
        "nopython": str(build_rootfs(base / "nopython", "nopython", with_python=False)),
    }
    yield built
    shutil.rmtree(base)


def config(**changes: Any) -> SandboxConfig:
    settings: dict[str, Any] = {
        "backend": "local",
        "isolation": "bwrap",
        "slots_per_sandbox": 2,
        "min_sandboxes": 1,
        "max_sandboxes": 3,
        "acquire_timeout_s": 30.0,
    }
    settings.update(changes)
    return SandboxConfig(**settings)


async def sh(backend: ToolBackend, slot: Any, command: str) -> str:
    [result] = await backend.execute_batch([(slot, "bash", {"command": command})])
    assert result.success, result
    return result.output


WHICH = "cat /etc/hermes-image 2>/dev/null || echo host; test -e /usr/bin/apt && echo has-apt; true"


async def test_a_slot_runs_in_the_image_it_asked_for(images: dict[str, str]) -> None:
    """image= picks the root filesystem; without it the host's (the default) is used."""
    async with ToolBackend(config()) as backend:
        host = await backend.acquire("h")
        alpha = await backend.acquire("a", image=images["alpha"])
        beta = await backend.acquire("b", image=images["beta"])
        assert await sh(backend, host, WHICH) == "host\nhas-apt\n"
        assert await sh(backend, alpha, WHICH) == "alpha\n"
        assert await sh(backend, beta, WHICH) == "beta\n"
        assert len({host.sandbox_id, alpha.sandbox_id, beta.sandbox_id}) == 3
        assert await sh(backend, alpha, "pwd; echo x > f; cat f") == "/data/slot-0\nx\n"
        # Forks of a slot stay in its image; checkpoints and transfers work there too.
        [fork] = await backend.fork(alpha, 1)
        assert fork.sandbox_id == alpha.sandbox_id
        assert await sh(backend, fork, "cat /etc/hermes-image f") == "alpha\nx\n"
        statuses = backend.status().pools[0].sandboxes
        assert sorted(s.image for s in statuses) == sorted(
            ["python:3.11", images["alpha"], images["beta"]]
        )


async def test_bad_images_fail_with_what_to_do(images: dict[str, str], tmp_path: Path) -> None:
    """An image without python3, a missing directory, or isolation none say so clearly."""
    async with ToolBackend(config(min_sandboxes=0)) as backend:
        with pytest.raises(SandboxStartFailed, match="has no python3"):
            await backend.acquire("x", image=images["nopython"])
        with pytest.raises(SandboxStartFailed, match="not a directory"):
            await backend.acquire("y", image=str(tmp_path / "missing"))
        slot = await backend.acquire("z")  # the profile's own image is unaffected
        assert await sh(backend, slot, "echo ok") == "ok\n"
    async with ToolBackend(config(min_sandboxes=0, isolation="none")) as backend:
        with pytest.raises(SandboxStartFailed, match="isolation 'bwrap'"):
            await backend.acquire("x", image=images["alpha"])


def test_terminal_tool_runs_a_task_in_its_image(
    images: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task's image is set per call (first call) or registered beforehand, until cleanup_vm."""
    profiles = tmp_path / "profiles.yaml"
    profiles.write_text(
        "profiles:\n  default:\n    backend: local\n    isolation: bwrap\n"
        "    slots_per_sandbox: 2\n    min_sandboxes: 0\n    max_sandboxes: 3\n"
    )
    monkeypatch.setenv("TERMINAL_MODAL_PROFILES_FILE", str(profiles))
    shutdown_terminal_backend()
    try:

        def run(command: str, **options: Any) -> str:
            reply = json.loads(terminal_tool(command, **options))
            assert reply["exit_code"] == 0, reply
            return str(reply["output"])

        assert run("cat /etc/hermes-image", task_id="t1", image=images["alpha"]) == "alpha\n"
        assert run("cat /etc/hermes-image", task_id="t1") == "alpha\n"
        clash = json.loads(terminal_tool("true", task_id="t1", image=images["beta"]))
        assert "cleanup_vm" in clash["error"]
        register_task_image("t2", images["beta"])
        assert run("cat /etc/hermes-image", task_id="t2") == "beta\n"
        cleanup_vm("t2")
        assert run("cat /etc/hermes-image 2>/dev/null || echo host", task_id="t2") == "host\n"
        cleanup_vm("t1")
        cleanup_vm("t2")
    finally:
        shutdown_terminal_backend()
