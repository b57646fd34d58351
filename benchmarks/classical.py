"""The classical gold standard for photon counts, as a yardstick beside the daemon.

The Anscombe transform makes Poisson counts roughly Gaussian with unit variance; BM3D,
frame by frame, removes that noise at sigma = 1; Makitalo and Foi's exact unbiased inverse
maps the estimate back to expected counts without the bias of the algebraic inverse at low
counts (M. Makitalo, A. Foi, "A closed-form approximation of the exact unbiased inverse of
the Anscombe variance-stabilizing transformation", IEEE TIP 20(9), 2011).

The ``bm3d`` package (and ``bm4d``, which it builds on) is licensed for non-commercial use
only: it is the optional benchmark extra ``[bench]`` and never a dependency of the daemon.
Without it, ``available()`` says why and the benchmarks leave the row out.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

SQRT_3_2 = np.sqrt(1.5)
ZERO_COUNTS = 2 * np.sqrt(3 / 8)
"""The expected Anscombe value of zero counts: the exact unbiased inverse maps it to 0."""


def available() -> str | None:
    """None when BM3D can run, else why not (one line)."""
    try:
        import bm3d  # noqa: F401
    except ImportError as exc:
        return f"{exc.name} is not installed (pip install -e '.[bench]')"
    return None


def anscombe(counts: np.ndarray) -> np.ndarray:
    """Variance-stabilised counts: Poisson noise becomes roughly N(0, 1)."""
    return 2.0 * np.sqrt(np.maximum(counts, 0.0) + 3 / 8)


def exact_unbiased_inverse(stabilised: np.ndarray) -> np.ndarray:
    """Expected counts from a denoised Anscombe image (Makitalo and Foi's closed form);
    values at or below the transform of zero counts map to 0."""
    d = np.maximum(np.asarray(stabilised, dtype=np.float64), ZERO_COUNTS)
    counts = 0.25 * d**2 + 0.25 * SQRT_3_2 / d - 1.375 / d**2 + 0.625 * SQRT_3_2 / d**3 - 0.125
    return np.maximum(counts, 0.0)


def anscombe_bm3d(frame: np.ndarray) -> np.ndarray:
    """One ``(H, W)`` frame of counts denoised by Anscombe + BM3D (sigma 1, default
    profile) + exact unbiased inverse."""
    import bm3d

    return exact_unbiased_inverse(bm3d.bm3d(anscombe(frame), sigma_psd=1.0)).astype(np.float32)


def framewise(
    denoise: Callable[[np.ndarray], np.ndarray], stack: np.ndarray
) -> tuple[np.ndarray, float]:
    """``denoise`` applied to each frame of ``stack``; the stack and CPU seconds per frame."""
    started = time.process_time()
    out = np.stack([denoise(frame) for frame in stack])
    return out, (time.process_time() - started) / len(stack)
