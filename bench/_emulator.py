"""What the Modal benchmarks share: the emulator they run on and how they count its calls."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hermes_actors.testing.modal_emulator import ModalEmulator


@contextlib.contextmanager
def emulator_environment() -> Iterator[ModalEmulator]:
    """A fresh emulator with this process's modal client pointed at it (before modal loads)."""
    os.environ.setdefault("MODAL_CONFIG_PATH", "/nonexistent")
    from hermes_actors.testing.modal_emulator import ModalEmulator

    with ModalEmulator() as emulator:
        os.environ.update(emulator.env)
        yield emulator


def call_delta(after: Mapping[str, int], before: Mapping[str, int]) -> dict[str, int]:
    """Calls per method between two `ModalEmulator.call_counts()` (methods with none left out)."""
    return {
        method: count - before.get(method, 0)
        for method, count in sorted(after.items())
        if count != before.get(method, 0)
    }
