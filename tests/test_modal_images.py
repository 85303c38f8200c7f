"""Per-task images on the modal backend, through the Modal API emulator and the real client."""

from __future__ import annotations

from typing import Any

import pytest

from hermes_actors import SandboxConfig, SandboxStartFailed, ToolBackend
from hermes_actors.testing.modal_emulator import ModalEmulator

APP_NAME = "hermes-image-tests"


def profile(**changes: Any) -> SandboxConfig:
    settings: dict[str, Any] = {
        "name": "img",
        "backend": "modal",
        "app_name": APP_NAME,
        "cpu": 0.5,
        "memory": 256,
        "min_sandboxes": 0,
        "max_sandboxes": 3,
        "slots_per_sandbox": 1,
        "acquire_timeout_s": 15.0,
        **changes,
    }
    return SandboxConfig(**settings)


async def sh(backend: ToolBackend, slot: Any, command: str) -> str:
    [result] = await backend.execute_batch([(slot, "bash", {"command": command})])
    assert result.success, result
    return result.output


def created_tags(emulator: ModalEmulator) -> list[object]:
    images = {c.fields["image_id"]: c.fields["tag"] for c in emulator.calls("ImageGetOrCreate")}
    creates = emulator.calls("SandboxCreateV2") or emulator.calls("SandboxCreate")
    return [images.get(c.fields.get("image_id")) for c in creates]


async def test_a_task_image_gets_its_own_sandbox_built_once_per_app(
    modal_emulator: ModalEmulator,
) -> None:
    """acquire(image=) creates sandboxes of that registry image; its build is reused."""
    async with ToolBackend(profile(), run_id="images-1") as backend:
        own = await backend.acquire("a")
        first = await backend.acquire("b", image="repo-b:1")
        second = await backend.acquire("c", image="repo-b:1")
        assert await sh(backend, first, "echo ok") == "ok\n"
        assert own.sandbox_id != first.sandbox_id != second.sandbox_id
        assert sorted(map(str, created_tags(modal_emulator))) == [
            "python:3.11",
            "repo-b:1",
            "repo-b:1",
        ]
        builds = [c.fields["tag"] for c in modal_emulator.calls("ImageGetOrCreate")]
        assert builds.count("repo-b:1") == 1


async def test_an_image_without_python_fails_with_what_to_do(
    modal_emulator: ModalEmulator,
) -> None:
    """An image with no python3 fails at once (not retried) and says to set add_python."""
    modal_emulator.add_image_without_python("bare:1")
    async with ToolBackend(profile(), run_id="images-2") as backend:
        with pytest.raises(SandboxStartFailed, match="add_python"):
            await backend.acquire("x", image="bare:1")
        creates = modal_emulator.calls("SandboxCreateV2") or modal_emulator.calls("SandboxCreate")
        assert len(creates) == 1  # a start that cannot heal is not retried
        slot = await backend.acquire("y")  # the profile's own image still serves
        assert await sh(backend, slot, "echo fine") == "fine\n"


async def test_add_python_makes_such_an_image_work(modal_emulator: ModalEmulator) -> None:
    """With add_python, Modal's SDK adds a Python to the image and the agent runs there."""
    modal_emulator.add_image_without_python("bare:2")
    async with ToolBackend(profile(add_python="3.11"), run_id="images-3") as backend:
        slot = await backend.acquire("x", image="bare:2")
        assert await sh(backend, slot, "echo works") == "works\n"
    builds = [c for c in modal_emulator.calls("ImageGetOrCreate") if c.fields["tag"] == "bare:2"]
    assert len(builds) == 1
    assert "COPY /python/. /usr/local" in builds[0].fields["dockerfile_commands"]  # type: ignore[operator]


def test_add_python_is_checked() -> None:
    """add_python must look like a Python version."""
    from hermes_actors import ConfigError

    with pytest.raises(ConfigError, match="add_python"):
        profile(add_python="python3")
