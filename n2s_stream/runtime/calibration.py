"""What the first frame decides, once: the normaliser (unless a checkpoint brought one),
the cold-start classical denoiser's parameters and the counts per photon its noise shows
(``n2s_counts_per_photon``, from the next frames where it cannot tell; binomial training
splits photons only where one count is one). A small stage of its own, so that the
inference loop only asks for a snapshot that is ready to use."""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np

from n2s_stream.config import NetworkOptions
from n2s_stream.n2s.normalize import Normalizer, fill_invalid
from n2s_stream.n2s.photons import TRIES, counts_per_photon
from n2s_stream.runtime.coldstart import ColdStart
from n2s_stream.runtime.metrics import Metrics
from n2s_stream.runtime.snapshot import ModelStore, Snapshot

log = logging.getLogger(__name__)


class Calibration:
    """Completes a snapshot with what only the first frame can tell."""

    def __init__(
        self,
        store: ModelStore,
        network: NetworkOptions,
        cold_start: ColdStart | None,
        metrics: Metrics | None = None,
    ) -> None:
        self.store, self.network, self.cold_start = store, network, cold_start
        self.metrics = metrics
        self._photon_tries = 0

    def ready(self, snapshot: Snapshot, data: np.ndarray, valid: np.ndarray) -> Snapshot:
        """``snapshot`` with a normaliser, fitted on ``data`` (a usable ``(H, W)`` frame)
        and published if there was none; the cold-start denoiser calibrated on it too,
        its dtype noted, and its counts per photon measured while unknown."""
        if snapshot.normalizer is None:
            snapshot = replace(snapshot, normalizer=self.normalizer_for(data, valid))
        if snapshot.frames_dtype is None:
            self.store.set_frames_dtype(data.dtype.name)
            snapshot = replace(snapshot, frames_dtype=data.dtype.name)
        if snapshot.counts_per_photon is None and self._photon_tries < TRIES:
            snapshot = replace(snapshot, counts_per_photon=self._measure_photons(data, valid))
        if self.cold_start is not None and self.cold_start.classical is None:
            assert snapshot.normalizer is not None
            image = snapshot.normalizer.forward(fill_invalid(data[np.newaxis], valid[np.newaxis]))[
                0
            ]
            self.cold_start.denoiser_for(image, snapshot)
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

    def _measure_photons(self, data: np.ndarray, valid: np.ndarray) -> float | None:
        """The counts per photon of this frame, published, exported and logged; None
        while no frame could tell (the next ones are tried, up to ``TRIES``)."""
        self._photon_tries += 1
        estimate = counts_per_photon(data, valid)
        if estimate is None:
            if self._photon_tries == TRIES:
                log.info(
                    "counts per photon unknown: none of the first %d frames could tell "
                    "(too small, masked or dark)",
                    TRIES,
                )
            return None
        self.store.set_counts_per_photon(estimate)
        if self.metrics is not None:
            self.metrics.counts_per_photon.set(estimate)
        log.info(
            "counts per photon, from the noise of frame %d seen: %.2f",
            self._photon_tries,
            estimate,
        )
        return estimate
