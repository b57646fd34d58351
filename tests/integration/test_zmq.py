"""The daemon on real ZeroMQ sockets (127.0.0.1): every protocol, several series back to
back, every frame written exactly once; garbage counted and survived."""

from __future__ import annotations

import subprocess
import time

import h5py
import numpy as np
import pytest
import zmq

from n2s_stream.formats import protocols as p
from tests.helpers.daemon import N2S, STARTED, DaemonProcess, frames_in, free_port, read_output


@pytest.mark.parametrize(
    "protocol,names",
    [
        ("native", ["scan_0001", "scan_0002"]),
        ("dectris-stream1", ["series_000001", "series_000002"]),
        ("dectris-stream2", ["series_000001", "series_000002"]),
    ],
)
def test_each_protocol_two_series_exactly_once(tmp_path, protocol, names):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    detector = subprocess.Popen(
        [
            *N2S,
            "simulate",
            "--zmq-bind",
            endpoint,
            "--protocol",
            protocol,
            "--frames",
            "12",
            "--series",
            "2",
            "--shape",
            "32x40",
            "--rate",
            "60",
            "--log-level",
            "WARNING",
        ]
    )
    STARTED.append(detector)
    daemon = DaemonProcess(tmp_path, "--zmq", endpoint, "--zmq-protocol", protocol)
    daemon.wait_ready()
    for ended, name in enumerate(names, start=1):
        daemon.wait_for_ended(ended, timeout=90)
        assert frames_in(daemon.output(f"{name}_n2s.h5")) == 12
    assert detector.wait(timeout=60) == 0
    metrics = daemon.scrape()
    assert daemon.terminate() == 0
    assert metrics["n2s_frames_received_total"] == 24
    assert metrics["n2s_frames_denoised_total"] == 24
    for name in names:
        frames, provenance = read_output(daemon.out / f"{name}_n2s.h5")
        index = provenance["source_frame"]
        assert np.array_equal(index, np.arange(12)) and frames.shape == (12, 32, 40)
        if protocol != "native":  # the Eiger gap row from the pixel mask keeps its value
            assert np.isposinf(frames[:, 16]).all()  # 65535: beyond float16, +inf


