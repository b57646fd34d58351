"""The quality scores the daemon exports and the benchmarks use."""

from __future__ import annotations

import numpy as np
import pytest

from n2s_stream.n2s.guards import (
    flux_ratio,
    keep_outliers,
    preserve_frame_flux,
    preserve_local_flux,
)


def test_flux_ratio_counts_only_measured_pixels():
    raw = np.array([[10, 20], [30, 65535]], dtype=np.uint16)  # a gap pixel's sentinel
    valid = raw != 65535
    denoised = np.array([[12.0, 18.0], [33.0, np.inf]], dtype=np.float32)
    assert flux_ratio(denoised, raw, valid) == 63 / 60
    assert flux_ratio(raw.astype(np.float32), raw, np.ones_like(valid)) == 1.0


def test_flux_ratio_of_a_frame_without_counts_is_nan():
    raw = np.zeros((4, 4), np.uint16)
    assert np.isnan(flux_ratio(raw.astype(np.float32), raw, raw == 0))


def test_preserve_frame_flux_scales_to_the_raw_total_and_reports_the_networks_ratio():
    raw = np.array([[10, 20], [30, 65535]], dtype=np.uint16)
    valid = raw != 65535
    denoised = np.array([[9.0, 18.0], [27.0, 65535.0]], dtype=np.float32)  # 10 % too dark
    assert flux_ratio(denoised, raw, valid) == 54 / 60
    assert preserve_frame_flux(denoised, raw, valid) == 54 / 60
    np.testing.assert_allclose(denoised[valid], [10.0, 20.0, 30.0], rtol=1e-6)
    assert denoised[1, 1] == 65535.0  # the gap keeps its sentinel
    assert flux_ratio(denoised, raw, valid) == pytest.approx(1.0, abs=1e-6)


def test_guards_leave_a_frame_alone_where_there_is_nothing_to_mend():
    rng = np.random.default_rng(0)
    truth = np.full((64, 64), 5.0, np.float32)
    raw = rng.poisson(truth).astype(np.float32)
    valid = np.ones(raw.shape, bool)
    # a denoiser that found the truth: nothing far above it, and the residual averages out
    assert np.mean(keep_outliers(truth, raw, valid) != truth) < 1e-3
    local = preserve_local_flux(truth, raw, valid, sigma=8)
    assert np.abs(local - truth).max() < 0.5
    spot = raw.copy()
    spot[32, 32] = 60  # a Bragg spot's peak that the denoiser smoothed away
    assert keep_outliers(truth, spot, valid)[32, 32] == 60
