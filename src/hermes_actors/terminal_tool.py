"""The agent-facing terminal tool, importable as `hermes_actors.terminal_tool`.

`terminal_tool(command, task_id=None, profile=None, timeout=None) -> str` (JSON with `output`,
`exit_code`, `error`) and `cleanup_vm(task_id)`; see `hermes_actors.facades._terminal`.
"""

from hermes_actors.facades._terminal import (
    MAX_OUTPUT_CHARS,
    cleanup_vm,
    shutdown_terminal_backend,
    terminal_tool,
)

__all__ = ["MAX_OUTPUT_CHARS", "cleanup_vm", "shutdown_terminal_backend", "terminal_tool"]
