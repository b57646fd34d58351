"""Cold start: a calibrated classical denoiser writes the frames until the network is better.

A network trained from scratch is worse than its noisy input for its first seconds. Until
its self-supervised loss on held-out frames beats that of a classical denoiser (total
variation or wavelet, calibrated the J-invariant way on the first frame, as scikit-image's
``calibrate_denoiser`` does), the daemon writes the classical result. Both losses are
measured on the same frames with the same masks and need no ground truth, so the first
frames of a new sample are never worse than classical denoising. The switch to the network
happens once; each output frame's provenance says which of the two produced it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
from skimage.restoration import calibrate_denoiser, denoise_tv_chambolle, denoise_wavelet
from torch import nn

from n2s_stream.n2s.masking import Masker
from n2s_stream.n2s.patches import center_crop
from n2s_stream.n2s.training import masked_validation_loss

log = logging.getLogger(__name__)

NETWORK, CLASSICAL = 0, 1
"""Values of the ``denoiser`` provenance column of output files."""

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
    (it sees channel 0, the masked centre frame), so that its held-out loss is measured by
    exactly the code and masks that measure the network's."""

    def __init__(self, denoiser: ClassicalDenoiser) -> None:
        super().__init__()
        self.denoiser = denoiser

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Denoise each sample's first channel on the host."""
        images = x[:, 0].detach().float().cpu().numpy()
        out = np.stack([self.denoiser(image) for image in images])
        return torch.from_numpy(out).unsqueeze(1).to(x.device)


@dataclass(frozen=True)
class StartingNetwork:
    """The network as it starts (the shipped pretrained model), scored on the first frame
    itself before that frame is written. Weights trained on the scan need held-out frames
    for a fair score; these never saw the scan, so the first frame is as good as a held-out
    one, and a pretrained network that beats the classical denoiser writes from frame 0."""

    model: nn.Module  # a copy the trainer does not touch; single-frame input
    masker: Masker
    crop: int  # the central crop scored, as the trainer's held-out frames are

    def loss_of(self, image: np.ndarray) -> Callable[[nn.Module], float]:
        """Masked loss of a module on the normalised ``(H, W)`` ``image``, with the
        trainer's masks: every phase once (one frame is few pixels to decide on)."""
        device = next(self.model.parameters()).device
        crop = center_crop(image[np.newaxis, np.newaxis], self.crop).astype(np.float32)
        # masked_validation_loss scores copy k with phases k and k + n/2: all n once (n even)
        copies = np.repeat(crop, max(self.masker.n_phases // 2, 1), axis=0)
        frames = torch.from_numpy(copies).to(device)
        return partial(masked_validation_loss, masker=self.masker, frames=frames, batch=1)


class ColdStart:
    """Which denoiser writes frames now; shared by the inference thread (asks, calibrates
    on the first frame) and the trainer (compares losses at each model publication)."""

    def __init__(
        self,
        *,
        active: bool,
        on_change: Callable[[bool, float, float], None],
        starting: StartingNetwork | None = None,
    ) -> None:
        self._active = active
        self._on_change = on_change  # (active, classical loss, network loss) -> metrics
        self._lock = threading.Lock()
        self._starting = starting
        self.classical: ClassicalDenoiser | None = None
        on_change(active, float("nan"), float("nan"))

    @property
    def active(self) -> bool:
        """True while the classical denoiser writes frames."""
        return self._active

    @property
    def has_starting_network(self) -> bool:
        """A starting network (the shipped pretrained one) is there to be scored."""
        return self._starting is not None

    def denoiser_for(self, frame: np.ndarray) -> ClassicalDenoiser:
        """The calibrated classical denoiser, calibrated on ``frame`` the first time (when
        the starting network is scored on ``frame`` too, and may take over at once)."""
        with self._lock:
            classical = self.classical
            if classical is None:
                classical = self.classical = calibrate_classical(frame)
                log.info(
                    "cold start: %s writes frames until the network's held-out loss beats its %.4g",
                    classical.describe(),
                    classical.calibration_loss,
                )
        if self._starting is not None and self._active:
            starting, self._starting = self._starting, None
            try:
                loss_of = starting.loss_of(frame)
                self.compare(loss_of(starting.model), loss_of)
            except (RuntimeError, ValueError) as exc:  # e.g. out of device memory
                log.warning(
                    "cold start: the starting network could not be scored on the "
                    "first frame (%s); the classical denoiser writes",
                    exc,
                )
        return classical

    def denoise(
        self, stacks: np.ndarray, network: Callable[[np.ndarray], np.ndarray]
    ) -> tuple[int, np.ndarray]:
        """Which denoiser writes now (``CLASSICAL`` while active, else ``NETWORK``) and its
        ``(n, H, W)`` result for normalised ``(n, K, H, W)`` stacks (the classical one sees
        the centre frame only)."""
        if not self._active:
            return NETWORK, network(stacks)
        assert self.classical is not None  # calibrated on the first usable frame
        return CLASSICAL, np.stack([self.classical(stack[0]) for stack in stacks])

    def compare(self, network_loss: float, loss_of: Callable[[nn.Module], float]) -> None:
        """Switch to the network, for good, once its held-out loss is below the classical
        denoiser's; ``loss_of`` scores a module on the same held-out frames and masks."""
        with self._lock:
            classical = self.classical
        if not self._active or classical is None:
            return
        classical_loss = loss_of(ClassicalModule(classical))
        if network_loss < classical_loss:
            self._active = False
            log.info(
                "cold start over: network held-out loss %.4g < %.4g of %s; the network "
                "writes from now on",
                network_loss,
                classical_loss,
                classical.describe(),
            )
        self._on_change(self._active, classical_loss, network_loss)
