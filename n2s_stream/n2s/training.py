"""Pieces of self-supervised training shared by offline `train` and the daemon's online
trainer.

``train_step`` is the one place a gradient step happens. Tensors are ``(B, C, H, W)``
float32 in normalised units: channel 0 the frame, the others its temporal context.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from n2s_stream.n2s.loss import masked_mse
from n2s_stream.n2s.masking import Masker
from n2s_stream.n2s.neighbor2neighbor import NEIGHBOUR_PAIRS, even_crop, neighbor2neighbor_loss
from n2s_stream.n2s.specs import OBJECTIVES, Objective

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when present, else CPU; ``cpu``/``cuda``/``cuda:N`` as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        from n2s_stream.errors import UsageError

        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    return device


def amp_enabled(requested: bool, device: torch.device) -> bool:
    """Mixed precision runs on CUDA only; on CPU the request is a no-op with a warning."""
    if requested and device.type != "cuda":
        warnings.warn("--amp has no effect on CPU; running in float32", stacklevel=2)
        log.warning("--amp has no effect on CPU; running in float32")
        return False
    return requested


def autocast(device: torch.device, enabled: bool) -> AbstractContextManager[object]:
    """float16 autocast on CUDA when enabled, else nothing."""
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return nullcontext()


DIVERGENCE_FACTOR = 20.0
"""A step whose loss is this far above its recent level is undone."""


class LossWatch:
    """Tells a diverging training step from an ordinary one: its loss is not finite, or
    more than `DIVERGENCE_FACTOR` times the recent (exponentially averaged) loss. A step's
    loss is measured before its update, so such a loss means the weights it started from
    are already damaged: the trainer rolls back to weights it saved and restarts Adam."""

    def __init__(self) -> None:
        self.recent: float | None = None

    def diverging(self, loss: float) -> bool:
        """True for a loss that calls for a rollback; any other joins the recent level."""
        if not math.isfinite(loss) or (
            self.recent is not None and loss > DIVERGENCE_FACTOR * self.recent
        ):
            return True
        self.recent = loss if self.recent is None else 0.98 * self.recent + 0.02 * loss
        return False

    def describe(self, loss: float) -> str:
        """The loss and the recent level, for the rollback's log line."""
        return f"loss {loss:g}" + ("" if self.recent is None else f" (recent {self.recent:.4g})")


def all_finite(model: nn.Module) -> bool:
    """True when no weight of ``model`` is NaN or infinite (one host sync)."""
    weights = [p.detach() for p in model.parameters()]
    return bool(torch.stack([torch.isfinite(w).all() for w in weights]).all()) if weights else True


def make_optimizer(model: nn.Module, lr: float) -> torch.optim.Adam:
    """Adam over the model's parameters with its fused kernel (one pass over every
    parameter instead of a few small ops per tensor: 1.03x the training steps/s on CPU,
    benchmarks/profile_model.py). Its state dict is plain Adam's, so checkpoints of either
    resume in the other."""
    return torch.optim.Adam(model.parameters(), lr=lr, fused=True)


def weight_average(model: nn.Module, steps: int) -> AveragedModel:
    """An exponential moving average of ``model``'s weights over about ``steps`` training
    steps (Polyak averaging), updated by ``update_parameters(model)`` after each step.

    Online training runs at a constant learning rate on a changing buffer, so its weights
    wander around a good solution from step to step; their average sits nearer the middle
    and varies far less between published versions. The first updates weigh 1/n (a plain
    mean), so a fresh start does not drag the starting weights along for ``steps`` steps.
    Buffers (batch-norm statistics) follow the trained model as they are.
    """

    def lerp(
        averaged: tuple[torch.Tensor, ...] | list[torch.Tensor],
        current: tuple[torch.Tensor, ...] | list[torch.Tensor],
        n_averaged: torch.Tensor | int,
    ) -> None:
        torch._foreach_lerp_(averaged, current, max(1.0 / steps, 1.0 / (int(n_averaged) + 1)))

    return AveragedModel(model, multi_avg_fn=lerp, use_buffers=False)


def cosine_lr(base_lr: float, progress: float, floor: float = 0.05) -> float:
    """Learning rate at ``progress`` in [0, 1] of a cosine schedule ending at ``floor*base``."""
    progress = min(max(progress, 0.0), 1.0)
    return base_lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


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


