"""The Modal emulator, driven by the real `modal` client (1.6.4) exactly as a driver would.

These are tests of the test support, not of hermes: each one talks to the session emulator
through the blocking modal API from the test's own thread. Lifetimes are real seconds (the
client and the emulator run on their own loops, so trio's autojump clock cannot drive them);
they are kept to one or two seconds.
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

modal = pytest.importorskip(
    "modal", reason="the emulator is exercised through the real modal client"
)

from grpclib import GRPCError, Status  # noqa: E402
from grpclib.client import Channel  # noqa: E402
from modal_proto import api_pb2  # noqa: E402
from modal_proto import task_command_router_pb2 as sr_pb2  # noqa: E402
from modal_proto.api_grpc import ModalClientStub  # noqa: E402
from modal_proto.task_command_router_grpc import TaskCommandRouterStub  # noqa: E402

from hermes_actors.testing.modal_emulator import ModalEmulator  # noqa: E402

IMAGE_TAG = "python:3.11-slim"
ROUND_TRIPS = 200


@pytest.fixture
def app(modal_emulator: ModalEmulator) -> modal.App:
    return modal.App.lookup("emulator-tests", create_if_missing=True)


@pytest.fixture
def sandbox(app: modal.App) -> Iterator[modal.Sandbox]:
    created = modal.Sandbox.create(
        app=app, image=modal.Image.from_registry(IMAGE_TAG), cpu=1.0, memory=512, timeout=60
    )
    yield created
    created.terminate()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def test_exec_echo_streams_stdout(modal_emulator: ModalEmulator, sandbox: modal.Sandbox) -> None:
    """An exec's stdout reaches the client and its exit code is reported by wait."""
    process = sandbox.exec("sh", "-c", "echo hello; echo oops >&2; exit 3")

    assert process.stdout.read() == "hello\n"
    assert process.stderr.read() == "oops\n"
    assert process.wait() == 3
    methods = [call.method for call in modal_emulator.calls()]
    for expected in ("AppGetOrCreate", "ImageGetOrCreate", "SandboxCreateV2", "TaskExecStart"):
        assert expected in methods


def test_exec_of_a_missing_program_exits_127(sandbox: modal.Sandbox) -> None:
    """An exec whose program does not exist exits 127 with a message on stderr."""
    process = sandbox.exec("/no/such/program")

    assert process.wait() == 127
    assert "No such file" in process.stderr.read()


def test_cat_echoes_one_megabyte_of_binary_stdin(sandbox: modal.Sandbox) -> None:
    """1 MiB of arbitrary bytes written to stdin comes back from `cat` byte for byte."""
    payload = os.urandom(1024 * 1024)
    process = sandbox.exec("cat", text=False)

    process.stdin.write(payload)
    process.stdin.write_eof()
    process.stdin.drain()

    assert process.stdout.read() == payload
    assert process.wait() == 0


def test_long_lived_exec_round_trips_frames_in_order(
    modal_emulator: ModalEmulator, sandbox: modal.Sandbox
) -> None:
    """Many small stdin writes each get their reply on stdout, in order, through one exec."""
    echo_loop = (
        "import sys\n"
        "for line in sys.stdin.buffer:\n"
        "    sys.stdout.buffer.write(b'ack ' + line)\n"
        "    sys.stdout.buffer.flush()\n"
    )
    process = sandbox.exec("python3", "-u", "-c", echo_loop, text=False)
    replies = iter(process.stdout)
    pending = b""

    def round_trip(frame: bytes) -> bytes:
        nonlocal pending
        process.stdin.write(frame)
        process.stdin.drain()
        while b"\n" not in pending:
            pending += next(replies)
        line, pending = pending.split(b"\n", 1)
        return line + b"\n"

    # The first frame also opens the stdout stream: it is not counted.
    assert round_trip(b"warm up\n") == b"ack warm up\n"
    counts_before = modal_emulator.call_counts()
    latencies = []
    for index in range(ROUND_TRIPS):
        frame = f"frame {index}\n".encode()
        started = time.perf_counter()
        reply = round_trip(frame)
        latencies.append(time.perf_counter() - started)
        assert reply == b"ack " + frame

    counts_after = modal_emulator.call_counts()
    process.stdin.write_eof()
    process.stdin.drain()
    assert process.wait() == 0
    rpcs = {
        method: counts_after[method] - counts_before.get(method, 0)
        for method in counts_after
        if counts_after[method] != counts_before.get(method, 0)
    }
    # One stdin write per frame; replies ride the one long-lived stdout stream.
    assert rpcs == {"TaskExecStdinWrite": ROUND_TRIPS}
    median_ms = statistics.median(latencies) * 1000
    p95_ms = sorted(latencies)[int(len(latencies) * 0.95)] * 1000
    print(
        f"\nmodal emulator round trip (write+drain, read reply) over {ROUND_TRIPS} frames: "
        f"median {median_ms:.2f} ms, p95 {p95_ms:.2f} ms; RPCs per round trip: "
        f"{ {method: count / ROUND_TRIPS for method, count in rpcs.items()} }"
    )


