"""Guards against denoising biasing what is measured: pure functions of one denoised frame
and its raw counts, applied after the network (``benchmarks/fidelity.py`` scores them)."""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter


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


def preserve_frame_flux(denoised: np.ndarray, raw: np.ndarray, valid: np.ndarray) -> float:
    """Scale the measured pixels of ``denoised`` (in place) so that their total equals the
    raw total: no intensity added to or taken from the frame as a whole; unmeasured pixels
    keep their value. Returns the ratio of the totals before scaling (`flux_ratio`), NaN
    where either has no counts (then nothing changes)."""
    ratio = flux_ratio(denoised, raw, valid)
    if np.isfinite(ratio) and ratio > 0:
        scale = np.float32(1.0 / ratio)
        if valid.all():
            denoised *= scale
        else:
            np.multiply(denoised, scale, out=denoised, where=valid)
    return ratio


def keep_outliers(
    denoised: np.ndarray, raw: np.ndarray, valid: np.ndarray, sigmas: float = 4.0
) -> np.ndarray:
    """The raw count wherever it stands more than ``sigmas`` Poisson deviations above the
    denoised value (a Bragg spot's peak that the network smoothed away); elsewhere the
    denoised value. Under pure Poisson noise such pixels are rare (under 1e-3)."""
    prediction = np.maximum(denoised, 0.0)
    outlier = valid & (raw > prediction + sigmas * np.sqrt(prediction + 1.0))
    return np.where(outlier, raw, denoised).astype(denoised.dtype)


def preserve_local_flux(
    denoised: np.ndarray, raw: np.ndarray, valid: np.ndarray, sigma: float = 4.0
) -> np.ndarray:
    """``denoised`` plus the Gaussian-smoothed (``sigma`` px) residual of the raw counts:
    intensity integrated over a few ``sigma`` is the raw intensity, at the price of the
    noise that survives that smoothing."""
    weight = gaussian_filter(valid.astype(np.float64), sigma)
    residual = gaussian_filter(np.where(valid, raw - denoised, 0.0), sigma)
    correction = np.divide(residual, weight, out=np.zeros_like(residual), where=weight > 1e-6)
    return np.where(valid, denoised + correction, denoised).astype(denoised.dtype)
