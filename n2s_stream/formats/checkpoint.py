"""Checkpoints: plain dicts that load with ``torch.load(weights_only=True)``.

A checkpoint holds the weights and everything needed to use them again: the model and
masker configs, the normalisation fitted on the training data, the optimizer state, the
step count and a version number that grows each time new weights are published.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from n2s_stream.errors import CheckpointError
from n2s_stream.models import StateDict, build_model
from n2s_stream.n2s.normalize import Normalizer
from n2s_stream.n2s.specs import MaskerConfig, ModelConfig

log = logging.getLogger(__name__)

FORMAT = "n2s-stream-checkpoint/1"


@dataclass
class Checkpoint:
    """A loaded checkpoint, its parts already typed."""

    path: Path
    model_config: ModelConfig
    masker_config: MaskerConfig
    normalizer: Normalizer
    state_dict: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any] | None
    step: int
    version: int
    extra: dict[str, Any]

    def build_model(self, device: torch.device | str = "cpu") -> nn.Module:
        """The network with these weights, in eval mode on ``device``."""
        model = build_model(self.model_config)
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError as exc:
            raise CheckpointError(
                f"{self.path}: weights do not fit the saved model config"
                f" ({_describe(self.model_config)}): {str(exc).splitlines()[0]}"
            ) from exc
        return model.to(device).eval()

    def check_compatible(self, expected: ModelConfig) -> None:
        """Raise a clear error if this checkpoint was made for another architecture."""
        if expected != self.model_config:
            raise CheckpointError(
                f"{self.path}: checkpoint is for model {_describe(self.model_config)},"
                f" not the requested {_describe(expected)}"
            )


def _describe(config: ModelConfig) -> str:
    fields = config.to_dict()
    return ", ".join(f"{key}={value}" for key, value in fields.items())


def save_checkpoint(
    path: str | Path,
    *,
    model: nn.Module | StateDict,
    model_config: ModelConfig,
    masker_config: MaskerConfig,
    normalizer: Normalizer,
    optimizer: torch.optim.Optimizer | None = None,
    step: int = 0,
    version: int = 0,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically (temp file + rename): a crash never leaves half a file.
    ``model``: the network or its weights."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = model.state_dict() if isinstance(model, nn.Module) else model
    payload = {
        "format": FORMAT,
        "model": {k: v.detach().cpu() for k, v in weights.items()},
        "model_config": model_config.to_dict(),
        "masker_config": {
            "grid_size": masker_config.grid_size,
            "mode": masker_config.mode,
            "mask_as_input": masker_config.mask_as_input,
            "context_frames": masker_config.context_frames,
            "causal": masker_config.causal,
            "register": masker_config.register,
        },
        "normalizer": normalizer.to_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "step": int(step),
        "version": int(version),
        "extra": extra or {},
    }
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch reports a short write (disk full) as
        _remove_partial(tmp)  # RuntimeError: callers see one error type
        if isinstance(exc, OSError):
            raise
        raise OSError(errno.EIO, f"writing {path} failed: {exc}") from exc
    return path


def _remove_partial(tmp: Path) -> None:
    try:
        tmp.unlink(missing_ok=True)
    except OSError as exc:  # read-only file system: nothing was written there either
        log.debug("could not remove %s: %s", tmp, exc)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load and validate a checkpoint; never unpickles arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or foreign files
        raise CheckpointError(
            f"{path}: not a loadable checkpoint: {str(exc).splitlines()[0] if str(exc) else exc!r}"
        ) from exc
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an n2s-stream checkpoint (format {FORMAT} expected)")
    try:
        return Checkpoint(
            path=path,
            model_config=ModelConfig.from_dict(raw["model_config"]),
            masker_config=MaskerConfig(**raw["masker_config"]),
            normalizer=Normalizer.from_dict(raw["normalizer"]),
            state_dict=raw["model"],
            optimizer_state=raw.get("optimizer"),
            step=int(raw["step"]),
            version=int(raw["version"]),
            extra=dict(raw.get("extra") or {}),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: malformed checkpoint: {exc}") from exc
