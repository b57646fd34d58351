"""What the first frames decide: the counts per photon is measured on the first frame that
can tell (up to `photons.TRIES`), published with every later snapshot and exported."""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from prometheus_client import CollectorRegistry

from n2s_stream.config import NetworkOptions
from n2s_stream.n2s.photons import TRIES
from n2s_stream.runtime.calibration import Calibration
from n2s_stream.runtime.metrics import Metrics
from n2s_stream.runtime.snapshot import ModelStore


def _calibration() -> tuple[Calibration, ModelStore, Metrics]:
    store = ModelStore({"w": torch.zeros(1)}, 0)
    metrics = Metrics(CollectorRegistry())
    return Calibration(store, NetworkOptions(), None, metrics), store, metrics


def _gauge(metrics: Metrics) -> float:
    value = metrics.registry.get_sample_value("n2s_counts_per_photon")
    assert value is not None
    return value


def test_the_first_frame_that_can_tell_sets_the_counts_per_photon_for_good():
    calibration, store, metrics = _calibration()
    rng = np.random.default_rng(0)
    dark = np.zeros((64, 64), np.uint16)  # a closed shutter: no block with a mean
    counts = rng.poisson(10.0, (64, 64)).astype(np.uint16)
    valid = np.ones((64, 64), bool)
    snapshot = calibration.ready(store.snapshot(), dark, valid)
    assert snapshot.counts_per_photon is None and math.isnan(_gauge(metrics))
    assert snapshot.frames_dtype == store.snapshot().frames_dtype == "uint16"
    snapshot = calibration.ready(snapshot, counts, valid)
    measured = snapshot.counts_per_photon
    assert measured is not None and 0.85 <= measured <= 1.15
    assert _gauge(metrics) == measured
    later = calibration.ready(snapshot, 2 * counts, valid)  # not measured again
    assert later.counts_per_photon == measured
    store.publish({"w": torch.ones(1)}, 1)  # new weights keep it
    published = store.snapshot()
    assert published.counts_per_photon == measured and published.version == 1
    assert published.frames_dtype == "uint16"


def test_frames_too_small_to_tell_leave_it_unknown_after_a_few(caplog):
    calibration, store, metrics = _calibration()
    small = np.random.default_rng(1).poisson(10.0, (32, 32)).astype(np.uint16)
    valid = np.ones(small.shape, bool)
    with caplog.at_level(logging.INFO):
        for _ in range(TRIES + 3):
            snapshot = calibration.ready(store.snapshot(), small, valid)
    assert snapshot.counts_per_photon is None and math.isnan(_gauge(metrics))
    unknown = [r for r in caplog.records if "counts per photon unknown" in r.message]
    assert len(unknown) == 1 and f"first {TRIES} frames" in unknown[0].message
