"""The persistent shell through the facades: `ToolBackend` tools and `terminal_tool`.

Runs on local `none`, local `bwrap` and modal (through the emulator), with the profile's
`shell` setting and the per-call override side by side.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from hermes_actors import SandboxConfig, ToolBackend
from hermes_actors.terminal_tool import cleanup_vm
from terminal_support import run, terminal_profiles

MODES = ["local-none", "local-bwrap", "modal"]


@asynccontextmanager
async def backend_for(
    request: pytest.FixtureRequest, mode: str, **changes: Any
) -> AsyncIterator[ToolBackend]:
    settings: dict[str, Any] = {"name": "shell", "min_sandboxes": 1, "max_sandboxes": 1}
    if mode == "modal":
        request.getfixturevalue("modal_emulator")
        settings.update(backend="modal", app_name="hermes-shell-tests", cpu=0.5, memory=256)
    else:
        isolation = mode.removeprefix("local-")
        settings.update(backend="local", isolation=isolation)
    settings.update(changes)
    async with ToolBackend(SandboxConfig(**settings), run_id="shell-tests") as backend:
        yield backend


@pytest.mark.parametrize("mode", MODES)
async def test_bash_calls_share_one_shell_per_slot(
    request: pytest.FixtureRequest, mode: str
) -> None:
    """By default a slot's bash calls share state; `shell: fresh` per call does not see it."""
    async with backend_for(request, mode) as backend:
        slot = await backend.acquire("shell-state")
        calls = [
            (slot, "bash", {"command": "mkdir -p w && cd w; export X=1; y=2; f() { echo f$1; }"}),
            (slot, "bash", {"command": 'pwd; echo "$X$y"; f 3'}),
            (slot, "bash", {"command": 'pwd; echo "[${X-}]"', "shell": "fresh"}),
            (slot, "terminal", {"command": "echo a; echo b >&2; echo c"}),
            (slot, "bash", {"command": "echo a; echo b >&2; echo c"}),
            (slot, "bash", {"command": "exit 3"}),
            (slot, "bash", {"command": 'pwd; echo "$X${y-}"'}),
        ]
        results = await backend.execute_batch(calls)
        state, fresh, merged, apart, exited, restored = results[1:]
        assert state.output.splitlines()[0].endswith("/w")
        assert state.output.splitlines()[1:] == ["12", "f3"]
        assert not fresh.output.splitlines()[0].endswith("/w")
        assert fresh.output.splitlines()[1] == "[]"
        assert merged.output == "a\nb\nc\n"
        assert apart.output == "a\nc\nb\n"
        assert (exited.metadata["exit_code"], exited.metadata["shell_restarted"]) == (3, True)
        assert restored.output.splitlines()[0].endswith("/w")
        assert restored.output.splitlines()[1] == "1"
        assert not restored.metadata["shell_restarted"]
        await backend.release(slot)
        again = await backend.acquire("shell-state-2")
        [clean] = await backend.execute_batch([(again, "bash", {"command": 'echo "[${X-}]"'})])
        assert clean.output == "[]\n"
        await backend.release(again)


@pytest.mark.parametrize("mode", ["local-none", "modal"])
async def test_profile_shell_fresh_keeps_calls_independent(
    request: pytest.FixtureRequest, mode: str
) -> None:
    """With `shell: fresh` in the profile, calls share nothing unless a call asks for it."""
    async with backend_for(request, mode, shell="fresh") as backend:
        slot = await backend.acquire("fresh")
        results = await backend.execute_batch(
            [
                (slot, "bash", {"command": "export X=1"}),
                (slot, "bash", {"command": 'echo "[${X-}]"'}),
                (slot, "bash", {"command": "export Y=2", "shell": "persistent"}),
                (slot, "bash", {"command": 'echo "[${Y-}]"', "shell": "persistent"}),
                (slot, "bash", {"command": "true", "shell": "sticky"}),
            ]
        )
        assert [result.output for result in results[:4]] == ["", "[]\n", "", "[2]\n"], results
        assert not results[4].success
        assert "'shell' must be one of" in (results[4].error or "")
        await backend.release(slot)


async def test_modal_commands_need_no_provider_call_of_their_own(
    request: pytest.FixtureRequest,
) -> None:
    """Under Modal, persistent calls travel on the one agent stream: no exec per command."""
    emulator = request.getfixturevalue("modal_emulator")
    async with backend_for(request, "modal") as backend:
        slot = await backend.acquire("modal-calls")
        await backend.execute_batch([(slot, "bash", {"command": "cd /tmp"})])
        starts = len(emulator.calls("TaskExecStart"))
        results = await backend.execute_batch(
            [(slot, "bash", {"command": f"echo {index}; pwd"}) for index in range(10)]
        )
        assert [result.output for result in results] == [f"{i}\n/tmp\n" for i in range(10)]
        assert len(emulator.calls("TaskExecStart")) == starts
        await backend.release(slot)


PROFILES = """\
default_profile: none
profiles:
  none:
    backend: local
    isolation: none
    slots_per_sandbox: 2
    min_sandboxes: 1
    max_sandboxes: 1
  bwrap:
    backend: local
    isolation: bwrap
    slots_per_sandbox: 2
    min_sandboxes: 0
    max_sandboxes: 1
  fresh:
    backend: local
    isolation: none
    shell: fresh
    slots_per_sandbox: 2
    min_sandboxes: 0
    max_sandboxes: 1
"""


@pytest.fixture
def profiles_file(tmp_path: Path) -> Iterator[Path]:
    with terminal_profiles(tmp_path / "profiles.yaml", PROFILES) as path:
        yield path


@pytest.mark.parametrize("profile", ["none", "bwrap"])
def test_terminal_tool_keeps_a_tasks_shell_until_cleanup(profiles_file: Path, profile: str) -> None:
    """A task's cd and exports carry over; output interleaves; cleanup_vm starts it afresh."""
    task = f"task-{profile}"
    assert run("mkdir -p src && cd src && export MODE=dev", task_id=task, profile=profile) == {
        "output": "",
        "exit_code": 0,
        "error": None,
    }
    reply = run('echo "$MODE"; ls /nonexistent; pwd', task_id=task)
    lines = reply["output"].splitlines()
    assert lines[0] == "dev"
    assert "nonexistent" in lines[1]  # stderr where it was written, before pwd's output
    assert lines[2].endswith("/src")
    fresh = run('echo "[${MODE-}]"', task_id=task, shell="fresh")
    assert fresh["output"] == "[]\n"
    cleanup_vm(task)
    assert run('echo "[${MODE-}]"', task_id=task, profile=profile)["output"] == "[]\n"
    cleanup_vm(task)


def test_terminal_tool_follows_the_profiles_shell_setting(profiles_file: Path) -> None:
    """A profile with `shell: fresh` keeps today's independent calls."""
    run("export MODE=dev", task_id="fresh-task", profile="fresh")
    assert run('echo "[${MODE-}]"', task_id="fresh-task")["output"] == "[]\n"
    assert run('echo "[${MODE-}]"', task_id="fresh-task", shell="persistent")["output"] == "[]\n"
    run("export MODE=dev", task_id="fresh-task", shell="persistent")
    assert run('echo "$MODE"', task_id="fresh-task", shell="persistent")["output"] == "dev\n"
    bad = run("true", task_id="fresh-task", shell="sticky")
    assert bad["exit_code"] is None
    assert "'shell' must be one of" in bad["error"]
    cleanup_vm("fresh-task")
