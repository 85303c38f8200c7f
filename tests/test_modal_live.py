"""Opt-in live tests against real Modal, and the same checks against the emulator.

The live test runs only when real Modal credentials (`MODAL_TOKEN_ID` and `MODAL_TOKEN_SECRET`)
were in the environment before the emulator plugin pointed the modal client at the emulator
(`conftest.REAL_MODAL_ENVIRONMENT`); otherwise it is skipped with the reason. Because the modal
client caches one client per process, the checks run in a subprocess (this file, run as a
script) given the real `MODAL_*` settings and none of the emulator's.

The checks: the `default` profile of `config/modal_profiles.yaml` on the modal backend starts a
sandbox, commands run through the agent, a file makes a round trip, the slot is released and
the backend stopped; a fork lands in a second sandbox through a directory snapshot and runs as
its slot's own user; then no sandbox of this run is left running in the app.

Running them against the emulator too keeps the script from rotting when no account is at hand.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROFILES_FILE = ROOT / "config" / "modal_profiles.yaml"
#: The app the live checks use (their sandboxes are also tagged with a fresh run id).
LIVE_APP = "hermes-actors-live-tests"
PASSED = "live checks passed"
#: Bound on one whole live run (image pull and sandbox start on a cold account included).
LIVE_TIMEOUT_S = 600


def has_credentials(environment: Mapping[str, str]) -> bool:
    """Whether `environment` holds Modal credentials (a token id and secret)."""
    return bool(environment.get("MODAL_TOKEN_ID")) and bool(environment.get("MODAL_TOKEN_SECRET"))


def checks_environment(modal_settings: Mapping[str, str]) -> dict[str, str]:
    """This process's environment with its `MODAL_*` settings replaced by `modal_settings`."""
    environment = {
        name: value for name, value in os.environ.items() if not name.startswith("MODAL_")
    }
    environment.update(modal_settings)
    return environment


def run_checks_in_subprocess(modal_settings: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, __file__],
        cwd=ROOT,
        env=checks_environment(modal_settings),
        capture_output=True,
        text=True,
        timeout=LIVE_TIMEOUT_S,
        check=False,
    )


# -- the checks (run in the subprocess) -----------------------------------------------------------


def live_checks() -> None:
    """Start the default profile on Modal, use it, stop it, and check nothing is left."""
    import attrs
    import modal
    import trio

    from hermes_actors import ToolBackend, load_profiles
    from hermes_actors.drivers._modal import TAG_RUN

    profiles = load_profiles(PROFILES_FILE, env={"TERMINAL_ENV": "modal"})
    config = attrs.evolve(
        profiles.profiles["default"], app_name=LIVE_APP, min_sandboxes=1, max_sandboxes=1
    )
    run_id = f"live-{secrets.token_hex(4)}"
    payload = "round trip: é ✓\n" * 100

    async def use_the_backend() -> None:
        async with ToolBackend(config, run_id=run_id) as backend:
            slot = await backend.acquire("live-trajectory")
            first, second, written, read = await backend.execute_batch(
                [
                    (slot, "bash", {"command": "echo hello from $(uname -s)"}),
                    (slot, "bash", {"command": "python3 -c 'print(6 * 7)'; pwd"}),
                    (slot, "write_file", {"path": "notes/data.txt", "content": payload}),
                    (slot, "read_file", {"path": "notes/data.txt"}),
                ]
            )
            assert first.success, first
            assert first.output == "hello from Linux\n", first.output
            assert second.success, second
            assert second.output.splitlines()[0] == "42", second.output
            assert written.success, written
            assert written.metadata["size"] == len(payload.encode()), written
            assert read.success, read
            assert read.output == payload
            await backend.release(slot)

    # One slot per sandbox: a fork lands in another sandbox, through a directory snapshot.
    spread = attrs.evolve(config, slots_per_sandbox=1, min_sandboxes=1, max_sandboxes=2)

    async def fork_across_sandboxes() -> None:
        async with ToolBackend(spread, run_id=run_id) as backend:
            source = await backend.acquire("live-source")
            [made] = await backend.execute_batch(
                [(source, "bash", {"command": "mkdir -p a/b && echo kept > a/b/f && cd a/b"})]
            )
            assert made.success, made
            [fork] = await backend.fork(source, 1)
            assert fork.sandbox_id != source.sandbox_id
            [seen] = await backend.execute_batch(
                [(fork, "bash", {"command": "cat f; whoami; ls -ld ~ | cut -c1-10"})]
            )
            assert seen.success, seen
            assert seen.output == "kept\nslot0\ndrwx------\n", seen.output
            for slot in (source, fork):
                await backend.release(slot)

    trio.run(use_the_backend)
    trio.run(fork_across_sandboxes)
    app = modal.App.lookup(LIVE_APP, create_if_missing=True)
    left = [
        sandbox.object_id
        for sandbox in modal.Sandbox.list(app_id=app.app_id, tags={TAG_RUN: run_id})
    ]
    assert left == [], f"sandboxes of run {run_id} still running: {left}"
    print(PASSED)


# -- the tests ------------------------------------------------------------------------------------

if __name__ != "__main__":
    import pytest

    from conftest import REAL_MODAL_ENVIRONMENT
    from hermes_actors.testing.modal_emulator import ModalEmulator

    @pytest.mark.skipif(
        not has_credentials(REAL_MODAL_ENVIRONMENT),
        reason="live Modal tests need real credentials: set MODAL_TOKEN_ID and "
        "MODAL_TOKEN_SECRET (see `modal token new`) before running pytest",
    )
    def test_live_default_profile_round_trip() -> None:
        """On real Modal, the default profile runs commands and files through the agent and
        leaves no sandbox behind."""
        completed = run_checks_in_subprocess(REAL_MODAL_ENVIRONMENT)
        assert completed.returncode == 0, completed.stdout + completed.stderr
        assert PASSED in completed.stdout

    def test_live_checks_pass_against_the_emulator(modal_emulator: ModalEmulator) -> None:
        """The live checks pass against the emulator, in a subprocess of their own."""
        completed = run_checks_in_subprocess(modal_emulator.env)
        assert completed.returncode == 0, completed.stdout + completed.stderr
        assert PASSED in completed.stdout
        creates = modal_emulator.calls("SandboxCreateV2")
        assert len(creates) == 3  # the round trip's sandbox, then the fork's source and target
        assert all(c.fields["tags"]["hermes-app"] == LIVE_APP for c in creates)  # type: ignore[index]
        assert len(modal_emulator.calls("TaskSnapshotDirectory")) == 1
        assert all(state.returncode is not None for state in modal_emulator.sandboxes())

    def test_credentials_come_from_the_captured_environment() -> None:
        """Only a token id and secret together count as credentials; the emulator's are not
        captured."""
        assert not has_credentials({})
        assert not has_credentials({"MODAL_TOKEN_ID": "ak-1"})
        assert not has_credentials({"MODAL_TOKEN_ID": "ak-1", "MODAL_TOKEN_SECRET": ""})
        assert has_credentials({"MODAL_TOKEN_ID": "ak-1", "MODAL_TOKEN_SECRET": "as-1"})
        assert REAL_MODAL_ENVIRONMENT.get("MODAL_TOKEN_ID") != "ak-modal-emulator"
        environment = checks_environment({"MODAL_TOKEN_ID": "ak-1"})
        assert {name for name in environment if name.startswith("MODAL_")} == {"MODAL_TOKEN_ID"}


if __name__ == "__main__":
    live_checks()
