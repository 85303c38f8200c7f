"""Quickstart: the agent-facing terminal tool.

    python examples/quickstart.py

Runs a few commands the way an agent's `terminal` tool would: one-off commands, a task that
keeps its files between calls, a command that times out, and the cleanup. Profiles come from
`TERMINAL_MODAL_PROFILES_FILE` when it is set, else the built-in default (the local backend).
"""

from __future__ import annotations

import json

from hermes_actors.terminal_tool import cleanup_vm, terminal_tool


def show(title: str, reply: str) -> dict[str, object]:
    result: dict[str, object] = json.loads(reply)
    print(f"--- {title}")
    print(json.dumps(result, indent=2))
    return result


def main() -> None:
    show("a one-off command", terminal_tool("python3 -c 'import sys; print(sys.version_info[:2])'"))

    # A task keeps its slot (and its files) until cleanup_vm.
    task = "quickstart-task"
    show("write a file", terminal_tool("echo 'print(6 * 7)' > answer.py", task_id=task))
    show("run it in the same task", terminal_tool("python3 answer.py", task_id=task))
    show("a failing command", terminal_tool("ls does-not-exist", task_id=task))
    show("a command that times out", terminal_tool("sleep 30", task_id=task, timeout=1))
    cleanup_vm(task)
    show("after cleanup_vm the files are gone", terminal_tool("ls answer.py", task_id=task))
    cleanup_vm(task)


if __name__ == "__main__":
    main()
