"""Facades: the APIs users call (`ToolBackend` for trainers, `terminal_tool` for agents).

`BackendCore` is `ToolBackend`'s trio-native core (an async context manager), for code that
lives in one trio run; `ToolBackend` carries calls to it from asyncio, sync code and other runs.
"""

from hermes_actors._trio import Portal
from hermes_actors.facades._backend import (
    ArtifactTooLarge,
    ExecutionResult,
    ModalToolBackend,
    Slot,
    SlotState,
    ToolBackend,
    ToolResult,
)
from hermes_actors.facades._core import BackendCore
from hermes_actors.facades._terminal import cleanup_vm, shutdown_terminal_backend, terminal_tool

__all__ = [
    "ArtifactTooLarge",
    "BackendCore",
    "ExecutionResult",
    "ModalToolBackend",
    "Portal",
    "Slot",
    "SlotState",
    "ToolBackend",
    "ToolResult",
    "cleanup_vm",
    "shutdown_terminal_backend",
    "terminal_tool",
]