def test_terminate_kills_the_whole_process_tree(
    modal_emulator: ModalEmulator, sandbox: modal.Sandbox
) -> None:
    """Terminate kills every process of the sandbox, setsid escapees included, and reports 137."""
    process = sandbox.exec("sh", "-c", "sleep 300 & setsid sleep 300 & nohup sleep 300 & wait")
    deadline = time.monotonic() + 5
    while len(pids := modal_emulator.live_pids()) < 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(pids) >= 4

    sandbox.terminate()
    sandbox.wait(raise_on_termination=False)

    assert sandbox.returncode == 137
    assert process.wait() == 137
    assert not [pid for pid in pids if _alive(pid)]
    with pytest.raises(modal.exception.SandboxTerminatedError):
        sandbox.wait()


_WATCHER = """
import os, select, sys
poller = select.poll()
for pid in sys.argv[2:]:
    poller.register(os.pidfd_open(int(pid)), select.POLLIN)
open(sys.argv[1] + ".ready", "w").close()
poller.poll()
os.close(os.open(sys.argv[1], os.O_CREAT | os.O_WRONLY))
"""
_SLEEPS = 300
_WATCHERS = 3


def test_no_process_of_a_killed_sandbox_sees_another_die(
    modal_emulator: ModalEmulator, sandbox: modal.Sandbox, tmp_path: Path
) -> None:
    """A provider kill freezes the sandbox first: no process of it runs while its siblings die."""
    sandbox.exec("sh", "-c", f"for i in $(seq {_SLEEPS}); do sleep 300 & done; wait")
    deadline = time.monotonic() + 10
    while len(sleeps := modal_emulator.live_pids()) <= _SLEEPS and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(sleeps) > _SLEEPS
    # The watchers start last, so the killer (in pid order) reaches them last; each wakes up as
    # soon as any process it watches dies, and leaves a file behind.
    witnesses = [tmp_path / f"witness-{n}" for n in range(_WATCHERS)]
    for witness in witnesses:
        sandbox.exec("python3", "-c", _WATCHER, str(witness), *map(str, sleeps))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not all(
        Path(f"{witness}.ready").exists() for witness in witnesses
    ):
        time.sleep(0.02)
    assert all(Path(f"{witness}.ready").exists() for witness in witnesses)

    modal_emulator.kill_sandbox(sandbox.object_id)
    sandbox.wait(raise_on_termination=False)

    assert sandbox.returncode == 137
    assert [witness.name for witness in witnesses if witness.exists()] == []
    assert not [pid for pid in sleeps if _alive(pid)]


def test_named_secret_and_env_reach_execs(modal_emulator: ModalEmulator, app: modal.App) -> None:
    """A secret defined on the emulator and the create's env are in the sandbox's environment."""
    secret_id = modal_emulator.define_secret("api-keys", {"API_KEY": "s3cret"})
    created = modal.Sandbox.create(
        app=app,
        image=modal.Image.from_registry(IMAGE_TAG),
        secrets=[modal.Secret.from_name("api-keys")],
        env={"MODE": "test"},
        timeout=60,
    )
    try:
        process = created.exec("sh", "-c", 'echo "$API_KEY $MODE"')
        assert process.stdout.read() == "s3cret test\n"
    finally:
        created.terminate()
    create = modal_emulator.calls("SandboxCreateV2")[-1]
    assert create.fields["secret_ids"] == [secret_id]
    assert create.fields["env"] == {"MODE": "test"}


