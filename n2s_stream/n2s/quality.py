"""Image-quality scores against a known truth (simulator, benchmarks). Pure numpy."""

from __future__ import annotations

import numpy as np
from skimage.metrics import structural_similarity


def psnr(truth: np.ndarray, estimate: np.ndarray, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB over the whole array; range defaults to the truth's."""
    truth = np.asarray(truth, dtype=np.float64)
    estimate = np.asarray(estimate, dtype=np.float64)
    data_range = float(truth.max() - truth.min()) if data_range is None else data_range
    mse = float(np.mean((truth - estimate) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(data_range**2 / mse)


def mean_ssim(truth: np.ndarray, estimate: np.ndarray, data_range: float | None = None) -> float:
    """Structural similarity averaged over the frames of ``(N, H, W)`` stacks."""
    truth = np.asarray(truth, dtype=np.float64).reshape(-1, *truth.shape[-2:])
    estimate = np.asarray(estimate, dtype=np.float64).reshape(truth.shape)
    data_range = float(truth.max() - truth.min()) if data_range is None else data_range
    return float(
        np.mean(
            [
                structural_similarity(t, e, data_range=data_range)
                for t, e in zip(truth, estimate, strict=True)
            ]
        )
    )


def flux_ratio(denoised: np.ndarray, raw: np.ndarray, valid: np.ndarray) -> float:
    """Total denoised counts over total raw counts on the measured pixels of one frame: 1
    when denoising moves intensity around without adding or removing any, so a lasting
    departure shows a bias in what integration would measure (NaN for a frame without
    counts)."""
    where: np.ndarray | bool = True if valid.all() else valid
    raw_total = float(np.sum(raw, where=where, dtype=np.float64))
    if raw_total <= 0:
        return float("nan")
    return float(np.sum(denoised, where=where, dtype=np.float64)) / raw_total
