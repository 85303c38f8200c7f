"""Shared fixtures: sandboxes of every driver for the contract suite."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest

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

# The Modal API emulator's fixtures (one emulator per test session).
pytest_plugins = ["conftest_modal"]


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


async def skip_without_bwrap(isolation: str) -> None:
    """Skip an isolation case, saying why, where bubblewrap cannot run (never fail it)."""
    if isolation != "bwrap":
        return
    problem = await bwrap_problem()
    if problem is not None:
        pytest.skip(
            f"isolation case skipped: {problem}; `make test` installs bubblewrap when it runs "
            "as root with apt-get, else install it (`apt-get install bubblewrap`)"
        )