def test_unknown_secret_raises_not_found(modal_emulator: ModalEmulator, app: modal.App) -> None:
    """A secret name the emulator does not know fails the create with NotFoundError."""
    with pytest.raises(modal.exception.NotFoundError, match="no-such-secret"):
        modal.Sandbox.create(
            app=app,
            image=modal.Image.from_registry(IMAGE_TAG),
            secrets=[modal.Secret.from_name("no-such-secret")],
        )
    assert modal_emulator.sandboxes() == []


def test_gpu_sandbox_takes_the_v1_path(modal_emulator: ModalEmulator, app: modal.App) -> None:
    """A gpu= sandbox is created, exec'd and terminated through the V1 calls."""
    created = modal.Sandbox.create(
        app=app, image=modal.Image.from_registry(IMAGE_TAG), gpu="A10G", env={"X": "1"}, timeout=60
    )
    process = created.exec("sh", "-c", "echo gpu $X")
    assert process.stdout.read() == "gpu 1\n"
    created.terminate()
    created.wait(raise_on_termination=False)

    assert created.returncode == 137
    methods = [call.method for call in modal_emulator.calls()]
    for expected in ("SandboxCreate", "SandboxGetTaskId", "TaskGetCommandRouterAccess"):
        assert expected in methods
    assert "SandboxTerminate" in methods
    assert "SandboxCreateV2" not in methods
    create = modal_emulator.calls("SandboxCreate")[-1]
    assert create.fields["gpu"] == "A10G"
    assert create.fields["env"] == {"X": "1"}


def test_tags_filter_the_sandbox_list(app: modal.App) -> None:
    """Tags set at create or later are returned by get_tags and filter Sandbox.list."""
    image = modal.Image.from_registry(IMAGE_TAG)
    first = modal.Sandbox.create(app=app, image=image, tags={"pool": "a"}, timeout=60)
    second = modal.Sandbox.create(app=app, image=image, tags={"pool": "b"}, timeout=60)
    try:
        assert first.get_tags() == {"pool": "a"}
        second.set_tags({"pool": "a", "slot": "2"})
        assert second.get_tags() == {"pool": "a", "slot": "2"}

        listed = {sb.object_id for sb in modal.Sandbox.list(app_id=app.app_id, tags={"pool": "a"})}
        assert listed == {first.object_id, second.object_id}
        only_second = modal.Sandbox.list(app_id=app.app_id, tags={"slot": "2"})
        assert [sb.object_id for sb in only_second] == [second.object_id]

        first.terminate()
        first.wait(raise_on_termination=False)
        listed = {sb.object_id for sb in modal.Sandbox.list(app_id=app.app_id, tags={"pool": "a"})}
        assert listed == {second.object_id}
    finally:
        first.terminate()
        second.terminate()


def test_from_id_reattaches_to_a_running_sandbox(sandbox: modal.Sandbox) -> None:
    """Sandbox.from_id finds a running sandbox and can exec in it."""
    again = modal.Sandbox.from_id(sandbox.object_id)

    assert again.poll() is None
    assert again.exec("echo", "again").stdout.read() == "again\n"
    with pytest.raises(modal.exception.NotFoundError):
        modal.Sandbox.from_id("sb-doesnotexist000000000000")


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (Status.RESOURCE_EXHAUSTED, "ResourceExhaustedError"),
        (Status.INVALID_ARGUMENT, "InvalidError"),
        (Status.PERMISSION_DENIED, "PermissionDeniedError"),
    ],
)
def test_injected_create_failure_surfaces_as_its_modal_exception(
    modal_emulator: ModalEmulator, app: modal.App, status: Status, error: str
) -> None:
    """The next create fails with the injected status mapped to its modal.exception type."""
    image = modal.Image.from_registry(IMAGE_TAG)
    modal_emulator.fail_next_creates(1, status, "injected")

    with pytest.raises(getattr(modal.exception, error), match="injected"):
        modal.Sandbox.create(app=app, image=image)
    created = modal.Sandbox.create(app=app, image=image)
    created.terminate()
    assert len(modal_emulator.sandboxes()) == 1


