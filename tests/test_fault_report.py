"""The reliability report: figures rendered as recorded, and the committed report's promises."""

from __future__ import annotations

from pathlib import Path

import pytest

from fault_report import _render
from fault_support import Reliability

pytestmark = pytest.mark.faults

REPORT = Path(__file__).resolve().parent.parent / "docs" / "reliability.md"


def test_report_renders_the_recorded_figures() -> None:
    """Each fault's recorded counts and its tests' outcomes appear in the report, with totals."""
    reliability = Reliability()
    reliability.current_test = "tests/x.py::test_a"
    reliability.record("soak", "agent killed", injected=3, requests=10, answered=10)
    reliability.record("soak", "agent killed", injected=1, requests=5, answered=4, leaks=2)
    reliability.record("soak (bwrap)", "agent killed", injected=5)
    reliability.current_test = "tests/x.py::test_b"
    reliability.record("modal", "create refused", injected=7)
    reliability.outcome("tests/x.py::test_a", "passed")
    reliability.outcome("tests/x.py::test_b", "xfail")
    text = _render(reliability)
    assert "| soak | agent killed | 4 | 15 | 14 | 2 | passed |" in text
    assert "| modal | create refused | 7 | 0 | 0 | 0 | xfail |" in text
    assert "| soak (bwrap) | agent killed | 5 | 0 | 0 | 0 | passed |" in text
    assert "| **all** | | **16** | **15** | **14** | **2** | |" in text


def _rows() -> list[list[str]]:
    lines = REPORT.read_text().splitlines()
    rows = [line.strip("|").split("|") for line in lines if line.startswith("| ")]
    figures = [row for row in rows[1:] if not row[0].strip().startswith("**")]
    return [[cell.strip() for cell in row] for row in figures]


def test_committed_report_shows_no_leak_where_its_tests_passed() -> None:
    """docs/reliability.md exists, and every fault whose tests passed leaked nothing."""
    rows = _rows()
    assert rows, f"{REPORT} has no figures: run `make reliability`"
    for area, fault, _injected, requests, answered, leaks, outcomes in rows:
        if outcomes == "passed":
            assert leaks == "0", f"{area}: {fault} leaked {leaks}"
            assert answered == requests, f"{area}: {fault} answered {answered} of {requests}"
