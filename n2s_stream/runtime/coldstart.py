"""Cold start: a calibrated classical denoiser writes the frames until the network is better.

A network trained from scratch is worse than its noisy input for its first seconds. Until
its self-supervised loss on held-out frames beats that of a classical denoiser (total
variation or wavelet, calibrated the J-invariant way on the first frame, as scikit-image's
``calibrate_denoiser`` does), the daemon writes the classical result. Both losses are
measured on the same frames with the same masks (or, where training splits photons, the
same binomial splits, which score the single pass a network without a blind spot writes)
and need no ground truth, so the first frames of a new sample are never worse than
classical denoising. The switch to the network
happens once; each output frame's provenance says which of the two produced it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch import nn

from n2s_stream.n2s.binomial import KEEP, scoring_split
from n2s_stream.n2s.classical import ClassicalDenoiser, ClassicalModule, calibrate_classical
from n2s_stream.n2s.masking import Masker
from n2s_stream.n2s.patches import center_crop
from n2s_stream.n2s.specs import Objective
from n2s_stream.n2s.training import held_out_loss
from n2s_stream.runtime.snapshot import Snapshot

log = logging.getLogger(__name__)

NETWORK, CLASSICAL = 0, 1
"""Values of the ``denoiser`` provenance column of output files."""


@dataclass(frozen=True)
class StartingNetwork:
    """The network as it starts (the shipped pretrained model), scored on the first frame
    itself before that frame is written. Weights trained on the scan need held-out frames
    for a fair score; these never saw the scan, so the first frame is as good as a held-out
    one, and a pretrained network that beats the classical denoiser writes from frame 0.
    A network that sees several frames is scored on the first frame's context stack, once
    its neighbours have arrived (one frame alone holds no context)."""

    model: nn.Module  # a copy the trainer does not touch
    masker: Masker
    crop: int  # the central crop scored, as the trainer's held-out frames are
    objective: Objective = "noise2self"  # binomial: scored by photon splits where it can be
    keep: float = KEEP  # the share of photons a split keeps (``split_keep``)

    def loss_of(self, image: np.ndarray, snapshot: Snapshot) -> Callable[[nn.Module], float]:
        """Held-out loss of a module on the normalised ``(H, W)`` ``image``, or ``(K, H, W)``
        context stack (centre first), (`held_out_loss`:
        split as the trainer splits where the first frame's ``snapshot`` shows photon
        counts, else masked), with the trainer's masks or draws: every phase once (one
        frame is few pixels to decide on)."""
        device = next(self.model.parameters()).device
        stack = image if image.ndim == 3 else image[np.newaxis]
        crop = center_crop(stack[np.newaxis], self.crop).astype(np.float32)
        # masked_validation_loss scores copy k with phases k and k + n/2: all n once (n even)
        copies = np.repeat(crop, max(self.masker.n_phases // 2, 1), axis=0)
        frames = torch.from_numpy(copies).to(device)
        normalizer = snapshot.normalizer
        assert normalizer is not None  # fitted on this first frame
        split = scoring_split(
            self.objective,
            normalizer,
            snapshot.frames_dtype or normalizer.source_dtype,
            snapshot.counts_per_photon,
            self.keep,
        )
        return partial(held_out_loss, masker=self.masker, frames=frames, split=split)


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
        self._awaiting_context: StartingNetwork | None = None  # scored by `denoise`
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

    def denoiser_for(self, frame: np.ndarray, snapshot: Snapshot) -> ClassicalDenoiser:
        """The calibrated classical denoiser, calibrated on ``frame`` the first time (when
        a single-frame starting network is scored on ``frame`` too, and may take over at
        once; ``snapshot`` tells how it is scored; one of several frames is scored by
        `denoise` on the first whole context stack)."""
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
            if starting.masker.config.context_frames > 1:
                log.info(
                    "cold start: a starting network of %d frames is scored on the first "
                    "whole context stack, once its neighbours are there",
                    starting.masker.config.context_frames,
                )
                self._awaiting_context = starting
                return classical
            self._score(starting, frame, snapshot)
        return classical

    def _score(self, starting: StartingNetwork, image: np.ndarray, snapshot: Snapshot) -> None:
        """Score the starting network against the classical denoiser on ``image`` (a frame,
        or a context stack) and switch to it if it wins; a failure leaves the classical
        denoiser writing, said once."""
        try:
            loss_of = starting.loss_of(image, snapshot)
            self.compare(loss_of(starting.model), loss_of)
        except Exception as exc:  # e.g. out of device memory: scoring must never lose a frame
            log.warning(
                "cold start: the starting network could not be scored on the first frame "
                "(%s: %s); the classical denoiser writes",
                type(exc).__name__,
                exc,
            )

    def denoise(
        self,
        stacks: np.ndarray,
        network: Callable[[np.ndarray], np.ndarray],
        snapshot: Snapshot,
    ) -> tuple[int, np.ndarray]:
        """Which denoiser writes now (``CLASSICAL`` while active, else ``NETWORK``) and its
        ``(n, H, W)`` result for normalised ``(n, K, H, W)`` stacks (the classical one sees
        the centre frame only). A starting network of several frames is scored on the
        first stack whose neighbours all exist (not zero-filled), before it is written,
        as the current ``snapshot`` says."""
        starting = self._awaiting_context
        if starting is not None and self._active and _whole_context(stacks[0]):
            self._awaiting_context = None
            self._score(starting, stacks[0], snapshot)
        if not self._active:
            return NETWORK, network(stacks)
        assert self.classical is not None  # calibrated on the first usable frame
        return CLASSICAL, np.stack([self.classical(stack[0]) for stack in stacks])

    def compare(self, network_loss: float, loss_of: Callable[[nn.Module], float]) -> None:
        """Switch to the network, for good, once its held-out loss is below the classical
        denoiser's; ``loss_of`` scores a module on the same held-out frames and masks (or
        photon splits)."""
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


def _whole_context(stack: np.ndarray) -> bool:
    """No neighbour channel of a normalised ``(K, H, W)`` stack is zero-filled (a frame the
    series does not have: causal context's first frames, a series of one frame)."""
    return bool(np.all(np.any(stack[1:] != 0, axis=(-2, -1))))
