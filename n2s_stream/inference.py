"""Apply a trained network to frames: the same code offline and in the daemon."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from n2s_stream.n2s.masking import Masker
from n2s_stream.n2s.normalize import Normalizer, fill_invalid, valid_pixels
from n2s_stream.training import autocast


@torch.inference_mode()
def denoise_normalized(
    model: nn.Module,
    masker: Masker,
    frames: np.ndarray,
    *,
    jinv: bool,
    device: torch.device,
    amp: bool = False,
) -> np.ndarray:
    """Denoise ``(n, H, W)`` normalised frames; returns ``(n, H, W)`` float32 on the host."""
    x = torch.from_numpy(np.ascontiguousarray(frames, dtype=np.float32))
    x = x.unsqueeze(1).to(device, non_blocking=True)  # (n, 1, H, W)
    with autocast(device, amp):
        infer = masker.infer_full_image if jinv else masker.infer_single_pass
        y = infer(x, model)
    return y.float().squeeze(1).cpu().numpy()  # host sync


def denoise_counts(
    model: nn.Module,
    masker: Masker,
    normalizer: Normalizer,
    frames: np.ndarray,
    *,
    jinv: bool,
    device: torch.device,
    amp: bool = False,
) -> np.ndarray:
    """Denoise ``(n, H, W)`` frames in detector units; returns float32 in the same units.

    Sentinel, NaN and inf pixels are in-filled for the network and keep their source
    value in the output, so nothing is invented where the detector measured nothing.
    """
    valid = valid_pixels(frames, frames.dtype)
    normalized = normalizer.forward(fill_invalid(frames, valid))
    denoised = normalizer.inverse(
        denoise_normalized(model, masker, normalized, jinv=jinv, device=device, amp=amp)
    )
    if not valid.all():
        denoised[~valid] = frames[~valid]
    return denoised


def to_source_dtype(frames: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Round and clip float frames into ``dtype`` (integers) or cast (floats)."""
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.clip(np.rint(frames), info.min, info.max).astype(dtype)
    return frames.astype(dtype)
