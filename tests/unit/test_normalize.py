"""Normalisation: fitted on valid pixels, invertible, exact only when it can be."""

from __future__ import annotations

import numpy as np
import pytest

from n2s_stream.n2s.normalize import (
    Normalizer,
    fill_invalid,
    fit_normalizer,
    integer_full_scale,
    valid_pixels,
)


@pytest.mark.parametrize("mode", ["none", "meanstd", "percentile"])
@pytest.mark.parametrize("scale_integers", [True, False])
def test_round_trip(mode, scale_integers):
    frames = np.random.default_rng(0).poisson(30, size=(4, 16, 16)).astype(np.uint16)
    norm = fit_normalizer(
        frames, mode=mode, scale_integers=scale_integers, source_dtype=frames.dtype
    )
    back = norm.inverse(norm.forward(frames))
    assert np.allclose(back, frames, atol=1e-3)
    assert Normalizer.from_dict(norm.to_dict()) == norm


def test_meanstd_gives_zero_mean_unit_std():
    frames = np.random.default_rng(1).normal(50, 7, size=(8, 32, 32)).astype(np.float32)
    y = fit_normalizer(
        frames, mode="meanstd", scale_integers=True, source_dtype=frames.dtype
    ).forward(frames)
    assert abs(y.mean()) < 1e-3 and abs(y.std() - 1) < 1e-3


def test_statistics_ignore_sentinels():
    frames = np.full((2, 8, 8), 10, dtype=np.uint16)
    frames[:, 0, 0] = np.iinfo(np.uint16).max  # saturated/dead pixels
    valid = valid_pixels(frames, frames.dtype)
    norm = fit_normalizer(
        frames, mode="meanstd", scale_integers=False, source_dtype=frames.dtype, valid=valid
    )
    assert norm.shift == pytest.approx(10.0)
    filled = fill_invalid(frames, valid)
    assert filled[0, 0, 0] == pytest.approx(10.0)


def test_exactness():
    assert fit_normalizer(
        np.ones((1, 2, 2), np.uint16), mode="none", scale_integers=False, source_dtype=np.uint16
    ).is_exact
    # dividing by 65535 does not round-trip every count exactly in float32
    assert not fit_normalizer(
        np.ones((1, 2, 2), np.uint16), mode="none", scale_integers=True, source_dtype=np.uint16
    ).is_exact
    assert Normalizer(divisor=256.0).is_exact
    assert not Normalizer(shift=1.0).is_exact
    assert integer_full_scale(np.uint8) == 255 and integer_full_scale(np.float32) == 1


def test_nan_is_invalid():
    frames = np.array([[[1.0, np.nan], [np.inf, 2.0]]], dtype=np.float32)
    assert valid_pixels(frames, frames.dtype).tolist() == [[[True, False], [False, True]]]
