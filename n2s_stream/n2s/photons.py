"""Whether a frame's values are photon counts: its counts per photon, read from its noise.

Photon noise has a variance equal to its mean when one count is one photon; a detector
that gives ``g`` counts per photon shows a variance ``g`` times its mean. So the ratio of
a frame's noise variance to its mean level estimates ``g`` from the frame alone, with no
dark or flat frame. Binomial splitting (``n2s/binomial.py``) is right only where ``g`` is 1.

The noise is the residual of each pixel against the mean of its four neighbours (for an
image that is locally linear, its variance is 5/4 of the pixel's), its mean level the
mean of the same five pixels. Both are averaged in blocks of ``BLOCK`` x ``BLOCK`` pixels,
and the median of the blocks' ratios is the estimate: fine structure adds variance in the
blocks that hold it, and the median ignores them while they are fewer than half. On
scikit-image's photographs and the simulator's scenes with 1-20 photons at the brightest
pixel it reads 0.9-1.12, and 1.8-2.25 at two counts per photon
(``tests/unit/test_photons.py``). Structure grows with brightness faster than photon
noise, so brighter frames read higher: fine textures from about 100 photons at the
brightest pixel, smooth photographs from several hundred, can read above 1.5. A dark
level (offset) that is not subtracted lowers the estimate.

Pure numpy; no I/O.
"""

from __future__ import annotations

import numpy as np

BLOCK = 16
"""Side of the blocks whose ratios are compared (256 pixels each)."""
MAX_SIDE = 1024
"""Frames are measured on their central crop of this side at most: enough blocks (4096)
for a stable median, at a bounded cost at detector sizes."""
MIN_BLOCKS = 9
"""At least a 3 x 3 grid of blocks: a frame under 50 x 50 pixels cannot tell."""
PHOTON_RANGE = (0.67, 1.5)
"""Estimates taken for one count per photon: up to halfway to 2 counts per photon, and
down to its reciprocal."""
TRIES = 8
"""Frames tried, one after another, before the counts per photon is left unknown: a
frame too small, too masked or dark (no block with a positive mean) cannot tell."""


def counts_per_photon(frame: np.ndarray, valid: np.ndarray | None = None) -> float | None:
    """The counts per photon that ``frame``'s noise shows (an ``(H, W)`` frame in detector
    units; ``valid``: its measured pixels, all finite ones where not given), or None where
    fewer than ``MIN_BLOCKS`` blocks of measured pixels with a positive mean are left to
    tell."""
    if valid is None and frame.dtype.kind == "f":
        valid = np.isfinite(frame)
    image, usable = _central_crop(frame, valid)
    image = image.astype(np.float64)
    centre = image[1:-1, 1:-1]
    neighbours = (image[:-2, 1:-1] + image[2:, 1:-1] + image[1:-1, :-2] + image[1:-1, 2:]) / 4
    noise = (centre - neighbours) ** 2 / 1.25
    level = (4 * neighbours + centre) / 5
    whole = np.ones(centre.shape, bool)
    if usable is not None:
        whole = (
            usable[1:-1, 1:-1]
            & usable[:-2, 1:-1]
            & usable[2:, 1:-1]
            & usable[1:-1, :-2]
            & usable[1:-1, 2:]
        )
    noise_blocks, level_blocks, whole_blocks = (
        _block_means(a) for a in (noise, level, whole.astype(np.float64))
    )
    kept = (whole_blocks == 1.0) & (level_blocks > 0)
    if np.count_nonzero(kept) < MIN_BLOCKS:
        return None
    return float(np.median(noise_blocks[kept] / level_blocks[kept]))


def first_counts_per_photon(frames: np.ndarray, valid: np.ndarray) -> tuple[int, float] | None:
    """The first of up to ``TRIES`` frames of ``(N, H, W)`` ``frames`` that can tell, and
    its counts per photon; None where none can."""
    for index in range(min(len(frames), TRIES)):
        estimate = counts_per_photon(frames[index], valid[index])
        if estimate is not None:
            return index, estimate
    return None


def are_photon_counts(estimate: float | None) -> bool:
    """Whether an estimate of `counts_per_photon` says one count is one photon."""
    return estimate is not None and PHOTON_RANGE[0] <= estimate <= PHOTON_RANGE[1]


def _central_crop(
    frame: np.ndarray, valid: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """The central ``MAX_SIDE`` x ``MAX_SIDE`` window of ``frame`` (and of ``valid``)."""
    height, width = frame.shape
    top, left = max((height - MAX_SIDE) // 2, 0), max((width - MAX_SIDE) // 2, 0)
    window = (slice(top, top + MAX_SIDE), slice(left, left + MAX_SIDE))
    return frame[window], None if valid is None else valid[window]


def _block_means(values: np.ndarray) -> np.ndarray:
    """Means over whole ``BLOCK`` x ``BLOCK`` blocks (a partial last row or column of blocks
    is left out)."""
    rows, cols = values.shape[0] // BLOCK, values.shape[1] // BLOCK
    blocks = values[: rows * BLOCK, : cols * BLOCK].reshape(rows, BLOCK, cols, BLOCK)
    return blocks.mean(axis=(1, 3))
