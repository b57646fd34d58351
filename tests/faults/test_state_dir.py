"""The state dir turns read-only while the daemon runs (a remounted or full file system):
denoising goes on, each failed write is logged and counted, and checkpoints resume once
it is writable again."""

from __future__ import annotations

import re
import subprocess
import time

import numpy as np
import pytest

from tests.helpers.daemon import (
    N2S,
    DaemonProcess,
    frames_in,
    mounted_tmpfs,
    read_output,
    remount,
    start_writer,
)
from tests.helpers.fault_report import FaultFigure

pytestmark = pytest.mark.faults


def test_state_dir_read_only_at_run_time(tmp_path, fault_figures):
    with mounted_tmpfs(tmp_path / "state", "size=16m") as state:
        # --no-refine: the refiner's spool holds a file open for writing in the state
        # dir, and the kernel refuses to remount a file system read-only under it
        daemon = DaemonProcess(tmp_path, "--checkpoint-every", "1", "--no-refine")
        daemon.wait_ready()
        writer = start_writer(daemon.watch, frames=300, rate=20)
        deadline = time.monotonic() + 60
        while not list(daemon.state.glob("checkpoints/ckpt_v*.pt")):
            assert time.monotonic() < deadline, "no checkpoint written"
            time.sleep(0.2)
        remount(state, "ro")
        daemon.wait_for_metric("n2s_state_write_errors_total", 1, timeout=30)
        assert re.search(r"cannot write checkpoint .*Read-only file system", daemon.log())
        before = daemon.scrape()["n2s_frames_denoised_total"]
        time.sleep(2)
        metrics = daemon.scrape()
        assert metrics["n2s_state_write_errors_total"] >= 1
        assert metrics["n2s_frames_denoised_total"] > before  # denoising went on
        saved = {p.name for p in daemon.state.glob("checkpoints/ckpt_v*.pt")}
        remount(state, "rw")
        deadline = time.monotonic() + 30
        while not {p.name for p in daemon.state.glob("checkpoints/ckpt_v*.pt")} - saved:
            assert time.monotonic() < deadline, "no checkpoint after the state dir recovered"
            time.sleep(0.2)
        assert writer.wait(timeout=120) == 0
        daemon.wait_for_ended(1, timeout=60)
        assert frames_in(daemon.output("scan_0001_n2s.h5")) == 300
        assert daemon.terminate() == 0
        log = daemon.log()
    written = read_output(daemon.out / "scan_0001_n2s.h5")[1]["source_frame"]
    fault_figures.append(
        FaultFigure(
            "state dir read-only at run time",
            1,
            int(np.array_equal(written, np.arange(300))),
            sent=300,
            written=len(set(written.tolist())),
            lost_silently=300 - len(set(written.tolist())),
        )
    )
    assert np.array_equal(written, np.arange(300))
    assert "Traceback" not in log


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, fault_figures):
    """A checkpoint cut short (a crash mid-copy, a bad disk block) is skipped with a
    warning; the daemon resumes from the one before it and serves."""
    daemon = DaemonProcess(tmp_path, "--checkpoint-every", "0.5")
    daemon.wait_ready()
    writer = start_writer(daemon.watch, frames=60, rate=30)
    assert writer.wait(timeout=60) == 0
    daemon.wait_for_ended(1, timeout=60)
    assert frames_in(daemon.output("scan_0001_n2s.h5")) == 60
    deadline = time.monotonic() + 30
    while len(list(daemon.state.glob("checkpoints/ckpt_v*.pt"))) < 2:
        assert time.monotonic() < deadline, "fewer than 2 checkpoints written"
        time.sleep(0.2)
    assert daemon.terminate() == 0
    older, newest = sorted(daemon.state.glob("checkpoints/ckpt_v*.pt"))[-2:]
    newest.write_bytes(newest.read_bytes()[:1000])
    again = DaemonProcess(tmp_path, name="restart")
    again.wait_ready()
    assert re.search(
        f"skipping checkpoint: .*{newest.name}: not a loadable checkpoint", again.log()
    )
    assert re.search(f"resuming from .*{older.name}", again.log())
    second = start_writer(again.watch, frames=10, rate=0, name="scan_0002")
    assert second.wait(timeout=60) == 0
    again.wait_for_ended(1, timeout=60)  # scan_0001 is complete: only scan_0002 is read
    assert frames_in(again.output("scan_0002_n2s.h5")) == 10
    assert again.terminate() == 0
    fault_figures.append(FaultFigure("corrupt newest checkpoint", 1, 1, sent=10, written=10))


def test_read_only_state_dir_is_a_clear_startup_error(tmp_path):
    with mounted_tmpfs(tmp_path / "state", "ro,size=1m") as state:
        (tmp_path / "acq").mkdir()
        proc = subprocess.run(
            [
                *N2S,
                "--watch",
                str(tmp_path / "acq"),
                "--state-dir",
                str(state),
                "--metrics-port",
                "-1",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 2, proc.stderr
    assert "state directory is not writable" in proc.stderr
    assert "Traceback" not in proc.stderr
