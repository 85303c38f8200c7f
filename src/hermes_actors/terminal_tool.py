"""The agent-facing terminal tool, importable as `hermes_actors.terminal_tool`.

`terminal_tool(command, background=False, timeout=None, task_id=None, profile=None,
image=None) -> str` (JSON with `output`, `exit_code`, `error`), `cleanup_vm(task_id)`,
`register_task_image(task_id, image)` and the rest of the original Hermes terminal tool's
names; see `hermes_actors.facades._terminal`.
"""

from hermes_actors.facades._terminal import (
    MAX_OUTPUT_CHARS,
    TERMINAL_TOOL_DESCRIPTION,
    check_terminal_requirements,
    cleanup_all_environments,
    cleanup_vm,
    get_active_environments_info,
    register_task_image,
    shutdown_terminal_backend,
    terminal_tool,
)

__all__ = [
    "MAX_OUTPUT_CHARS",
    "TERMINAL_TOOL_DESCRIPTION",
    "check_terminal_requirements",
    "cleanup_all_environments",
    "cleanup_vm",
    "get_active_environments_info",
    "register_task_image",
    "shutdown_terminal_backend",
    "terminal_tool",
]
