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


FIGURES: list[FaultFigure] = []
"""Every figure recorded in this test run."""
