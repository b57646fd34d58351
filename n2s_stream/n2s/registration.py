"""Temporal context that follows motion, without looking at the centre frame.

A drifting sample moves between frames: stacked as they are, neighbours show the scene
displaced, and beyond a pixel or two per frame the network cannot use them. Here the motion
is estimated from two neighbour frames alone (phase correlation, as a constant velocity per
frame) and each neighbour is shifted onto where the centre frame sees the scene. The centre
frame's pixels never enter, so the network input stays J-invariant exactly: no neighbour
channel depends on the centre frame's noise.

Evidence decides: the neighbours are shifted only when the shift makes the two frames it
was estimated from agree better than they did unshifted (a scene that jumped, or noise with
no structure, leaves them as they are).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy import ndimage
from skimage.filters import window
from skimage.registration import phase_cross_correlation

SMOOTHING = 1.0
"""Gaussian sigma (pixels) applied before estimating: photon noise dominates single pixels."""

MIN_SHIFT = 0.25
"""Per-frame motion (pixels) below which neighbours are left as they are."""

ESTIMATE_SIZE = 256
"""Side of the central square the motion is estimated from: large frames cost no more."""

MIN_AGREEMENT, MIN_GAIN = 0.3, 0.05
"""Shifted, the two neighbours must correlate at least this well (unrelated noise fields
reach about 0.1; a drifting sample at 2 counts per pixel 0.8), and this much better than
unshifted."""


def estimate_shift(reference: np.ndarray, moving: np.ndarray) -> np.ndarray:
    """``(dy, dx)`` that, applied to ``moving`` (``scipy.ndimage.shift``), lays it on
    ``reference``; sub-pixel (to 0.1 px); from the central `ESTIMATE_SIZE` square (the
    motion is taken as one shift for the whole frame)."""
    crop = _central(reference.shape)
    shift, _, _ = phase_cross_correlation(
        _tapered(reference[crop]), _tapered(moving[crop]), upsample_factor=10, normalization=None
    )
    return np.asarray(shift, dtype=np.float64)


def _central(shape: tuple[int, ...]) -> tuple[slice, ...]:
    """The central `ESTIMATE_SIZE` square of a frame (all of a smaller one)."""
    return tuple(
        slice(max(0, (n - ESTIMATE_SIZE) // 2), max(0, (n - ESTIMATE_SIZE) // 2) + ESTIMATE_SIZE)
        for n in shape
    )


def _tapered(image: np.ndarray) -> np.ndarray:
    """Smoothed, mean removed, and faded to zero at the edges by a Hann window, so that the
    FFT's wrap-around does not pull the estimate towards no shift."""
    smooth = ndimage.gaussian_filter(image.astype(np.float64), SMOOTHING)
    return (smooth - smooth.mean()) * window("hann", image.shape)


def shift_image(
    image: np.ndarray, shift: np.ndarray, region: tuple[slice, ...] | None = None
) -> np.ndarray:
    """``image`` moved by ``shift`` pixels (bilinear; edges repeat the nearest pixel), as
    ``scipy.ndimage.shift(order=1, mode="nearest")`` moves it, to float32 rounding; only
    ``region`` of the result where given. Axis by axis, two slices weighted: faster than
    ndimage at detector sizes, where every frame of the context is registered."""
    moved = np.asarray(image, dtype=np.float32)
    for axis, step in enumerate(shift):
        n = image.shape[axis]
        wanted = region[axis] if region is not None else slice(0, n)
        whole = int(np.floor(-step))
        fraction = np.float32(-step - whole)
        source = np.arange(*wanted.indices(n)) + whole
        lower = np.take(moved, np.clip(source, 0, n - 1), axis=axis)  # a fresh array
        if fraction:
            upper = np.take(moved, np.clip(source + 1, 0, n - 1), axis=axis)
            lower *= 1 - fraction
            upper *= fraction
            lower += upper
        moved = lower
    return moved


def register_neighbours(neighbours: Mapping[int, np.ndarray], centre: int) -> dict[int, np.ndarray]:
    """``neighbours`` (frame index -> image, never the centre frame) shifted onto frame
    ``centre``: the per-frame motion comes from the two neighbours nearest the centre; if
    there are fewer than two, or the motion is below `MIN_SHIFT`, or shifting does not make
    those two agree well and better (`MIN_AGREEMENT`, `MIN_GAIN`), they are returned as they
    are."""
    unchanged = dict(neighbours)
    if len(neighbours) < 2 or centre in neighbours:
        return unchanged
    first, second = sorted(sorted(neighbours), key=lambda index: abs(index - centre))[:2]
    if first > second:
        first, second = second, first
    step = estimate_shift(neighbours[first], neighbours[second]) / (second - first)
    if np.hypot(*step) < MIN_SHIFT:
        return unchanged
    crop = _central(neighbours[first].shape)  # where the agreement is judged
    reference = neighbours[first][crop]
    agreement = _agreement(
        reference, shift_image(neighbours[second], step * (second - first), crop)
    )
    if (
        agreement < MIN_AGREEMENT
        or agreement < _agreement(reference, neighbours[second][crop]) + MIN_GAIN
    ):
        return unchanged
    return {
        index: shift_image(image, step * (index - centre)) for index, image in neighbours.items()
    }


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Correlation of the smoothed central crops ``a`` and ``b``, away from the edges a
    shift fills in."""
    margin = tuple(slice(max(1, n // 8), n - max(1, n // 8)) for n in a.shape)
    a = ndimage.gaussian_filter(a, SMOOTHING)[margin].ravel()
    b = ndimage.gaussian_filter(b, SMOOTHING)[margin].ravel()
    return float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else 0.0
