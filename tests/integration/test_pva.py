"""The daemon on real PVAccess servers in their own processes on loopback (the simulator
acting as NDPluginPva, or a scripted IOC), its denoised PV read back by pvapy: the stale
value at connect is not denoised, a counter reset opens a new series, gaps are counted
once, a JPEG frame is refused, a burst beyond the monitor queue gives counted gaps only,
and a daemon killed mid-series continues its file."""

from __future__ import annotations

import os
import re
import subprocess

import h5py
import numpy as np
import pytest

from n2s_stream import __version__
from tests.helpers.daemon import (
    FLOAT32,
    N2S,
    STARTED,
    DaemonProcess,
    frames_in,
    free_port,
    read_output,
)
from tests.helpers.pva import client_env, pva_env, pvapy_reader, scripted_server, server_env

pytest.importorskip("p4p", reason="optional extra [pva] not installed")


def _simulator(pv: str, env: dict, *args: str) -> subprocess.Popen:
    """The detector: up first, its PV holding a stale frame (pvxs clients retry a refused
    name server only every 10 s, so the server must be there when the daemon starts)."""
    proc = subprocess.Popen(
        [*N2S, "simulate", "--pva-serve", pv, "--log-level", "WARNING", *args],
        env={**os.environ, **env},
    )
    STARTED.append(proc)
    return proc


def _wait_denoised(daemon: DaemonProcess, count: int, timeout: float = 60) -> dict:
    return daemon.wait_for_metric("n2s_frames_denoised_total", count, timeout)


def test_two_acquisitions_by_acquire_pv_with_gaps_served_back_as_a_pv(tmp_path):
    """The counter runs on between acquisitions: the Acquire PV alone separates them."""
    pytest.importorskip("pvaccess", reason="pvapy (the second client) not installed")
    env, _ = pva_env()
    pv, served, acquire = (
        f"N2STEST:{os.getpid()}:{name}" for name in ("Image", "Denoised", "Acquire")
    )
    serve_port = free_port()
    detector = _simulator(
        pv,
        env,
        "--frames",
        "25",
        "--series",
        "2",
        "--shape",
        "32x24",
        "--rate",
        "25",
        "--codec",
        "bslz4",
        "--gap-every",
        "10",
        "--acquire-pv",
        acquire,
        "--keep-counter",
        "--start-delay",
        "12",
    )
    daemon = DaemonProcess(
        tmp_path,
        *FLOAT32,
        "--pva",
        pv,
        "--pva-series-gap",
        "30",
        "--pva-acquire-pv",
        acquire,
        "--no-cold-start",
        "--pva-serve",
        served,
        env={**env, **server_env(serve_port)},
    )
    daemon.wait_ready()
    reader = pvapy_reader(served, 50, tmp_path / "served.npz", client_env(serve_port))
    assert detector.wait(timeout=120) == 0
    daemon.wait_for_ended(1, timeout=60)
    metrics = _wait_denoised(daemon, 50)
    log = daemon.log()
    first = re.search(r"series (\S+) started at uniqueId 1\b", log).group(1)
    assert frames_in(daemon.output(f"{first}_n2s.h5")) == 25
    assert re.search(r"ended after 25 frames \(no frames for 1 s after Acquire went to 0\)", log)
    assert re.search(r"series \S+ started at uniqueId 28\b", log)
    assert reader.wait(timeout=60) == 0, reader.stdout.read()
    assert daemon.terminate() == 0, daemon.log()[-2000:]
    log = daemon.log()
    assert "is the previous acquisition's and is not denoised" in log  # the stale value
    assert metrics["n2s_frames_received_total"] == 50
    # uniqueId 10 and 21 of each acquisition never came: 4 gaps, each counted and logged once
    assert metrics["n2s_frames_missing_total"] == 4
    assert log.count("1 frames missing") == 4
    assert metrics[f'n2s_build_info{{following="{pv}",source="pva",version="{__version__}"}}'] == 1

    outputs = sorted(daemon.out.glob("*_n2s.h5"))
    assert len(outputs) == 2 and outputs[0].name == f"{first}_n2s.h5"  # names sort by time
    sent = [k for k in range(27) if k not in (9, 20)]  # uniqueId - first uniqueId
    written = []
    for output in outputs:
        frames, provenance = read_output(output)
        assert provenance["source_frame"].tolist() == sent and frames.shape == (25, 32, 24)
        assert np.isfinite(frames).all()
        lag = provenance["t_received"] - provenance["t_source"]  # the detector's own clock
        assert ((lag >= 0) & (lag < 5)).all()
        with h5py.File(output) as handle:
            assert handle["/entry/provenance/attributes/ColorMode"][()].tolist() == [0] * 25
        written.append((frames, provenance))

    got = np.load(tmp_path / "served.npz")  # what a second, independent client saw
    assert len(got["ids"]) == 50
    for (frames, provenance), half, base in zip(
        written, (slice(0, 25), slice(25, 50)), (1, 28), strict=True
    ):
        assert (got["ids"][half] - base).tolist() == sent
        np.testing.assert_array_equal(got["frames"][half], frames)
        assert got["version"][half].tolist() == provenance["model_version"].tolist()
        assert (got["denoiser"][half] == provenance["denoiser"]).all()
        assert (provenance["source_id"] - base).tolist() == sent  # the detector's uniqueId


def _frame(unique_id: int, **kw) -> dict:
    return {"id": unique_id, **kw}


