"""Denoising networks, built from a small `ModelConfig` that is saved with each checkpoint."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

MODEL_NAMES = ("unet", "dncnn")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a denoiser; enough to rebuild it from a checkpoint.

    ``width`` is the channel count of the first level (UNet) or of every layer (DnCNN);
    ``depth`` the number of down-samplings (UNet); ``layers`` the conv layers (DnCNN).
    ``residual`` adds the input image to the output: it helps J-invariant inference but
    lets the noisy pixel leak through in single-pass inference, so it is off by default.
    """

    name: str = "unet"
    in_channels: int = 1
    out_channels: int = 1
    width: int = 16
    depth: int = 2
    layers: int = 10
    residual: bool = False
    batch_norm: bool = False

    def __post_init__(self) -> None:
        if self.name not in MODEL_NAMES:
            raise ValueError(f"model must be one of {MODEL_NAMES}, got {self.name!r}")
        if self.width < 1 or self.depth < 0 or self.layers < 2:
            raise ValueError(f"invalid model size: {self}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for a checkpoint."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Inverse of `to_dict`; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**data)


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
