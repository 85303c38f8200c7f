"""Drivers: how sandboxes are started (local processes under bubblewrap, or Modal Sandboxes)."""

from hermes_actors.drivers._base import SandboxDriver, SandboxHandle, SandboxSpec

__all__ = ["SandboxDriver", "SandboxHandle", "SandboxSpec"]
