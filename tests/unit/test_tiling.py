"""Tiled inference (frames larger than a device holds) and reduced-precision inference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from n2s_stream.models import build_model
from n2s_stream.n2s.denoising import denoise_normalized
from n2s_stream.n2s.masking import Masker
from n2s_stream.n2s.specs import MaskerConfig, ModelConfig
from n2s_stream.n2s.tiling import spans, tiled_forward


def test_tiles_cover_every_pixel_once_with_context_inside_the_frame():
    tiles = spans(100, 30, 8)
    assert [(c0, c1) for _, _, c0, c1 in tiles] == [(0, 30), (30, 60), (60, 90), (90, 100)]
    assert tiles[0][:2] == (0, 38) and tiles[1][:2] == (22, 68) and tiles[-1][:2] == (82, 100)


@torch.inference_mode()
def test_tiles_with_overlap_beyond_the_networks_reach_equal_a_whole_frame_pass():
    torch.manual_seed(0)
    model = build_model(ModelConfig("dncnn", width=4, layers=5)).eval()  # reach: 5 px
    x = torch.randn(2, 1, 75, 61)
    whole = model(x)
    tiled = tiled_forward(model, x, tile=32, overlap=6)
    assert tiled.shape == whole.shape
    assert torch.allclose(tiled, whole, atol=1e-5)
    short = tiled_forward(model, x, tile=32, overlap=2)  # less than its reach: seams
    assert not torch.allclose(short, whole, atol=1e-3)
    assert tiled_forward(model, x, tile=80, overlap=6).equal(model(x))  # fits: one pass
    with pytest.raises(ValueError, match="no core"):
        tiled_forward(model, x, tile=12, overlap=6)


@torch.inference_mode()
def test_the_default_unet_tiled_with_the_default_overlap_matches_the_whole_frame():
    torch.manual_seed(0)
    model = build_model(ModelConfig()).eval()
    x = torch.randn(1, 1, 150, 130)
    whole, tiled = model(x), tiled_forward(model, x, tile=96, overlap=32)
    assert (tiled - whole).abs().max() < 1e-3 * whole.abs().max()


def test_denoise_normalized_tiles_and_casts_as_asked():
    torch.manual_seed(1)
    model = build_model(ModelConfig("dncnn", width=4, layers=3)).eval()
    masker = Masker(MaskerConfig())
    frames = np.random.default_rng(0).normal(size=(2, 40, 44)).astype(np.float32)
    cpu = torch.device("cpu")
    whole = denoise_normalized(model, masker, frames, jinv=False, device=cpu)
    tiled = denoise_normalized(model, masker, frames, jinv=False, device=cpu, tile=24, overlap=4)
    assert np.allclose(tiled, whole, atol=1e-5)
    bf16 = denoise_normalized(model, masker, frames, jinv=False, device=cpu, precision="bfloat16")
    assert bf16.dtype == np.float32 and not np.array_equal(bf16, whole)
    assert np.abs(bf16 - whole).max() < 0.05 * np.abs(whole).max()  # bfloat16: ~3 digits
