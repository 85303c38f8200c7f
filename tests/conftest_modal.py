"""Pytest fixtures that point the real `modal` client at a local `ModalEmulator`.

Registered from `tests/conftest.py` with `pytest_plugins = ["conftest_modal"]`.

* `modal_emulator_session` (session scope): one emulator for the whole session, because the
  modal client caches one client (and so one server URL) per process. It exports the
  emulator's `MODAL_*` variables into `os.environ` for the session and restores them after.
  Live-Modal tests cannot share a session with it.
* `modal_emulator` (function scope): the session emulator, reset (no sandboxes, no faults, empty
  call log) before the test. After the test it terminates whatever the test left running, then
  fails the test if a sandbox process survived, a child process was left unreaped, a thread the
  test started is still running, or an emulator handler hit a bug.

`MODAL_CONFIG_PATH` must be set before `modal` is imported (it is read at import): importing this
plugin sets it to `/nonexistent` unless it is already set, so a developer's `~/.modal.toml`
cannot leak into tests.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator

import pytest

os.environ.setdefault("MODAL_CONFIG_PATH", "/nonexistent")

from hermes_actors.testing.modal_emulator import ModalEmulator
from proc_support import children_of

_GRACE_SECS = 5.0
# modal runs its blocking API on one asyncio loop in a thread it keeps for the whole process.
_PERSISTENT_THREAD_SUFFIX = "(thread_inner)"
# The local driver starts sandboxes from one thread that lives as long as the process.
_LOCAL_SPAWNER_THREAD = "hermes-sandbox-spawner"
# trio keeps idle `to_thread` workers cached (and ends them itself after a while).
_IDLE_TRIO_WORKER_PREFIX = "Trio thread "


@pytest.fixture(scope="session")
def modal_emulator_session() -> Iterator[ModalEmulator]:
    """One emulator for the session, with the modal client's environment pointing at it."""
    pytest.importorskip("modal", reason="the modal emulator drives the real `modal` client")
    emulator = ModalEmulator().start()
    saved = {name: os.environ.get(name) for name in emulator.env}
    os.environ.update(emulator.env)
    try:
        yield emulator
    finally:
        emulator.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture
def modal_emulator(modal_emulator_session: ModalEmulator) -> Iterator[ModalEmulator]:
    """The session emulator, reset; checks after the test that nothing was left behind."""
    emulator = modal_emulator_session
    emulator.reset()
    threads_before = set(threading.enumerate())
    yield emulator
    errors = emulator.internal_errors()
    emulator.reset()
    survivors = emulator.live_pids()
    assert not survivors, f"sandbox processes survived reset: {survivors}"
    assert not errors, f"emulator handler bugs: {errors}"
    _wait_until(lambda: not child_pids(), "child processes left behind")
    _wait_until(lambda: not new_threads(threads_before), "threads left behind")


def child_pids() -> list[int]:
    """Direct children of this process (zombies included: they are unreaped leftovers)."""
    return children_of(os.getpid())


def new_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    """Live threads started since `before`, except lifelong ones and idle trio workers."""
    return [
        thread
        for thread in threading.enumerate()
        if thread not in before
        and thread.is_alive()
        and not thread.name.endswith(_PERSISTENT_THREAD_SUFFIX)
        and thread.name != _LOCAL_SPAWNER_THREAD
        and not thread.name.startswith(_IDLE_TRIO_WORKER_PREFIX)
    ]


def _wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + _GRACE_SECS
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(what)
        time.sleep(0.02)