def test_series_number_reused_after_end_gets_a_new_file(tmp_path):
    """A detector restarted its numbering: earlier output is never appended to."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    daemon = DaemonProcess(tmp_path, "--zmq", endpoint, "--zmq-protocol", "dectris-stream1")
    daemon.wait_ready()
    for run in range(2):
        proc = subprocess.run(
            [
                *N2S,
                "simulate",
                "--zmq-bind",
                endpoint,
                "--protocol",
                "dectris-stream1",
                "--frames",
                "4",
                "--shape",
                "16x16",
                "--log-level",
                "WARNING",
            ],
            timeout=60,
        )
        assert proc.returncode == 0
        daemon.wait_for_ended(run + 1, timeout=60)
        assert frames_in(daemon.output("series_000001" + ("_r2" if run else "") + "_n2s.h5")) == 4
        time.sleep(0.5)
    assert daemon.terminate() == 0
    for name in ("series_000001_n2s.h5", "series_000001_r2_n2s.h5"):
        assert read_output(daemon.out / name)[1]["source_frame"].tolist() == [0, 1, 2, 3]


def test_republish_and_tee(tmp_path):
    """Viewers SUBscribe to denoised frames; the facility writer PULLs every raw message."""
    feed, out, tee = (f"tcp://127.0.0.1:{free_port()}" for _ in range(3))
    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 5000)
    push.bind(feed)
    daemon = DaemonProcess(tmp_path, "--zmq", feed, "--zmq-out", out, "--zmq-tee", tee)
    viewer = context.socket(zmq.SUB)
    viewer.setsockopt(zmq.SUBSCRIBE, b"")
    writer = context.socket(zmq.PULL)
    try:
        daemon.wait_ready()
        viewer.connect(out)
        writer.connect(tee)
        time.sleep(1.0)  # let the SUB join before anything is published
        frames = [np.full((16, 16), 10 + k, np.uint16) for k in range(6)]
        sent = [p.native_frame("live", k, f, "bslz4") for k, f in enumerate(frames)]
        for message in [*sent, p.native_end("live")]:
            push.send_multipart(message)
        raw = [writer.recv_multipart() for _ in range(7)]
        assert raw[:6] == sent  # untouched, every one
        decoder = p.NativeDecoder()
        viewer.setsockopt(zmq.RCVTIMEO, 30_000)
        published = [decoder.decode(viewer.recv_multipart()) for _ in range(7)]
        images = [e[0] for e in published[:6]]
        assert [i.index for i in images] == list(range(6))
        assert all(i.data.dtype == np.float32 and i.data.shape == (16, 16) for i in images)
        assert published[6] == [p.End("live")]
        assert daemon.terminate() == 0
    finally:
        for sock in (push, viewer, writer):
            sock.close(linger=0)
        context.term()


def test_fan_out_to_two_workers_then_merge(tmp_path):
    """Two daemons PULL one feed (ZeroMQ round-robins the frames); each writes its shard;
    `merge` presents them as one stack in frame order."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    workers = [
        DaemonProcess(
            tmp_path / name, "--zmq", endpoint, "--series-idle-close", "1", "--shared-feed"
        )
        for name in ("a", "b")
    ]
    for worker in workers:
        worker.wait_ready()
    time.sleep(0.5)  # both connected, so the feed is shared
    proc = subprocess.run(
        [
            *N2S,
            "simulate",
            "--zmq-bind",
            endpoint,
            "--frames",
            "40",
            "--shape",
            "24x24",
            "--rate",
            "80",
            "--log-level",
            "WARNING",
        ],
        timeout=120,
    )
    assert proc.returncode == 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done = sum(w.scrape().get("n2s_frames_denoised_total", 0) for w in workers)
        if done == 40:
            break
        time.sleep(0.3)
    assert done == 40
    counts = [w.scrape()["n2s_frames_denoised_total"] for w in workers]
    assert all(c > 0 for c in counts)  # both workers got a share
    # the other worker's frames are not gaps (--shared-feed)
    assert all(w.scrape()["n2s_frames_missing_total"] == 0 for w in workers)
    for worker in workers:  # the end message reached one; the other closes when idle
        worker.wait_for_ended(1, timeout=30)
    for worker in workers:
        assert worker.terminate() == 0
    shards = [w.out / "scan_0001_n2s.h5" for w in workers]
    merged = tmp_path / "merged" / "scan_0001.h5"
    proc = subprocess.run(
        [*N2S, "merge", *map(str, shards), "--out", str(merged)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "40 frames from 2 shards" in proc.stdout and "missing" not in proc.stdout
    with h5py.File(merged, "r") as handle:
        stack = handle["/entry/data/data"][()]
        assert handle["/entry/data/data"].is_virtual
    expected = np.empty_like(stack)
    for shard in shards:
        frames, provenance = read_output(shard)
        index = provenance["source_frame"]
        expected[index] = frames
    assert np.array_equal(stack, expected) and np.isfinite(stack).all()


def test_restart_mid_series_keeps_the_stream1_header(tmp_path):
    """The header (with its pixel mask) came before the restart; images after it still
    decode with the mask, and the output continues without a duplicate."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 5000)
    push.bind(endpoint)
    mask = np.zeros((16, 20), np.uint32)
    mask[8] = 1
    frames = [np.full((16, 20), 5 + k, np.uint16) for k in range(6)]
    try:
        first = DaemonProcess(
            tmp_path, "--zmq", endpoint, "--zmq-protocol", "dectris-stream1", name="first"
        )
        first.wait_ready()
        push.send_multipart(p.stream1_header(7, mask))
        for k in range(3):
            push.send_multipart(p.stream1_image(7, k, frames[k]))
        first.wait_for_metric("n2s_frames_denoised_total", 3, timeout=30)
        assert first.terminate() == 0
        second = DaemonProcess(
            tmp_path, "--zmq", endpoint, "--zmq-protocol", "dectris-stream1", name="second"
        )
        second.wait_ready()
        for k in range(2, 6):  # frame 2 again: the detector resent it
            push.send_multipart(p.stream1_image(7, k, frames[k]))
        push.send_multipart(p.stream1_end(7))
        second.wait_for_ended(1, timeout=30)
        assert frames_in(second.output("series_000007_n2s.h5")) == 6
        assert "header details restored" in second.log()
        assert second.terminate() == 0
        # the series ended: its header left the state dir (masks can be tens of MB each)
        assert list((tmp_path / "state" / "series_headers").iterdir()) == []
    finally:
        push.close(linger=0)
        context.term()
    data, provenance = read_output(tmp_path / "out" / "series_000007_n2s.h5")
    index = provenance["source_frame"]
    assert index.tolist() == [0, 1, 2, 3, 4, 5]
    assert (data[:, 8] == np.arange(5, 11)[:, None]).all()  # masked row keeps raw counts


def test_drop_policy_counts_what_it_drops(tmp_path):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    daemon = DaemonProcess(
        tmp_path, "--zmq", endpoint, "--queue-size", "1", "--drop-when-full", "--max-batch", "1"
    )
    daemon.wait_ready()
    proc = subprocess.run(
        [
            *N2S,
            "simulate",
            "--zmq-bind",
            endpoint,
            "--frames",
            "60",
            "--shape",
            "256x256",
            "--log-level",
            "WARNING",
        ],
        timeout=120,
    )
    assert proc.returncode == 0
    daemon.wait_for_ended(1, timeout=60)
    metrics = daemon.scrape()
    assert daemon.terminate() == 0
    dropped = metrics.get('n2s_frames_rejected_total{reason="dropped_queue_full"}', 0)
    assert dropped > 0
    assert metrics["n2s_frames_denoised_total"] + dropped == 60
    assert metrics.get("n2s_frames_missing_total", 0) == 0  # counted once, as dropped
    assert "dropped: inference queue full" in daemon.log()


def test_detector_restart_is_followed_by_reconnecting(tmp_path):
    """The detector process exits and binds again: ZeroMQ reconnects the daemon's socket."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    daemon = DaemonProcess(tmp_path, "--zmq", endpoint)
    daemon.wait_ready()
    for run in range(2):
        proc = subprocess.run(
            [
                *N2S,
                "simulate",
                "--zmq-bind",
                endpoint,
                "--frames",
                "5",
                "--shape",
                "16x16",
                "--log-level",
                "WARNING",
            ],
            timeout=60,
        )
        assert proc.returncode == 0
        daemon.wait_for_ended(run + 1, timeout=60)
        assert frames_in(daemon.output("scan_0001" + ("_r2" if run else "") + "_n2s.h5")) == 5
    assert daemon.terminate() == 0


def test_inference_worker_adopts_the_training_workers_checkpoints(tmp_path):
    """Fan-out with one model: worker a trains and checkpoints, worker b only infers with
    a's newest checkpoint (shared state dir)."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    trainer = DaemonProcess(
        tmp_path / "a",
        "--zmq",
        endpoint,
        "--checkpoint-every",
        "0.5",
        "--publish-every",
        "10",
        "--series-idle-close",
        "1",
    )
    trainer.wait_ready()
    follower = DaemonProcess(
        tmp_path / "b",
        "--zmq",
        endpoint,
        "--model-from",
        str(tmp_path / "a" / "state"),
        "--series-idle-close",
        "1",
    )
    follower.wait_ready()
    time.sleep(0.5)
    proc = subprocess.run(
        [
            *N2S,
            "simulate",
            "--zmq-bind",
            endpoint,
            "--frames",
            "80",
            "--shape",
            "32x32",
            "--rate",
            "15",
            "--log-level",
            "WARNING",
        ],
        timeout=120,
    )
    assert proc.returncode == 0
    for worker in (trainer, follower):
        worker.wait_for_ended(1, timeout=30)
    metrics = follower.wait_until(lambda m: m["n2s_model_version"] > 0, "a model adopted")
    assert metrics["n2s_train_steps_total"] == 0
    for worker in (trainer, follower):
        assert worker.terminate() == 0
    with h5py.File(tmp_path / "b" / "out" / "scan_0001_n2s.h5") as handle:
        versions = handle["/entry/provenance/model_version"][()]
    assert versions[-1] > 0 and (np.diff(versions) >= 0).all()


def test_sub_socket_follows_a_publishing_detector(tmp_path):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    context = zmq.Context()
    pub = context.socket(zmq.PUB)
    pub.bind(endpoint)
    daemon = DaemonProcess(
        tmp_path, "--zmq", endpoint, "--zmq-socket", "sub", "--zmq-protocol", "dectris-stream2"
    )
    try:
        daemon.wait_ready()
        time.sleep(1.0)  # a SUB sees only what is published after it joined
        frame = np.arange(20 * 20, dtype=np.uint16).reshape(20, 20)
        pub.send_multipart(p.stream2_start(3, frame.shape))
        for k in range(4):
            pub.send_multipart(p.stream2_image(3, k, frame, "lz4"))
        pub.send_multipart(p.stream2_end(3))
        daemon.wait_for_ended(1, timeout=30)
        assert frames_in(daemon.output("series_000003_n2s.h5")) == 4
        assert daemon.terminate() == 0
    finally:
        pub.close(linger=0)
        context.term()
