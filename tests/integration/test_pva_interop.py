"""Interoperability: the daemon follows pvapy's ``pvapy-ad-sim-server`` (APS's areaDetector
stand-in, on EPICS pvAccessCPP: its own frames, its own NTNDArray encoding, its own server)
found by UDP search on loopback. Marked slow and interop: make test-slow."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.daemon import STARTED, DaemonProcess, free_port, read_output

pytest.importorskip("p4p", reason="optional extra [pva] not installed")
SIM = str(Path(sys.executable).with_name("pvapy-ad-sim-server"))  # beside this Python
pytestmark = [
    pytest.mark.slow,
    pytest.mark.interop,
    pytest.mark.skipif(not Path(SIM).exists(), reason="pvapy not installed"),
]


def test_daemon_follows_pvapy_ad_sim_server(tmp_path):
    udp = free_port()  # pvAccessCPP takes its TCP port itself; search finds it by UDP
    env = {
        "EPICS_PVA_ADDR_LIST": "127.0.0.1",
        "EPICS_PVA_AUTO_ADDR_LIST": "NO",
        "EPICS_PVA_BROADCAST_PORT": str(udp),
        "EPICS_PVAS_BROADCAST_PORT": str(udp),
        "EPICS_PVAS_INTF_ADDR_LIST": "127.0.0.1",
        "EPICS_PVA_NAME_SERVERS": "",
    }
    pv = f"N2SINTEROP:{os.getpid()}:Image"
    daemon = DaemonProcess(
        tmp_path, "--pva", pv, "--pva-series-gap", "3", "--no-cold-start", env=env
    )
    daemon.wait_ready()
    simulator = subprocess.Popen(
        [
            SIM,
            "-cn",
            pv,
            "-nx",
            "64",
            "-ny",
            "48",
            "-dt",
            "uint16",
            "-mn",
            "0",
            "-mx",
            "200",
            "-fps",
            "20",
            "-nf",
            "60",
            "-rt",
            "6",
            "-std",
            "3",
            "-shd",
            "1",
            "-dc",
            "-rp",
            "0",
        ],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    STARTED.append(simulator)
    assert simulator.wait(timeout=60) == 0
    daemon.wait_for_ended(1, timeout=60)
    time.sleep(0.5)
    metrics = daemon.scrape()
    assert daemon.terminate() == 0, daemon.log()[-2000:]

    (output,) = daemon.out.glob("*_n2s.h5")
    frames, provenance = read_output(output)
    written = provenance["source_frame"]
    assert len(written) >= 60 and (np.diff(written) > 0).all()  # ~120 published, 64x48
    assert frames.shape[1:] == (48, 64) and np.isfinite(frames).all()
    assert metrics["n2s_frames_received_total"] == len(written)
    assert metrics.get("n2s_frames_missing_total", 0) == written[-1] + 1 - len(written)
    assert not any(v for k, v in metrics.items() if k.startswith("n2s_frames_rejected_total"))
