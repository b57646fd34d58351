"""Run a network over a frame in overlapping tiles, for frames whose activations do not fit
the device's memory (a 16-megapixel frame through the default UNet needs several GB).

Each tile is the core it is responsible for plus ``overlap`` pixels of context on every
side (clipped at the frame's edges); only the core of each output tile is kept. When the
overlap covers the network's receptive field the result equals one pass over the whole
frame (a fully convolutional network sees the same pixels; for a UNet, tile starts must
also fall on multiples of 2**depth, which a ``tile`` and ``overlap`` that are such
multiples give), so ``overlap`` trades a little duplicated work for exactness. Pure torch:
no I/O, no state.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Forward = Callable[[torch.Tensor], torch.Tensor]


def spans(length: int, core: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """Along one axis: ``(input start, input stop, core start, core stop)`` of each tile."""
    out = []
    for start in range(0, length, core):
        stop = min(start + core, length)
        out.append((max(start - overlap, 0), min(stop + overlap, length), start, stop))
    return out


def tiled_forward(forward: Forward, x: torch.Tensor, tile: int, overlap: int) -> torch.Tensor:
    """``forward(x)`` for ``(N, C, H, W)`` input, computed tile by tile: tiles of at most
    ``tile`` pixels a side including ``overlap`` pixels of context on each side. Frames no
    larger than ``tile`` go through in one pass."""
    height, width = x.shape[-2:]
    if tile <= 0 or (height <= tile and width <= tile):
        return forward(x)
    core = tile - 2 * overlap
    if core < 1:
        raise ValueError(f"tile {tile} leaves no core inside an overlap of {overlap} a side")
    out: torch.Tensor | None = None
    for y0, y1, cy0, cy1 in spans(height, core, overlap):
        for x0, x1, cx0, cx1 in spans(width, core, overlap):
            part = forward(x[..., y0:y1, x0:x1])
            if out is None:
                out = part.new_empty((*part.shape[:-2], height, width))
            out[..., cy0:cy1, cx0:cx1] = part[..., cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
    assert out is not None
    return out
