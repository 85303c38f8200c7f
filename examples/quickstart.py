"""Quickstart: the agent-facing terminal tool.

    python examples/quickstart.py

Runs a few commands the way an agent's `terminal` tool would: one-off commands, a task that
keeps its files between calls, a command that times out, and the cleanup. Profiles come from
`TERMINAL_MODAL_PROFILES_FILE` when it is set, else the built-in default (the local backend).
The replies go to stdout; progress of the calls (live on a terminal) to stderr.
"""

from __future__ import annotations

import json

from hermes_actors import Progress
from hermes_actors.terminal_tool import cleanup_vm, terminal_tool

CALLS = 6


def step(
    progress: Progress,
    title: str,
    command: str,
    task_id: str | None = None,
    timeout: float | None = None,
) -> dict[str, object]:
    """One terminal_tool call, counted by the progress display; its reply is printed."""
    progress.start()
    progress.set(description=f"terminal_tool: {command}")
    result: dict[str, object] = json.loads(terminal_tool(command, task_id=task_id, timeout=timeout))
    progress.finish(ok=result["exit_code"] == 0)
    print(f"--- {title}")
    print(json.dumps(result, indent=2))
    return result


def main() -> None:
    with Progress("terminal_tool", total=CALLS) as progress:
        step(progress, "a one-off command", "python3 -c 'import sys; print(sys.version_info[:2])'")

        # A task keeps its slot (and its files) until cleanup_vm.
        task = "quickstart-task"
        step(progress, "write a file", "echo 'print(6 * 7)' > answer.py", task_id=task)
        step(progress, "run it in the same task", "python3 answer.py", task_id=task)
        step(progress, "a failing command", "ls does-not-exist", task_id=task)
        step(progress, "a command that times out", "sleep 30", task_id=task, timeout=1)
        cleanup_vm(task)
        step(progress, "after cleanup_vm the files are gone", "ls answer.py", task_id=task)
        cleanup_vm(task)
        progress.set(description="terminal_tool calls")


if __name__ == "__main__":
    main()
