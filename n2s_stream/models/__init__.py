"""Denoising networks, built from a small `ModelConfig` that is saved with each checkpoint."""

from __future__ import annotations

import torch
from torch import nn

from n2s_stream.n2s.specs import ModelConfig

StateDict = dict[str, torch.Tensor]
"""A network's weights by parameter name (what checkpoints and snapshots hold)."""


def build_model(config: ModelConfig) -> nn.Module:
    """Instantiate the network described by ``config``."""
    from n2s_stream.models.dncnn import DnCNN
    from n2s_stream.models.unet import UNet

    if config.name == "unet":
        return UNet(config)
    return DnCNN(config)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (for logs and benchmark tables)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def use_fast_layout(model: nn.Module, device: torch.device) -> nn.Module:
    """On CPU, put the model in channels_last memory layout (in place; returned too):
    measured 1.4-1.5x faster forward passes at every frame size (benchmarks/model_speed.py)
    and 1.2-1.3x faster training steps (benchmarks/profile_model.py); the activations
    follow the weights' layout. Weights loaded later with ``load_state_dict`` keep it."""
    if device.type == "cpu":
        # torch's stub of Module.to leaves out memory_format, which it accepts (documented)
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return model
