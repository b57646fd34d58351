"""Operations: a tee nobody reads never stalls denoising; a dead worker is never hidden
(n2s_worker_up, the status, and for a required worker a non-zero exit)."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import urllib.request

import pytest
import zmq
from prometheus_client import CollectorRegistry

from n2s_stream.config import DaemonConfig
from n2s_stream.daemon import Daemon
from n2s_stream.options import make
from n2s_stream.runtime.worker import unfinished_threads
from tests.helpers.daemon import N2S, STARTED, DaemonProcess, frames_in, free_port, start_writer


def test_a_tee_nobody_reads_never_stalls_the_daemon(tmp_path):
    """--zmq-tee bound, no facility writer connected: every frame is denoised, every raw
    message that could not be passed on is counted, and SIGTERM ends it cleanly."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    tee = f"tcp://127.0.0.1:{free_port()}"
    daemon = DaemonProcess(tmp_path, "--zmq", endpoint, "--zmq-tee", tee, "--no-cold-start")
    daemon.wait_ready()
    detector = subprocess.Popen(
        [
            *N2S,
            "simulate",
            "--zmq-bind",
            endpoint,
            "--frames",
            "60",
            "--shape",
            "32x32",
            "--rate",
            "60",
            "--log-level",
            "WARNING",
        ]
    )
    STARTED.append(detector)
    daemon.wait_for_ended(1, timeout=90)
    assert frames_in(daemon.output("scan_0001_n2s.h5")) == 60
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


def _in_process_config(tmp_path, **changes) -> DaemonConfig:
    """A daemon in this process following ``tmp_path/acq`` on the CPU, one thread, no cold
    start, metrics on any free port: with ``changes`` on top."""
    (tmp_path / "acq").mkdir(exist_ok=True)
    return make(
        DaemonConfig,
        **{
            "watch": tmp_path / "acq",
            "out": tmp_path / "out",
            "state_dir": tmp_path / "state",
            "device": "cpu",
            "metrics_port": 0,
            "threads": 1,
            "cold_start": False,
            "settle_seconds": 2,
            **changes,
        },
    )


@pytest.fixture
def running_daemon(tmp_path):
    """A real daemon in this process (so a test can break one of its workers), following a
    directory that a detector process fills."""
    daemon = Daemon(_in_process_config(tmp_path, publish_every=5), registry=CollectorRegistry())
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
    _wait(
        lambda: "STOPPED" in json.loads(_get(port, "/status.json"))["state"].get("training", ""),
        seconds=10,
    )
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


@pytest.mark.slow  # 45 s; the disk-full SIGTERM test covers a full queue in the default run
def test_sigterm_with_a_full_queue_stops_within_stop_timeout(tmp_path):
    """64 frames of 512x512 queued (seconds of work) and --stop-timeout 1: SIGTERM ends
    the daemon in about a second, exit 0; what it did not write is counted, and the next
    start writes it, each frame once."""
    from tests.helpers.daemon import read_output

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
    import re

    unwritten = int(re.search(r"(\d+) accepted frames were not written", daemon.log())[1])
    _, provenance = read_output(daemon.out / "scan_0001_n2s.h5")
    # every frame read was written or counted (the source had read ahead into the queue)
    assert unwritten >= 40 and len(provenance["source_frame"]) + unwritten <= 120
    again = DaemonProcess(tmp_path, "--no-cold-start", name="restarted")
    again.wait_ready()
    assert again.scrape()["n2s_frames_unwritten_at_last_stop"] == unwritten
    again.wait_for_ended(1, timeout=180)
    assert frames_in(again.output("scan_0001_n2s.h5")) == 120
    assert again.terminate() == 0
    _, provenance = read_output(again.out / "scan_0001_n2s.h5")
    assert provenance["source_frame"].tolist() == list(range(120))


def _stalled_detector(tmp_path):
    """A detector process frozen (SIGSTOP) in the middle of its file."""
    import signal

    daemon = DaemonProcess(tmp_path, "--no-cold-start")
    daemon.wait_ready()
    writer = start_writer(daemon.watch, frames=100, rate=20, shape="32x32")
    _wait(lambda: daemon.scrape().get("n2s_frames_denoised_total", 0) >= 10)
    writer.send_signal(signal.SIGSTOP)
    return daemon, writer