def self_supervised_loss(
    model: nn.Module,
    masker: Masker,
    batch: torch.Tensor,
    *,
    rng: np.random.Generator,
    objective: Objective = "noise2self",
    valid: torch.Tensor | None = None,
    amp: bool = False,
) -> torch.Tensor:
    """The loss of ``model`` on noisy ``batch`` ``(B, C, H, W)`` under ``objective``, its
    random draws (mask phases, pixel pairs) from ``rng``; a 0-d float32 tensor."""
    if objective == "neighbor2neighbor":
        batch = even_crop(batch)
        valid = None if valid is None else even_crop(valid)
        size = (batch.shape[0], 1, batch.shape[-2] // 2, batch.shape[-1] // 2)
        choice = torch.from_numpy(rng.integers(len(NEIGHBOUR_PAIRS), size=size))

        def single_pass(x: torch.Tensor) -> torch.Tensor:  # + a zero mask channel if any
            return masker.infer_single_pass(x, model)

        with autocast(batch.device, amp):
            return neighbor2neighbor_loss(single_pass, batch, choice.to(batch.device), valid=valid)
    if objective != "noise2self":
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    # hide one grid phase of each centre frame: net_input (B, C[+1], H, W), mask (B,1,H,W)
    phases = torch.from_numpy(rng.integers(masker.n_phases, size=batch.shape[0]))
    net_input, mask = masker.mask(batch, phases.to(batch.device))
    # predict the hidden pixels from their surroundings (and the neighbouring frames)
    with autocast(batch.device, amp):
        output = model(net_input)
    # loss on the centre frame's hidden (and valid) pixels only, in float32
    return masked_mse(output.float(), batch[:, :1], mask, valid)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    masker: Masker,
    batch: torch.Tensor,
    *,
    rng: np.random.Generator,
    objective: Objective = "noise2self",
    valid: torch.Tensor | None = None,
    scaler: torch.amp.GradScaler | None = None,
    amp: bool = False,
) -> torch.Tensor:
    """One self-supervised gradient step; returns the loss (a 0-d tensor, no sync).

    ``batch``: ``(B, C, H, W)`` noisy patches (channel 0 the frame, then its context);
    ``objective`` and ``rng``: see `self_supervised_loss`.
    """
    model.train()
    loss = self_supervised_loss(
        model, masker, batch, rng=rng, objective=objective, valid=valid, amp=amp
    )
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None and scaler.is_enabled():
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return loss.detach()


@torch.inference_mode()
def masked_validation_loss(
    model: nn.Module,
    masker: Masker,
    frames: torch.Tensor,
    *,
    valid: torch.Tensor | None = None,
    batch: int = 8,
    amp: bool = False,
    before_chunk: Callable[[], None] | None = None,
) -> float:
    """Masked loss on held-out frames: a quality estimate that needs no ground truth.

    The hidden pixels are in-filled in the input whatever the objective, so the number
    scores the network's J-invariant use: for a blind-spot network that is what it
    learnt; for one trained without a blind spot (Neighbor2Neighbor) it scores a use it
    was not trained for, not the single pass it writes (no self-supervised loss scores
    that without bias), but on the same footing as the classical denoiser's.

    Each frame ``k`` of ``(N, C, H, W)`` (channel 0 is scored, the rest is its context) is
    scored with two fixed phases (``k`` and ``k + n_phases/2``), so the number is
    comparable from one evaluation to the next; ``batch`` frames per forward pass (it does
    not change the number). ``before_chunk`` is called before each pass: the daemon's
    trainer waits there while inference is busy.
    """
    model.eval()
    total, count = 0.0, 0
    half = masker.n_phases // 2
    for start in range(0, frames.shape[0], batch):
        if before_chunk is not None:
            before_chunk()
        chunk = frames[start : start + batch]
        chunk_valid = None if valid is None else valid[start : start + batch]
        index = torch.arange(start, start + chunk.shape[0], device=chunk.device)
        for phases in (index, index + half):
            net_input, mask = masker.mask(chunk, phases)
            with autocast(chunk.device, amp):
                output = model(net_input)
            loss = masked_mse(output.float(), chunk[:, :1], mask, chunk_valid)
            total += float(loss) * chunk.shape[0]  # host sync, once per chunk
            count += chunk.shape[0]
    return total / max(count, 1)
