"""The modal driver on the real `modal` client, through the Modal API emulator.

The client and the emulator run on their own loops and threads, so these tests run on real time
(kept short); the create throttle, which is pure trio, is tested on the virtual clock.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing
from grpclib import Status

from hermes_actors._client import SandboxClient
from hermes_actors._config import SandboxConfig, load_profiles
from hermes_actors._errors import BackendUnavailable, SandboxLost, SandboxStartFailed
from hermes_actors.drivers import _modal_stream
from hermes_actors.drivers._modal import (
    TAG_APP,
    TAG_CREATE_ID,
    TAG_CREATED_AT,
    TAG_PROFILE,
    TAG_RUN,
    CreateThrottle,
    ModalDriver,
    ModalSandbox,
)
from hermes_actors.testing.modal_emulator import ModalEmulator

PROFILES_FILE = Path(__file__).parent.parent / "config" / "modal_profiles.yaml"
FAST_RETRIES = (0.05, 0.1, 0.2, 0.4, 0.8)


def _spec(**changes: object) -> SandboxConfig:
    return SandboxConfig(name="drv", backend="modal", slots_per_sandbox=2, **changes)  # type: ignore[arg-type]


@asynccontextmanager
async def _driver(**options: object) -> AsyncIterator[ModalDriver]:
    driver = ModalDriver(run_id=str(options.pop("run_id", "run-test")), **options)  # type: ignore[arg-type]
    try:
        yield driver
    finally:
        await driver.aclose()


@asynccontextmanager
async def _client(handle: ModalSandbox) -> AsyncIterator[SandboxClient]:
    async with trio.open_nursery() as nursery:
        client = SandboxClient(handle)
        await nursery.start(client.run)
        yield client
        nursery.cancel_scope.cancel()


def _running(emulator: ModalEmulator) -> list[str]:
    return [state.sandbox_id for state in emulator.sandboxes() if state.returncode is None]


# -- the create throttle (virtual clock) ----------------------------------------------------------


async def test_throttle_spaces_starts_and_caps_in_flight(autojump_clock: trio.abc.Clock) -> None:
    """Starts are 1/rate apart in arrival order, and no more than the cap run at once."""
    throttle = CreateThrottle(per_second=4.0, max_in_flight=2)
    started: list[tuple[int, float]] = []
    peak = 0

    async def create(index: int) -> None:
        nonlocal peak
        async with throttle.slot():
            started.append((index, trio.current_time()))
            peak = max(peak, throttle.in_flight)
            await trio.sleep(1.0)

    async with trio.open_nursery() as nursery:
        for index in range(4):
            nursery.start_soon(create, index)
            await trio.testing.wait_all_tasks_blocked()
    assert started == [(0, 0.0), (1, 0.25), (2, 1.0), (3, 1.25)]
    assert peak == 2
    assert throttle.in_flight == 0


async def test_throttle_penalty_delays_everyone(autojump_clock: trio.abc.Clock) -> None:
    """A rate-limit penalty pushes the next start back by its delay."""
    throttle = CreateThrottle(per_second=10.0, max_in_flight=8)
    async with throttle.slot():
        pass
    throttle.penalize(2.0)
    async with throttle.slot():
        assert trio.current_time() == 2.0


async def test_throttle_slows_down_on_refusals_and_recovers(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A refusal halves the pace (down to a floor); accepted creates bring it back step by step."""
    throttle = CreateThrottle(per_second=8.0, max_in_flight=8)
    throttle.penalize(0.0)
    assert throttle.current_per_second == 4.0
    starts = []
    for _ in range(3):
        async with throttle.slot():
            starts.append(trio.current_time())
    assert starts == [0.0, 0.25, 0.5]
    for _ in range(10):
        throttle.penalize(0.0)
    assert throttle.current_per_second == 0.5
    for _ in range(3):
        throttle.accepted()
    assert throttle.current_per_second == pytest.approx(0.5 + 3 * 0.16)
    for _ in range(100):
        throttle.accepted()
    assert throttle.current_per_second == 8.0


