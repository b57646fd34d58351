"""The quality scores the daemon exports and the benchmarks use."""

from __future__ import annotations

import numpy as np

from n2s_stream.n2s.quality import flux_ratio


def test_flux_ratio_counts_only_measured_pixels():
    raw = np.array([[10, 20], [30, 65535]], dtype=np.uint16)  # a gap pixel's sentinel
    valid = raw != 65535
    denoised = np.array([[12.0, 18.0], [33.0, np.inf]], dtype=np.float32)
    assert flux_ratio(denoised, raw, valid) == 63 / 60
    assert flux_ratio(raw.astype(np.float32), raw, np.ones_like(valid)) == 1.0


def test_flux_ratio_of_a_frame_without_counts_is_nan():
    raw = np.zeros((4, 4), np.uint16)
    assert np.isnan(flux_ratio(raw.astype(np.float32), raw, raw == 0))
