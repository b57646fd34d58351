"""One denoise path, shared by offline ``denoise`` and the daemon.

Frames go through the same four steps wherever they come from:
1. ``prepare``: find the pixels that carry a measurement (sentinels, NaN/inf and the
   pixel mask do not), in-fill the others and normalise;
2. a `ContextWindow` per series releases each frame with its neighbours ``(K, H, W)``
   (a channel with no frame to use is zero, the normalised mean);
3. ``denoise_normalized`` runs the network (or any module with its interface), and the
   same normaliser maps the result back to detector units;
4. ``restore_invalid``: unmeasured pixels keep their source value in the output.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch import nn

from n2s_stream.n2s.context import ContextWindow
from n2s_stream.n2s.device import autocast
from n2s_stream.n2s.guards import preserve_frame_flux
from n2s_stream.n2s.masking import Masker
from n2s_stream.n2s.normalize import Normalizer, normalize_frame, valid_pixels
from n2s_stream.n2s.tiling import tiled_forward

Forward = Callable[[torch.Tensor], torch.Tensor]
"""A network's forward pass: ``(N, C, H, W)`` normalised input -> ``(N, 1, H, W)``."""


@dataclass
class Network:
    """A network ready to run: the module, its masking, the device it runs on, and
    whether inference through it is J-invariant (every pixel predicted with itself
    hidden) or a single pass."""

    model: nn.Module
    masker: Masker
    device: torch.device
    jinv: bool = False


@dataclass(frozen=True)
class Prepared:
    """A frame ready for the network: ``normalized`` float32 ``(H, W)`` with unmeasured
    pixels in-filled, ``valid`` True where the detector measured."""

    normalized: np.ndarray
    valid: np.ndarray


