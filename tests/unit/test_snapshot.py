"""One snapshot per batch: a frame is made by the weights whose version is written beside
it, normalised and inverted with one normaliser, while the trainer publishes at full speed."""

from __future__ import annotations

import queue
import threading
import time

import h5py
import numpy as np
import torch
from prometheus_client import CollectorRegistry

from n2s_stream.n2s.normalize import Normalizer
from n2s_stream.runtime.metrics import Metrics
from n2s_stream.runtime.snapshot import ModelStore
from n2s_stream.stages import Frame, SeriesEnd
from tests.helpers.pipeline import make_loop


class Constant(torch.nn.Module):
    """Outputs its bias everywhere: the weights' version can be read off every pixel."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x[:, :1]) + self.bias


def _weights(version: int) -> dict[str, torch.Tensor]:
    return {"bias": torch.full((1,), float(version))}


def test_frames_are_never_mixed_under_concurrent_publishes(tmp_path):
    store = ModelStore(_weights(0), 0)
    metrics = Metrics(CollectorRegistry())
    frames: queue.Queue = queue.Queue()
    out = tmp_path / "s_n2s.h5"
    n_frames = 150
    loop = make_loop(
        tmp_path / "state", frames, model=Constant(), store=store, metrics=metrics, max_batch=4
    )
    stop = threading.Event()

    def publish() -> None:  # as fast as it can, as a trainer and a follower would
        version = 0
        while not stop.is_set():
            version += 1
            store.publish(
                _weights(version), version, Normalizer("meanstd", 1e6, 1e3)
            )  # refused: one is already set
            time.sleep(0.0005)

    loop.start()
    rng = np.random.default_rng(0)
    frames.put(Frame("s", 0, rng.poisson(50, (16, 16)).astype(np.uint16), time.time(), out))
    while not metrics.registry.get_sample_value("n2s_frames_denoised_total"):
        time.sleep(0.01)  # the first frame fitted the normaliser
    publisher = threading.Thread(target=publish)
    publisher.start()
    for index in range(1, n_frames):
        frames.put(Frame("s", index, rng.poisson(50, (16, 16)).astype(np.uint16), time.time(), out))
        if index % 10 == 0:
            time.sleep(0.01)
    frames.put(SeriesEnd("s", n_frames, out))
    loop.stop()
    stop.set()
    publisher.join()
    normalizer = store.snapshot().normalizer
    assert normalizer is not None and normalizer.shift != 1e6  # fitted once, never replaced
    with h5py.File(out) as handle:
        data = handle["/entry/data/data"][()]
        versions = handle["/entry/provenance/model_version"][()]
    assert len(data) == n_frames and len(set(versions.tolist())) > 5
    assert (np.diff(versions) >= 0).all()
    # every pixel of every frame is its recorded version's output, inverted with the one
    # normaliser: nothing mixed between two snapshots
    expected = normalizer.inverse(versions.astype(np.float32))[:, None, None]
    np.testing.assert_allclose(data, np.broadcast_to(expected, data.shape), rtol=1e-6)


def test_the_first_normaliser_wins():
    store = ModelStore({}, 0)
    first, second = Normalizer("meanstd", 1.0, 2.0), Normalizer("meanstd", 5.0, 6.0)
    assert store.adopt_normalizer(first) is first
    assert store.adopt_normalizer(second) is first
    store.publish({}, 1, second)
    assert store.snapshot().normalizer is first and store.version == 1
    fresh = ModelStore({}, 0)
    fresh.publish({}, 3, second)  # a checkpoint brings the first one
    assert fresh.snapshot().normalizer is second
