"""Operations: a tee nobody reads never stalls denoising; a dead worker is never hidden
(n2s_worker_up, the status, and for a required worker a non-zero exit)."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.request

import pytest
from daemon_helpers import N2S, STARTED, DaemonProcess, free_port, start_writer
from prometheus_client import CollectorRegistry

from n2s_stream.config import DaemonConfig
from n2s_stream.daemon import Daemon
from n2s_stream.options import make


def test_a_tee_nobody_reads_never_stalls_the_daemon(tmp_path):
    """--zmq-tee bound, no facility writer connected: every frame is denoised, every raw
    message that could not be passed on is counted, and SIGTERM ends it cleanly."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    tee = f"tcp://127.0.0.1:{free_port()}"
    daemon = DaemonProcess(tmp_path, "--zmq", endpoint, "--zmq-tee", tee, "--no-cold-start")
    daemon.wait_ready()
    detector = subprocess.Popen([*N2S, "simulate", "--zmq-bind", endpoint, "--frames", "60",
                                 "--shape", "32x32", "--rate", "60", "--log-level", "WARNING"])
    STARTED.append(detector)
    daemon.wait_for("closed output .*scan_0001_n2s.h5 \\(60 frames\\)", timeout=90)
    assert detector.wait(timeout=60) == 0
    metrics = daemon.scrape()
    started = time.monotonic()
    assert daemon.terminate(timeout=60) == 0, daemon.log()[-2000:]
    assert time.monotonic() - started < 30
    assert metrics["n2s_frames_denoised_total"] == 60
    # 60 frames and the end message: nobody took any of them
    assert metrics['n2s_output_dropped_total{output="zmq_tee"}'] == 61
    assert "nobody takes the tee's messages" in daemon.log()


def _get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
        return reply.read().decode()


def _wait(condition, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.fixture
def running_daemon(tmp_path):
    """A real daemon in this process (so a test can break one of its workers), following a
    directory that a detector process fills."""
    (tmp_path / "acq").mkdir()
    config = make(DaemonConfig, watch=tmp_path / "acq", out=tmp_path / "out",
                  state_dir=tmp_path / "state", device="cpu", metrics_port=0, threads=1,
                  cold_start=False, publish_every=5, settle_seconds=2)
    daemon = Daemon(config, registry=CollectorRegistry())
    status: list[int] = []
    thread = threading.Thread(target=lambda: status.append(daemon.run()))
    thread.start()
    _wait(lambda: daemon.stages is not None and daemon.stages.server is not None)
    yield daemon, status, thread
    daemon.stop_requested.set()
    thread.join(timeout=120)


def test_a_trainer_that_raises_is_visible_and_inference_goes_on(running_daemon, tmp_path):
    daemon, status, thread = running_daemon
    stages = daemon.stages
    value = daemon.metrics.registry.get_sample_value

    def broken_step():
        raise RuntimeError("simulated trainer bug")

    stages.trainer._step = broken_step
    writer = start_writer(tmp_path / "acq", frames=20, rate=20, shape="32x32")
    assert writer.wait(timeout=60) == 0
    _wait(lambda: value("n2s_frames_denoised_total") == 20)
    _wait(lambda: value("n2s_worker_up", {"worker": "trainer"}) == 0)
    assert value("n2s_worker_up", {"worker": "inference"}) == 1
    assert value("n2s_worker_up", {"worker": "source"}) == 1
    port = stages.server.port
    _wait(lambda: "STOPPED" in json.loads(_get(port, "/status.json"))["state"]["training"],
          seconds=10)
    state = json.loads(_get(port, "/status.json"))["state"]
    assert "simulated trainer bug" in state["training"]
    assert 'n2s_worker_up{worker="trainer"} 0.0' in _get(port, "/metrics")
    assert thread.is_alive()  # policy: the daemon serves on without training
    daemon.stop_requested.set()
    thread.join(timeout=120)
    assert status == [0]


def test_a_required_worker_that_dies_stops_the_daemon_with_status_1(running_daemon):
    daemon, status, thread = running_daemon
    source = daemon.stages.source

    def crash():
        raise RuntimeError("simulated source bug")

    source._events.take = crash  # the source thread's next round raises
    thread.join(timeout=120)
    assert status == [1]
    assert isinstance(daemon.failure, RuntimeError) and "source" in str(daemon.failure)


def test_sigterm_with_a_full_queue_stops_within_stop_timeout(tmp_path):
    """64 frames of 512x512 queued (seconds of work) and --stop-timeout 1: SIGTERM ends
    the daemon in about a second, exit 0; what it did not write is counted, and the next
    start writes it, each frame once."""
    from daemon_helpers import read_output

    daemon = DaemonProcess(tmp_path, "--stop-timeout", "1", "--no-cold-start")
    daemon.wait_ready()
    writer = start_writer(daemon.watch, frames=120, rate=0, shape="512x512")
    assert writer.wait(timeout=120) == 0
    _wait(lambda: daemon.scrape()["n2s_queue_depth"] >= 60)
    started = time.monotonic()
    assert daemon.terminate(timeout=60) == 0, daemon.log()[-2000:]
    stop_seconds = time.monotonic() - started
    assert stop_seconds < 8, stop_seconds
    assert "stop bound reached" in daemon.log()
    again = DaemonProcess(tmp_path, "--no-cold-start", name="restarted")
    again.wait_ready()
    again.wait_for("closed output .*scan_0001_n2s.h5 \\(120 frames\\)", timeout=180)
    assert again.terminate() == 0
    _, provenance = read_output(again.out / "scan_0001_n2s.h5")
    assert provenance["source_frame"].tolist() == list(range(120))
