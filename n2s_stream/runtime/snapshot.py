"""The model as inference sees it: one immutable snapshot of version, weights and normaliser.

The trainer (or the checkpoint follower) publishes a new snapshot; the normaliser is
fitted once on the first frame and published too. Inference takes one snapshot per batch,
so a frame is normalised and its output inverted with the same normaliser and produced
by the weights whose version is written beside it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace

from torch import nn

from n2s_stream.models import StateDict
from n2s_stream.n2s.normalize import Normalizer


@dataclass(frozen=True)
class Snapshot:
    """Weights (never modified once published), their version and the normaliser that
    maps detector units to the network's (None until the first frame was seen); and the
    counts per photon the first frame's noise showed (``n2s/photons.py``; None until
    measured, or where it could not tell) and the dtype the frames come in (None until the
    first frame: a normaliser from a checkpoint may have been fitted on another)."""

    version: int
    weights: StateDict
    normalizer: Normalizer | None
    counts_per_photon: float | None = None
    frames_dtype: str | None = None


def copy_state(model: nn.Module) -> StateDict:
    """A detached CPU copy of a model's weights."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


class ModelStore:
    """The newest snapshot; safe across threads (a lock around one reference)."""

    def __init__(
        self, weights: StateDict, version: int, normalizer: Normalizer | None = None
    ) -> None:
        self._lock = threading.Lock()
        self._snapshot = Snapshot(version, weights, normalizer)

    def snapshot(self) -> Snapshot:
        """The current snapshot: take it once and use it for a whole batch."""
        with self._lock:
            return self._snapshot

    def publish(
        self, weights: StateDict, version: int, normalizer: Normalizer | None = None
    ) -> None:
        """Make ``weights`` (a private copy) the current weights. The normaliser is fixed
        once set (frames in context windows and the training buffer were normalised with
        it); one that comes with the weights (a checkpoint) is adopted only if none is."""
        with self._lock:
            self._snapshot = replace(
                self._snapshot,
                version=version,
                weights=weights,
                normalizer=self._snapshot.normalizer or normalizer,
            )

    def adopt_normalizer(self, normalizer: Normalizer) -> Normalizer:
        """Set the normaliser if none is set yet; returns the one in force (the first
        wins, so two threads fitting at once cannot leave frames with different ones)."""
        with self._lock:
            if self._snapshot.normalizer is None:
                self._snapshot = replace(self._snapshot, normalizer=normalizer)
            assert self._snapshot.normalizer is not None
            return self._snapshot.normalizer

    def set_counts_per_photon(self, estimate: float | None) -> None:
        """Record what the first frame's noise showed (kept through later publications)."""
        with self._lock:
            self._snapshot = replace(self._snapshot, counts_per_photon=estimate)

    def set_frames_dtype(self, dtype: str) -> None:
        """Record the dtype the frames come in (kept through later publications)."""
        with self._lock:
            self._snapshot = replace(self._snapshot, frames_dtype=dtype)

    @property
    def version(self) -> int:
        """Version of the newest weights."""
        return self.snapshot().version
