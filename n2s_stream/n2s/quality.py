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
