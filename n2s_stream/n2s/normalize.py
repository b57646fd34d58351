"""Map detector values to the network's range and back, and find unusable pixels.

A `Normalizer` is an affine map ``y = (x - shift) / divisor`` fitted on a stack and saved
in the checkpoint, so denoised output can be returned in the input's own units (counts
stay counts). Pure numpy/torch; no file access.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

NORMALIZE_MODES = ("none", "meanstd", "percentile")
PERCENTILE_RANGE = (1.0, 99.5)
# Enough pixels for stable statistics without sorting a whole stack.
_MAX_STAT_SAMPLES = 4_000_000


@dataclass(frozen=True)
class Normalizer:
    """Affine normalisation fitted on a stack: ``normalized = (x - shift) / divisor``.

    ``mode`` and ``integer_scale`` record how the numbers came about: integer inputs are
    first divided by their dtype's maximum unless fitted with ``scale_integers=False``.
    """

    mode: str = "none"
    shift: float = 0.0
    divisor: float = 1.0
    integer_scale: float = 1.0
    source_dtype: str = "float32"

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Detector units → network units (float32)."""
        return ((np.asarray(x, dtype=np.float32) - self.shift) / self.divisor).astype(
            np.float32, copy=False
        )

    def inverse(self, y: np.ndarray) -> np.ndarray:
        """Network units → detector units (a new float32 array; ``y`` is left as it is).
        torch's vectorised loops give numpy's float32 result at a fraction of its time."""
        out = torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32))
        return out.mul(float(np.float32(self.divisor))).add_(float(np.float32(self.shift))).numpy()

    @property
    def is_exact(self) -> bool:
        """True when the map and its inverse lose nothing in float32: no shift and a
        power-of-two divisor (a multiplication by 2**k is exact). Only then can output be
        written back in the source's integer counts without doubt."""
        mantissa, _ = math.frexp(self.divisor)
        return self.shift == 0.0 and self.divisor > 0 and mantissa == 0.5

    def describe(self) -> str:
        """One-line human description for logs and error messages."""
        return (
            f"normalize={self.mode}, shift={self.shift:g}, divisor={self.divisor:g}"
            f" (integer scale {self.integer_scale:g}, source dtype {self.source_dtype})"
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for a checkpoint (loads with ``weights_only=True``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Normalizer:
        """Inverse of `to_dict`."""
        return cls(**data)


def integer_full_scale(dtype: np.dtype) -> float:
    """The dtype's maximum for integers (their natural full scale), 1 otherwise."""
    dtype = np.dtype(dtype)
    return float(np.iinfo(dtype).max) if dtype.kind in "iu" else 1.0


def valid_pixels(frames: np.ndarray, source_dtype: np.dtype) -> np.ndarray:
    """Boolean map of pixels that carry a measurement.

    Integer detectors mark saturated, dead and gap pixels with the dtype's maximum;
    float data marks them with NaN or inf. Such pixels are kept out of the loss and the
    statistics, and in-filled before the network sees them.
    """
    source_dtype = np.dtype(source_dtype)
    if source_dtype.kind in "iu":
        return frames != np.iinfo(source_dtype).max
    return np.isfinite(frames)


def fit_normalizer(
    frames: np.ndarray,
    *,
    mode: str,
    scale_integers: bool,
    source_dtype: np.dtype,
    valid: np.ndarray | None = None,
) -> Normalizer:
    """Fit the normalisation ``mode`` on ``frames`` (``(N,H,W)``, source units)."""
    if mode not in NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {mode!r}")
    source_dtype = np.dtype(source_dtype)
    integer_scale = integer_full_scale(source_dtype) if scale_integers else 1.0
    if mode == "none":
        return Normalizer("none", 0.0, integer_scale, integer_scale, source_dtype.name)
    values = np.asarray(frames)[valid] if valid is not None else np.asarray(frames).ravel()
    if values.size > _MAX_STAT_SAMPLES:
        step = values.size // _MAX_STAT_SAMPLES + 1
        values = values[::step]
    values = values.astype(np.float64) / integer_scale
    if values.size == 0:
        values = np.zeros(1)
    if mode == "meanstd":
        center, spread = float(values.mean()), float(values.std())
    else:
        low, high = np.percentile(values, PERCENTILE_RANGE)
        center, spread = float(low), float(high - low)
    spread = spread if spread > 0 else 1.0
    return Normalizer(
        mode, center * integer_scale, spread * integer_scale, integer_scale, source_dtype.name
    )


def fill_invalid(frames: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Replace unusable pixels by the mean of the usable ones in the same frame.

    Works on ``(N,H,W)`` float arrays; returns a new array. A crude fill is enough: the
    pixels are excluded from the loss, this only stops them dominating their neighbours.
    """
    filled = np.array(frames, dtype=np.float32, copy=True)
    if valid.all():
        return filled
    for k in range(filled.shape[0]):
        bad = ~valid[k]
        if bad.any():
            good = filled[k][~bad]
            filled[k][bad] = float(good.mean()) if good.size else 0.0
    return filled


def normalize_frame(data: np.ndarray, valid: np.ndarray, normalizer: Normalizer) -> np.ndarray:
    """One ``(H, W)`` frame in network units (float32), its unusable pixels in-filled with
    the mean of its usable ones: `fill_invalid` then ``normalizer.forward``, in a few
    vectorised passes over one array and without temporaries of the frame's size (at 4
    megapixels the two-step form costs several times more)."""
    # numpy's cast (torch's is slower for 16-bit integers), C order: the flat view below
    # must write into it
    out = data.astype(np.float32, order="C")
    image = torch.from_numpy(out)
    if not valid.all():
        bad = np.flatnonzero(~valid)
        flat = out.reshape(-1)
        flat[bad] = 0.0  # NaN/inf included: they take no part in the mean
        count = flat.size - bad.size
        # torch's float32 sum is vectorised and cascaded: accurate, and 5x faster than
        # numpy's sum of the integers in int64
        flat[bad] = np.float32(float(image.sum()) / count) if count else np.float32(0.0)
    image.sub_(float(np.float32(normalizer.shift))).div_(float(np.float32(normalizer.divisor)))
    return out
