"""Shared fixtures: sandboxes of every driver for the contract suite."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from sandbox_support import ContractSandbox, open_local_sandbox

# The Modal API emulator's fixtures (one emulator per test session).
pytest_plugins = ["conftest_modal"]


@pytest.fixture(params=["local-none", "local-bwrap"])
async def contract_sandbox(request: pytest.FixtureRequest) -> AsyncIterator[ContractSandbox]:
    """A fresh sandbox per test, for each driver mode."""
    isolation = request.param.removeprefix("local-")
    async with open_local_sandbox(isolation) as sandbox:
        yield sandbox


@pytest.fixture(params=["local-bwrap"])
async def isolated_sandbox(request: pytest.FixtureRequest) -> AsyncIterator[ContractSandbox]:
    """A fresh sandbox per test, for each driver mode that promises isolation."""
    async with open_local_sandbox(request.param.removeprefix("local-")) as sandbox:
        yield sandbox
