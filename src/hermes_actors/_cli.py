"""The former home of the command line; `hermes_actors.cli` is the package now.

Kept so a console script installed before the move (`hermes_actors._cli:main`) still works
until the next install.
"""

from hermes_actors.cli import format_status, main

__all__ = ["format_status", "main"]
