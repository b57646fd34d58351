"""Models: any frame size in, same size out; configs round-trip through plain dicts."""

from __future__ import annotations

import pytest
import torch

from n2s_stream.models import build_model, count_parameters
from n2s_stream.n2s.specs import ModelConfig


@pytest.mark.parametrize(
    "config",
    [
        ModelConfig(width=8, depth=3),
        ModelConfig(width=8, depth=0),
        ModelConfig(name="dncnn", width=8, layers=5),
        ModelConfig(in_channels=2, width=8, depth=2),
    ],
)
@pytest.mark.parametrize("shape", [(16, 16), (37, 50), (8, 9)])
def test_output_shape_matches_input(config, shape):
    model = build_model(config)
    y = model(torch.randn(2, config.in_channels, *shape))
    assert y.shape == (2, 1, *shape)


def test_default_unet_is_small_enough_for_a_cpu():
    assert count_parameters(build_model(ModelConfig())) < 2_500_000


def test_config_round_trip_and_validation():
    config = ModelConfig(name="dncnn", width=12, layers=6, residual=True)
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown model config keys: colour"):
        ModelConfig.from_dict({**config.to_dict(), "colour": 1})
    with pytest.raises(ValueError, match="model must be one of"):
        ModelConfig(name="resnet")
