"""The output disk fills up: the daemon holds writing (and so reading), says why, and goes
on without losing or repeating a frame once space returns. A real size-limited tmpfs."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest

from tests.helpers.daemon import (
    FLOAT32,
    DaemonProcess,
    frames_in,
    mounted_tmpfs,
    read_output,
    remount,
    start_writer,
)
from tests.helpers.fault_report import FaultFigure


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs mounted where the daemon writes; skipped where mounting is not allowed."""
    with mounted_tmpfs(tmp_path / "out", "size=3m") as mount_point:
        yield mount_point


pytestmark = pytest.mark.faults


def test_full_output_disk_pauses_and_resumes_without_loss(tmp_path, small_disk, fault_figures):
    daemon = DaemonProcess(tmp_path, *FLOAT32, "--min-free-mb", "1", "--stall-seconds", "2")
    daemon.wait_ready()
    writer = start_writer(daemon.watch, frames=200, rate=0, shape="64x64")
    daemon.wait_until(lambda m: m["n2s_output_paused"] == 1, "output paused", timeout=60)
    assert re.search("nearly full .* holding frames until space returns", daemon.log())
    time.sleep(4)  # twice stall_seconds without progress: a pause, not a stall
    metrics = daemon.scrape()
    assert metrics["n2s_output_paused"] == 1
    assert metrics['n2s_worker_up{worker="inference"}'] == 1
    assert metrics["n2s_frames_denoised_total"] < 200
    assert writer.wait(timeout=60) == 0
    remount(small_disk, "size=32m")
    daemon.wait_until(lambda m: m["n2s_output_paused"] == 0, "output resumed", timeout=30)
    daemon.wait_for_ended(1, timeout=60)
    assert "space returned on the output disk" in daemon.log()
    assert frames_in(daemon.output("scan_0001_n2s.h5")) == 200
    assert daemon.scrape()["n2s_output_paused"] == 0
    assert daemon.terminate() == 0
    frames, provenance = read_output(small_disk / "scan_0001_n2s.h5")
    written = provenance["source_frame"]
    fault_figures.append(
        FaultFigure(
            "output disk full, then space returns",
            1,
            int(np.array_equal(written, np.arange(200))),
            sent=200,
            written=len(set(written.tolist())),
            lost_silently=200 - len(set(written.tolist())),
        )
    )
    assert np.array_equal(written, np.arange(200))
    assert np.isfinite(frames).all()


def test_sigterm_in_a_disk_full_pause_with_a_full_queue_stops_within_its_bound(
    tmp_path, small_disk, fault_figures
):
    """The disk is full, the queue is full behind it, the source waits on the queue: SIGTERM
    still ends the daemon at once (exit 0), the frames it accepted but could not write are
    counted, and the next start, with room again, writes every frame exactly once."""
    import time

    daemon = DaemonProcess(tmp_path, *FLOAT32, "--min-free-mb", "1", "--queue-size", "8")
    daemon.wait_ready()
    writer = start_writer(daemon.watch, frames=200, rate=0, shape="64x64")
    daemon.wait_until(lambda m: m["n2s_output_paused"] == 1, "output paused", timeout=60)
    assert writer.wait(timeout=60) == 0
    daemon.wait_for_metric("n2s_queue_depth", 8, timeout=30)
    started = time.monotonic()
    status = daemon.terminate(timeout=60)
    stop_seconds = time.monotonic() - started
    log = daemon.log()
    assert status == 0, log[-2000:]
    assert stop_seconds < 15, stop_seconds
    assert "accepted frames were not written" in log
    remount(small_disk, "size=32m")
    again = DaemonProcess(tmp_path, *FLOAT32, "--min-free-mb", "1", name="restarted")
    again.wait_ready()
    again.wait_for_ended(1, timeout=120)
    assert frames_in(again.output("scan_0001_n2s.h5")) == 200
    assert again.terminate() == 0
    _, provenance = read_output(small_disk / "scan_0001_n2s.h5")
    written = provenance["source_frame"]
    fault_figures.append(
        FaultFigure(
            f"SIGTERM in a disk-full pause, queue full (stopped in {stop_seconds:.1f} s)",
            1,
            int(np.array_equal(written, np.arange(200))),
            sent=200,
            written=len(set(written.tolist())),
            lost_silently=200 - len(set(written.tolist())),
        )
    )
    assert np.array_equal(written, np.arange(200))
