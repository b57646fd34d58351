"""What training learns from: random patches and crops of the buffered frames, their
central crop for validation, and the eight orientations that augment them. Pure numpy."""

from __future__ import annotations

import numpy as np


def sample_patches(
    frames: np.ndarray,
    valid: np.ndarray | None,
    *,
    batch: int,
    patch: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Random ``(batch, C, patch, patch)`` crops with random flips and 90° turns.

    ``frames`` is ``(N, C, H, W)`` in normalised units (a frame and its context, C = 1
    without); ``patch=0`` (or a patch larger than the frame) takes whole frames. ``valid``
    (``(N, H, W)``, of the centre frames) is cropped alongside when given.
    """
    n, channels, height, width = frames.shape
    ph, pw = (height, width) if patch <= 0 else (min(patch, height), min(patch, width))
    crops = np.empty((batch, channels, ph, pw), dtype=np.float32)
    valid_crops = None if valid is None else np.empty((batch, 1, ph, pw), dtype=np.float32)
    for b in range(batch):
        k = rng.integers(n)
        crop, valid_crop = random_crop(
            frames[k], None if valid is None else valid[k], (ph, pw), rng
        )
        crops[b] = crop
        if valid_crops is not None:
            valid_crops[b, 0] = valid_crop
    return crops, valid_crops


def random_crop(
    image: np.ndarray,
    valid: np.ndarray | None,
    size: tuple[int, int],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray | None]:
    """A random ``size`` window of ``image`` (``(H, W)`` or ``(C, H, W)``, every channel
    alike, and of ``valid`` alike), randomly mirrored and turned (by 90° steps when square,
    else by 180°)."""
    ph, pw = size
    top = rng.integers(image.shape[-2] - ph + 1)
    left = rng.integers(image.shape[-1] - pw + 1)
    turns = int(rng.integers(4)) if ph == pw else 2 * int(rng.integers(2))
    flip = bool(rng.integers(2))
    crop = augment(image[..., top : top + ph, left : left + pw], turns, flip)
    if valid is None:
        return crop, None
    return crop, augment(valid[..., top : top + ph, left : left + pw], turns, flip)


def center_crop(frames: np.ndarray, size: int) -> np.ndarray:
    """The central ``size`` x ``size`` window of every frame of ``(..., H, W)`` (a side
    shorter than ``size`` is kept whole; ``size`` 0 keeps the frames whole)."""
    if size <= 0:
        return frames
    height, width = frames.shape[-2:]
    top, left = max(height - size, 0) // 2, max(width - size, 0) // 2
    return frames[..., top : top + size, left : left + size]


def augment(image: np.ndarray, turns: int, flip: bool) -> np.ndarray:
    """Rotate the last two axes by ``turns`` quarter turns, then mirror left-right if
    ``flip``."""
    image = np.rot90(image, turns, axes=(-2, -1))
    return image[..., ::-1] if flip else image