def test_jpeg_refused_counter_reset_and_a_burst_beyond_the_monitor_queue(tmp_path):
    env, _ = pva_env()
    pv = f"N2STEST:{os.getpid()}:Script"
    paced = [{"sleep": 0.1}]
    steps = (
        [_frame(900)]
        + [{"sleep": 12}]  # stale value, then time for the daemon
        + [s for k in range(1, 11) for s in (_frame(k, codec="jpeg" if k == 7 else "lz4"), *paced)]
        + [{"sleep": 1.0}]
        + [s for k in range(1, 4) for s in (_frame(k), *paced)]  # the counter reset
        + [_frame(k, shape=[64, 64]) for k in range(4, 204)]
    )  # new shape: a burst
    ioc = scripted_server(pv, steps, env, tmp_path / "ioc.log")
    daemon = DaemonProcess(
        tmp_path,
        "--pva",
        pv,
        "--pva-series-gap",
        "4",
        "--no-cold-start",
        "--pva-queue-size",
        "2",
        "--queue-size",
        "2",
        env=env,
    )
    daemon.wait_ready()
    assert ioc.wait(timeout=120) == 0, (tmp_path / "ioc.log").read_text()
    daemon.wait_for_ended(3, timeout=60)
    assert re.search(r"series \S+ ended after \d+ frames \(no frames", daemon.log())
    metrics = daemon.scrape()
    assert daemon.terminate() == 0, daemon.log()[-2000:]

    first, reset, burst = (
        read_output(path)[1]["source_frame"] for path in sorted(daemon.out.glob("*_n2s.h5"))
    )
    assert first.tolist() == [0, 1, 2, 3, 4, 5, 7, 8, 9]  # uniqueId 7 was the JPEG one
    assert reset.tolist() == [0, 1, 2]  # uniqueId went back to 1: a new acquisition
    assert metrics['n2s_frames_rejected_total{reason="lossy_codec"}'] == 1
    assert len(set(burst.tolist())) == len(burst) and (np.diff(burst) > 0).all()
    assert burst[-1] == 199  # PVA squashes the queue onto the newest update
    missing = metrics.get("n2s_frames_missing_total", 0)
    assert 0 < missing == 200 - len(burst)  # the burst's losses, all counted as missing
    assert metrics["n2s_frames_received_total"] == 9 + 3 + len(burst)
    assert sum(v for k, v in metrics.items() if k.startswith("n2s_frames_rejected_total")) == 1


def test_killed_mid_series_the_restart_continues_the_file(tmp_path):
    env, _ = pva_env()
    pv = f"N2STEST:{os.getpid()}:Restart"
    detector = _simulator(
        pv, env, "--frames", "150", "--shape", "32x32", "--rate", "10", "--start-delay", "12"
    )
    args = ("--pva", pv, "--pva-series-gap", "3", "--no-cold-start")
    daemon = DaemonProcess(tmp_path, *args, env=env)
    daemon.wait_ready()
    _wait_denoised(daemon, 20)
    daemon.kill()
    restarted = DaemonProcess(tmp_path, *args, env=env, name="restarted")
    restarted.wait_ready()
    assert detector.wait(timeout=120) == 0
    restarted.wait_for_ended(1, timeout=60)
    assert re.search(
        r"continues series \S+ \(written to uniqueId \d+\) after a restart", restarted.log()
    )
    metrics = restarted.scrape()
    assert restarted.terminate() == 0, restarted.log()[-2000:]

    (output,) = daemon.out.glob("*_n2s.h5")
    frames = read_output(output)[1]["source_frame"]
    assert len(set(frames.tolist())) == len(frames) and (np.diff(frames) > 0).all()
    assert frames[-1] == 149
    # what the kill and the restart cost (queued, then passed while down) is counted once
    assert metrics["n2s_frames_missing_total"] == 150 - len(frames) > 0


@pytest.mark.slow  # the client retries a lost name server every 10 s: about a minute
def test_daemon_reconnects_when_the_ioc_restarts(tmp_path):
    env, _ = pva_env()
    pv = f"N2STEST:{os.getpid()}:Reboot"
    first = [
        _frame(900),
        {"sleep": 12},
        *(s for k in range(1, 6) for s in (_frame(k), {"sleep": 0.1})),
    ]
    ioc = scripted_server(pv, first, env, tmp_path / "ioc1.log")
    daemon = DaemonProcess(
        tmp_path, "--pva", pv, "--pva-series-gap", "30", "--no-cold-start", env=env
    )
    daemon.wait_ready()
    assert ioc.wait(timeout=60) == 0
    daemon.wait_for(r"Disconnected; waiting for it to come back", timeout=30)
    # the IOC is back: its PV holds the last frame it had (stale), then a new acquisition
    second = [
        _frame(5),
        {"sleep": 15},
        *(s for k in range(1, 4) for s in (_frame(k), {"sleep": 0.1})),
    ]
    rebooted = scripted_server(pv, second, env, tmp_path / "ioc2.log")
    assert rebooted.wait(timeout=60) == 0
    daemon.wait_for(r"(started at uniqueId 1\b[\s\S]*){2}", timeout=60)
    metrics = _wait_denoised(daemon, 8)
    assert daemon.terminate() == 0, daemon.log()[-2000:]
    before, after = (
        read_output(path)[1]["source_frame"].tolist()
        for path in sorted(daemon.out.glob("*_n2s.h5"))
    )
    assert before == [0, 1, 2, 3, 4] and after == [0, 1, 2]  # the stale 5 not written again
    assert metrics["n2s_frames_received_total"] == 8
