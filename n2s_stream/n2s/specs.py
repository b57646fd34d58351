"""Descriptions of the math's variants, as plain data that imports no torch: the network
architecture (`ModelConfig`), the masking (`MaskerConfig`), the training objective and the
inference precision. The config names them without loading torch (``--help`` and
``check-config`` stay light); the modules that compute with them import them from here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, get_args

MODEL_NAMES = ("unet", "dncnn")
MASK_MODES = ("interpolate", "zero")

Objective = Literal["noise2self", "neighbor2neighbor", "binomial"]
"""How a training step learns from noisy patches: Noise2Self's masked loss on one hidden
grid phase per patch (the network learns a blind-spot prediction), Neighbor2Neighbor's
sub-image loss (``n2s/neighbor2neighbor.py``: every pixel supervises, no blind spot), or
binomial splitting of photon counts (``n2s/binomial.py``: a Noise2Noise pair from one
frame; photon counts only)."""
OBJECTIVES: tuple[str, ...] = get_args(Objective)


def is_blind(objective: str) -> bool:
    """Whether a network trained by ``objective`` predicts each pixel without seeing it
    (Noise2Self); the others see every pixel, are used unmasked, and share a starting
    model."""
    return objective == "noise2self"


Precision = Literal["float32", "float16", "bfloat16"]
"""The forward pass's arithmetic (``n2s/denoising.py``: float16 and bfloat16 by autocast)."""


def context_offsets(frames: int, causal: bool) -> list[int]:
    """Offsets of the neighbour channels from the centre: ``[-1, 1, -2, 2, ...]`` (centred)
    or ``[-1, -2, ...]`` (causal)."""
    if frames < 1:
        raise ValueError(f"context_frames must be >= 1, got {frames}")
    if causal:
        return [-d for d in range(1, frames)]
    if frames % 2 == 0:
        raise ValueError(f"centred context needs an odd number of frames, got {frames}")
    return [sign * d for d in range(1, frames // 2 + 1) for sign in (-1, 1)]


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a denoiser; enough to rebuild it from a checkpoint.

    ``width`` is the channel count of the first level (UNet) or of every layer (DnCNN);
    ``depth`` the number of down-samplings (UNet); ``layers`` the conv layers (DnCNN).
    ``residual`` adds the input image to the output: it helps J-invariant inference but
    lets the noisy pixel leak through in single-pass inference, so it is off by default.
    """

    name: str = "unet"
    in_channels: int = 1
    out_channels: int = 1
    width: int = 16
    depth: int = 2
    layers: int = 10
    residual: bool = False
    batch_norm: bool = False

    def __post_init__(self) -> None:
        if self.name not in MODEL_NAMES:
            raise ValueError(f"model must be one of {MODEL_NAMES}, got {self.name!r}")
        if self.width < 1 or self.depth < 0 or self.layers < 2:
            raise ValueError(f"invalid model size: {self}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for a checkpoint."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Inverse of `to_dict`; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**data)


@dataclass(frozen=True)
class MaskerConfig:
    """How pixels are hidden during training and J-invariant inference."""

    grid_size: int = 4
    mode: str = "interpolate"
    mask_as_input: bool = False
    context_frames: int = 1  # frames the network sees: the centre one and K-1 neighbours
    causal: bool = False  # neighbours from the past only (no wait for later frames)
    register: bool = False  # neighbours shifted onto the centre frame (motion from them)

    def __post_init__(self) -> None:
        if self.grid_size < 2:
            raise ValueError(f"grid_size must be >= 2, got {self.grid_size}")
        if self.mode not in MASK_MODES:
            raise ValueError(f"mask mode must be one of {MASK_MODES}, got {self.mode!r}")
        context_offsets(self.context_frames, self.causal)  # raises on a bad K

    @property
    def in_channels(self) -> int:
        """Input channels of a model fed by this masker: the frames, plus the mask."""
        return self.context_frames + int(self.mask_as_input)
