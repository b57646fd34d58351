"""Self-supervised loss: mean squared error on the hidden pixels only."""

from __future__ import annotations

import torch


def masked_mse(
    output: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean of ``(output - target)**2`` over pixels that are hidden (``mask``) and usable.

    ``valid`` (same broadcastable shape, 0/1) drops detector sentinels and masked pixels,
    whose values say nothing about the sample. Returns a scalar; 0 if no pixel counts.
    """
    weight = mask if valid is None else mask * valid
    weight = weight.expand_as(output)
    squared = (output - target) ** 2 * weight
    return squared.sum() / weight.sum().clamp_min(1.0)