def test_transient_create_failures_are_retried_then_surface(
    modal_emulator: ModalEmulator, app: modal.App
) -> None:
    """One UNAVAILABLE create is retried by the client; four in a row raise ServiceError."""
    image = modal.Image.from_registry(IMAGE_TAG)
    modal_emulator.fail_next_creates(1, Status.UNAVAILABLE)
    created = modal.Sandbox.create(app=app, image=image)
    created.terminate()
    assert modal_emulator.call_counts()["SandboxCreateV2"] == 2

    modal_emulator.fail_next_creates(4, Status.UNAVAILABLE)
    with pytest.raises(modal.exception.ServiceError):
        modal.Sandbox.create(app=app, image=image)
    assert len(modal_emulator.sandboxes()) == 1


def test_create_rate_limit_rejects_the_excess(
    modal_emulator: ModalEmulator, app: modal.App
) -> None:
    """Creates beyond the per-second limit fail with ResourceExhaustedError."""
    image = modal.Image.from_registry(IMAGE_TAG)
    modal_emulator.set_create_rate_limit(2)
    created = [modal.Sandbox.create(app=app, image=image) for _ in range(2)]
    try:
        with pytest.raises(modal.exception.ResourceExhaustedError, match="rate limit"):
            modal.Sandbox.create(app=app, image=image)
    finally:
        for each in created:
            each.terminate()


def test_lifetime_timeout_ends_the_sandbox_with_124(
    modal_emulator: ModalEmulator, app: modal.App
) -> None:
    """A sandbox past its timeout is killed, wait raises SandboxTimeoutError, returncode is 124."""
    created = modal.Sandbox.create(app=app, image=modal.Image.from_registry(IMAGE_TAG), timeout=1)
    process = created.exec("sleep", "300")
    started = time.monotonic()

    with pytest.raises(modal.exception.SandboxTimeoutError):
        created.wait()

    assert 0.9 <= time.monotonic() - started < 5
    assert created.returncode == 124
    assert process.wait() == 137
    assert modal_emulator.live_pids() == []


def test_idle_timeout_waits_for_running_execs(app: modal.App) -> None:
    """idle_timeout counts from the end of the last exec, not while one runs."""
    created = modal.Sandbox.create(
        app=app, image=modal.Image.from_registry(IMAGE_TAG), timeout=60, idle_timeout=1
    )
    started = time.monotonic()
    process = created.exec("sleep", "1.5")
    time.sleep(1.2)
    assert created.poll() is None

    assert process.wait() == 0
    with pytest.raises(modal.exception.SandboxTimeoutError):
        created.wait()
    assert time.monotonic() - started >= 2.4
    assert created.returncode == 124


def test_provider_kill_reports_the_reason(modal_emulator: ModalEmulator, app: modal.App) -> None:
    """A provider-side kill ends the sandbox with the code of its reason."""
    image = modal.Image.from_registry(IMAGE_TAG)
    expected = {"timeout": 124, "idle_timeout": 124, "terminated": 137}
    for reason, returncode in expected.items():
        created = modal.Sandbox.create(app=app, image=image, timeout=60)
        modal_emulator.kill_sandbox(created.object_id, reason)  # type: ignore[arg-type]
        error = (
            modal.exception.SandboxTerminatedError
            if reason == "terminated"
            else modal.exception.SandboxTimeoutError
        )
        with pytest.raises(error):
            created.wait()
        assert created.returncode == returncode
        (state,) = [
            each for each in modal_emulator.sandboxes() if each.sandbox_id == created.object_id
        ]
        assert state.returncode == returncode
        assert state.live_pids == ()


