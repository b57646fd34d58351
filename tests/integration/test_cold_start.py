"""Cold start: from scratch, a calibrated classical denoiser writes frames until the
network's held-out loss beats it, then the network does, for good; outputs say which."""

from __future__ import annotations

import logging

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
from n2s_stream.runtime.snapshot import Snapshot
from tests.helpers.daemon import DaemonProcess, frames_in, read_output, start_writer, write_stack


def test_calibration_picks_a_denoiser_that_helps():
    clean = clean_frames(1, (96, 96), seed=1)[0]
    noisy = poisson_frames(clean, 20.0, np.random.default_rng(0)).astype(np.float32)
    normalized = (noisy - noisy.mean()) / noisy.std()
    classical = calibrate_classical(normalized)
    denoised = classical(normalized) * noisy.std() + noisy.mean()
    assert classical.name in ("tv", "wavelet")
    assert psnr(clean * 20, denoised, 20.0) > psnr(clean * 20, noisy, 20.0) + 4.0


def _first_frame_decision(
    weights: dict[str, torch.Tensor] | None, objective: str = "noise2self"
) -> tuple[bool, list]:
    """Whether the cold start is still active after the first frame (a photograph the shipped
    model never saw, 128x128, peak 20, photon counts) with a starting network of
    ``weights`` (None: random) trained by ``objective``, and the metric updates it made."""
    clean = skdata.camera()[::4, ::4].astype(np.float64) / 255.0
    noisy = poisson_frames(clean, 20.0, np.random.default_rng(1)).astype(np.uint16)
    network = NetworkOptions()
    masker = Masker(network.masker_config())
    model = build_model(network.model_config())
    if weights is not None:
        model.load_state_dict(weights)
    changes: list = []
    cold = ColdStart(
        active=True,
        on_change=lambda *change: changes.append(change),
        starting=StartingNetwork(model, masker, crop=256, objective=objective),
    )
    snapshot = _first_frame_snapshot(noisy)
    image = snapshot.normalizer.forward(noisy[np.newaxis])[0]
    cold.denoiser_for(image, snapshot)
    cold.denoiser_for(image, snapshot)  # scored once only
    return cold.active, changes


def _first_frame_snapshot(frame: np.ndarray, counts_per_photon: float | None = 1.0) -> Snapshot:
    """What the calibration of ``frame`` tells the cold start: its normaliser, dtype and
    counts per photon."""
    normalizer = NetworkOptions().fit_normalizer(frame[np.newaxis], source_dtype=frame.dtype)
    return Snapshot(0, {}, normalizer, counts_per_photon, frame.dtype.name)


@pytest.mark.parametrize("objective", ["noise2self", "binomial"])
def test_a_pretrained_network_that_beats_classical_on_the_first_frame_writes_it(objective):
    network = NetworkOptions()
    shipped = starting_model(network.model_config(), network.masker_config(), objective)
    assert shipped is not None
    active, changes = _first_frame_decision(shipped.state_dict, objective)
    assert not active
    _, (active_after, classical_loss, network_loss) = changes  # scored once
    assert active_after is False and 0 < network_loss < classical_loss


@pytest.mark.parametrize("objective", ["noise2self", "binomial"])
def test_an_untrained_network_does_not_take_the_first_frame(objective):
    torch.manual_seed(0)
    active, changes = _first_frame_decision(None, objective)
    assert active
    _, (active_after, classical_loss, network_loss) = changes
    assert active_after is True and network_loss > classical_loss > 0


@pytest.mark.parametrize(
    ("objective", "dtype", "counts_per_photon", "split"),
    [
        ("binomial", np.uint16, 1.0, True),  # photon counts: the single pass, by splits
        ("binomial", np.uint16, 2.5, False),  # not photons: training falls back, masked
        ("binomial", np.float32, 1.0, False),  # floats cannot be split
        ("noise2self", np.uint16, 1.0, False),  # a blind network: masked, as it learnt
    ],
)
def test_the_first_frame_is_scored_by_photon_splits_where_training_splits_photons(
    objective, dtype, counts_per_photon, split
):
    """Scored by a masked use, a network without a blind spot is judged on what it never
    learnt; on photon counts the cold start scores it, and the classical denoiser, on the
    same binomial splits instead: the number is then their error against the split-off
    photons, far above a masked loss of the normalised frame's order."""
    frame = np.random.default_rng(0).poisson(20.0, size=(64, 64)).astype(dtype)
    snapshot = _first_frame_snapshot(frame, counts_per_photon)
    network = NetworkOptions()
    starting = StartingNetwork(
        build_model(network.model_config()),
        Masker(network.masker_config()),
        crop=64,
        objective=objective,
        keep=0.9,
    )
    loss_of = starting.loss_of(snapshot.normalizer.forward(frame[np.newaxis])[0], snapshot)
    assert (loss_of.keywords["split"] is not None) is split
    if split:
        assert loss_of.keywords["split"].keep == 0.9
        flat = loss_of(_Constant())  # predicts the mean: the target's variance, 1/(1-keep)
        assert flat == pytest.approx(1 / (1 - 0.9), rel=0.1)


