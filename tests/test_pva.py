"""The daemon on a real PVAccess server (the simulator acting as NDPluginPva, in its own
process, on loopback): the stale value at connect is not denoised, a counter reset opens a
new series, every frame is written once."""

from __future__ import annotations

import os
import subprocess
import time

import h5py
import numpy as np
import pytest
from daemon_helpers import N2S, STARTED, DaemonProcess, free_port

pytest.importorskip("p4p", reason="optional extra [pva] not installed")


def _pva_env() -> dict[str, str]:
    """Loopback only, by name server (UDP search between processes is fragile)."""
    port, broadcast = free_port(), free_port()
    return {"EPICS_PVA_NAME_SERVERS": f"127.0.0.1:{port}", "EPICS_PVA_AUTO_ADDR_LIST": "NO",
            "EPICS_PVA_ADDR_LIST": "", "EPICS_PVA_BROADCAST_PORT": str(broadcast),
            "EPICS_PVAS_INTF_ADDR_LIST": "127.0.0.1", "EPICS_PVAS_SERVER_PORT": str(port),
            "EPICS_PVAS_BROADCAST_PORT": str(broadcast), "EPICS_PVAS_AUTO_BEACON_ADDR_LIST":
            "NO", "EPICS_PVAS_BEACON_ADDR_LIST": ""}


@pytest.mark.parametrize("codec", ["bslz4"])  # every codec: tests/test_ntndarray.py
def test_two_acquisitions_from_an_ntndarray_pv(tmp_path, codec):
    env = _pva_env()
    pv = f"N2STEST:{os.getpid()}:{codec}:Image"
    detector = subprocess.Popen(  # the IOC is up first, its PV holding a stale frame
        [*N2S, "simulate", "--pva-serve", pv, "--frames", "25", "--series", "2",
         "--shape", "32x24", "--rate", "25", "--codec", codec, "--start-delay", "12",
         "--log-level", "WARNING"], env={**os.environ, **env})
    STARTED.append(detector)
    daemon = DaemonProcess(tmp_path, "--pva", pv, "--pva-series-gap", "30",
                           "--no-cold-start", env=env)
    daemon.wait_ready()
    opened = daemon.wait_for(r"series (\S+) started at uniqueId 1", timeout=60)
    assert detector.wait(timeout=120) == 0
    first = opened.group(1)
    daemon.wait_for(f"closed output .*{first}_n2s.h5 \\(25 frames\\)", timeout=60)
    deadline = time.monotonic() + 60
    while daemon.scrape().get("n2s_frames_denoised_total", 0) < 50:
        assert time.monotonic() < deadline, daemon.log()[-2000:]
        time.sleep(0.2)
    metrics = daemon.scrape()
    assert daemon.terminate() == 0, daemon.log()[-2000:]
    log = daemon.log()
    assert "is the previous acquisition's and is not denoised" in log  # the stale value
    outputs = sorted(daemon.out.glob("*_n2s.h5"))
    assert len(outputs) == 2 and outputs[0].name == f"{first}_n2s.h5"  # names sort by time
    for output in outputs:
        with h5py.File(output) as handle:
            assert handle["/entry/provenance/source_frame"][()].tolist() == list(range(25))
            assert handle["/entry/data/data"].shape == (25, 32, 24)
            assert np.isfinite(handle["/entry/data/data"][()]).all()
    assert metrics["n2s_frames_received_total"] == 50
    assert metrics.get("n2s_frames_missing_total", 0) == 0
