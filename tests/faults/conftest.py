"""The fault suite's figures: each fault test records what it tried and what survived;
``tests/conftest.py`` prints them as one table at the end of the run."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from tests.helpers.fault_report import FIGURE_PROPERTY, FaultFigure


@pytest.fixture
def fault_figures(request):
    """Where a fault test appends its :class:`FaultFigure`s. They travel to the table as the
    test's user properties, which pytest-xdist sends from its workers to the controller."""
    figures: list[FaultFigure] = []
    yield figures
    request.node.user_properties.extend((FIGURE_PROPERTY, asdict(f)) for f in figures)
