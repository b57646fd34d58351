"""What the first frame decides, once: the normaliser (unless a checkpoint brought one)
and the cold-start classical denoiser's parameters. A small stage of its own, so that the
inference loop only asks for a snapshot that is ready to use."""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np

from n2s_stream.config import NetworkOptions
from n2s_stream.n2s.normalize import Normalizer, fill_invalid
from n2s_stream.runtime.coldstart import ColdStart
from n2s_stream.runtime.snapshot import ModelStore, Snapshot

log = logging.getLogger(__name__)


class Calibration:
    """Completes a snapshot with what only the first frame can tell."""

    def __init__(
        self, store: ModelStore, network: NetworkOptions, cold_start: ColdStart | None
    ) -> None:
        self.store, self.network, self.cold_start = store, network, cold_start

    def ready(self, snapshot: Snapshot, data: np.ndarray, valid: np.ndarray) -> Snapshot:
        """``snapshot`` with a normaliser, fitted on ``data`` (a usable ``(H, W)`` frame)
        and published if there was none; the cold-start denoiser calibrated on it too."""
        if snapshot.normalizer is None:
            snapshot = replace(snapshot, normalizer=self.normalizer_for(data, valid))
        if self.cold_start is not None and self.cold_start.classical is None:
            assert snapshot.normalizer is not None
            image = snapshot.normalizer.forward(fill_invalid(data[np.newaxis], valid[np.newaxis]))[
                0
            ]
            self.cold_start.denoiser_for(image)
        return snapshot

    def normalizer_for(self, data: np.ndarray, valid: np.ndarray) -> Normalizer:
        """The daemon's normaliser: fitted on ``data`` and published unless one is set
        (the first wins); the inference loop's first frame, or the refiner's after a
        restart without a checkpoint."""
        fitted = self.network.fit_normalizer(
            data[np.newaxis], source_dtype=data.dtype, valid=valid[np.newaxis]
        )
        normalizer = self.store.adopt_normalizer(fitted)
        if normalizer is fitted:
            log.info("normalisation fitted on the first frame: %s", fitted.describe())
        return normalizer
