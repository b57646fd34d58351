"""The first frames of a scan against finely calibrated TV, frame by frame.

The daemon writes the first frames of a scan with a classical denoiser calibrated
J-invariantly on the first frame (``n2s_stream.n2s.classical``), unless the shipped pretrained
network beats it on that frame's held-out loss (masked, or by photon splits under binomial
training); the issue asks that those frames be never
below calibrated classical denoising. On first_pass's scan (a 256x256 window drifting
3 px/frame over real photographs, Poisson noise), for each peak dose, each candidate is
calibrated on the normalised first frame as the daemon does and applied to the first
``--frames`` frames; the reference is first_pass's TV (Chambolle, calibrated on the first
frame over 30 weights). Candidates: the daemon's grids (Chambolle TV or wavelet), TV solved
to convergence (split Bregman), both in the Anscombe domain (counts taken as photons), and
the shipped networks (single pass; the blind-spot one that ``--objective noise2self``
starts from and the non-blind one that the default binomial objective and
neighbor2neighbor start from) with whether the daemon lets each write
frame 0. Prints
the per-frame PSNR margin over the reference (mean, worst, worst frame), the calibration's
seconds and the seconds per frame; writes ``benchmarks/results/cold_start_classical.json``.

    python benchmarks/cold_start_classical.py          # ~30 s on 2 cores
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from common import RESULTS, write_report
from first_pass import calibrated_tv, drifting_scan, frame_margins
from offline_quality import noisy_counts
from skimage.restoration import denoise_tv_bregman, denoise_tv_chambolle, denoise_wavelet

from n2s_stream.config import NetworkOptions
from n2s_stream.models import build_model
from n2s_stream.n2s.classical import GRIDS, Grids, calibrate_classical
from n2s_stream.n2s.denoising import denoise_counts
from n2s_stream.n2s.masking import Masker
from n2s_stream.n2s.normalize import Normalizer
from n2s_stream.n2s.specs import Objective
from n2s_stream.pretrained import starting_model
from n2s_stream.runtime.coldstart import ColdStart, StartingNetwork
from n2s_stream.runtime.snapshot import Snapshot
from n2s_stream.runtime.trainer import VAL_CROP


def tv_split_bregman(image: np.ndarray, smoothing: float) -> np.ndarray:
    """TV solved to convergence; ``smoothing`` plays Chambolle's ``weight``. (Chambolle in
    scikit-image stops early, so its result jumps with the weight.)"""
    return denoise_tv_bregman(image, weight=1.0 / (2.0 * smoothing), eps=1e-4, max_num_iter=200)


def anscombe_grids(normalizer: Normalizer) -> Grids:
    """The daemon's grids applied in the Anscombe domain of the counts (unit noise)."""

    def in_anscombe(function: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
        def denoise(image: np.ndarray, **params: float) -> np.ndarray:
            counts = np.maximum(normalizer.inverse(image.astype(np.float32)), 0.0)
            y = np.maximum(function(2.0 * np.sqrt(counts + 0.375), **params), 0.8)
            back = (
                (y / 2) ** 2
                - 1 / 8
                + np.sqrt(1.5) / (4 * y)
                - 11 / (8 * y**2)
                + 5 * np.sqrt(1.5) / (8 * y**3)
            )  # Makitalo-Foi closed-form inverse
            return normalizer.forward(back.astype(np.float32))

        return denoise

    return {
        "tv_anscombe": (
            in_anscombe(denoise_tv_chambolle),
            {"weight": list(np.geomspace(0.05, 10.0, 9))},
        ),
        "wavelet_anscombe": (
            in_anscombe(partial(denoise_wavelet, rescale_sigma=True)),
            {"sigma": list(np.geomspace(0.06, 6.0, 9))},
        ),
    }


CANDIDATES: dict[str, Callable[[Normalizer], Grids]] = {
    "daemon: chambolle|wavelet": lambda _: GRIDS,
    "bregman|wavelet": lambda _: {
        "tv": (tv_split_bregman, {"smoothing": list(np.geomspace(0.02, 4.0, 9))}),
        "wavelet": GRIDS["wavelet"],
    },
    "anscombe chambolle|wavelet": anscombe_grids,
}


def daemon_normalizer(noisy: np.ndarray) -> Normalizer:
    """The normaliser the daemon fits on the first (uint16) frame with its defaults."""
    return NetworkOptions().fit_normalizer(
        noisy[:1].astype(np.uint16), source_dtype=np.dtype(np.uint16)
    )


def classical_frames(
    noisy: np.ndarray, grids: Grids, normalizer: Normalizer
) -> tuple[np.ndarray, str, float, float]:
    """The frames denoised as the cold start would with ``grids``: what it picked, the
    calibration's seconds and the seconds per frame."""
    normalized = normalizer.forward(noisy.astype(np.uint16).astype(np.float32))
    started = time.perf_counter()
    denoiser = calibrate_classical(normalized[0], grids)
    calibration = time.perf_counter() - started
    started = time.perf_counter()
    out = normalizer.inverse(np.stack([denoiser(image) for image in normalized]))
    return out, denoiser.describe(), calibration, (time.perf_counter() - started) / len(noisy)


SHIPPED_NETWORKS = {
    "noise2self": "shipped network",
    "neighbor2neighbor": "shipped network, no blind spot",
    "binomial": "the same, scored by photon splits",
}
"""The shipped starting model of each training objective, and its row's label."""


def shipped_network(
    noisy: np.ndarray, normalizer: Normalizer, objective: Objective
) -> tuple[np.ndarray, str]:
    """The shipped model for ``objective``: its frames (single pass) and whether the
    daemon's first-frame score lets it write frame 0 (``network writes``) or the classical
    denoiser (``classical writes``)."""
    network = NetworkOptions()
    masker = Masker(network.masker_config())
    shipped = starting_model(network.model_config(), masker.config, objective)
    assert shipped is not None, "no shipped model fits the default options"
    model = build_model(network.model_config())
    model.load_state_dict(shipped.state_dict)
    cold = ColdStart(
        active=True,
        on_change=lambda *_: None,
        starting=StartingNetwork(model, masker, VAL_CROP, objective),
    )
    first = noisy[:1].astype(np.uint16)
    snapshot = Snapshot(0, {}, normalizer, counts_per_photon=1.0, frames_dtype="uint16")
    cold.denoiser_for(normalizer.forward(first.astype(np.float32))[0], snapshot)
    out = denoise_counts(model, masker, normalizer, noisy, jinv=False, device=torch.device("cpu"))
    return out, "classical writes" if cold.active else "network writes"


def main() -> None:
    """Every dose: print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=30)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--drift", type=float, default=3.0)
    parser.add_argument("--doses", type=float, nargs="+", default=[5.0, 20.0, 100.0])
    parser.add_argument("--out", type=Path, default=RESULTS / "cold_start_classical.json")
    args = parser.parse_args()
    clean = drifting_scan(args.frames, args.size, args.drift)
    print(
        f"first {args.frames} frames of first_pass ({args.size}x{args.size}, "
        f"{args.drift:g} px/frame); PSNR margin over finely calibrated TV, dB"
    )
    print(
        f"{'peak':>5} {'candidate':>30} {'mean':>6} {'worst':>6} {'at':>3} "
        f"{'calib s':>7} {'s/frame':>7}  picked"
    )
    rows = []
    for dose in args.doses:
        noisy = noisy_counts(clean, dose)
        truth, reference = clean * dose, calibrated_tv(noisy, dose)
        normalizer = daemon_normalizer(noisy)
        for label, grids in CANDIDATES.items():
            out, picked, calibration, per_frame = classical_frames(
                noisy, grids(normalizer), normalizer
            )
            rows.append(
                {
                    "dose": dose,
                    "candidate": label,
                    "picked": picked,
                    "margins": frame_margins(truth, out, reference, args.frames, dose),
                    "calibration_seconds": calibration,
                    "seconds_per_frame": per_frame,
                }
            )
        for objective, label in SHIPPED_NETWORKS.items():
            out, picked = shipped_network(noisy, normalizer, objective)
            rows.append(
                {
                    "dose": dose,
                    "candidate": label,
                    "picked": picked,
                    "margins": frame_margins(truth, out, reference, args.frames, dose),
                    "calibration_seconds": None,
                    "seconds_per_frame": None,
                }
            )
        for row in rows[-len(CANDIDATES) - len(SHIPPED_NETWORKS) :]:
            margins = row["margins"]
            worst = int(np.argmin(margins))
            timing = (
                ""
                if row["seconds_per_frame"] is None
                else f"{row['calibration_seconds']:7.2f} {row['seconds_per_frame']:7.3f}"
            )
            print(
                f"{dose:5g} {row['candidate']:>30} {np.mean(margins):+6.2f} "
                f"{margins[worst]:+6.2f} {worst:3d} {timing:>15}  {row['picked']}",
                flush=True,
            )
    write_report(args.out, "cold_start_classical", args, rows)


if __name__ == "__main__":
    main()
