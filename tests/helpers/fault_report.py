"""Figures of the fault suite: what each fault test tried and what survived."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FaultFigure:
    """What one fault scenario did: ``trials`` faults injected, ``survived`` of them with
    every guarantee held; frames sent, written once, reported missing, lost silently."""

    scenario: str
    trials: int
    survived: int
    sent: int = 0
    written: int = 0
    reported_missing: int = 0
    lost_silently: int = 0
    duplicated: int = 0


FIGURE_PROPERTY = "fault_figure"
"""The name under which a fault test's figures ride in its report's user properties."""


def figures_in(report) -> list[FaultFigure]:
    """The figures a test's teardown report carries (recorded by the fault_figures fixture)."""
    if report.when != "teardown":
        return []
    return [
        FaultFigure(**value) for name, value in report.user_properties if name == FIGURE_PROPERTY
    ]


def write_table(write, figures: list[FaultFigure]) -> None:
    """The figures as one table, a total row and the legend, through ``write(line)``."""
    write(
        f"{'scenario':<44}{'trials':>7}{'survived':>9}{'sent':>7}{'written':>8}"
        f"{'missing*':>9}{'lost':>6}{'dup':>5}"
    )
    for f in figures:
        write(
            f"{f.scenario:<44}{f.trials:>7}{f.survived:>9}{f.sent:>7}{f.written:>8}"
            f"{f.reported_missing:>9}{f.lost_silently:>6}{f.duplicated:>5}"
        )
    write(
        f"{'total':<44}{sum(f.trials for f in figures):>7}"
        f"{sum(f.survived for f in figures):>9}{sum(f.sent for f in figures):>7}"
        f"{sum(f.written for f in figures):>8}"
        f"{sum(f.reported_missing for f in figures):>9}"
        f"{sum(f.lost_silently for f in figures):>6}{sum(f.duplicated for f in figures):>5}"
    )
    write(
        "* missing = frames a killed process had taken off a ZeroMQ socket, reported as gaps "
        "(n2s_frames_missing_total) as DESIGN.md promises; lost = neither written nor reported"
    )
