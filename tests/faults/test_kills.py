"""SIGKILL the daemon at seeded random moments while a detector sends, restart it, and
check the restart guarantees: every output opens and holds whole frames only, and each
frame sent is written exactly once, or (ZeroMQ only) reported missing, never lost silently.

The default run does 3 kills per source; ``make test-slow`` / ``make test-faults`` do 20.
"""

from __future__ import annotations

import random
import re
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import zmq

from n2s_stream.commands.simulate import clean_frames, poisson_frames
from n2s_stream.formats import protocols
from tests.helpers.daemon import DaemonProcess, free_port, read_output, start_writer
from tests.helpers.fault_report import FaultFigure

pytestmark = pytest.mark.faults

OUTPUT = "scan_0001_n2s.h5"
GAP = re.compile(
    r"scan_0001: (\d+) frames missing before (?:the end of the series \()?"
    r"frame (\d+)"
)


class HeldBackFeed:
    """A detector PUSHing ``frames`` native frames of series scan_0001 at ``rate`` from a
    thread, holding its last ``held`` frames and the end message back until ``release()``.

    The kill trials need the final daemon to receive the series' tail: a feed that
    finished while killed runs held the socket would hand its end message to a dead
    process, and then no daemon could ever tell what the series had sent."""

    def __init__(self, endpoint: str, *, frames: int, rate: float, held: int, seed: int):
        self.endpoint, self.frames, self.rate, self.held = endpoint, frames, rate, held
        self._rng = np.random.default_rng(seed)
        self._released = threading.Event()
        self._thread = threading.Thread(target=self._send, name="detector", daemon=True)
        self._thread.start()

    def _send(self) -> None:
        context = zmq.Context()
        sock = context.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 60_000)  # deliver what is queued before closing
        sock.bind(self.endpoint)
        scene = clean_frames(self.frames, (48, 48), seed=3)
        started = time.monotonic()
        for index in range(self.frames):
            if index == self.frames - self.held:
                self._released.wait()
                started = time.monotonic() - index / self.rate
            frame = poisson_frames(scene[index], 20.0, self._rng)
            sock.send_multipart(protocols.native_frame("scan_0001", index, frame, "bslz4"))
            time.sleep(max(0.0, started + (index + 1) / self.rate - time.monotonic()))
        sock.send_multipart(protocols.native_end("scan_0001", self.frames))
        sock.close()
        context.term()

    def release(self) -> None:
        """Send the held-back tail and the end message."""
        self._released.set()

    def wait(self, timeout: float) -> None:
        """Wait until every frame and the end message are delivered."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the detector feed did not finish"


def _assert_whole_frames(output: Path) -> None:
    """A killed writer leaves a file that opens; its provenance never runs ahead of data."""
    if output.exists():
        with h5py.File(output, "r", swmr=True) as handle:
            n = handle["/entry/provenance/t_written"].shape[0]
            assert handle["/entry/data/data"].shape[0] >= n


def _reported_missing(tmp_path: Path) -> set[int]:
    """Frame numbers the daemons logged as gaps, over every run."""
    logs = "".join(p.read_text() for p in sorted(tmp_path.glob("*.log")))
    return {i for n, before in GAP.findall(logs) for i in range(int(before) - int(n), int(before))}


def _kill_runs(tmp_path: Path, trials: int, seed: int, *extra: str) -> None:
    rng = random.Random(seed)
    for trial in range(trials):
        daemon = DaemonProcess(tmp_path, *extra, name=f"run{trial:02d}")
        daemon.wait_for("n2s-stream ready")
        time.sleep(rng.uniform(0.2, 2.0))
        daemon.kill()
        _assert_whole_frames(tmp_path / "out" / OUTPUT)


def _check_restart_after_the_series(tmp_path: Path, n_frames: int, *extra: str) -> None:
    """A restart after the series writes nothing twice and resumes training from the
    checkpoint the final run's SIGTERM wrote. (When the killed runs had written every
    frame, the final run saw none and, having learnt nothing, saved none: then there is
    nothing to resume, and the restart must say it starts afresh.)"""
    saved = list((tmp_path / "state" / "checkpoints").glob("ckpt_v*.pt"))
    again = DaemonProcess(tmp_path, *extra, name="zz_again")
    again.wait_ready()
    if not extra:  # a directory source sees the finished file again and skips it
        again.wait_for("series scan_0001 already complete")
    if saved:
        again.wait_for(r"resuming from .*ckpt_v\d+\.pt")
    else:
        assert "resuming from" not in again.log()
    assert again.terminate() == 0
    assert read_output(tmp_path / "out" / OUTPUT)[0].shape[0] == n_frames


def directory_trials(tmp_path: Path, figures, *, trials: int, n_frames: int, seed: int) -> None:
    """Kills while a detector writes a growing SWMR file: nothing may go missing."""
    (tmp_path / "acq").mkdir()
    writer = start_writer(tmp_path / "acq", frames=n_frames, rate=15, seed=2)
    _kill_runs(tmp_path, trials, seed)
    assert writer.wait(timeout=600) == 0
    daemon = DaemonProcess(tmp_path, name="final")
    daemon.wait_ready()
    # killed runs may already have written every frame without marking the series done
    daemon.wait_for(
        f"closed output .*{OUTPUT}|series scan_0001 already complete"
        "|series scan_0001 ended with nothing new",
        timeout=120,
    )
    assert daemon.terminate() == 0
    frames, provenance = read_output(tmp_path / "out" / OUTPUT)
    written = provenance["source_frame"]
    figures.append(_figure("directory (SWMR file), SIGKILL", trials, n_frames, written, set()))
    assert np.array_equal(written, np.arange(n_frames))
    assert frames.shape[0] == n_frames and np.isfinite(frames).all()
    logs = "".join(p.read_text() for p in sorted(tmp_path.glob("*.log")))
    assert "resumed output" in logs  # a killed run's output was continued, not restarted
    _check_restart_after_the_series(tmp_path, n_frames)


def zmq_trials(tmp_path: Path, figures, *, trials: int, n_frames: int, seed: int) -> None:
    """Kills while a detector PUSHes frames: what a killed process had taken off the socket
    is reported as a gap, everything else is written exactly once."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    feed = ("--zmq", endpoint)
    detector = HeldBackFeed(endpoint, frames=n_frames, rate=15, held=30, seed=2)
    _kill_runs(tmp_path, trials, seed, *feed)
    daemon = DaemonProcess(tmp_path, *feed, name="final")
    daemon.wait_ready()
    detector.release()
    daemon.wait_for_ended(1, timeout=max(120, n_frames / 10))
    detector.wait(timeout=60)
    assert daemon.terminate() == 0
    frames, provenance = read_output(tmp_path / "out" / OUTPUT)
    written = provenance["source_frame"]
    missing = _reported_missing(tmp_path)
    figures.append(_figure("ZeroMQ PUSH/PULL feed, SIGKILL", trials, n_frames, written, missing))
    assert (np.diff(written) > 0).all(), "a frame written twice or out of order"
    assert frames.shape[0] == written.size and np.isfinite(frames).all()
    assert not missing & set(written.tolist()), "a written frame was reported missing"
    assert set(written.tolist()) | missing == set(range(n_frames)), "a frame lost silently"
    _check_restart_after_the_series(tmp_path, written.size, *feed)


def _figure(scenario: str, trials: int, n_frames: int, written: np.ndarray, missing: set[int]):
    unique = set(written.tolist())
    lost = set(range(n_frames)) - unique - missing
    return FaultFigure(
        scenario,
        trials,
        trials if not lost else 0,
        sent=n_frames,
        written=len(unique),
        reported_missing=len(missing),
        lost_silently=len(lost),
        duplicated=written.size - len(unique),
    )


def test_directory_kill_9_three_trials(tmp_path, fault_figures):
    directory_trials(tmp_path, fault_figures, trials=3, n_frames=150, seed=1234)


def test_zmq_kill_9_three_trials(tmp_path, fault_figures):
    zmq_trials(tmp_path, fault_figures, trials=3, n_frames=150, seed=99)


@pytest.mark.slow
def test_directory_kill_9_twenty_trials(tmp_path, fault_figures):
    directory_trials(tmp_path, fault_figures, trials=20, n_frames=900, seed=20)


@pytest.mark.slow
def test_zmq_kill_9_twenty_trials(tmp_path, fault_figures):
    zmq_trials(tmp_path, fault_figures, trials=20, n_frames=900, seed=21)
