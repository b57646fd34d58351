"""The training step and its losses, shared by offline `train` and the daemon's online
trainer (where it runs: `device`; the optimiser and weight averaging: `optim`; the
patches it learns from: `patches`).

``train_step`` is the one place a gradient step happens. Tensors are ``(B, C, H, W)``
float32 in normalised units: channel 0 the frame, the others its temporal context.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial

import numpy as np
import torch
from torch import nn

from n2s_stream.n2s.binomial import PhotonSplit, binomial_split_loss
from n2s_stream.n2s.device import autocast
from n2s_stream.n2s.loss import masked_mse
from n2s_stream.n2s.masking import Masker
from n2s_stream.n2s.neighbor2neighbor import NEIGHBOUR_PAIRS, even_crop, neighbor2neighbor_loss
from n2s_stream.n2s.specs import OBJECTIVES, Objective

log = logging.getLogger(__name__)


def self_supervised_loss(
    model: nn.Module,
    masker: Masker,
    batch: torch.Tensor,
    *,
    rng: np.random.Generator,
    objective: Objective = "noise2self",
    valid: torch.Tensor | None = None,
    amp: bool = False,
    split: PhotonSplit | None = None,
) -> torch.Tensor:
    """The loss of ``model`` on noisy ``batch`` ``(B, C, H, W)`` under ``objective``, its
    random draws (mask phases, pixel pairs, photon splits) from ``rng``; a 0-d float32
    tensor. ``split``: how ``batch`` turns back into photon counts and is split
    (``binomial`` only)."""

    def unmasked(x: torch.Tensor) -> torch.Tensor:  # + a zero mask channel if any
        return masker.infer_single_pass(x, model)

    if objective == "binomial":
        if split is None:
            raise ValueError("objective binomial needs the normaliser of photon counts")
        generator = torch.Generator(batch.device).manual_seed(int(rng.integers(2**62)))
        with autocast(batch.device, amp):
            return binomial_split_loss(
                unmasked,
                batch,
                shift=split.shift,
                divisor=split.divisor,
                keep=split.keep,
                generator=generator,
                valid=valid,
            )
    if objective == "neighbor2neighbor":
        batch = even_crop(batch)
        valid = None if valid is None else even_crop(valid)
        size = (batch.shape[0], 1, batch.shape[-2] // 2, batch.shape[-1] // 2)
        choice = torch.from_numpy(rng.integers(len(NEIGHBOUR_PAIRS), size=size))
        with autocast(batch.device, amp):
            return neighbor2neighbor_loss(unmasked, batch, choice.to(batch.device), valid=valid)
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
    split: PhotonSplit | None = None,
) -> torch.Tensor:
    """One self-supervised gradient step; returns the loss (a 0-d tensor, no sync).

    ``batch``: ``(B, C, H, W)`` noisy patches (channel 0 the frame, then its context);
    ``objective``, ``rng`` and ``split``: see `self_supervised_loss`.
    """
    model.train()
    loss = self_supervised_loss(
        model, masker, batch, rng=rng, objective=objective, valid=valid, amp=amp, split=split
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


@torch.inference_mode()
def split_validation_loss(
    model: nn.Module,
    masker: Masker,
    frames: torch.Tensor,
    split: PhotonSplit,
    *,
    before_chunk: Callable[[], None] | None = None,
) -> float:
    """Binomial-split loss on held-out frames of photon counts: a quality estimate of the
    single pass a network without a blind spot writes, which needs no ground truth.

    Each frame's photons are split (``split.keep`` to the input, the rest the target), so
    the number is the squared error against the truth plus the target's own noise, the
    same for every model scored on the same split: it ranks a network and the classical
    denoiser without the bias of scoring a non-blind network by a masked use it never
    learnt (`masked_validation_loss`). Frame ``k`` of ``(N, C, H, W)`` is scored on two
    fixed draws (seeds ``2k`` and ``2k + 1``), so the number is comparable from one
    evaluation to the next; the network runs as it writes, one pass on the unmasked input
    (``masker.infer_single_pass``). ``before_chunk`` is called before each frame's passes.
    """
    model.eval()
    total = 0.0
    for k in range(frames.shape[0]):
        if before_chunk is not None:
            before_chunk()
        for draw in (2 * k, 2 * k + 1):
            generator = torch.Generator(device=frames.device).manual_seed(draw)
            loss = binomial_split_loss(
                partial(masker.infer_single_pass, model=model),
                frames[k : k + 1],
                shift=split.shift,
                divisor=split.divisor,
                keep=split.keep,
                generator=generator,
            )
            total += float(loss)  # host sync, once per draw
    return total / max(2 * frames.shape[0], 1)


def held_out_loss(
    model: nn.Module,
    masker: Masker,
    frames: torch.Tensor,
    split: PhotonSplit | None,
    *,
    before_chunk: Callable[[], None] | None = None,
) -> float:
    """The held-out score the cold start compares a network and the classical denoiser
    by: the photon-split loss where training splits photons (``split``), which scores the
    single pass written; else the masked loss. One frame per forward pass."""
    if split is not None:
        return split_validation_loss(model, masker, frames, split, before_chunk=before_chunk)
    return masked_validation_loss(model, masker, frames, batch=1, before_chunk=before_chunk)