@pytest.mark.parametrize("shipped", [True, False])
def test_a_starting_network_of_several_frames_is_scored_on_the_first_context(caplog, shipped):
    """One frame holds no context: a starting network of 3 frames is scored on the first
    context stack whose neighbours all exist, before that frame is written. The shipped
    3-frame model wins there and writes from frame 0; random weights lose and the
    classical denoiser writes (the trainer scores again later)."""
    network = NetworkOptions(context_frames=3)
    model, masker = network.model_config(), network.masker_config()
    weights = build_model(model)
    if shipped:
        checkpoint = starting_model(model, masker, "binomial")
        assert checkpoint is not None
        weights.load_state_dict(checkpoint.state_dict)
    weights.eval()
    changes: list = []
    cold = ColdStart(
        active=True,
        on_change=lambda *change: changes.append(change),
        starting=StartingNetwork(weights, Masker(masker), 256, "binomial"),
    )
    clean = skdata.camera()[::4, ::4].astype(np.float64) / 255.0  # unseen in pretraining
    rng = np.random.default_rng(1)
    frames = np.stack([poisson_frames(clean, 20.0, rng) for _ in range(3)]).astype(np.uint16)
    snapshot = _first_frame_snapshot(frames[0])
    stacks = snapshot.normalizer.forward(frames)[np.newaxis]  # (1, K, H, W), centre first
    with caplog.at_level(logging.INFO, logger="n2s_stream.runtime.coldstart"):
        cold.denoiser_for(stacks[0, 0], snapshot)
    assert cold.active and len(changes) == 1  # not scored on the lone frame
    assert "scored on the first whole context stack" in caplog.text

    def forward(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return weights(torch.from_numpy(batch)).numpy()[:, 0]

    causal_start = stacks.copy()
    causal_start[:, 2] = 0  # a neighbour the series does not have yet: zero-filled
    assert cold.denoise(causal_start, forward, snapshot)[0] == CLASSICAL
    assert len(changes) == 1  # no context, no score
    denoiser, out = cold.denoise(stacks, forward, snapshot)
    assert out.shape == (1, *clean.shape) and len(changes) == 2  # scored once, here
    _, classical_loss, network_loss = changes[1]
    assert denoiser == (NETWORK if shipped else CLASSICAL) and cold.active is not shipped
    assert (network_loss < classical_loss) is shipped
    cold.denoise(stacks, forward, snapshot)
    assert len(changes) == 2 and "could not be scored" not in caplog.text


class _Constant(torch.nn.Module):
    """Predicts the normalised mean (0) everywhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x[:, :1])


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
    frame = np.random.default_rng(0).poisson(20.0, size=(64, 64)).astype(np.uint16)
    snapshot = _first_frame_snapshot(frame)
    image = snapshot.normalizer.forward(frame[np.newaxis])[0]
    assert cold.denoiser_for(image, snapshot).name in ("tv", "wavelet")
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
    assert f"starts from the shipped pretrained model {SHIPPED[objective, 1]}" in daemon.log()
    assert "cold start over" in daemon.log() and metrics["n2s_cold_start_active"] == 0
    assert 0 < metrics["n2s_selfsup_val_loss"] < metrics["n2s_classical_selfsup_loss"]
    _, provenance = read_output(daemon.out / "scan_0001_n2s.h5")
    assert (provenance["denoiser"] == NETWORK).all()  # the first frame included
    assert provenance["model_version"][0] == 0  # as shipped


def test_daemon_starts_a_three_frame_network_from_its_shipped_model(tmp_path):
    """``--context-frames 3`` under the default objective starts from the shipped 3-frame
    file, scored on the first frame's context before that frame is written: it wins, and
    the network writes every frame."""
    daemon = DaemonProcess(tmp_path, "--context-frames", "3")
    daemon.wait_ready()
    writer = start_writer(daemon.watch, frames=30, rate=15, seed=1)
    assert writer.wait(timeout=60) == 0
    daemon.wait_for_ended(1, timeout=120)
    daemon.wait_until(lambda m: m["n2s_cold_start_active"] == 0, "cold start over", 60)
    second = start_writer(daemon.watch, frames=10, rate=0, name="scan_0002", seed=2)
    assert second.wait(timeout=60) == 0
    daemon.wait_for_ended(2, timeout=60)
    assert daemon.terminate() == 0
    assert f"starts from the shipped pretrained model {SHIPPED['binomial', 3]}" in daemon.log()
    assert "scored on the first whole context stack" in daemon.log()
    assert daemon.log().count("cold start over") == 1
    _, first = read_output(daemon.out / "scan_0001_n2s.h5")
    assert (first["denoiser"] == NETWORK).all()  # the first frame included
    assert first["model_version"][0] == 0  # as shipped
    _, provenance = read_output(daemon.out / "scan_0002_n2s.h5")
    assert (provenance["denoiser"] == NETWORK).all()


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
