"""A small UNet for single-channel detector frames.

Frames of any size are accepted: the input is padded (replicated edges) to a multiple of
``2**depth`` and the output cropped back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from n2s_stream.n2s.specs import ModelConfig


def conv_block(in_channels: int, out_channels: int, batch_norm: bool) -> nn.Sequential:
    """Two 3x3 convolutions with LeakyReLU (and optional batch norm)."""
    layers: list[nn.Module] = []
    for c_in in (in_channels, out_channels):
        layers.append(nn.Conv2d(c_in, out_channels, 3, padding=1, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_channels))
        layers.append(nn.LeakyReLU(0.1, inplace=True))
    return nn.Sequential(*layers)


class UNet(nn.Module):
    """Encoder–decoder with skip connections; channel width doubles at each level."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        widths = [config.width * 2**level for level in range(config.depth + 1)]
        self.encoders = nn.ModuleList()
        c_in = config.in_channels
        for w in widths:
            self.encoders.append(conv_block(c_in, w, config.batch_norm))
            c_in = w
        self.decoders = nn.ModuleList(
            conv_block(widths[level + 1] + widths[level], widths[level], config.batch_norm)
            for level in reversed(range(config.depth))
        )
        self.head = nn.Conv2d(widths[0], config.out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, H, W)`` → ``(B, out_channels, H, W)``."""
        height, width = x.shape[-2:]
        multiple = 2**self.config.depth
        pad_h, pad_w = (-height) % multiple, (-width) % multiple
        h = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else x
        skips = []
        for level, encoder in enumerate(self.encoders):
            if level > 0:
                h = F.avg_pool2d(h, 2)
            h = encoder(h)
            skips.append(h)
        for decoder, skip in zip(self.decoders, reversed(skips[:-1]), strict=True):
            h = F.interpolate(h, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            h = decoder(torch.cat([h, skip], dim=1))
        out = self.head(h)[..., :height, :width]
        if self.config.residual:
            out = out + x[:, : self.config.out_channels]
        return out
