"""DnCNN (Zhang et al. 2017): a plain stack of 3x3 convolutions."""

from __future__ import annotations

import torch
from torch import nn

from n2s_stream.n2s.specs import ModelConfig


class DnCNN(nn.Module):
    """``layers`` convolutions of ``width`` channels; residual output when configured."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = [
            nn.Conv2d(config.in_channels, config.width, 3, padding=1),
            nn.ReLU(inplace=True),
        ]
        for _ in range(config.layers - 2):
            layers.append(
                nn.Conv2d(config.width, config.width, 3, padding=1, bias=not config.batch_norm)
            )
            if config.batch_norm:
                layers.append(nn.BatchNorm2d(config.width))
            layers.append(nn.ReLU(inplace=True))
        layers.append(nn.Conv2d(config.width, config.out_channels, 3, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, H, W)`` → ``(B, out_channels, H, W)``."""
        out = self.body(x)
        if self.config.residual:
            out = out + x[:, : self.config.out_channels]
        return out
