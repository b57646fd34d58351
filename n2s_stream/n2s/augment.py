"""Test-time augmentation: average a network's output over flips and rotations of its input.

Noise is independent per pixel, while a model's errors depend on orientation; averaging
the eight orientations of a square frame (four flips of any frame) removes part of those
errors at the cost of that many forward passes. Pure functions on tensors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Forward = Callable[[torch.Tensor], torch.Tensor]


def orient(x: torch.Tensor, k: int) -> torch.Tensor:
    """Orientation ``k`` (0..7) of ``(..., H, W)``: bit 2 transposes, bit 0 flips W, bit 1
    flips H."""
    if k & 4:
        x = x.transpose(-1, -2)
    if k & 1:
        x = x.flip(-1)
    if k & 2:
        x = x.flip(-2)
    return x


def unorient(y: torch.Tensor, k: int) -> torch.Tensor:
    """The inverse of `orient`."""
    if k & 2:
        y = y.flip(-2)
    if k & 1:
        y = y.flip(-1)
    if k & 4:
        y = y.transpose(-1, -2)
    return y


def augmented(forward: Forward, n: int) -> Forward:
    """``forward`` averaged over ``n`` (1, 2, 4 or 8) orientations of its input; frames that
    are not square get at most the four flips."""
    if n not in (1, 2, 4, 8):
        raise ValueError(f"test-time augmentation takes 1, 2, 4 or 8 orientations, not {n}")
    if n == 1:
        return forward

    def run(x: torch.Tensor) -> torch.Tensor:
        count = n if x.shape[-1] == x.shape[-2] else min(n, 4)
        total = unorient(forward(orient(x, 0)), 0)
        for k in range(1, count):
            total = total + unorient(forward(orient(x, k)), k)
        return total / count

    return run
