"""The posterior-mean un-blind step (n2s/unblind.py) on data whose truth is known."""

from __future__ import annotations

import numpy as np

from n2s_stream.n2s.unblind import noise_model, unblind


def _scene(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    clean = np.tile(np.linspace(2, 50, 64), (4, 64, 1))
    return clean, rng.poisson(clean).astype(np.float64)


def test_the_noise_model_is_fitted_from_the_residuals():
    clean, noisy = _scene()
    gain, offset = noise_model(clean, noisy)  # a perfect prediction: residual = the noise
    assert abs(gain - 1.0) < 0.05 and offset < 1.5  # of variances 2 to 50


def test_a_poor_prediction_gains_from_its_pixel_and_a_good_one_keeps_its_value():
    clean, noisy = _scene()
    rng = np.random.default_rng(1)
    for error, factor in ((6.0, 0.5), (3.0, 0.8)):  # MSE falls at least by this factor
        blind = clean + rng.normal(0, error, clean.shape)
        gain, _ = noise_model(blind, noisy)
        for window in (None, 15):
            combined = unblind(blind, noisy, gain=gain, window=window)
            assert ((combined - clean) ** 2).mean() < factor * ((blind - clean) ** 2).mean()
    exact = unblind(clean, noisy, gain=1.0)  # nothing unexplained: the pixel gets ~no weight
    assert ((exact - clean) ** 2).mean() < 0.02 * ((noisy - clean) ** 2).mean()
