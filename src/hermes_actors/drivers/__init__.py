"""Drivers: how sandboxes are started (local processes under bubblewrap, or Modal Sandboxes)."""

from hermes_actors.drivers._base import SandboxDriver, SandboxHandle

__all__ = ["SandboxDriver", "SandboxHandle"]