def test_call_log_shows_the_create_arguments(modal_emulator: ModalEmulator, app: modal.App) -> None:
    """The call log records the full create definition: resources, lifetimes, network, tags."""
    created = modal.Sandbox.create(
        "sleep",
        "300",
        app=app,
        image=modal.Image.from_registry(IMAGE_TAG),
        cpu=(2.0, 4.0),
        memory=2048,
        timeout=120,
        idle_timeout=30,
        workdir="/workspace",
        env={"A": "1"},
        tags={"profile": "default"},
        outbound_cidr_allowlist=["10.0.0.0/8"],
    )
    created.terminate()

    fields = modal_emulator.calls("SandboxCreateV2")[-1].fields
    assert fields["app_id"] == app.app_id
    assert fields["entrypoint_args"] == ["sleep", "300"]
    assert fields["image_tag"] == IMAGE_TAG
    assert (fields["cpu"], fields["cpu_limit"], fields["memory_mb"]) == (2.0, 4.0, 2048)
    assert fields["gpu"] is None
    assert (fields["timeout_secs"], fields["idle_timeout_secs"]) == (120, 30)
    assert fields["workdir"] == "/workspace"
    assert fields["env"] == {"A": "1"}
    assert fields["tags"] == {"profile": "default"}
    assert fields["network"] == "allowlist"
    assert fields["outbound_cidr_allowlist"] == ["10.0.0.0/8"]
    assert fields["block_network"] is False


def test_workdir_is_mapped_under_the_sandbox_root(
    modal_emulator: ModalEmulator, app: modal.App
) -> None:
    """A workdir such as /data becomes <sandbox root>/data, never a host path."""
    created = modal.Sandbox.create(
        app=app, image=modal.Image.from_registry(IMAGE_TAG), workdir="/data", timeout=60
    )
    try:
        (state,) = modal_emulator.sandboxes()
        assert created.exec("pwd").stdout.read() == f"{state.root / 'data'}\n"
        assert created.exec("pwd", workdir="/tmp/x").stdout.read() == f"{state.root / 'tmp/x'}\n"
    finally:
        created.terminate()


def test_failing_image_fails_the_create(modal_emulator: ModalEmulator, app: modal.App) -> None:
    """An image named as failing fails like a registry pull failure, and no sandbox starts."""
    modal_emulator.add_failing_image("registry.example/missing:1")

    with pytest.raises(
        modal.exception.Error, match=r"Failed to pull image registry\.example/missing:1"
    ):
        modal.Sandbox.create(app=app, image=modal.Image.from_registry("registry.example/missing:1"))
    assert modal_emulator.sandboxes() == []


def test_unimplemented_calls_answer_unimplemented(
    modal_emulator: ModalEmulator, sandbox: modal.Sandbox
) -> None:
    """An RPC the emulator lacks answers UNIMPLEMENTED at once instead of being retried."""
    with pytest.raises(modal.exception.UnimplementedError, match="SandboxGetTunnelsV2"):
        sandbox.tunnels()
    assert modal_emulator.call_counts()["SandboxGetTunnelsV2"] == 1


def test_stdio_read_resumes_at_the_requested_offset(
    modal_emulator: ModalEmulator, sandbox: modal.Sandbox
) -> None:
    """Stdio reads start at the offset asked for; a retried stdin write applies once."""
    process = sandbox.exec("cat")
    start = modal_emulator.calls("TaskExecStart")[-1].fields
    task_id, exec_id = str(start["task_id"]), str(start["exec_id"])
    port = int(modal_emulator.url.rsplit(":", 1)[1])

    async def talk() -> bytes:
        channel = Channel("127.0.0.1", port)
        try:
            router = TaskCommandRouterStub(channel)
            auth = {"authorization": "Bearer test"}
            for _ in range(2):  # the same write twice, as a client retry would send it
                await router.TaskExecStdinWrite(
                    sr_pb2.TaskExecStdinWriteRequest(
                        task_id=task_id, exec_id=exec_id, offset=0, data=b"0123456789", eof=False
                    ),
                    metadata=auth,
                )
            await router.TaskExecStdinWrite(
                sr_pb2.TaskExecStdinWriteRequest(
                    task_id=task_id, exec_id=exec_id, offset=10, data=b"", eof=True
                ),
                metadata=auth,
            )
            replies = await router.TaskExecStdioRead(
                sr_pb2.TaskExecStdioReadRequest(
                    task_id=task_id,
                    exec_id=exec_id,
                    offset=4,
                    file_descriptor=sr_pb2.TASK_EXEC_STDIO_FILE_DESCRIPTOR_STDOUT,
                ),
                metadata=auth,
            )
            return b"".join(reply.data for reply in replies)
        finally:
            channel.close()

    assert asyncio.run(talk()) == b"456789"
    assert process.wait() == 0


