"""Shared fixtures: sandboxes of every driver for the contract suite."""

from __future__ import annotations

import os
import re
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Iterator

import pytest
import trio
from hypothesis import HealthCheck, settings

from hermes_actors.drivers._local import bwrap_problem
from sandbox_support import (
    ContractSandbox,
    ModalContractSandbox,
    open_local_sandbox,
    open_modal_sandbox,
)

#: The real environment's MODAL_* settings, captured before the emulator plugin (imported next,
#: through `pytest_plugins`) and its session fixture point the modal client at the emulator.
#: Live-Modal tests decide from this, never from `os.environ`.
REAL_MODAL_ENVIRONMENT = {
    name: value for name, value in os.environ.items() if name.startswith("MODAL_")
}


def _signals_as_from_a_terminal() -> None:
    """Undo what a launcher ignored: the tests send SIGINT, SIGTERM and SIGHUP to programs they
    start, as a terminal or a supervisor would, and ignored signals are inherited across exec.

    A suite started as a background job of a non-interactive shell runs with SIGINT (and
    SIGQUIT) ignored, and under `nohup` with SIGHUP ignored; its child programs would then
    ignore the very signals their tests send.
    """
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        if signal.getsignal(signum) is signal.SIG_IGN:
            signal.signal(signum, signal.SIG_DFL)


_signals_as_from_a_terminal()

# Hypothesis fails an example slower than 200 ms, and a test whose data is slow to generate:
# timed assertions, which this suite does not make (speed is proven in bench/), and which a
# loaded machine fails. Loaded before the test modules are imported, so their own `settings`
# inherit it.
settings.register_profile(
    "hermes-actors", deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("hermes-actors")

# The Modal API emulator's fixtures (one emulator per test session), and the fault suite's
# figures (`docs/reliability.md`).
pytest_plugins = ["conftest_modal", "fault_report"]


@pytest.fixture(autouse=True, scope="session")
def state_directory() -> Iterator[str]:
    """A state directory of the test session's own: runtimes publish their status there."""
    directory = tempfile.mkdtemp(prefix="hst-", dir="/tmp")  # short: socket paths are bounded
    saved = os.environ.get("HERMES_ACTORS_STATE_DIR")
    os.environ["HERMES_ACTORS_STATE_DIR"] = directory
    try:
        yield directory
    finally:
        if saved is None:
            os.environ.pop("HERMES_ACTORS_STATE_DIR", None)
        else:
            os.environ["HERMES_ACTORS_STATE_DIR"] = saved
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(params=["local-none", "local-bwrap", "modal"])
async def contract_sandbox(
    request: pytest.FixtureRequest,
) -> AsyncIterator[ContractSandbox | ModalContractSandbox]:
    """A fresh sandbox per test, for each driver mode (modal: through the emulator)."""
    if request.param == "modal":
        emulator = request.getfixturevalue("modal_emulator")
        async with open_modal_sandbox(emulator) as modal_sandbox:
            yield modal_sandbox
        return
    isolation = request.param.removeprefix("local-")
    await skip_without_bwrap(isolation)
    async with open_local_sandbox(isolation) as sandbox:
        yield sandbox


@pytest.fixture(params=["local-bwrap"])
async def isolated_sandbox(request: pytest.FixtureRequest) -> AsyncIterator[ContractSandbox]:
    """A fresh sandbox per test, for each driver mode that promises isolation."""
    isolation = request.param.removeprefix("local-")
    await skip_without_bwrap(isolation)
    async with open_local_sandbox(isolation) as sandbox:
        yield sandbox


def _needs_bwrap(item: pytest.Item) -> bool:
    """An isolation case: marked `bwrap`, or one of its parameters' ids is `bwrap`."""
    if item.get_closest_marker("bwrap") is not None:
        return True
    callspec = getattr(item, "callspec", None)
    return callspec is not None and "bwrap" in re.split(r"[-\[\]]", callspec.id)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Where bubblewrap cannot run, the isolation cases are skipped with the reason (decided
    before their fixtures run: a skip raised inside an async fixture loses its reason)."""
    cases = [item for item in items if _needs_bwrap(item)]
    if not cases:
        return
    problem = trio.run(bwrap_problem)
    if problem is None:
        return
    skip = pytest.mark.skip(reason=_bwrap_skip_reason(problem))
    for item in cases:
        item.add_marker(skip)


def _bwrap_skip_reason(problem: str) -> str:
    return (
        f"isolation case skipped: {problem}; `make test` installs bubblewrap when it runs "
        "as root with apt-get, else install it (`apt-get install bubblewrap`)"
    )


async def skip_without_bwrap(isolation: str) -> None:
    """Skip an isolation case, saying why, where bubblewrap cannot run (never fail it)."""
    if isolation != "bwrap":
        return
    problem = await bwrap_problem()
    if problem is not None:
        pytest.skip(_bwrap_skip_reason(problem))