def _vanished_feed(tmp_path):
    """A ZeroMQ detector killed mid-series: the daemon's socket waits for a peer."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    detector = subprocess.Popen(
        [
            *N2S,
            "simulate",
            "--zmq-bind",
            endpoint,
            "--frames",
            "400",
            "--shape",
            "32x32",
            "--rate",
            "40",
            "--log-level",
            "WARNING",
        ]
    )
    STARTED.append(detector)
    daemon = DaemonProcess(tmp_path, "--zmq", endpoint, "--no-cold-start")
    daemon.wait_ready()
    _wait(lambda: daemon.scrape().get("n2s_frames_denoised_total", 0) >= 10)
    detector.kill()
    return daemon, detector


def _training_mid_step(tmp_path):
    """Long training steps (batch 64 of 256x256 patches: seconds each) while idle."""
    daemon = DaemonProcess(tmp_path, "--no-cold-start", "--batch", "64", "--patch", "256")
    daemon.wait_ready()
    writer = start_writer(daemon.watch, frames=6, rate=0, shape="256x256")
    assert writer.wait(timeout=60) == 0
    _wait(lambda: daemon.scrape().get("n2s_train_steps_total", 0) >= 1, seconds=120)
    return daemon, writer


def _slow_viewers(tmp_path):
    """A SUB viewer on --zmq-out that never reads, and an HTTP client on the preview port
    that never finishes its request, while frames flow."""
    import socket

    viewer_endpoint = f"tcp://127.0.0.1:{free_port()}"
    daemon = DaemonProcess(tmp_path, "--no-cold-start", "--zmq-out", viewer_endpoint)
    daemon.wait_ready()
    context = zmq.Context()
    viewer = context.socket(zmq.SUB)
    viewer.setsockopt(zmq.SUBSCRIBE, b"")
    viewer.setsockopt(zmq.RCVHWM, 1)
    viewer.connect(viewer_endpoint)
    browser = socket.create_connection(("127.0.0.1", daemon.port))
    browser.sendall(b"GET /status.json HTTP/1.1\r\nHost: x\r\n")  # never finished
    writer = start_writer(daemon.watch, frames=200, rate=40, shape="64x64")
    _wait(lambda: daemon.scrape().get("n2s_frames_denoised_total", 0) >= 20)

    class Cleanup:
        def kill(self):
            writer.kill()
            browser.close()
            viewer.close(linger=0)
            context.term()

        def wait(self, timeout):
            writer.wait(timeout=timeout)

    return daemon, Cleanup()


def _onnx_export_running(tmp_path):
    """ONNX Runtime engine re-exporting new weights all the time while frames flow."""
    pytest.importorskip("onnxruntime", reason="optional extra [onnx] not installed")
    daemon = DaemonProcess(
        tmp_path,
        "--no-cold-start",
        "--engine",
        "onnxruntime",
        "--onnx-reload-seconds",
        "0",
        "--publish-every",
        "1",
    )
    daemon.wait_ready()
    writer = start_writer(daemon.watch, frames=400, rate=40, shape="128x128")
    _wait(lambda: daemon.scrape().get("n2s_model_version", 0) >= 3, seconds=120)
    return daemon, writer


SLOW = pytest.mark.slow  # a minute or two each on 2 cores: make test-slow


@pytest.mark.parametrize(
    "state",
    [
        _stalled_detector,
        _vanished_feed,
        pytest.param(_training_mid_step, marks=SLOW),
        _slow_viewers,
        pytest.param(_onnx_export_running, marks=SLOW),
    ],
    ids=[
        "detector stalled mid-file",
        "feed vanished",
        "training mid-step",
        "slow viewers",
        "ONNX export running",
    ],
)
def test_sigterm_stops_promptly_in_each_state(tmp_path, state):
    daemon, other = state(tmp_path)
    started = time.monotonic()
    status = daemon.terminate(timeout=120)
    stop_seconds = time.monotonic() - started
    other.kill()
    other.wait(timeout=30)
    assert status == 0, daemon.log()[-2000:]
    assert stop_seconds < 30, stop_seconds
    print(f"stop in {stop_seconds:.1f} s")


class _HangingEngine:
    """The daemon's engine, whose forward pass hangs (a driver or file system that never
    returns) until released."""

    def __init__(self, engine) -> None:
        self.engine, self.release = engine, threading.Event()

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def __call__(self, stacks):
        self.release.wait()
        return self.engine(stacks)


def test_a_hung_inference_thread_counts_as_dead(tmp_path):
    """Alive but stuck: after stall_seconds without progress the inference worker is down,
    the watchdog stops, and the daemon stops itself (status 1) within its stop bound."""
    config = _in_process_config(tmp_path, stall_seconds=2, stop_timeout=2)
    daemon = Daemon(config, registry=CollectorRegistry())
    status: list[int] = []
    thread = threading.Thread(target=lambda: status.append(daemon.run()))
    thread.start()
    _wait(lambda: daemon.stages is not None)
    hanging = daemon.stages.inference.engine = _HangingEngine(daemon.stages.inference.engine)
    try:
        writer = start_writer(tmp_path / "acq", frames=5, rate=0, shape="32x32")
        assert writer.wait(timeout=60) == 0
        thread.join(timeout=120)
        assert status == [1]
        assert "inference" in str(daemon.failure)
        value = daemon.metrics.registry.get_sample_value
        assert value("n2s_worker_up", {"worker": "inference"}) == 0
    finally:
        hanging.release.set()
        daemon.stop_requested.set()
        thread.join(timeout=60)


def test_a_start_that_fails_releases_what_it_opened(tmp_path):
    """A metrics port already taken fails the start after the republish socket was bound
    and the state dir claimed: both are released, so a second start in this process binds
    the same endpoint and claims the same state dir."""
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    republish = f"tcp://127.0.0.1:{free_port()}"
    common = {"zmq_out": republish, "refine": False}
    config = _in_process_config(tmp_path, metrics_port=taken.getsockname()[1], **common)
    daemon = Daemon(config, registry=CollectorRegistry())
    with pytest.raises(OSError):
        daemon.run()
    taken.close()
    context = zmq.Context()
    probe = context.socket(zmq.PUB)
    probe.bind(republish)  # raises "Address already in use" if the failed start kept it
    probe.close(linger=0)
    context.term()
    again = Daemon(_in_process_config(tmp_path, **common), registry=CollectorRegistry())
    status: list[int] = []
    thread = threading.Thread(target=lambda: status.append(again.run()))
    thread.start()
    _wait(lambda: again.stages is not None)  # the state dir's lock was given back
    again.stop_requested.set()
    thread.join(timeout=60)
    assert status == [0]


def test_construction_binds_nothing_and_starting_does():
    """Objects are built, then started: building the metrics server and the republishing
    sink on endpoints already taken succeeds; starting them is what fails."""
    import socket

    from prometheus_client import CollectorRegistry as Registry

    from n2s_stream.runtime.metrics import MetricsServer
    from n2s_stream.sinks.republish import ZmqRepublishSink

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    context = zmq.Context()
    holder = context.socket(zmq.PUB)
    holder.bind(endpoint)
    try:
        server = MetricsServer(Registry(), port=taken.getsockname()[1])
        sink = ZmqRepublishSink(endpoint)
        assert not server.alive
        with pytest.raises(OSError):
            server.start()
        with pytest.raises(zmq.ZMQError):
            sink.start()
        server.close()
        sink.close()
    finally:
        holder.close(linger=0)
        context.term()
        taken.close()


def _threads_of_this_process() -> set[str]:
    """Every thread of this process by id, native ones too (libzmq's I/O threads, p4p's)."""
    return set(os.listdir("/proc/self/task"))


def test_building_a_source_or_the_served_pv_starts_nothing(tmp_path):
    """Sources and the served PV are built, then started: building one opens no socket
    and starts no thread (native threads counted), so a daemon start that fails later has
    nothing of it to release; stopping one never started is a no-op."""
    pytest.importorskip("p4p", reason="the [pva] extra is not installed")
    from n2s_stream.sinks.pva import PvaServeSink
    from n2s_stream.sources.bluesky.source import BlueskySource
    from n2s_stream.sources.pva import PvaSource
    from n2s_stream.sources.zmq import ZmqSource

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    config = make(
        DaemonConfig,
        zmq=endpoint,
        zmq_tee=f"tcp://127.0.0.1:{free_port()}",
        bluesky=endpoint,
        bluesky_root=tmp_path,
        pva=f"N2STEST:{os.getpid()}:Built",
        out=tmp_path / "out",
        state_dir=tmp_path / "state",
    )
    common = {"out_root": config.output.out, "emit": lambda item: None, "reject": print}
    state_dir = config.service.state_dir
    before = _threads_of_this_process()
    sources = [
        ZmqSource(config.zmq, **common),
        BlueskySource(config.bluesky, state_dir=state_dir, start_position=lambda s, o: 0, **common),
        PvaSource(config.pva, state_dir=state_dir, **common),
    ]
    served = PvaServeSink(f"N2STEST:{os.getpid()}:Served")
    assert not _threads_of_this_process() - before  # none started (some may have ended)
    for source in sources:
        source.stop()
        assert not source.alive
    served.close()


def test_sigusr1_writes_every_threads_stack_and_the_daemon_goes_on(tmp_path):
    """An operator's ``kill -USR1`` on a daemon that seems stuck: each thread's stack goes
    to the log (the journal), and the daemon keeps writing and stops cleanly after."""
    import signal

    daemon = DaemonProcess(tmp_path, "--no-cold-start")
    daemon.wait_ready()
    writer = start_writer(daemon.watch, frames=40, rate=20, shape="32x32")
    _wait(lambda: daemon.scrape().get("n2s_frames_denoised_total", 0) >= 5)
    daemon.proc.send_signal(signal.SIGUSR1)
    _wait(lambda: "most recent call first" in daemon.log())
    assert writer.wait(timeout=60) == 0
    daemon.wait_for_ended(1, timeout=120)
    written = frames_in(daemon.output("scan_0001_n2s.h5"))
    assert written == 40 and daemon.proc.poll() is None, daemon.log()[-3000:]
    assert daemon.terminate(timeout=120) == 0
    log = daemon.log()
    assert 'File "' in log and "in _run" in log  # the workers' frames, by function
    assert "stopped cleanly after 40 frames" in log


def test_unfinished_threads_names_a_pool_worker_that_never_returns():
    """A non-daemon thread blocked for good is named after the wait, so the CLI exits
    anyway; once it ends, nothing is left."""
    release = threading.Event()
    stuck = threading.Thread(target=release.wait, name="decode_0")
    stuck.start()
    try:
        assert "decode_0" in unfinished_threads(0.2)
    finally:
        release.set()
    assert "decode_0" not in unfinished_threads(5.0)