def test_stop_leaves_no_thread_socket_process_or_directory() -> None:
    """Stopping an emulator kills its sandboxes and frees its thread, port and temp directory."""
    threads_before = set(threading.enumerate())
    emulator = ModalEmulator().start()
    port = int(emulator.url.rsplit(":", 1)[1])

    async def create_sandbox() -> None:
        channel = Channel("127.0.0.1", port)
        try:
            stub = ModalClientStub(channel)
            app = await stub.AppGetOrCreate(
                api_pb2.AppGetOrCreateRequest(
                    app_name="stop-test",
                    object_creation_type=api_pb2.OBJECT_CREATION_TYPE_CREATE_IF_MISSING,
                )
            )
            image = await stub.ImageGetOrCreate(
                api_pb2.ImageGetOrCreateRequest(
                    image=api_pb2.Image(dockerfile_commands=[f"FROM {IMAGE_TAG}"])
                )
            )
            assert app is not None
            assert image is not None
            await stub.SandboxCreateV2(
                api_pb2.SandboxCreateV2Request(
                    app_id=app.app_id,
                    definition=api_pb2.Sandbox(
                        entrypoint_args=["sh", "-c", "setsid sleep 300 & sleep 300"],
                        image_id=image.image_id,
                        timeout_secs=60,
                    ),
                )
            )
        finally:
            channel.close()

    try:
        asyncio.run(create_sandbox())
        deadline = time.monotonic() + 5
        while len(pids := emulator.live_pids()) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(pids) >= 3
        (state,) = emulator.sandboxes()
    finally:
        emulator.stop()

    assert not [pid for pid in pids if _alive(pid)]
    assert not state.root.parent.exists()
    assert set(threading.enumerate()) <= threads_before
    with socket.socket() as probe, pytest.raises(ConnectionRefusedError):
        probe.connect(("127.0.0.1", port))
    emulator.stop()  # idempotent


def test_sandbox_processes_are_in_their_own_sessions(sandbox: modal.Sandbox) -> None:
    """Each exec runs in a session of its own, so a signal to the test's group cannot reach it."""
    process = sandbox.exec("python3", "-c", "import os; print(os.getsid(0), os.getpid())")
    session, pid = map(int, process.stdout.read().split())

    assert session == pid != os.getsid(0)
    assert process.wait() == 0


def test_entrypoint_stdio_and_exit_code_reach_the_client(app: modal.App) -> None:
    """The create command's stdin, stdout and exit code go through the sandbox's own streams."""
    created = modal.Sandbox.create(
        "sh",
        "-c",
        "read line; echo got $line; echo err >&2; exit 5",
        app=app,
        image=modal.Image.from_registry(IMAGE_TAG),
        timeout=60,
    )
    created.stdin.write(b"ping\n")
    created.stdin.drain()

    assert created.stdout.read() == "got ping\n"
    assert created.stderr.read() == "err\n"
    created.wait()
    assert created.returncode == 5


def test_latency_and_slow_start_delay_the_client(
    modal_emulator: ModalEmulator, app: modal.App
) -> None:
    """Injected per-RPC latency and slow start show up in the client's call times."""
    image = modal.Image.from_registry(IMAGE_TAG)
    modal_emulator.set_slow_start(0.5)
    started = time.monotonic()
    created = modal.Sandbox.create(app=app, image=image, timeout=60)
    assert time.monotonic() - started >= 0.5
    try:
        modal_emulator.set_latency(0.05)
        started = time.monotonic()
        assert created.poll() is None
        assert time.monotonic() - started >= 0.05
    finally:
        modal_emulator.clear_faults()
        created.terminate()


async def test_blocking_calls_from_trio_worker_threads_run_concurrently(
    sandbox: modal.Sandbox,
) -> None:
    """Execs driven from trio worker threads overlap instead of queueing behind each other."""
    results: list[int] = []

    def run_one() -> None:
        results.append(sandbox.exec("sleep", "0.5").wait())

    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(trio.to_thread.run_sync, run_one)

    assert results == [0] * 5
    assert time.monotonic() - started < 2.0


