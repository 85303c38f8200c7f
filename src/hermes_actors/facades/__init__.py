"""Facades: the APIs users call (`ToolBackend` for trainers, `terminal_tool` for agents)."""

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
from hermes_actors.facades._terminal import cleanup_vm, shutdown_terminal_backend, terminal_tool

__all__ = [
    "ArtifactTooLarge",
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
