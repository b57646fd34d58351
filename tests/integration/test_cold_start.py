"""Cold start: from scratch, a calibrated classical denoiser writes frames until the
network's held-out loss beats it, then the network does, for good; outputs say which."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from skimage import data as skdata

from n2s_stream.commands.simulate import clean_frames, poisson_frames, truth_path
from n2s_stream.config import NetworkOptions
from n2s_stream.models import build_model
from n2s_stream.n2s.classical import calibrate_classical
from n2s_stream.n2s.masking import Masker
from n2s_stream.n2s.quality import psnr
from n2s_stream.n2s.specs import OBJECTIVES
from n2s_stream.pretrained import SHIPPED, starting_model
from n2s_stream.runtime.coldstart import CLASSICAL, NETWORK, ColdStart, StartingNetwork
from tests.helpers.daemon import DaemonProcess, frames_in, read_output, start_writer, write_stack


def test_calibration_picks_a_denoiser_that_helps():
    clean = clean_frames(1, (96, 96), seed=1)[0]
    noisy = poisson_frames(clean, 20.0, np.random.default_rng(0)).astype(np.float32)
    normalized = (noisy - noisy.mean()) / noisy.std()
    classical = calibrate_classical(normalized)
    denoised = classical(normalized) * noisy.std() + noisy.mean()
    assert classical.name in ("tv", "wavelet")
    assert psnr(clean * 20, denoised, 20.0) > psnr(clean * 20, noisy, 20.0) + 4.0


def _first_frame_decision(weights: dict[str, torch.Tensor] | None) -> tuple[bool, list]:
    """Whether the cold start is still active after the first frame (a photograph the shipped
    model never saw, 128x128, peak 20) with a starting network of ``weights`` (None:
    random), and the metric updates it made."""
    clean = skdata.camera()[::4, ::4].astype(np.float64) / 255.0
    noisy = poisson_frames(clean, 20.0, np.random.default_rng(1)).astype(np.float32)
    network = NetworkOptions()
    masker = Masker(network.masker_config())
    model = build_model(network.model_config())
    if weights is not None:
        model.load_state_dict(weights)
    changes: list = []
    cold = ColdStart(
        active=True,
        on_change=lambda *change: changes.append(change),
        starting=StartingNetwork(model, masker, crop=256),
    )
    cold.denoiser_for((noisy - noisy.mean()) / noisy.std())
    cold.denoiser_for((noisy - noisy.mean()) / noisy.std())  # scored once only
    return cold.active, changes


def test_a_pretrained_network_that_beats_classical_on_the_first_frame_writes_it():
    network = NetworkOptions()
    shipped = starting_model(network.model_config(), network.masker_config())
    assert shipped is not None
    active, changes = _first_frame_decision(shipped.state_dict)
    assert not active
    _, (active_after, classical_loss, network_loss) = changes  # scored once
    assert active_after is False and 0 < network_loss < classical_loss


def test_an_untrained_network_does_not_take_the_first_frame():
    torch.manual_seed(0)
    active, changes = _first_frame_decision(None)
    assert active
    _, (active_after, classical_loss, network_loss) = changes
    assert active_after is True and network_loss > classical_loss > 0


class _Failing(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("CUDA out of memory (simulated)")


def test_a_starting_network_that_cannot_be_scored_leaves_the_classical_denoiser(caplog):
    network = NetworkOptions()
    failing = _Failing()
    failing.register_parameter("w", torch.nn.Parameter(torch.zeros(1)))
    cold = ColdStart(
        active=True,
        on_change=lambda *_: None,
        starting=StartingNetwork(failing, Masker(network.masker_config()), 64),
    )
    image = np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32)
    assert cold.denoiser_for(image).name in ("tv", "wavelet")
    assert cold.active and "could not be scored on the first frame" in caplog.text


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_daemon_lets_the_shipped_network_write_from_the_first_frame(tmp_path, objective):
    daemon = DaemonProcess(tmp_path, "--no-refine", "--objective", objective)
    daemon.wait_ready()
    assert daemon.scrape()["n2s_cold_start_active"] == 1
    clean = skdata.camera()[::4, ::4].astype(np.float64) / 255.0  # unseen in pretraining
    rng = np.random.default_rng(1)
    noisy = np.stack([poisson_frames(clean, 20.0, rng) for _ in range(4)]).astype(np.uint16)
    written = write_stack(tmp_path / "scan_0001.h5", noisy, "/entry/data/data")
    written.rename(daemon.watch / written.name)  # appears complete
    daemon.wait_for_ended(1, timeout=60)
    assert frames_in(daemon.output("scan_0001_n2s.h5")) == 4
    metrics = daemon.scrape()
    assert daemon.terminate() == 0
    assert f"starts from the shipped pretrained model {SHIPPED[objective]}" in daemon.log()
    assert "cold start over" in daemon.log() and metrics["n2s_cold_start_active"] == 0
    assert 0 < metrics["n2s_selfsup_val_loss"] < metrics["n2s_classical_selfsup_loss"]
    _, provenance = read_output(daemon.out / "scan_0001_n2s.h5")
    assert (provenance["denoiser"] == NETWORK).all()  # the first frame included
    assert provenance["model_version"][0] == 0  # as shipped


def test_daemon_switches_once_from_classical_to_network(tmp_path):
    dose = 20.0  # the simulator's default dose
    # from random weights (a shipped model may already beat classical on the first frame)
    daemon = DaemonProcess(tmp_path, "--publish-every", "10", "--no-pretrained")
    daemon.wait_ready()
    assert daemon.scrape()["n2s_cold_start_active"] == 1
    writer = start_writer(daemon.watch, frames=120, rate=15, seed=1)
    assert writer.wait(timeout=120) == 0
    daemon.wait_for_ended(1, timeout=120)
    assert frames_in(daemon.output("scan_0001_n2s.h5")) == 120
    daemon.wait_until(lambda m: m["n2s_cold_start_active"] == 0, "cold start over", 120)
    second = start_writer(daemon.watch, frames=20, rate=0, name="scan_0002", seed=2)
    assert second.wait(timeout=60) == 0
    daemon.wait_for_ended(2, timeout=60)
    assert frames_in(daemon.output("scan_0002_n2s.h5")) == 20
    metrics = daemon.scrape()
    assert daemon.terminate() == 0
    assert metrics["n2s_cold_start_active"] == 0
    assert metrics["n2s_classical_selfsup_loss"] > 0
    assert daemon.log().count("cold start over") == 1

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
    assert (
        psnr(clean[classical], frames[classical], dose)
        > psnr(clean[classical], noisy[classical], dose) + 5.0
    )