def test_terminate_with_a_running_exec_and_an_idle_timeout_returns_promptly(
    modal_emulator: ModalEmulator, app: modal.App
) -> None:
    """Terminate answers at once while an exec runs on a sandbox with an idle_timeout."""
    created = modal.Sandbox.create(
        app=app, image=modal.Image.from_registry(IMAGE_TAG), timeout=60, idle_timeout=30
    )
    process = created.exec("sh", "-c", "read line; echo $line")
    reader = threading.Thread(target=lambda: process.stdout.read(), daemon=True)
    reader.start()
    time.sleep(0.2)

    terminating = created.terminate(_future=True)
    terminating.result(timeout=5)

    assert created.wait(raise_on_termination=False) is None or created.returncode == 137
    assert created.returncode == 137
    reader.join(timeout=5)
    assert not reader.is_alive()
    assert modal_emulator.internal_errors() == []


def test_a_client_leaving_before_its_reply_is_not_an_emulator_bug(tmp_path: Path) -> None:
    """A handler whose client reset the stream (a given-up long poll) records no error."""
    import h2.exceptions

    from hermes_actors.testing._emulator_service import EmulatorService

    service = EmulatorService(root=tmp_path, secrets={}, failing_images=())

    async def replies_too_late(stream: object) -> None:
        raise h2.exceptions.StreamClosedError(1)

    async def buggy(stream: object) -> None:
        raise KeyError("bug")

    async def serve(handler: object) -> None:
        await service._serve("ModalClient", "SandboxWaitV2", handler, None)  # type: ignore[arg-type]

    asyncio.run(serve(replies_too_late))
    assert service.internal_errors() == []
    assert service.call_counts() == {"SandboxWaitV2": 1}
    # A real bug is still reported (the contrast that shows the check can fail).
    with pytest.raises(GRPCError):
        asyncio.run(serve(buggy))
    assert service.internal_errors() == ["SandboxWaitV2: KeyError('bug')"]


def test_terminate_kills_processes_that_dropped_the_sandbox_environment(
    modal_emulator: ModalEmulator, sandbox: modal.Sandbox
) -> None:
    """Children that cleared their environment (no marker) or left the session die too."""
    process = sandbox.exec(
        "sh",
        "-c",
        "env -i sleep 301 & env -i setsid sleep 302 & env MODAL_TASK_ID=other sleep 303 & "
        # each is named sleep once `env` has exec'd it: wait for all three, then list them
        "until [ $(pgrep -c -P $$ -x sleep) -ge 3 ]; do sleep 0.01; done; "
        "echo $(pgrep -P $$ -d ' ' -x sleep); wait",
    )
    line = ""
    for chunk in process.stdout:
        line += chunk
        if line.endswith("\n"):
            break
    pids = [int(pid) for pid in line.split()]
    assert len(pids) == 3
    assert all(_alive(pid) for pid in pids)
    assert set(pids) <= set(modal_emulator.live_pids())

    sandbox.terminate()
    sandbox.wait(raise_on_termination=False)

    assert not [pid for pid in pids if _alive(pid)]


def test_exec_timeout_kills_only_its_direct_process(
    modal_emulator: ModalEmulator, sandbox: modal.Sandbox
) -> None:
    """An exec's own timeout kills its direct process after that long; its children survive
    until the sandbox ends."""
    started = time.monotonic()
    process = sandbox.exec("sh", "-c", "sleep 300 & echo $!; exec sleep 300", timeout=1)
    line = ""
    for chunk in process.stdout:
        line += chunk
        if line.endswith("\n"):
            break
    child = int(line)

    assert process.wait() != 0
    assert 1.0 <= time.monotonic() - started < 5.0
    assert _alive(child)
    quick = sandbox.exec("true", timeout=1)
    assert quick.wait() == 0

    sandbox.terminate()
    sandbox.wait(raise_on_termination=False)
    assert not _alive(child)


