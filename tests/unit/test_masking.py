"""Masking and loss: the J-invariance that makes self-supervision work, checked by gradients."""

from __future__ import annotations

import pytest
import torch

from n2s_stream.models import build_model
from n2s_stream.n2s.loss import masked_mse
from n2s_stream.n2s.masking import Masker, grid_mask, interpolate_neighbours
from n2s_stream.n2s.specs import MaskerConfig, ModelConfig


def test_phases_cover_every_pixel_exactly_once():
    masks = torch.cat([grid_mask(9, 11, phase, 4) for phase in range(16)])
    assert torch.equal(masks.sum(0), torch.ones(1, 9, 11))
    assert grid_mask(8, 8, 5, 4).sum() == 4  # one pixel per 4x4 cell


def test_per_sample_phases():
    masks = grid_mask(8, 8, torch.tensor([0, 1, 15]), 4)
    assert masks.shape == (3, 1, 8, 8)
    assert masks[0, 0, 0, 0] == 1 and masks[1, 0, 0, 1] == 1 and masks[2, 0, 3, 3] == 1


def test_interpolation_excludes_centre():
    x = torch.zeros(1, 1, 5, 5)
    x[0, 0, 2, 2] = 100.0
    y = interpolate_neighbours(x)
    assert y[0, 0, 2, 2] == 0.0  # the pixel's own value never reaches its fill
    constant = interpolate_neighbours(torch.full((1, 1, 6, 6), 3.0))
    assert torch.allclose(constant, torch.full_like(constant, 3.0))  # weights sum to 1


@pytest.mark.parametrize("mode", ["interpolate", "zero"])
@pytest.mark.parametrize("mask_as_input", [False, True])
@pytest.mark.parametrize("name", ["unet", "dncnn"])
def test_training_output_at_masked_pixels_ignores_their_input(mode, mask_as_input, name):
    """d output[J] / d input[J] == 0 for the hidden set J: the loss cannot learn identity."""
    torch.manual_seed(0)
    masker = Masker(MaskerConfig(grid_size=4, mode=mode, mask_as_input=mask_as_input))
    model = build_model(
        ModelConfig(
            name=name,
            in_channels=1 + masker.extra_channels,
            width=8,
            depth=2,
            layers=4,
            residual=True,
        )
    ).double()
    x = torch.randn(2, 1, 16, 16, dtype=torch.float64, requires_grad=True)
    for phase in (0, 7, torch.tensor([3, 12])):
        net_input, mask = masker.mask(x, phase)
        (model(net_input) * mask).sum().backward()
        grad_at_hidden = (x.grad * mask).abs().max()
        grad_elsewhere = (x.grad * (1 - mask)).abs().max()
        assert grad_at_hidden == 0.0
        assert grad_elsewhere > 1e-6  # the network does see the other pixels
        x.grad = None


def test_jinvariant_inference_never_uses_a_pixels_own_value():
    torch.manual_seed(0)
    masker = Masker(MaskerConfig(grid_size=3))
    # A residual model would copy its input; J-invariant inference must still not.
    model = build_model(ModelConfig(width=4, depth=1, residual=True)).double()
    x = torch.randn(1, 1, 12, 12, dtype=torch.float64, requires_grad=True)
    out = masker.infer_full_image(x, model)
    for r, c in [(0, 0), (5, 7), (11, 11), (6, 2)]:
        (grad,) = torch.autograd.grad(out[0, 0, r, c], x, retain_graph=True)
        assert grad[0, 0, r, c] == 0.0
        assert grad.abs().sum() > 0


def test_single_pass_with_residual_leaks_the_pixel():
    """The pitfall the docs warn about: single pass lets a residual model see the pixel."""
    model = build_model(ModelConfig(width=4, depth=1, residual=True)).double()
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    out = Masker().infer_single_pass(x, model)
    (grad,) = torch.autograd.grad(out[0, 0, 3, 3], x)
    assert grad[0, 0, 3, 3] != 0.0


def test_masked_mse_counts_only_hidden_valid_pixels():
    target = torch.zeros(1, 1, 4, 4)
    output = torch.full((1, 1, 4, 4), 10.0)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., 0, 0] = mask[..., 2, 2] = 1
    output[..., 2, 2] = 2.0
    assert masked_mse(output, target, mask).item() == pytest.approx((100 + 4) / 2)
    valid = torch.ones(1, 1, 4, 4)
    valid[..., 0, 0] = 0
    assert masked_mse(output, target, mask, valid).item() == pytest.approx(4.0)


def test_masker_config_rejects_bad_values():
    with pytest.raises(ValueError, match="grid_size"):
        MaskerConfig(grid_size=1)
    with pytest.raises(ValueError, match="mode"):
        MaskerConfig(mode="median")
