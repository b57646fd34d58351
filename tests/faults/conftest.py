"""The fault suite's figures: each fault test records what it tried and what survived, and
``make test-faults`` prints them as one table at the end of the run."""

from __future__ import annotations

import pytest
from fault_report import FIGURES, FaultFigure


@pytest.fixture
def fault_figures() -> list[FaultFigure]:
    """Where a fault test appends its :class:`FaultFigure`."""
    return FIGURES


def pytest_terminal_summary(terminalreporter) -> None:
    """Print the figures of the fault tests that ran."""
    if not FIGURES:
        return
    write = terminalreporter.write_line
    terminalreporter.section("fault figures")
    write(f"{'scenario':<44}{'trials':>7}{'survived':>9}{'sent':>7}{'written':>8}"
          f"{'missing*':>9}{'lost':>6}{'dup':>5}")
    for f in FIGURES:
        write(f"{f.scenario:<44}{f.trials:>7}{f.survived:>9}{f.sent:>7}{f.written:>8}"
              f"{f.reported_missing:>9}{f.lost_silently:>6}{f.duplicated:>5}")
    write(f"{'total':<44}{sum(f.trials for f in FIGURES):>7}"
          f"{sum(f.survived for f in FIGURES):>9}{sum(f.sent for f in FIGURES):>7}"
          f"{sum(f.written for f in FIGURES):>8}"
          f"{sum(f.reported_missing for f in FIGURES):>9}"
          f"{sum(f.lost_silently for f in FIGURES):>6}{sum(f.duplicated for f in FIGURES):>5}")
    write("* missing = frames a killed process had taken off a ZeroMQ socket, reported as gaps "
          "(n2s_frames_missing_total) as DESIGN.md promises; lost = neither written nor reported")
