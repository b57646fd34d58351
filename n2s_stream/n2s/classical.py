"""Classical denoisers for the cold start and the benchmarks: total variation and wavelet
(scikit-image), their parameters calibrated the J-invariant way on one image (as
scikit-image's ``calibrate_denoiser`` does: no ground truth), and a wrapper that puts one
behind the network's interface so the same code, masks and photon splits score both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
from skimage.restoration import calibrate_denoiser, denoise_tv_chambolle, denoise_wavelet
from torch import nn

Grids = dict[str, tuple[Callable[..., np.ndarray], dict[str, list[float]]]]
"""Denoisers by name: the function and the values of its parameters to calibrate over."""

# Parameter grids in normalised units (frames have about unit spread after normalising).
GRIDS: Grids = {
    "tv": (denoise_tv_chambolle, {"weight": list(np.geomspace(0.02, 4.0, 9))}),
    "wavelet": (
        partial(denoise_wavelet, rescale_sigma=True),
        {"sigma": list(np.geomspace(0.03, 3.0, 9))},
    ),
}
CALIBRATION_CROP = 256
"""Side of the central crop the classical denoiser is calibrated on (about 0.2 s at 256). A
96x96 crop picked a TV weight half the right one at peaks 20 and 100 in first_pass: its first
30 frames were 0.9 dB below a finely calibrated TV; at 256, 0.4 - 1.3 dB above it."""


@dataclass(frozen=True)
class ClassicalDenoiser:
    """One classical denoiser with its calibrated parameters; call it on a 2-D image."""

    name: str
    params: dict[str, float] = field(default_factory=dict)
    calibration_loss: float = float("nan")
    function: Callable[..., np.ndarray] | None = None
    """Defaults to ``GRIDS[name]``'s."""

    def __call__(self, image: np.ndarray) -> np.ndarray:
        function = self.function or GRIDS[self.name][0]
        return np.asarray(function(image.astype(np.float64), **self.params), np.float32)

    def describe(self) -> str:
        """One line for logs and provenance."""
        params = ", ".join(f"{k}={v:.3g}" for k, v in self.params.items())
        return f"{self.name} ({params})"


def calibrate_classical(image: np.ndarray, grids: Grids | None = None) -> ClassicalDenoiser:
    """The denoiser of ``grids`` (default ``GRIDS``: TV or wavelet), with parameters, that
    has the lowest J-invariant self-supervised loss on (a centre crop of) the normalised
    ``image``."""
    height, width = image.shape
    top, left = max((height - CALIBRATION_CROP) // 2, 0), max((width - CALIBRATION_CROP) // 2, 0)
    crop = image[top : top + CALIBRATION_CROP, left : left + CALIBRATION_CROP].astype(np.float64)
    best: ClassicalDenoiser | None = None
    for name, (function, grid) in (GRIDS if grids is None else grids).items():
        _, (params, losses) = calibrate_denoiser(crop, function, grid, stride=4, extra_output=True)
        k = int(np.argmin(losses))
        if best is None or losses[k] < best.calibration_loss:
            best = ClassicalDenoiser(
                name, {key: float(v) for key, v in params[k].items()}, float(losses[k]), function
            )
    assert best is not None
    return best


class ClassicalModule(nn.Module):
    """A classical denoiser behind the network's interface ``(B, C, H, W) -> (B, 1, H, W)``
    (it sees channel 0, the centre frame as the network gets it: masked, or the kept part
    of a photon split), so that its held-out loss is measured by exactly the code, masks
    and splits that measure the network's."""

    def __init__(self, denoiser: ClassicalDenoiser) -> None:
        super().__init__()
        self.denoiser = denoiser

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Denoise each sample's first channel on the host."""
        images = x[:, 0].detach().float().cpu().numpy()
        out = np.stack([self.denoiser(image) for image in images])
        return torch.from_numpy(out).unsqueeze(1).to(x.device)
