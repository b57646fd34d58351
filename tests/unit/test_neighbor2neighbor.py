"""Neighbor2Neighbor's sub-images and loss: neighbouring pixels of one cell, every channel
alike, unusable pixels left out, any frame size and input layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from n2s_stream.models import build_model
from n2s_stream.n2s.masking import Masker
from n2s_stream.n2s.neighbor2neighbor import (
    NEIGHBOUR_PAIRS,
    neighbor2neighbor_loss,
    sub_images,
)
from n2s_stream.n2s.specs import MaskerConfig, ModelConfig
from n2s_stream.n2s.training import self_supervised_loss


def test_sub_images_take_two_neighbours_of_each_cell_in_every_channel():
    height, width = 8, 6
    index = torch.arange(height * width, dtype=torch.float32).reshape(1, 1, height, width)
    x = torch.cat([index, index + 1000], dim=1)  # a context channel: same pixels, +1000
    rng = np.random.default_rng(0)
    choice = torch.from_numpy(rng.integers(len(NEIGHBOUR_PAIRS), size=(1, 1, 4, 3)))
    first, second = sub_images(x, choice)
    assert first.shape == second.shape == (1, 2, 4, 3)
    torch.testing.assert_close(first[:, 1], first[:, 0] + 1000)
    rows_a, cols_a = first[0, 0] // width, first[0, 0] % width
    rows_b, cols_b = second[0, 0] // width, second[0, 0] % width
    cell_rows, cell_cols = torch.meshgrid(torch.arange(4), torch.arange(3), indexing="ij")
    for rows, cols in ((rows_a, cols_a), (rows_b, cols_b)):  # both in their own 2x2 cell
        assert torch.equal(rows // 2, cell_rows.float()) and torch.equal(
            cols // 2, cell_cols.float()
        )
    distance = (rows_a - rows_b).abs() + (cols_a - cols_b).abs()
    assert torch.equal(distance, torch.ones_like(distance))  # adjacent, never the same pixel
    assert len(torch.unique(choice)) > 4  # the draw mixes the pairs


def _halve(x: torch.Tensor) -> torch.Tensor:
    """A pointwise "network": its loss can be written out by hand."""
    return 0.5 * x[:, :1]


def test_loss_is_the_papers_on_a_pointwise_network():
    rng = np.random.default_rng(0)
    batch = torch.from_numpy(rng.normal(size=(2, 2, 8, 8)).astype(np.float32))
    choice = torch.from_numpy(rng.integers(len(NEIGHBOUR_PAIRS), size=(2, 1, 4, 4)))
    first, second = sub_images(batch[:, :1], choice)
    residual = 0.5 * first - second  # f(g1(y)) - g2(y)
    regulariser = residual - (0.5 * first - 0.5 * second)  # ... - (g1(f(y)) - g2(f(y)))
    expected = (residual**2).mean() + 2.0 * (regulariser**2).mean()
    torch.testing.assert_close(neighbor2neighbor_loss(_halve, batch, choice), expected)
    again = self_supervised_loss(
        _halve, Masker(), batch, rng=np.random.default_rng(5), objective="neighbor2neighbor"
    )
    torch.testing.assert_close(  # same seed, same pairs, same loss
        self_supervised_loss(
            _halve, Masker(), batch, rng=np.random.default_rng(5), objective="neighbor2neighbor"
        ),
        again,
    )


def test_unusable_pixels_drop_their_pairs():
    rng = np.random.default_rng(1)
    batch = torch.from_numpy(rng.normal(size=(2, 1, 16, 16)).astype(np.float32))
    choice = torch.from_numpy(rng.integers(len(NEIGHBOUR_PAIRS), size=(2, 1, 8, 8)))
    plain = neighbor2neighbor_loss(_halve, batch, choice)
    torch.testing.assert_close(
        neighbor2neighbor_loss(_halve, batch, choice, valid=torch.ones(2, 1, 16, 16)), plain
    )
    assert (
        float(neighbor2neighbor_loss(_halve, batch, choice, valid=torch.zeros(2, 1, 16, 16))) == 0.0
    )
    # a pixel far off (a hot pixel), unusable: its pair does not count, exactly
    _, target = sub_images(torch.arange(256.0).reshape(1, 1, 16, 16).expand(2, 1, 16, 16), choice)
    row, col = divmod(int(target[0, 0, 3, 5]), 16)
    valid = torch.ones(2, 1, 16, 16)
    valid[0, 0, row, col] = 0
    spoiled = batch.clone()
    spoiled[0, 0, row, col] = 1e3
    torch.testing.assert_close(
        neighbor2neighbor_loss(_halve, spoiled, choice, valid=valid),
        neighbor2neighbor_loss(_halve, batch, choice, valid=valid),
    )
    assert float(neighbor2neighbor_loss(_halve, spoiled, choice)) > 100 * float(plain)
    with pytest.raises(ValueError, match="even sides"):
        sub_images(batch[..., :15], choice)


@pytest.mark.parametrize("mask_as_input", [False, True])
def test_odd_frames_and_a_mask_channel_train(mask_as_input):
    masker = Masker(MaskerConfig(mask_as_input=mask_as_input, context_frames=3))
    model = build_model(ModelConfig(in_channels=masker.config.in_channels, width=4, depth=1))
    batch = torch.randn(2, 3, 33, 31)
    loss = self_supervised_loss(
        model,
        masker,
        batch,
        rng=np.random.default_rng(0),
        objective="neighbor2neighbor",
        valid=torch.ones(2, 1, 33, 31),
    )
    loss.backward()
    assert np.isfinite(float(loss.detach())) and model.head.weight.grad is not None
    with pytest.raises(ValueError, match="objective must be one of"):
        self_supervised_loss(
            model, masker, batch, rng=np.random.default_rng(0), objective="noise2noise"
        )
