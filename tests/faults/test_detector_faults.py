"""Faults on the detector side and in the file system, against a real daemon process."""

from __future__ import annotations

import time

import numpy as np
import pytest

from tests.helpers.daemon import DaemonProcess, frames_in, read_output, start_writer
from tests.helpers.fault_report import FaultFigure

pytestmark = pytest.mark.faults


def test_detector_writer_killed_mid_file(tmp_path, fault_figures):
    """The writer dies with its SWMR file open: every frame it flushed is denoised once
    and the series is closed after the quiet time."""
    daemon = DaemonProcess(tmp_path)
    daemon.wait_ready()
    writer = start_writer(daemon.watch, frames=500, rate=20)
    daemon.wait_for_metric("n2s_frames_denoised_total", 1)
    time.sleep(1.5)
    writer.kill()
    writer.wait(timeout=30)
    daemon.wait_for_ended(1, timeout=60)
    n = frames_in(daemon.output("scan_0001_n2s.h5"))
    assert daemon.terminate() == 0
    import h5py

    with h5py.File(daemon.watch / "scan_0001.h5", "r", swmr=True) as handle:
        flushed = handle["/entry/data/data"].shape[0]
    written = read_output(daemon.out / "scan_0001_n2s.h5")[1]["source_frame"]
    fault_figures.append(
        FaultFigure(
            "detector writer SIGKILLed mid-file",
            1,
            int(n == flushed),
            sent=flushed,
            written=len(written),
            lost_silently=flushed - len(set(written.tolist())),
        )
    )
    assert 5 < n == flushed < 500
    assert np.array_equal(written, np.arange(n))


def test_source_file_deleted_while_read(tmp_path, fault_figures):
    """The file is deleted under the daemon: what was read stays written, the daemon goes
    on with the next file."""
    daemon = DaemonProcess(tmp_path)
    daemon.wait_ready()
    writer = start_writer(daemon.watch, frames=400, rate=20)
    daemon.wait_for_metric("n2s_frames_denoised_total", 1)
    time.sleep(1.0)
    (daemon.watch / "scan_0001.h5").unlink()
    writer.kill()
    writer.wait(timeout=30)
    daemon.wait_for_ended(1, timeout=60)
    second = start_writer(daemon.watch, frames=10, rate=0, name="scan_0002")
    assert second.wait(timeout=60) == 0
    daemon.wait_for_ended(2, timeout=60)
    assert frames_in(daemon.output("scan_0002_n2s.h5")) == 10
    assert daemon.terminate() == 0
    index = read_output(daemon.out / "scan_0001_n2s.h5")[1]["source_frame"]
    fault_figures.append(
        FaultFigure(
            "source file deleted while read", 1, int(np.array_equal(index, np.arange(len(index))))
        )
    )
    assert len(index) > 0 and np.array_equal(index, np.arange(len(index)))


def test_source_file_renamed_while_read(tmp_path, fault_figures):
    """The acquisition file is renamed while its writer still writes: it stays one series,
    every frame is written once, and nothing is read again under the new name."""
    daemon = DaemonProcess(tmp_path)
    daemon.wait_ready()
    writer = start_writer(daemon.watch, frames=150, rate=25)
    daemon.wait_for_metric("n2s_frames_denoised_total", 1)
    time.sleep(1.0)
    (daemon.watch / "scan_0001.h5").rename(daemon.watch / "scan_0001_renamed.h5")
    daemon.wait_for("renamed to .*scan_0001_renamed.h5: still series scan_0001")
    assert writer.wait(timeout=60) == 0
    daemon.wait_for_ended(1, timeout=60)
    assert frames_in(daemon.output("scan_0001_n2s.h5")) == 150
    assert daemon.terminate() == 0
    written = read_output(daemon.out / "scan_0001_n2s.h5")[1]["source_frame"]
    assert sorted(p.name for p in daemon.out.iterdir()) == ["scan_0001_n2s.h5"]
    fault_figures.append(
        FaultFigure(
            "source file renamed while read",
            1,
            int(np.array_equal(written, np.arange(150))),
            sent=150,
            written=len(set(written.tolist())),
        )
    )
    assert np.array_equal(written, np.arange(150))
