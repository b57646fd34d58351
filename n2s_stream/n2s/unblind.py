"""The posterior-mean "un-blind" step: put the observed pixel back into a blind-spot
prediction (Laine et al. 2019, "High-quality self-supervised deep image denoising"; the
idea behind PN2V and Noise2Score).

A J-invariant prediction ``mu`` of pixel j never saw pixel j, so it is an independent
prior for it; the pixel itself is one noisy measurement, with the detector's
Poisson-Gaussian variance ``gain * x + offset``. With a Gaussian prior of variance ``s2``
around ``mu``, the posterior mean is ``mu + s2 / (s2 + n2) * (y - mu)``, ``n2`` the noise
variance at ``mu``: where the prediction is sure (``s2`` small against the noise) it
stays, where it is unsure (edges, fine texture) the pixel counts. Everything is estimated
from the data itself: the noise model by a straight-line fit of the squared residual
``(y - mu)^2`` against ``mu`` over intensity bins, and ``s2`` as the residual variance
the noise does not explain, per frame, or per pixel from the residuals of its neighbours
(the pixel's own left out, so its noise does not choose its own weight). Pure functions on
count arrays ``(..., H, W)``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def noise_model(blind: np.ndarray, noisy: np.ndarray, *, bins: int = 16) -> tuple[float, float]:
    """``(gain, offset)`` of the noise variance ``gain * mu + offset``, fitted to the mean
    squared residual in ``bins`` intensity bins of the blind prediction ``mu`` (a binned fit
    of the same kind as a photon-transfer curve)."""
    mu = blind.astype(np.float64).ravel()
    residual2 = ((noisy.astype(np.float64) - blind) ** 2).ravel()
    edges = np.unique(np.quantile(mu, np.linspace(0, 1, bins + 1)))
    which = np.clip(np.searchsorted(edges, mu, side="right") - 1, 0, max(len(edges) - 2, 0))
    counts = np.bincount(which, minlength=len(edges) - 1).astype(np.float64)
    used = counts > 0
    means = np.bincount(which, mu, len(counts))[used] / counts[used]
    variances = np.bincount(which, residual2, len(counts))[used] / counts[used]
    if len(means) < 2:
        return 1.0, 0.0
    gain, offset = np.polyfit(means, variances, 1, w=np.sqrt(counts[used]))
    return max(float(gain), 1e-6), max(float(offset), 0.0)


def unblind(
    blind: np.ndarray,
    noisy: np.ndarray,
    *,
    gain: float,
    offset: float = 0.0,
    window: int | None = None,
) -> np.ndarray:
    """The posterior mean of each pixel given its blind-spot prediction and its own noisy
    value (see the module docstring). The prediction's uncertainty is estimated per frame,
    or with ``window``, from the square of that side around each pixel."""
    mu = np.clip(blind.astype(np.float32), 0, None)
    y = noisy.astype(np.float32)
    noise = gain * mu + offset
    excess = (y - mu) ** 2 - noise
    if window is None:
        prior = np.clip(excess.mean(axis=(-2, -1), keepdims=True), 0, None)
    else:
        prior = np.clip(_neighbour_mean(excess, window), 0, None)
    weight = prior / (prior + np.maximum(noise, 1e-6))
    return mu + weight * (y - mu)


def _neighbour_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Mean over the ``window`` square around each pixel, the pixel itself left out."""
    shape = values.shape
    planes = torch.from_numpy(np.ascontiguousarray(values.reshape(-1, 1, *shape[-2:])))
    n = _counts(torch.ones_like(planes), window)
    total = F.avg_pool2d(planes, window, 1, window // 2, count_include_pad=False) * n
    return ((total - planes) / (n - 1)).numpy().reshape(shape)


def _counts(ones: torch.Tensor, window: int) -> torch.Tensor:
    """Pixels in each window (fewer at the borders)."""
    pad = window // 2
    return F.avg_pool2d(ones, window, 1, pad, count_include_pad=True) * window * window
