"""The `hermes-actors` command: run, shell, profiles check, status, reap, demo.

`main(argv)` is the entry point; `format_status` renders a status snapshot for people.
"""

from hermes_actors.cli._main import main
from hermes_actors.cli._render import format_status

__all__ = ["format_status", "main"]