def test_directory_snapshot_mounts_into_another_sandbox(
    modal_emulator: ModalEmulator, app: modal.App, sandbox: modal.Sandbox
) -> None:
    """snapshot_directory makes an image of a directory; mount_image shows it in another
    sandbox in place of what was there, and unmount_image puts that back."""
    # Relative paths: an emulated sandbox's processes see the host's absolute paths.
    sandbox.exec("sh", "-c", "mkdir -p work/d && echo hi > work/d/f", workdir="/").wait()
    image = sandbox.snapshot_directory("/work/d", ttl=120)
    other = modal.Sandbox.create(app=app, image=modal.Image.from_registry(IMAGE_TAG), timeout=60)
    try:
        other.exec("sh", "-c", "mkdir -p data/m && echo old > data/m/g", workdir="/").wait()
        other.mount_image("/data/m", image)
        listing = other.exec("sh", "-c", "cat data/m/f; ls data/m", workdir="/")
        assert listing.stdout.read() == "hi\nf\n"
        (state,) = [s for s in modal_emulator.sandboxes() if s.sandbox_id == other.object_id]
        assert state.mounts == ("data/m",)
        other.unmount_image("/data/m")
        assert other.exec("cat", "data/m/g", workdir="/").stdout.read() == "old\n"
    finally:
        other.terminate()
    assert modal_emulator.snapshot_images() == [image.object_id]
    [call] = modal_emulator.calls("TaskSnapshotDirectory")
    assert (call.fields["path"], call.fields["ttl_seconds"]) == ("/work/d", 120)


def test_filesystem_snapshot_seeds_a_new_sandbox(app: modal.App, sandbox: modal.Sandbox) -> None:
    """A sandbox created from snapshot_filesystem's image starts with the snapshot's files."""
    sandbox.exec("sh", "-c", "mkdir -p opt2 && echo kept > opt2/f", workdir="/").wait()
    image = sandbox.snapshot_filesystem()
    copy = modal.Sandbox.create(app=app, image=image, timeout=60)
    try:
        assert copy.exec("cat", "opt2/f", workdir="/").stdout.read() == "kept\n"
    finally:
        copy.terminate()


def test_injected_call_failures_reach_the_client(
    modal_emulator: ModalEmulator, sandbox: modal.Sandbox
) -> None:
    """fail_next_calls makes the next calls of one RPC fail with the given status, logged."""
    modal_emulator.fail_next_calls("TaskSnapshotDirectory", 1, Status.NOT_FOUND, "no such dir")
    with pytest.raises(modal.exception.NotFoundError, match="no such dir"):
        sandbox.snapshot_directory("/tmp")
    assert modal_emulator.snapshot_images() == []
    sandbox.exec("mkdir", "-p", "again", workdir="/").wait()
    assert sandbox.snapshot_directory("/again").object_id in modal_emulator.snapshot_images()
    faults = [c.fields.get("injected_fault") for c in modal_emulator.calls("TaskSnapshotDirectory")]
    assert faults == ["NOT_FOUND", None]


_ADD_USER = """
import pwd, sys
mounts = [line.split()[4] for line in open("/proc/self/mountinfo")]
if "/etc/passwd" not in mounts:
    sys.exit("/etc/passwd is the host's")  # never write the host's file
with open("/etc/passwd", "a") as passwd:
    passwd.write("emulated:x:4242:4242::/:/bin/sh\\n")
print(pwd.getpwuid(4242).pw_name)
"""
_LOOK_UP = """
import pwd
try:
    print(pwd.getpwuid(4242).pw_name)
except KeyError:
    print("unknown")
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can add users")
def test_each_sandbox_has_its_own_passwd_file(app: modal.App, sandbox: modal.Sandbox) -> None:
    """A user a sandbox's root adds to /etc/passwd exists there only, never on the host."""
    host_passwd = Path("/etc/passwd").read_bytes()
    added = sandbox.exec("python3", "-c", _ADD_USER)
    assert added.stdout.read() == "emulated\n", added.stderr.read()
    assert sandbox.exec("python3", "-c", _LOOK_UP).stdout.read() == "emulated\n"
    other = modal.Sandbox.create(app=app, image=modal.Image.from_registry(IMAGE_TAG), timeout=60)
    try:
        assert other.exec("python3", "-c", _LOOK_UP).stdout.read() == "unknown\n"
    finally:
        other.terminate()
    assert Path("/etc/passwd").read_bytes() == host_passwd