class Unusable(ValueError):
    """A frame the network cannot take; ``reason`` is its rejection label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def check_usable(data: np.ndarray, pixel_mask: np.ndarray | None = None) -> np.ndarray:
    """Valid-pixel map of one ``(H, W)`` frame; raises `Unusable` for a float frame with
    NaN/inf (a broken detector frame, not a sentinel) or one with no measured pixel."""
    valid = valid_pixels(data, data.dtype)
    if data.dtype.kind == "f" and not valid.all():
        raise Unusable("nan", "NaN or inf pixels in a float frame")
    if pixel_mask is not None:
        valid &= ~pixel_mask
    if not valid.any():
        raise Unusable("no_valid_pixels", "every pixel is a sentinel or masked")
    return valid


def prepare(data: np.ndarray, valid: np.ndarray, normalizer: Normalizer) -> Prepared:
    """In-fill the unmeasured pixels of one ``(H, W)`` frame and normalise it (the frame
    stays in its integer type until here)."""
    return Prepared(normalize_frame(data, valid, normalizer), valid)


PRECISIONS: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def inference_autocast(
    device: torch.device, precision: str, amp: bool = False
) -> AbstractContextManager[object]:
    """The forward pass's arithmetic: float32, or autocast to float16 / bfloat16 on the
    device (``amp``: the offline tools' float16 on CUDA)."""
    if precision in PRECISIONS:
        return torch.autocast(device_type=device.type, dtype=PRECISIONS[precision])
    return autocast(device, amp)


class HostStaging:
    """A page-locked host buffer that frames are copied into before they go to a CUDA
    device, so the copy runs without a bounce buffer and does not block this thread
    (``non_blocking``); it is reused while the input's shape stays the same."""

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None

    def to_device(self, x: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``x`` on ``device``; through the pinned buffer when that is a CUDA device."""
        if device.type != "cuda":
            return x.to(device)
        if self._buffer is None or self._buffer.shape != x.shape:
            self._buffer = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        self._buffer.copy_(x)
        return self._buffer.to(device, non_blocking=True)


@torch.inference_mode()
def denoise_normalized(
    forward: Forward,
    masker: Masker,
    inputs: np.ndarray,
    *,
    jinv: bool,
    device: torch.device,
    amp: bool = False,
    precision: str = "float32",
    tile: int = 0,
    overlap: int = 32,
    staging: HostStaging | None = None,
) -> np.ndarray:
    """Denoise normalised frames: ``(n, H, W)``, or ``(n, C, H, W)`` frames with their
    temporal context; returns the ``(n, H, W)`` denoised centre frames, float32, on the host.
    ``precision``: the forward pass's arithmetic; ``tile``: frames larger than this go
    through the network in overlapping tiles (`tiling.py`)."""
    x = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32))
    if x.ndim == 3:
        x = x.unsqueeze(1)
    x = (staging or HostStaging()).to_device(x, device)
    network = forward if tile <= 0 else partial(tiled_forward, forward, tile=tile, overlap=overlap)
    with inference_autocast(device, precision, amp):
        infer = masker.infer_full_image if jinv else masker.infer_single_pass
        y = infer(x, network)
    return y.float().squeeze(1).cpu().numpy()  # host sync


def restore_invalid(denoised: np.ndarray, raw: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Unmeasured pixels keep their source value (in place; returned)."""
    if not valid.all():
        np.copyto(denoised, raw, where=~valid, casting="unsafe")
    return denoised


def to_source_dtype(frames: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Round and clip float frames into ``dtype`` (integers) or cast (floats: values beyond
    a narrower float's range, such as a 16-bit sentinel in float16, become inf, which still
    reads as not measured)."""
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.clip(np.rint(frames), info.min, info.max).astype(dtype)
    with np.errstate(over="ignore"):
        return frames.astype(dtype)


def denoise_series(
    forward: Forward,
    masker: Masker,
    normalizer: Normalizer,
    chunks: Iterable[tuple[int, np.ndarray]],
    *,
    jinv: bool,
    device: torch.device,
    batch: int = 8,
    amp: bool = False,
    pixel_mask: np.ndarray | None = None,
    preserve_flux: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Denoise one series read in ``(first index, (n, H, W) frames)`` chunks, in order;
    yields ``(indices, denoised frames)`` in detector units, float32, ``batch`` at a time.
    Offline, frames with NaN/inf are denoised from their in-filled pixels (the daemon
    refuses them: see ``check_usable``). ``preserve_flux``: each frame scaled to its raw
    total (``n2s/guards.py``)."""
    window: ContextWindow[tuple[int, np.ndarray, np.ndarray]] = ContextWindow(
        masker.config.context_frames, masker.config.causal, masker.config.register
    )
    ready: list[tuple[tuple[int, np.ndarray, np.ndarray], np.ndarray]] = []

    def run(items) -> tuple[np.ndarray, np.ndarray]:
        stacks = np.stack([stack for _, stack in items])
        denoised = normalizer.inverse(
            denoise_normalized(forward, masker, stacks, jinv=jinv, device=device, amp=amp)
        )
        for k, ((_, raw, valid), _) in enumerate(items):
            if preserve_flux:
                preserve_frame_flux(denoised[k], raw, valid)
            restore_invalid(denoised[k], raw, valid)
        return np.array([index for (index, _, _), _ in items]), denoised

    for start, frames in chunks:
        valid = valid_pixels(frames, frames.dtype)
        if pixel_mask is not None:
            valid &= ~pixel_mask
        for k in range(len(frames)):
            normalized = normalize_frame(frames[k], valid[k], normalizer)
            ready += window.push((start + k, frames[k], valid[k]), normalized)
        while len(ready) >= batch:
            yield run(ready[:batch])
            ready = ready[batch:]
    ready += window.flush()
    for first in range(0, len(ready), batch):
        yield run(ready[first : first + batch])


def denoise_counts(
    model: nn.Module,
    masker: Masker,
    normalizer: Normalizer,
    frames: np.ndarray,
    *,
    jinv: bool,
    device: torch.device,
    amp: bool = False,
    pixel_mask: np.ndarray | None = None,
) -> np.ndarray:
    """Denoise the ``(n, H, W)`` frames of one series (in order) held in memory; returns
    float32 in detector units. See :func:`denoise_series`."""
    parts = [
        out
        for _, out in denoise_series(
            model,
            masker,
            normalizer,
            [(0, frames)],
            jinv=jinv,
            device=device,
            batch=max(len(frames), 1),
            amp=amp,
            pixel_mask=pixel_mask,
        )
    ]
    return np.concatenate(parts) if parts else np.empty((0, *frames.shape[1:]), np.float32)
