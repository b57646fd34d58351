"""Where training and inference run: the device named by ``--device`` and mixed
precision (float16 autocast on CUDA)."""

from __future__ import annotations

import logging
import warnings
from contextlib import AbstractContextManager, nullcontext

import torch

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
