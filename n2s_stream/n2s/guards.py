"""Guards against denoising biasing what is measured: pure functions of one denoised frame
and its raw counts, applied after the network (``benchmarks/fidelity.py`` scores them)."""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter


def preserve_frame_flux(denoised: np.ndarray, raw: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """``denoised`` scaled so that its total over the measured pixels equals the raw
    total: no intensity added to or taken from the frame as a whole."""
    raw_total = float(np.sum(raw, where=valid, dtype=np.float64))
    out_total = float(np.sum(denoised, where=valid, dtype=np.float64))
    if raw_total <= 0 or out_total <= 0:
        return denoised
    return np.where(valid, denoised * (raw_total / out_total), denoised).astype(denoised.dtype)


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
