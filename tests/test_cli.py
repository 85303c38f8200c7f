"""`hermes-actors` driven as a user drives it: subprocesses, real exit codes, real sandboxes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli_support import HERMES, clean_environment, hermes, host_sandbox_pids
from proc_support import pids_with_argv
from sandbox_support import processes_with

SUBCOMMANDS = [
    ["run"],
    ["shell"],
    ["profiles"],
    ["profiles", "check"],
    ["status"],
    ["reap"],
    ["demo"],
]


@pytest.mark.parametrize("subcommand", SUBCOMMANDS, ids=" ".join)
def test_every_subcommand_has_help(subcommand: list[str]) -> None:
    """Every subcommand answers --help with its usage and exit code 0."""
    done = hermes(*subcommand, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: hermes-actors {' '.join(subcommand)}")


def test_usage_errors_exit_2() -> None:
    """An unknown subcommand, or `run` without a command, is a usage error: exit 2."""
    unknown = hermes("launch")
    assert unknown.returncode == 2
    assert "invalid choice: 'launch'" in unknown.stderr
    empty = hermes("run", "--")
    assert empty.returncode == 2
    assert "run needs a command after --" in empty.stderr
    bad_timeout = hermes("run", "--timeout", "0", "--", "true")
    assert bad_timeout.returncode == 2
    assert "--timeout must be a number of seconds > 0" in bad_timeout.stderr


# -- run -------------------------------------------------------------------------------------------


def test_run_prints_the_output_and_exits_with_the_commands_code() -> None:
    """`run` prints what the command printed (stdout to stdout, stderr to stderr) and exits
    with the command's own exit code."""
    ok = hermes("run", "--", "echo hello; echo oops >&2")
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, "hello\n", "oops\n")
    failed = hermes("run", "--", "echo partial; exit 7")
    assert (failed.returncode, failed.stdout) == (7, "partial\n")
    assert failed.stderr == ""


#: Marks the processes of `run` tests, to find the waiting command and count what is left.
RUN_TAG = "hermes-cli-run-tag"


