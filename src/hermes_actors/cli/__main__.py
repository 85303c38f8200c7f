"""`python -m hermes_actors.cli`: the same as the `hermes-actors` command."""

import sys

from hermes_actors.cli._main import main

sys.exit(main())
