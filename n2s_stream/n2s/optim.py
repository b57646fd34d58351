"""The optimiser and what keeps training sound: Adam, the learning-rate schedule, weight
averaging (the published weights are the average of the last steps), and the watch that
rolls back a step whose loss is not finite or diverges."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

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
