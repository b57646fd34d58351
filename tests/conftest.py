"""Shared fixtures: small real HDF5 stacks with known truth, and a thread-leak guard."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from n2s_stream.commands.simulate import clean_frames, poisson_frames
from tests.helpers.daemon import write_stack
from tests.helpers.fault_report import FaultFigure, figures_in, write_table

# Tests run on 2 cores next to other work (`make test` runs two pytest-xdist workers);
# keep torch from oversubscribing them.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)

FAULT_FIGURES: list[FaultFigure] = []
"""The fault tests' figures as their reports arrive (from xdist workers too)."""


def pytest_runtest_logreport(report) -> None:
    """Keep the figures a fault test recorded."""
    FAULT_FIGURES.extend(figures_in(report))


def pytest_terminal_summary(terminalreporter) -> None:
    """Print the fault tests' figures as one table at the end of the run."""
    if FAULT_FIGURES:
        terminalreporter.section("fault figures")
        write_table(terminalreporter.write_line, FAULT_FIGURES)


@pytest.fixture(autouse=True)
def no_leaked_processes():
    """Kill daemons and detectors a failed test left running, so they cannot slow or
    disturb the tests after it."""
    from tests.helpers.daemon import reap

    yield
    reap()


POOL_PREFIXES = ("prepare", "encode", "decode", "onnx-export")
"""Name prefixes of the project's thread pools (``thread_name_prefix``)."""


def _ours(thread: threading.Thread) -> bool:
    """A thread the project started: a worker or server thread whose target is its code,
    or one of its pools. (Every such thread is a daemon thread, so daemon-ness says
    nothing; third-party daemon threads, e.g. p4p's or watchdog's, are not ours to stop.)"""
    target = getattr(thread, "_target", None)
    owner = getattr(target, "__self__", target)
    module = getattr(owner, "__module__", "") or type(owner).__module__
    return module.startswith("n2s_stream") or thread.name.startswith(POOL_PREFIXES)


@pytest.fixture(autouse=True)
def no_leaked_threads():
    """Fail a test that leaves threads running (STYLE: every worker is stoppable): any
    new non-daemon thread, and any thread of the project's own."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        leaked = [
            t
            for t in threading.enumerate()
            if t not in before and t.is_alive() and (not t.daemon or _ours(t))
        ]
        if not leaked:
            return
        time.sleep(0.05)
    pytest.fail(f"test leaked threads: {leaked}")


@pytest.fixture(scope="session")
def noisy_series(tmp_path_factory) -> tuple[Path, np.ndarray, float]:
    """A 24-frame 64x64 Poisson series at dose 20: (file, clean counts, dose)."""
    dose = 20.0
    clean = clean_frames(24, (64, 64), seed=3, drift=0.5)
    noisy = poisson_frames(clean, dose, np.random.default_rng(7))
    path = write_stack(tmp_path_factory.mktemp("series") / "series.h5", noisy)
    return path, clean * dose, dose