async def test_throttle_penalty_applies_to_creates_already_waiting(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Creates queued before a refusal start at the slower pace, after the penalty."""
    throttle = CreateThrottle(per_second=4.0, max_in_flight=8)
    starts: list[float] = []

    async def create() -> None:
        async with throttle.slot():
            starts.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(create)
        await trio.sleep(0.3)
        throttle.penalize(1.0)
    assert starts == [0.0, 0.25, 1.3, 1.8]


async def test_throttle_cancelled_waiter_gives_its_place_back(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A create cancelled while waiting for the throttle frees its place for the next one."""
    throttle = CreateThrottle(per_second=1.0, max_in_flight=1)
    async with throttle.slot():
        with trio.move_on_after(0.5):
            async with throttle.slot():
                pytest.fail("the cap of one create in flight was exceeded")
    assert throttle.in_flight == 0
    async with throttle.slot():
        assert trio.current_time() == 1.0


def test_throttle_rejects_nonsense() -> None:
    """A throttle needs a positive rate and room for at least one create."""
    with pytest.raises(ValueError, match="per_second"):
        CreateThrottle(per_second=0, max_in_flight=1)
    with pytest.raises(ValueError, match="max_in_flight"):
        CreateThrottle(per_second=1, max_in_flight=0)


# -- the exact Sandbox.create arguments of the shipped profiles ----------------------------------


async def test_default_profile_create_arguments(modal_emulator: ModalEmulator) -> None:
    """The default profile creates one sandbox with its resources, timeouts, network and tags."""
    profiles = load_profiles(PROFILES_FILE, env={"TERMINAL_ENV": "modal"})
    spec = profiles.profiles["default"]
    async with _driver(run_id="run-default") as driver:
        before = time.time()
        handle = await driver.create(spec)
        await handle.terminate()
    (create,) = modal_emulator.calls("SandboxCreateV2")
    fields = dict(create.fields)
    tags = dict(fields.pop("tags"))  # type: ignore[call-overload]
    create_id = tags.pop(TAG_CREATE_ID)
    created_at = int(tags.pop(TAG_CREATED_AT))
    assert fields == {
        "app_id": fields["app_id"],
        "name": None,
        "entrypoint_args": [],
        "image_id": fields["image_id"],
        "image_tag": "python:3.11",
        "cpu": 1.0,
        "cpu_limit": None,
        "memory_mb": 2048,
        "memory_limit_mb": None,
        "gpu": None,
        "timeout_secs": 3600,
        "idle_timeout_secs": 120,
        "workdir": "/data",
        "secret_ids": [],
        "env": {},
        "network": "open",
        "block_network": False,
        "outbound_cidr_allowlist": None,
        "outbound_domain_allowlist": None,
        "regions": [],
        "cloud": None,
        "pty": False,
    }
    assert tags == {TAG_APP: "hermes-actors", TAG_PROFILE: "default", TAG_RUN: "run-default"}
    assert len(create_id) == 16
    assert int(before) <= created_at <= time.time()
    (app_call,) = modal_emulator.calls("AppGetOrCreate")
    assert app_call.fields["app_name"] == "hermes-actors"
    assert app_call.fields["create_if_missing"] is True
    (agent_exec,) = modal_emulator.calls("TaskExecStart")
    assert agent_exec.fields["args"][:2] == ["python3", "-c"]
    assert agent_exec.fields["workdir"] == "/data"
    assert agent_exec.fields["env"] == {"HERMES_SANDBOX_ID": handle.sandbox_id}


async def test_gpu_profile_create_arguments(modal_emulator: ModalEmulator) -> None:
    """The gpu profile goes through Modal's gpu path with its gpu, secret, env and lifetime."""
    secret_id = modal_emulator.define_secret("huggingface", {"HF_TOKEN": "hf-test"})
    profiles = load_profiles(PROFILES_FILE, env={"TERMINAL_ENV": "modal"})
    spec = profiles.profiles["gpu"]
    async with _driver(run_id="run-gpu") as driver:
        handle = await driver.create(spec)
        await handle.terminate()
    assert modal_emulator.calls("SandboxCreateV2") == []
    (create,) = modal_emulator.calls("SandboxCreate")
    fields = dict(create.fields)
    tags = dict(fields.pop("tags"))  # type: ignore[call-overload]
    assert set(tags) == {TAG_APP, TAG_PROFILE, TAG_RUN, TAG_CREATED_AT, TAG_CREATE_ID}
    assert (tags[TAG_APP], tags[TAG_PROFILE], tags[TAG_RUN]) == ("hermes-actors", "gpu", "run-gpu")
    assert {key: fields[key] for key in fields if key not in ("app_id", "image_id")} == {
        "name": None,
        "entrypoint_args": [],
        "image_tag": "pytorch/pytorch:2.4.0-cuda12.1-cudnn9-runtime",
        "cpu": 4.0,
        "cpu_limit": None,
        "memory_mb": 16384,
        "memory_limit_mb": None,
        "gpu": "A10G",
        "timeout_secs": 7200,
        "idle_timeout_secs": 300,
        "workdir": "/data",
        "secret_ids": [secret_id],
        "env": {"HF_HOME": "/data/.cache/huggingface", "TOKENIZERS_PARALLELISM": "false"},
        "network": "open",
        "block_network": False,
        "outbound_cidr_allowlist": None,
        "outbound_domain_allowlist": None,
        "regions": [],
        "cloud": None,
        "pty": False,
    }


async def test_network_off_is_explicitly_blocked(modal_emulator: ModalEmulator) -> None:
    """A profile without network asks Modal to block it."""
    async with _driver() as driver:
        handle = await driver.create(_spec(network=False))
        await handle.terminate()
    (create,) = modal_emulator.calls("SandboxCreateV2")
    assert create.fields["block_network"] is True
    assert create.fields["network"] == "blocked"


async def test_provider_objects_are_looked_up_once(modal_emulator: ModalEmulator) -> None:
    """App, image and secrets are fetched once per driver, not once per sandbox."""
    modal_emulator.define_secret("token", {"TOKEN": "t"})
    async with _driver() as driver:
        first = await driver.create(_spec(secrets=("token",)))
        second = await driver.create(_spec(secrets=("token",)))
        await first.terminate()
        await second.terminate()
    counts = modal_emulator.call_counts()
    assert counts["AppGetOrCreate"] == 1
    assert counts["ImageGetOrCreate"] == 1
    assert counts["SecretGetOrCreate"] == 1
    assert counts["SandboxCreateV2"] == 2


# -- the stream and liveness ----------------------------------------------------------------------


async def test_commands_cost_one_stdin_write_each(modal_emulator: ModalEmulator) -> None:
    """After start, a command is a stdin write only: no exec, no extra stream, no poll."""
    async with _driver() as driver:
        handle = await driver.create(_spec())
        async with _client(handle) as client:
            await client.exec(0, command="true")
            before = modal_emulator.call_counts()
            for index in range(5):
                result = await client.exec(0, command=f"echo {index}")
                assert result.stdout == f"{index}\n".encode()
            after = modal_emulator.call_counts()
        await handle.terminate()
    delta = {key: after[key] - before.get(key, 0) for key in after if after[key] != before.get(key)}
    assert delta == {"TaskExecStdinWrite": 5}


async def test_provider_kill_is_detected_and_fails_pending_calls(
    modal_emulator: ModalEmulator,
) -> None:
    """A sandbox the provider kills ends the stream: pending calls fail with SandboxLost."""
    async with _driver() as driver:
        handle = await driver.create(_spec())
        async with _client(handle) as client:

            async def kill_soon() -> None:
                await trio.sleep(0.3)
                modal_emulator.kill_sandbox(handle.sandbox_id, "timeout")

            started = time.monotonic()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(kill_soon)
                with pytest.raises(SandboxLost) as lost:
                    await client.exec(0, command="sleep 30")
            assert lost.value.retryable
            with trio.fail_after(5):
                status = await handle.wait_exited()
            assert time.monotonic() - started < 5
        assert status == 124
        assert not handle.is_alive()
        await handle.terminate()
    assert _running(modal_emulator) == []


async def test_idle_gap_keeps_a_held_sandbox_alive(modal_emulator: ModalEmulator) -> None:
    """A sandbox with a 1 s idle_timeout survives a 2.5 s gap: its agent exec keeps it busy."""
    async with _driver() as driver:
        handle = await driver.create(_spec(idle_timeout=1.0))
        async with _client(handle) as client:
            await trio.sleep(2.5)
            assert handle.is_alive()
            result = await client.exec(0, command="echo awake")
            assert result.stdout == b"awake\n"
        await handle.terminate()


async def test_terminate_is_idempotent_and_bounded(modal_emulator: ModalEmulator) -> None:
    """terminate() twice ends the sandbox once, quickly, even from a cancelled scope."""
    async with _driver() as driver:
        handle = await driver.create(_spec())
        with trio.CancelScope() as scope:
            scope.cancel()
            await handle.terminate()
        await handle.terminate()
        assert not handle.is_alive()
        assert list(driver.live_sandboxes()) == []
    assert modal_emulator.call_counts()["SandboxTerminateV2"] == 1
    assert _running(modal_emulator) == []


async def test_aclose_terminates_leftover_sandboxes(modal_emulator: ModalEmulator) -> None:
    """Closing the driver terminates sandboxes still running and stops their threads."""
    driver = ModalDriver(run_id="run-close")
    handle = await driver.create(_spec())
    await driver.aclose()
    assert not handle.is_alive()
    assert _running(modal_emulator) == []
    with pytest.raises(BackendUnavailable, match="closed"):
        await driver.create(_spec())


# -- failures, retries, cancellation --------------------------------------------------------------


async def test_cancelled_create_leaves_no_sandbox(modal_emulator: ModalEmulator) -> None:
    """A create cancelled while the server is starting the sandbox terminates it anyway."""
    modal_emulator.set_slow_start(1.5)
    async with _driver() as driver:
        with trio.move_on_after(0.5) as scope:
            await driver.create(_spec())
        assert scope.cancelled_caught
        assert list(driver.live_sandboxes()) == []
    modal_emulator.clear_faults()
    await trio.sleep(1.5)
    states = modal_emulator.sandboxes()
    assert len(states) == 1
    assert states[0].returncode is not None
    assert states[0].live_pids == ()
    assert driver.swept == [states[0].sandbox_id]


async def test_rate_limited_creates_are_retried_without_duplicates(
    modal_emulator: ModalEmulator,
) -> None:
    """Creates refused by the provider's rate limit are retried until each one succeeds once."""
    modal_emulator.set_create_rate_limit(2)
    handles: list[ModalSandbox] = []
    async with _driver(creates_per_second=50.0, retry_delays_s=FAST_RETRIES * 3) as driver:

        async def create_one() -> None:
            handles.append(await driver.create(_spec()))

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(create_one)
        assert driver.create_retries > 0
        for handle in handles:
            await handle.terminate()
    assert len(handles) == 5
    assert len(modal_emulator.sandboxes()) == 5


async def test_transient_create_failures_are_survived(modal_emulator: ModalEmulator) -> None:
    """Unavailable/internal errors on create are retried; the attempt that works is the only one."""
    modal_emulator.fail_next_creates(2, Status.UNAVAILABLE)
    async with _driver(retry_delays_s=FAST_RETRIES) as driver:
        handle = await driver.create(_spec())
        async with _client(handle) as client:
            assert (await client.exec(0, command="echo ok")).stdout == b"ok\n"
        await handle.terminate()
    assert [state.sandbox_id for state in modal_emulator.sandboxes()] == [handle.sandbox_id]


async def test_rate_limit_that_persists_is_a_retryable_start_failure(
    modal_emulator: ModalEmulator,
) -> None:
    """When every retry is refused, the error is retryable and names the quota or rate limit."""
    modal_emulator.fail_next_creates(10, Status.RESOURCE_EXHAUSTED, "too many sandboxes")
    async with _driver(retry_delays_s=(0.05, 0.05)) as driver:
        with pytest.raises(SandboxStartFailed) as failed:
            await driver.create(_spec())
    assert failed.value.retryable
    assert "quota or rate limit" in str(failed.value)
    assert modal_emulator.call_counts()["SandboxCreateV2"] == 3


async def test_retries_stop_within_the_retry_budget(modal_emulator: ModalEmulator) -> None:
    """A create that keeps failing stops retrying before its budget ends, reporting the attempts."""
    modal_emulator.fail_next_creates(100, Status.RESOURCE_EXHAUSTED, "sandbox quota reached")
    async with _driver(
        creates_per_second=50.0, retry_delays_s=(0.2, 0.2, 0.2, 0.2, 0.2, 0.2)
    ) as driver:
        start = trio.current_time()
        with pytest.raises(SandboxStartFailed) as failed:
            await driver.create(_spec(create_retry_budget_s=0.5))
        spent = trio.current_time() - start
    # Attempts at about 0 s, 0.2 s and 0.4 s (2 on a slow machine); the next wait would end past
    # 0.5 s, so the driver stops there instead of running its six delays.
    attempts = failed.value.attempts
    assert 2 <= attempts <= 3
    assert modal_emulator.call_counts()["SandboxCreateV2"] == attempts
    assert failed.value.retryable
    assert "sandbox quota reached" in str(failed.value)
    assert f"gave up after {attempts} attempts" in str(failed.value)
    assert spent < 0.5 + 1.0  # the budget, plus the last refused attempt's own round trip


async def test_unknown_secret_is_named(modal_emulator: ModalEmulator) -> None:
    """A profile naming a secret Modal does not have fails for good, naming the secret."""
    async with _driver() as driver:
        with pytest.raises(SandboxStartFailed) as failed:
            await driver.create(_spec(secrets=("no-such-secret",)))
    assert not failed.value.retryable
    assert "'no-such-secret'" in str(failed.value)
    assert "modal secret create" in str(failed.value)
    assert "SandboxCreateV2" not in modal_emulator.call_counts()


async def test_image_pull_failure_names_the_image(modal_emulator: ModalEmulator) -> None:
    """An image that cannot be pulled fails for good, naming the image; nothing is left."""
    modal_emulator.add_failing_image("ghcr.io/nobody/missing:1")
    async with _driver() as driver:
        with pytest.raises(SandboxStartFailed) as failed:
            await driver.create(_spec(image="ghcr.io/nobody/missing:1"))
    assert not failed.value.retryable
    assert "'ghcr.io/nobody/missing:1'" in str(failed.value)
    assert _running(modal_emulator) == []


async def test_permanent_rejection_is_not_retried(modal_emulator: ModalEmulator) -> None:
    """An invalid request is reported once, not retried."""
    modal_emulator.fail_next_creates(1, Status.INVALID_ARGUMENT, "gpu type XYZ does not exist")
    async with _driver(retry_delays_s=FAST_RETRIES) as driver:
        with pytest.raises(SandboxStartFailed) as failed:
            await driver.create(_spec())
    assert not failed.value.retryable
    assert "gpu type XYZ" in str(failed.value)
    assert modal_emulator.call_counts()["SandboxCreateV2"] == 1


# -- the adapter and the environment --------------------------------------------------------------


async def test_thread_fallback_runs_blocking_calls(
    modal_emulator_session: ModalEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without `_future` support, calls run in a worker thread and return their result."""
    import modal

    monkeypatch.setattr(_modal_stream, "FUTURES_SUPPORTED", False)
    app = await _modal_stream.call_modal(modal.App.lookup, "fallback-app", create_if_missing=True)
    assert app.app_id.startswith("ap-")


def _run_script(script: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_missing_modal_says_how_to_install(tmp_path: Path) -> None:
    """Without the modal package, the driver says to pip install the extra."""
    blocker = tmp_path / "modal.py"
    blocker.write_text("raise ImportError('No module named modal')\n")
    script = """
        import sys, trio
        from hermes_actors.drivers._modal import ModalDriver
        from hermes_actors._config import SandboxConfig

        try:
            trio.run(ModalDriver(run_id="x").create, SandboxConfig(name="p", backend="modal"))
        except Exception as exc:
            print(type(exc).__name__, exc)
    """
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = _run_script(script, env)
    assert result.stdout.startswith("BackendUnavailable ")
    assert "pip install 'hermes-actors[modal]'" in result.stdout


def test_missing_credentials_say_modal_token_new(modal_emulator_session: ModalEmulator) -> None:
    """Without Modal credentials, the driver says to run `modal token new`."""
    script = """
        import trio
        from hermes_actors.drivers._modal import ModalDriver
        from hermes_actors._config import SandboxConfig

        try:
            trio.run(ModalDriver(run_id="x").create, SandboxConfig(name="p", backend="modal"))
        except Exception as exc:
            print(type(exc).__name__, exc)
    """
    env = {**os.environ, **modal_emulator_session.env}
    del env["MODAL_TOKEN_ID"], env["MODAL_TOKEN_SECRET"]
    result = _run_script(script, env)
    assert result.stdout.startswith("BackendUnavailable "), result.stdout + result.stderr
    assert "run `modal token new`" in result.stdout
    assert modal_emulator_session.calls("SandboxCreateV2") == []


def test_no_shutdown_noise_after_a_run(modal_emulator_session: ModalEmulator) -> None:
    """A program that used the driver exits without modal printing anything."""
    script = """
        import trio
        from hermes_actors.drivers._modal import ModalDriver
        from hermes_actors._config import SandboxConfig

        async def main():
            driver = ModalDriver(run_id="noise")
            config = SandboxConfig(name="p", backend="modal", slots_per_sandbox=1)
            handle = await driver.create(config)
            await handle.terminate()
            await driver.aclose()
            print("done")
        trio.run(main)
    """
    result = _run_script(script, {**os.environ, **modal_emulator_session.env})
    assert result.stdout == "done\n"
    assert result.stderr == ""


# -- orphans --------------------------------------------------------------------------------------


async def test_reap_stops_orphans_of_a_dead_run_and_spares_this_run(
    modal_emulator: ModalEmulator,
) -> None:
    """reap terminates the app's sandboxes left by another run; this run's and other apps'
    sandboxes keep running."""
    async with _driver(run_id="run-dead") as dead, _driver(run_id="run-alive") as alive:
        orphan = await dead.create(_spec(app_name="reap-app"))
        elsewhere = await dead.create(_spec(app_name="other-app"))
        mine = await alive.create(_spec(app_name="reap-app"))
        with trio.fail_after(10):
            reaped = await alive.reap("reap-app")
        assert [sandbox.sandbox_id for sandbox in reaped] == [orphan.sandbox_id]
        assert reaped[0].tags[TAG_RUN] == "run-dead"
        assert reaped[0].tags[TAG_APP] == "reap-app"
        assert sorted(_running(modal_emulator)) == sorted([elsewhere.sandbox_id, mine.sandbox_id])
        # The orphan's own handle sees it gone; this run's sandbox still serves.
        with trio.fail_after(5):
            assert await orphan.wait_exited() == 137
        async with _client(mine) as client:
            assert (await client.exec(0, command="echo spared")).stdout == b"spared\n"
        with trio.fail_after(10):
            assert await alive.reap("reap-app") == []
        await mine.terminate()
        await elsewhere.terminate()
        await orphan.terminate()
    assert _running(modal_emulator) == []


async def test_reap_spares_sandboxes_younger_than_min_age(modal_emulator: ModalEmulator) -> None:
    """With min_age_s, a recent sandbox of another run (perhaps a live one) is left alone."""
    async with _driver(run_id="run-other") as other, _driver(run_id="run-alive") as alive:
        recent = await other.create(_spec(app_name="reap-app"))
        with trio.fail_after(10):
            assert await alive.reap("reap-app", min_age_s=3600) == []
        assert _running(modal_emulator) == [recent.sandbox_id]
        with trio.fail_after(10):
            reaped = await alive.reap("reap-app")
        assert [sandbox.sandbox_id for sandbox in reaped] == [recent.sandbox_id]
        await recent.terminate()


async def test_reap_on_start_clears_the_app_before_the_first_create(
    modal_emulator: ModalEmulator,
) -> None:
    """A driver with reap_on_start reaps its app's orphans once, before its first sandbox."""
    async with _driver(run_id="run-crashed") as crashed:
        orphan = await crashed.create(_spec(app_name="reap-app"))
        async with _driver(run_id="run-next", reap_on_start=True) as fresh:
            first = await fresh.create(_spec(app_name="reap-app"))
            assert _running(modal_emulator) == [first.sandbox_id]
            listings = len(modal_emulator.calls("SandboxListV2"))
            assert listings >= 1
            second = await fresh.create(_spec(app_name="reap-app"))
            # Once per app: the second create lists nothing.
            assert len(modal_emulator.calls("SandboxListV2")) == listings
            assert sorted(_running(modal_emulator)) == sorted([first.sandbox_id, second.sandbox_id])
            await first.terminate()
            await second.terminate()
        await orphan.terminate()
