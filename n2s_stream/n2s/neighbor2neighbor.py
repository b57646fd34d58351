"""Neighbor2Neighbor (Huang et al., CVPR 2021): self-supervision without a blind spot.

Each 2x2 cell of a noisy patch gives two half-size sub-images, one pixel of a random
adjacent pair each. Their clean values nearly agree and their noise is independent, so a
network mapping one sub-image to the other learns to denoise, and every pixel of the
target supervises (the grid masker supervises one pixel in ``grid_size**2``). A
regulariser ties the sub-image mapping to the network's output on the whole patch, whose
sub-images differ by the small clean offset between neighbours: the network is used on
whole frames, unmasked, afterwards.

Tensors are ``(B, C, H, W)`` as for masking: channel 0 is the frame, the others its
temporal context, sub-sampled at the input sub-image's pixels (their noise is independent
of the centre frame's anyway).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

NEIGHBOUR_PAIRS = torch.tensor([[0, 1], [1, 0], [0, 2], [2, 0], [1, 3], [3, 1], [2, 3], [3, 2]])
"""Ordered pairs of adjacent pixels of a 2x2 cell, the cell read row by row."""

GAMMA = 2.0
"""Weight of the regulariser: the paper's final value for Poisson and Gaussian noise. Its
code ramps the weight up from 0 over the epochs of one training run; online training has
no epochs and, from a pretrained start, nothing to ramp from, so it is constant here."""


def sub_images(x: torch.Tensor, choice: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two half-size sub-images of ``(B, C, H, W)`` ``x`` (H, W even): in each 2x2 cell
    the first and the second pixel of pair ``choice`` (``(B, 1, H/2, W/2)`` indices into
    `NEIGHBOUR_PAIRS`), the same pixels in every channel."""
    b, c, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"sub-images need even sides (2x2 cells), got {h}x{w}")
    cells = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 2, 4, 3, 5)
    cells = cells.reshape(b, c, h // 2, w // 2, 4)
    pairs = NEIGHBOUR_PAIRS.to(x.device)[choice].expand(b, c, h // 2, w // 2, 2)
    first = torch.gather(cells, -1, pairs[..., :1]).squeeze(-1)
    second = torch.gather(cells, -1, pairs[..., 1:]).squeeze(-1)
    return first, second


def even_crop(x: torch.Tensor) -> torch.Tensor:
    """``x`` without its last row and column where they are odd (2x2 cells need even
    sides)."""
    return x[..., : x.shape[-2] // 2 * 2, : x.shape[-1] // 2 * 2]


def neighbor2neighbor_loss(
    model: Callable[[torch.Tensor], torch.Tensor],
    batch: torch.Tensor,
    choice: torch.Tensor,
    *,
    valid: torch.Tensor | None = None,
    gamma: float = GAMMA,
) -> torch.Tensor:
    """Neighbor2Neighbor's loss of ``model`` (unmasked input to denoised centre frame) on
    noisy ``batch`` (even sides), with the pixel pairs ``choice`` (see `sub_images`).

    ``valid`` (``(B, 1, H, W)`` 0/1) drops pixel pairs of which either pixel is unusable.
    Returns a scalar (0 if no pair counts).
    """
    with torch.no_grad():
        whole_first, whole_second = sub_images(model(batch).float(), choice)
    first, _ = sub_images(batch, choice)
    _, target = sub_images(batch[:, :1], choice)
    output = model(first).float()
    weight = torch.ones_like(target)
    if valid is not None:
        weight = torch.mul(*sub_images(valid, choice))
    residual = output - target
    consistency = residual - (whole_first - whole_second)
    total = weight.sum().clamp_min(1.0)
    return ((residual**2 + gamma * consistency**2) * weight).sum() / total
