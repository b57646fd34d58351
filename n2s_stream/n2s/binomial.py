"""Binomial splitting: a Noise2Noise pair from one frame of photon counts.

Each count ``y ~ Poisson(λ)`` of a pixel splits into ``a ~ Binomial(y, p)`` and
``b = y - a``; then ``a ~ Poisson(pλ)`` and ``b ~ Poisson((1 - p)λ)`` are independent, so
``a / p`` and ``b / (1 - p)`` are two noisy images of the same ``λ`` whose noise is
independent. A network mapping the first to the second learns the clean image
(Noise2Noise), with every pixel supervising and no blind spot, and no offset between
neighbours as Neighbor2Neighbor's sub-images have. Afterwards it is used, as a
Neighbor2Neighbor network is, on the whole unsplit frame, whose noise is a little lower
(variance ``λ`` instead of ``λ / p``): ``p`` close to 1 keeps that gap small.

It holds only for photon counts (a photon-counting detector, or an integrating one
calibrated to photons); frames are in normalised units, ``counts = y * divisor + shift``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from n2s_stream.n2s.loss import masked_mse
from n2s_stream.n2s.normalize import Normalizer
from n2s_stream.n2s.photons import PHOTON_RANGE, are_photon_counts
from n2s_stream.n2s.specs import Objective

KEEP = 0.9
"""Share ``p`` of each pixel's photons in the network's input; the rest is the target
(the default of the ``split_keep`` option)."""


@dataclass(frozen=True)
class PhotonSplit:
    """How normalised frames are split photon by photon: the normaliser's ``shift`` and
    ``divisor`` that turn them back into counts, and the share ``keep`` of each pixel's
    photons that goes to the network's input."""

    shift: float
    divisor: float
    keep: float = KEEP


def not_photon_counts(frames_dtype: str, counts_per_photon: float | None) -> str | None:
    """Why frames of ``frames_dtype`` whose noise showed ``counts_per_photon``
    (``n2s/photons.py``) cannot be split photon by photon; None where they can. An
    estimate that could not be made (None) does not refuse them."""
    if np.dtype(frames_dtype).kind not in "iu":
        return f"objective binomial splits photon counts, but the frames are {frames_dtype}"
    if counts_per_photon is not None and not are_photon_counts(counts_per_photon):
        low, high = PHOTON_RANGE
        return (
            f"objective binomial splits photon counts, but the frames' noise shows "
            f"{counts_per_photon:.2f} counts per photon (outside {low:g}-{high:g})"
        )
    return None


def photon_split(normalizer: Normalizer, keep: float = KEEP) -> PhotonSplit:
    """The split of photon counts normalised by ``normalizer`` (whatever the dtype of the
    frames it was fitted on: `not_photon_counts` judges the frames)."""
    return PhotonSplit(normalizer.shift, normalizer.divisor, keep)


def scoring_split(
    objective: Objective,
    normalizer: Normalizer,
    frames_dtype: str,
    counts_per_photon: float | None,
    keep: float = KEEP,
) -> PhotonSplit | None:
    """The split that held-out frames are scored by, where ``objective`` is binomial and
    the frames are photon counts (`not_photon_counts`); None where they are scored by
    the masked loss instead."""
    if objective != "binomial" or not_photon_counts(frames_dtype, counts_per_photon):
        return None
    return photon_split(normalizer, keep)


def split_counts(
    counts: torch.Tensor, keep: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split non-negative integer ``counts`` photon by photon: each photon goes to the
    first part with probability ``keep``. The parts sum to ``counts``."""
    first = torch.binomial(counts, torch.full_like(counts, keep), generator=generator)
    return first, counts - first


def binomial_split_loss(
    model: Callable[[torch.Tensor], torch.Tensor],
    batch: torch.Tensor,
    *,
    shift: float,
    divisor: float,
    keep: float = KEEP,
    generator: torch.Generator | None = None,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error of ``model`` (unmasked input to denoised centre frame) from the
    kept part of each centre frame's photons to the rest, both rescaled to the whole
    frame's intensity, in normalised units. ``batch`` is ``(B, C, H, W)`` normalised
    (``shift``, ``divisor``: the normaliser); context channels are left whole (their noise
    is independent of the centre frame's). ``valid`` (``(B, 1, H, W)`` 0/1) drops unusable
    pixels. Returns a scalar (0 if no pixel counts)."""
    counts = (batch[:, :1].float() * divisor + shift).round().clamp_min(0.0)
    kept, rest = split_counts(counts, keep, generator)
    net_input = batch.clone()
    net_input[:, :1] = (kept / keep - shift) / divisor
    target = (rest / (1.0 - keep) - shift) / divisor
    every_pixel = torch.ones_like(target)  # no blind spot: every pixel is a target
    return masked_mse(model(net_input).float(), target, every_pixel, valid)