def _run_waiting(*options: str) -> subprocess.Popen[bytes]:
    """`hermes-actors run` of a command that prints a line, then waits for a `sleep` tagged
    `RUN_TAG` to end (the test ends it from the host: sandboxes share no files with it), then
    prints another."""
    command = f"echo first; (exec -a {RUN_TAG} sleep 600); echo second"
    return subprocess.Popen(
        [*HERMES, "run", *options, "--", command],
        env=clean_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _tagged_processes() -> list[int]:
    return pids_with_argv(RUN_TAG, at_start=True)


def _wait_for_tagged() -> list[int]:
    deadline = time.monotonic() + 30
    while not (found := _tagged_processes()):
        assert time.monotonic() < deadline, "the tagged sleep never started"
        time.sleep(0.02)
    return found


def test_run_streams_output_while_the_command_runs() -> None:
    """`run` shows the command's first line while the command still runs: the command may go
    on only after that line was read from `run`'s stdout."""
    process = _run_waiting()
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == b"first\n"
        assert process.poll() is None
        for pid in _wait_for_tagged():
            os.kill(pid, signal.SIGTERM)
        assert process.stdout.read() == b"second\n"
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)
        for pipe in (process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()


def test_run_interrupted_by_ctrl_c_exits_130_and_leaves_nothing() -> None:
    """SIGINT to `run` mid-command cancels the command, stops the sandbox and exits 130."""
    process = _run_waiting()
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == b"first\n"
        assert host_sandbox_pids(process.pid)
        _wait_for_tagged()  # the waiting command runs
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=20) == 130
        assert process.stderr is not None
        assert b"interrupted" in process.stderr.read()
        assert process.stdout.read() == b""  # the command never went on
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)
        for pipe in (process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()
    assert host_sandbox_pids(process.pid) == []
    assert _tagged_processes() == []


def test_run_json_reports_the_whole_output_once(tmp_path: Path) -> None:
    """`run --json` streams nothing: stdout is one JSON object with the command's output."""
    done = hermes("run", "--json", "--", "echo out; echo err >&2; exit 5")
    assert done.returncode == 5
    report = json.loads(done.stdout)
    assert (report["output"], report["exit_code"]) == ("out\nerr\n", 5)


def test_verbosity_flags_work_before_and_after_the_subcommand() -> None:
    """Quiet by default; -v before or after the subcommand shows info records on stderr."""
    assert hermes("run", "--", "true").stderr == ""
    for arguments in (["-v", "run", "--", "true"], ["run", "-v", "--", "true"]):
        loud = hermes(*arguments)
        assert loud.returncode == 0, loud.stderr
        assert "hermes-actors: INFO hermes_actors.config:" in loud.stderr


def test_run_quotes_several_arguments_as_one_command() -> None:
    """Several arguments after -- are one command and its arguments, not a shell line."""
    done = hermes("run", "--", "printf", "%s|", "a b", "$HOME")
    assert (done.returncode, done.stdout) == (0, "a b|$HOME|")


def test_run_exits_124_on_timeout_and_reports_json() -> None:
    """A command past --timeout is killed; `run --json` reports it and exits 124."""
    started = time.monotonic()
    done = hermes("run", "--json", "--timeout", "0.5", "--", "echo early; sleep 30")
    assert time.monotonic() - started < 20
    assert done.returncode == 124
    report = json.loads(done.stdout)
    assert report["timed_out"] is True
    assert report["output"] == "early\n"
    assert report["exit_code"] == 124
    assert "timed out after 0.5 s" in report["error"]


def test_run_exits_128_plus_the_signal_that_killed_the_command() -> None:
    """A command killed by a signal makes `run` exit 128 + that signal, as shells do."""
    done = hermes("run", "--", "kill -TERM $$")
    assert done.returncode == 128 + signal.SIGTERM


def test_run_with_an_unknown_profile_or_missing_file_exits_2() -> None:
    """Configuration errors exit 2 and say what to do."""
    unknown = hermes("run", "--profile", "gpu", "--", "true")
    assert unknown.returncode == 2
    assert "no profile named 'gpu'" in unknown.stderr
    missing = hermes("run", "--profiles", "/nonexistent.yaml", "--", "true")
    assert missing.returncode == 2
    assert "/nonexistent.yaml: no such profiles file" in missing.stderr


def test_run_exits_3_when_the_sandbox_cannot_start(tmp_path: Path) -> None:
    """An infrastructure error (bubblewrap required but absent) exits 3 with the fix."""
    profiles = tmp_path / "p.yaml"
    profiles.write_text("profiles:\n  default:\n    isolation: bwrap\n")
    env = clean_environment(PATH=str(tmp_path))  # no bwrap on this PATH
    done = hermes("run", "--profiles", str(profiles), "--", "true", env=env)
    assert done.returncode == 3, done.stderr
    assert "bubblewrap (`bwrap`) is not installed" in done.stderr
    assert "apt-get install -y bubblewrap" in done.stderr


def test_run_reads_modal_profiles_yaml_in_the_working_directory(tmp_path: Path) -> None:
    """Without --profiles or the variable, ./modal_profiles.yaml is read when present."""
    (tmp_path / "modal_profiles.yaml").write_text(
        "profiles:\n  default:\n    isolation: none\n    env_vars: {GREETING: from-file}\n"
    )
    done = hermes("run", "--", "echo $GREETING", cwd=str(tmp_path))
    assert (done.returncode, done.stdout) == (0, "from-file\n")


def test_demo_runs_the_rl_batch_example() -> None:
    """`demo` runs what `make demo` runs (here with a few trajectories) and exits 0."""
    done = hermes("demo", "--", "--trajectories", "4", "--slots-per-sandbox", "2", timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 slots on 2 sandbox(es)" in done.stdout
    assert "tests passed: 3/4" in done.stdout  # policy 3 writes a wrong solution


# -- profiles check --------------------------------------------------------------------------------

GOOD_PROFILES = """\
default_profile: small
profiles:
  small:
    backend: local
    slots_per_sandbox: 4
    max_pool: 3
  big:
    cpu: 4
    memory: 8192
"""


def test_profiles_check_shows_values_and_where_they_came_from(tmp_path: Path) -> None:
    """A good file: the resolved profiles, each value marked default, file or environment."""
    path = tmp_path / "good.yaml"
    path.write_text(GOOD_PROFILES)
    env = clean_environment(TERMINAL_MODAL_IMAGE="registry.example/img:2")
    done = hermes("profiles", "check", str(path), env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"profiles from {path}")
    assert lines[2].split() == [
        "small", "*", "local", "registry.example/img:2", "(env)", "1", "2048", "MiB", "-", "4",
        "1..3",
    ]  # fmt: skip
    assert lines[3].split()[:2] == ["big", "local"]
    report = json.loads(hermes("profiles", "check", "--json", str(path), env=env).stdout)
    small, big = report["profiles"]["small"], report["profiles"]["big"]
    assert small["max_sandboxes"] == {"value": 3, "from": "file"}  # via the older alias
    assert small["backend"] == {"value": "local", "from": "file"}
    assert small["image"] == {"value": "registry.example/img:2", "from": "environment"}
    assert small["cpu"] == {"value": 1.0, "from": "default"}
    assert big["cpu"] == {"value": 4.0, "from": "file"}
    assert big["backend"] == {"value": "local", "from": "default"}
    assert report["default_profile"] == "small"


def test_profiles_check_lists_every_error_with_its_path_and_exits_2(tmp_path: Path) -> None:
    """A bad file: every problem, each with the file and the path of the value; exit 2."""
    path = tmp_path / "bad.yaml"
    path.write_text(
        "profiles:\n  default:\n    memory: lots\n    slots_per_sandbox: 0\n    colour: red\n"
    )
    done = hermes("profiles", "check", str(path))
    assert done.returncode == 2
    assert done.stdout == ""
    errors = done.stderr.splitlines()
    assert f"hermes-actors: {path}: $.profiles.default.memory: expected int, got str ('lots')" in (
        errors
    )
    assert any("$.profiles.default.colour: unknown key" in line for line in errors)
    assert any("'slots_per_sandbox' must be >= 1" in line for line in errors)


def test_profiles_check_of_a_missing_or_broken_file_exits_2(tmp_path: Path) -> None:
    """A missing file and a file that is not YAML both exit 2 with the reason."""
    missing = hermes("profiles", "check", str(tmp_path / "none.yaml"))
    assert missing.returncode == 2
    assert "no such profiles file" in missing.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("profiles: [unclosed\n")
    done = hermes("profiles", "check", str(broken))
    assert done.returncode == 2
    assert "invalid YAML" in done.stderr


def test_every_example_config_passes_profiles_check() -> None:
    """The profiles files shipped in config/ pass `profiles check`."""
    for path in sorted((Path(__file__).parent.parent / "config").glob("*.yaml")):
        done = hermes("profiles", "check", str(path))
        assert done.returncode == 0, (path, done.stderr)


# -- status ----------------------------------------------------------------------------------------

HOLDER = textwrap.dedent(
    """
    import sys
    from hermes_actors import SandboxConfig, ToolBackend

    backend = ToolBackend(SandboxConfig(isolation="none", slots_per_sandbox=3, min_sandboxes=1))
    backend.call_blocking(backend.start)
    slot = backend.call_blocking(backend.acquire, "traj-held")
    [result] = backend.call_blocking(backend.execute_batch, [(slot, "bash", {"command": "true"})])
    print("ready", flush=True)
    sys.stdin.readline()
    backend.stop_sync()
    print("stopped", flush=True)
    """
)


@pytest.fixture
def live_backend() -> Iterator[subprocess.Popen[str]]:
    """Another process holding a running backend with one slot held (stops on a newline)."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER],
        env=clean_environment(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == "ready\n"
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)
        for pipe in (process.stdin, process.stdout):
            if pipe is not None:
                pipe.close()


def test_status_json_shows_a_backend_running_in_another_process(
    live_backend: subprocess.Popen[str], state_directory: str
) -> None:
    """`status --json` reads the pools, slots and counters a running backend publishes."""
    done = hermes("status", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["state_dir"] == state_directory
    [run] = [run for run in report["runs"] if run["pid"] == live_backend.pid]
    status = run["status"]
    assert status["running"] is True
    assert status["default_profile"] == "default"
    [pool] = status["pools"]
    assert (pool["profile"], pool["backend"]) == ("default", "local")
    assert (pool["slots_held"], pool["slots_free"], pool["waiters"]) == (1, 2, 0)
    assert pool["commands_run"] == 1
    [sandbox] = pool["sandboxes"]
    assert (sandbox["state"], sandbox["slots_held"]) == ("ready", 1)
    text = hermes("status")
    assert f"(pid {live_backend.pid}," in text.stdout
    assert "sandboxes of default:" in text.stdout
    # Stopped, the run is gone from the listing and leaves no file behind.
    assert live_backend.stdin is not None
    assert live_backend.stdout is not None
    live_backend.stdin.write("\n")
    live_backend.stdin.flush()
    assert live_backend.stdout.readline() == "stopped\n"
    assert live_backend.wait(timeout=30) == 0
    after = json.loads(hermes("status", "--json").stdout)
    assert [run for run in after["runs"] if run["pid"] == live_backend.pid] == []
    assert not list(Path(state_directory, "runs").glob(f"{live_backend.pid}-*"))


def test_status_forgets_a_backend_that_was_killed(
    live_backend: subprocess.Popen[str], state_directory: str
) -> None:
    """A backend killed without stopping is not listed, and its record is removed."""
    runs = Path(state_directory, "runs")
    assert len(list(runs.glob(f"{live_backend.pid}-*"))) == 2  # the record and the socket
    live_backend.kill()
    live_backend.wait(timeout=30)
    done = hermes("status", "--json")
    assert done.returncode == 0
    assert [run for run in json.loads(done.stdout)["runs"] if run["pid"] == live_backend.pid] == []
    assert not list(runs.glob(f"{live_backend.pid}-*"))


def test_status_watch_refreshes_until_interrupted(live_backend: subprocess.Popen[str]) -> None:
    """`status --watch` prints a fresh snapshot each interval and exits 0 on Ctrl-C."""
    watcher = subprocess.Popen(
        [*HERMES, "status", "--json", "--watch", "0.2"],
        env=clean_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert watcher.stdout is not None
    snapshots = [json.loads(watcher.stdout.readline()) for _ in range(3)]
    watcher.send_signal(signal.SIGINT)
    assert watcher.wait(timeout=30) == 0
    watcher.stdout.close()
    assert watcher.stderr is not None
    watcher.stderr.close()
    for snapshot in snapshots:
        assert live_backend.pid in [run["pid"] for run in snapshot["runs"]]


# -- reap ------------------------------------------------------------------------------------------

CRASHER = textwrap.dedent(
    """
    import os, signal, sys
    from hermes_actors import SandboxConfig, ToolBackend

    backend = ToolBackend(SandboxConfig(isolation="none", min_sandboxes=1))
    backend.call_blocking(backend.start)
    slot = backend.call_blocking(backend.acquire, "doomed")
    escapee = f"setsid env -i bash -c 'exec -a {sys.argv[1]} sleep 600' & echo x > f"
    backend.call_blocking(backend.execute_batch, [(slot, "bash", {"command": escapee})])
    # The worst crash: the watchdog dies with this process, and the agent is stuck (stopped),
    # so its dead-man switch cannot fire either.
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as stat, open(f"/proc/{name}/cmdline") as argv:
                    parent, command = int(stat.read().rsplit(")", 1)[1].split()[1]), argv.read()
            except OSError:
                continue
            if parent == os.getpid():
                watchdog = command.split("\\0")[1:3] == ["-I", "-S"]
                os.kill(int(name), signal.SIGKILL if watchdog else signal.SIGSTOP)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def _wait_for(condition: object, what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_reap_stops_what_a_killed_local_run_left(tmp_path: Path) -> None:
    """A run SIGKILLed with its watchdog and a stuck agent leaves its sandbox; `reap --dry-run`
    lists it (an escapee that cleared its environment included) without touching it, `reap`
    stops it and removes its directory, a second reap finds none."""
    env = clean_environment(TMPDIR=str(tmp_path))
    tag = f"hermes-reap-{os.getpid()}-{time.monotonic_ns()}"
    crashed = subprocess.Popen([sys.executable, "-c", CRASHER, tag], env=env)
    assert crashed.wait(timeout=60) == -signal.SIGKILL
    # `setsid` may not have exec'd its sleep yet when the command returned.
    _wait_for(lambda: processes_with(tag), "the escapee")
    [escapee] = processes_with(tag)
    # Carrying a sandbox's markers in its environment makes nothing a sandbox's process.
    forged = subprocess.Popen(
        ["sleep", "600"],
        env={**env, "HERMES_SANDBOX_ID": "local-default-deadbeef", "HERMES_HOST_PID": "1999999"},
        start_new_session=True,
    )
    try:
        [directory] = [path for path in tmp_path.glob("hermes-default-*")]
        dry = hermes("reap", "--dry-run", "--min-age", "0", env=env)
        assert dry.returncode == 0, dry.stderr
        assert f"would remove local directory {directory}" in dry.stdout
        [listed] = [line for line in dry.stdout.splitlines() if "would stop local sandbox" in line]
        assert str(escapee) in listed
        assert str(forged.pid) not in dry.stdout
        assert "no Modal app to check" in dry.stdout
        assert directory.exists()
        assert processes_with(tag) == [escapee]
        done = hermes("reap", "--min-age", "0", env=env)
        assert done.returncode == 0, done.stderr
        assert f"removed local directory {directory}" in done.stdout
        _wait_for(lambda: not processes_with(tag), "the escapee killed")
        assert not directory.exists()
        assert forged.poll() is None
        again = hermes("reap", "--min-age", "0", env=env)
        assert again.stdout.startswith("0 leftover(s) cleaned up"), again.stdout
    finally:
        forged.kill()
        forged.wait()
        for pid in processes_with(tag):
            os.kill(pid, signal.SIGKILL)


def test_reap_spares_live_runs_and_young_directories(
    live_backend: subprocess.Popen[str], tmp_path: Path
) -> None:
    """A live run's sandboxes are never listed, and a fresh directory waits for --min-age."""
    young = tmp_path / "hermes-default-young"
    (young / "ws").mkdir(parents=True)
    (young / "agent.log").write_text("")
    done = hermes("reap", "--dry-run", env=clean_environment(TMPDIR=str(tmp_path)))
    assert done.returncode == 0, done.stderr
    live = host_sandbox_pids(live_backend.pid)
    assert live  # the live backend's sandbox runs...
    assert not any(str(pid) in done.stdout for pid in live)  # ...and is not a leftover
    assert "young" not in done.stdout


def test_reap_stops_modal_sandboxes_of_dead_runs(modal_emulator: object) -> None:
    """`reap --app` terminates the app's sandboxes of other runs on Modal (the emulator);
    --dry-run only lists them."""
    import trio

    from hermes_actors import SandboxConfig
    from hermes_actors.drivers._modal import ModalDriver

    env = clean_environment(**modal_emulator.env)  # type: ignore[attr-defined]

    async def leave_an_orphan() -> str:
        driver = ModalDriver(run_id="run-dead")
        handle = await driver.create(
            SandboxConfig(name="p", backend="modal", slots_per_sandbox=1, app_name="reap-cli")
        )
        driver._forget(handle)  # the run "dies": nobody terminates it
        await driver.aclose()
        return handle.sandbox_id

    orphan = trio.run(leave_an_orphan)
    dry = hermes("reap", "--app", "reap-cli", "--min-age", "0", "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert f"would stop Modal sandbox {orphan} of app reap-cli (run run-dead)" in dry.stdout
    done = hermes("reap", "--app", "reap-cli", "--min-age", "0", env=env)
    assert done.returncode == 0, done.stderr
    assert f"stopped Modal sandbox {orphan} of app reap-cli (run run-dead)" in done.stdout
    again = hermes("reap", "--app", "reap-cli", "--min-age", "0", env=env)
    assert orphan not in again.stdout


async def test_modal_reap_spares_runs_known_alive_and_dry_run_stops_nothing(
    modal_emulator: object,
) -> None:
    """The driver's reap skips `spare_runs`; with dry_run it lists without terminating."""
    from hermes_actors import SandboxConfig
    from hermes_actors.drivers._modal import ModalDriver

    spec = SandboxConfig(name="p", backend="modal", slots_per_sandbox=1, app_name="reap-spare")
    alive, dead, reaper = (ModalDriver(run_id=run) for run in ("run-alive", "run-dead", "reaper"))
    try:
        kept = await alive.create(spec)
        orphan = await dead.create(spec)
        listed = await reaper.reap("reap-spare", spare_runs={"run-alive"}, dry_run=True)
        assert [sandbox.sandbox_id for sandbox in listed] == [orphan.sandbox_id]
        assert orphan.is_alive()
        assert kept.is_alive()
        reaped = await reaper.reap("reap-spare", spare_runs={"run-alive"})
        assert [sandbox.sandbox_id for sandbox in reaped] == [orphan.sandbox_id]
        assert kept.is_alive()
        await kept.terminate()
        await orphan.terminate()
    finally:
        for driver in (alive, dead, reaper):
            await driver.aclose()
