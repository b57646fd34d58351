"""Cold start: from scratch, a calibrated classical denoiser writes frames until the
network's held-out loss beats it, then the network does, for good; outputs say which."""

from __future__ import annotations

import h5py
import numpy as np
from daemon_helpers import DaemonProcess, read_output, start_writer

from n2s_stream.coldstart import CLASSICAL, NETWORK, calibrate_classical
from n2s_stream.quality import psnr
from n2s_stream.simulate import clean_frames, poisson_frames, truth_path


def test_calibration_picks_a_denoiser_that_helps():
    clean = clean_frames(1, (96, 96), seed=1)[0]
    noisy = poisson_frames(clean, 20.0, np.random.default_rng(0)).astype(np.float32)
    normalized = (noisy - noisy.mean()) / noisy.std()
    classical = calibrate_classical(normalized)
    denoised = classical(normalized) * noisy.std() + noisy.mean()
    assert classical.name in ("tv", "wavelet")
    assert psnr(clean * 20, denoised, 20.0) > psnr(clean * 20, noisy, 20.0) + 4.0


def test_daemon_switches_once_from_classical_to_network(tmp_path):
    dose = 20.0  # the simulator's default dose
    daemon = DaemonProcess(tmp_path, "--publish-every", "20")
    daemon.wait_ready()
    assert daemon.scrape()["n2s_cold_start_active"] == 1
    writer = start_writer(daemon.watch, frames=120, rate=15, seed=1)
    assert writer.wait(timeout=120) == 0
    daemon.wait_for(r"closed output .*scan_0001_n2s.h5 \(120 frames\)", timeout=120)
    daemon.wait_for("cold start over: network held-out loss", timeout=120)
    second = start_writer(daemon.watch, frames=20, rate=0, name="scan_0002", seed=2)
    assert second.wait(timeout=60) == 0
    daemon.wait_for(r"closed output .*scan_0002_n2s.h5 \(20 frames\)", timeout=60)
    metrics = daemon.scrape()
    assert daemon.terminate() == 0
    assert metrics["n2s_cold_start_active"] == 0
    assert metrics["n2s_classical_selfsup_loss"] > 0
    assert daemon.log().count("cold start over") == 1
    assert "network starts from the shipped pretrained model" in daemon.log()

    first = daemon.out / "scan_0001_n2s.h5"
    frames, _ = read_output(first)
    with h5py.File(first) as handle:
        denoiser = handle["/entry/provenance/denoiser"][()]
        assert handle["/entry/process/cold_start"][()].decode().startswith(("tv", "wavelet"))
    assert denoiser[0] == CLASSICAL and (np.diff(denoiser.astype(int)) <= 0).all()
    with h5py.File(daemon.out / "scan_0002_n2s.h5") as handle:
        assert (handle["/entry/provenance/denoiser"][()] == NETWORK).all()
    # the frames written before the network was ready are classical-denoised, not raw
    classical = denoiser == CLASSICAL
    with h5py.File(truth_path(daemon.watch / "scan_0001.h5")) as handle:
        clean = handle["clean"][()] * dose
    with h5py.File(daemon.watch / "scan_0001.h5") as handle:
        noisy = handle["/entry/data/data"][()].astype(np.float32)
    assert psnr(clean[classical], frames[classical], dose) > \
        psnr(clean[classical], noisy[classical], dose) + 5.0
