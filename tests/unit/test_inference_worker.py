"""The inference/writer worker on its own: batches, order, duplicates, gaps, rejects."""

from __future__ import annotations

import queue
import time

import h5py
import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from n2s_stream.config import InferenceOptions
from n2s_stream.models import build_model
from n2s_stream.n2s.normalize import Normalizer
from n2s_stream.n2s.specs import ModelConfig
from n2s_stream.runtime.inference import InferenceLoop
from n2s_stream.runtime.metrics import Metrics
from n2s_stream.runtime.snapshot import ModelStore, copy_state
from n2s_stream.stages import Frame, SeriesEnd
from tests.helpers.pipeline import make_loop


@pytest.mark.parametrize(
    "normalizer",
    [None, Normalizer("meanstd", 10.0, 3.0, 1.0, "uint16")],
    ids=["calibrated_by_the_first_frame", "prepared_in_the_pool"],
)
def test_queued_frames_are_batched_in_order_once(tmp_path, normalizer):
    # with a normaliser already known, every frame is prepared in the pool ahead of its
    # batch (the NaN frame refused there); without one, the first batch is prepared inline
    model = build_model(ModelConfig(width=4, depth=1))
    frames: queue.Queue = queue.Queue()
    metrics = Metrics(CollectorRegistry())
    out = tmp_path / "s_n2s.h5"
    rng = np.random.default_rng(0)

    def frame(index, data=None):
        data = rng.poisson(10, (16, 16)).astype(np.uint16) if data is None else data
        return Frame("s", index, data, time.time(), out)

    nan_frame = Frame("s", 5, np.full((16, 16), np.nan, np.float32), time.time(), out)
    for item in [
        frame(0),
        frame(1),
        frame(1),
        frame(2),
        frame(4),
        nan_frame,
        frame(6),
        SeriesEnd("s", 7, out),
    ]:
        frames.put(item)
    worker = make_loop(
        tmp_path / "state",
        frames,
        model=build_model(ModelConfig(width=4, depth=1)),
        store=ModelStore(copy_state(model), 3, normalizer),
        metrics=metrics,
        max_batch=4,
    )
    worker.start()
    worker.stop()
    with h5py.File(out, "r") as handle:
        assert handle["/entry/provenance/source_frame"][()].tolist() == [0, 1, 2, 4, 6]
        assert (handle["/entry/provenance/model_version"][()] == 3).all()
    value = metrics.registry.get_sample_value
    assert value("n2s_frames_denoised_total") == 5
    assert value("n2s_frames_missing_total") == 1  # 3; 5 was rejected, not missing
    assert value("n2s_frames_rejected_total", {"reason": "nan"}) == 1


class _RecordsBusy(torch.nn.Module):
    """A one-layer network that notes, on each forward pass, whether the worker said busy."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)
        self.worker: InferenceLoop | None = None
        self.seen_busy: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.worker is not None
        self.seen_busy.append(self.worker.busy)
        return self.conv(x)


def test_worker_is_busy_while_denoising_so_training_waits(tmp_path):
    model = _RecordsBusy()
    frames: queue.Queue = queue.Queue()
    metrics = Metrics(CollectorRegistry())
    out = tmp_path / "s_n2s.h5"
    worker = make_loop(
        tmp_path / "state",
        frames,
        model=model,
        store=ModelStore(copy_state(model), 0),
        metrics=metrics,
    )
    model.worker = worker
    assert not worker.busy
    worker.start()
    for index in range(3):
        frames.put(Frame("s", index, np.full((16, 16), 7 + index, np.uint16), time.time(), out))
    deadline = time.monotonic() + 20
    while metrics.registry.get_sample_value("n2s_frames_denoised_total") < 3 or worker.busy:
        assert time.monotonic() < deadline, "the worker never went idle"
        time.sleep(0.01)
    worker.stop()
    assert model.seen_busy == [True, True, True]
    assert metrics.registry.get_sample_value("n2s_forward_seconds_count") == 3
    assert metrics.registry.get_sample_value("n2s_forward_seconds_sum") > 0


@pytest.mark.parametrize("reload_seconds", [3600.0, 0.0])
def test_onnxruntime_swaps_new_weights_in_without_mislabelling_a_frame(tmp_path, reload_seconds):
    """New weights are exported in the background and taken at most every
    ``onnx_reload_seconds``; each frame's recorded version is the one that made it (the
    same input gives one output per version)."""
    pytest.importorskip("onnxruntime", reason="optional extra [onnx] not installed")
    model = build_model(ModelConfig(width=4, depth=1))
    store = ModelStore(copy_state(model), 0)
    frames: queue.Queue = queue.Queue()
    metrics = Metrics(CollectorRegistry())
    out = tmp_path / "s_n2s.h5"
    worker = make_loop(
        tmp_path / "state",
        frames,
        model=build_model(ModelConfig(width=4, depth=1)),
        store=store,
        metrics=metrics,
        options=InferenceOptions(engine="onnxruntime", onnx_reload_seconds=reload_seconds),
    )
    data = np.random.default_rng(0).poisson(10, (16, 16)).astype(np.uint16)
    denoised = lambda: metrics.registry.get_sample_value("n2s_frames_denoised_total")  # noqa: E731
    worker.start()
    deadline = time.monotonic() + 30
    for index in range(40):
        if index == 1:
            store.publish({k: v * 2 for k, v in copy_state(model).items()}, 1)
        frames.put(Frame("s", index, data, time.time(), out))
        while denoised() < index + 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        if worker.version == 1 and index >= 5:
            break
    worker.stop()
    with h5py.File(out, "r") as handle:
        versions = handle["/entry/provenance/model_version"][()]
        outputs = handle["/entry/data/data"][()]
    assert (np.diff(versions) >= 0).all() and versions[0] == 0
    assert set(versions.tolist()) == ({0} if reload_seconds else {0, 1})
    for version in set(versions.tolist()):
        made = outputs[versions == version]
        np.testing.assert_allclose(made, made[:1].repeat(len(made), 0), atol=1e-4)
    if not reload_seconds:
        assert not np.allclose(outputs[versions == 0][0], outputs[versions == 1][0], atol=1e-3)


def test_an_idle_series_resumes_without_counting_anything_twice(tmp_path):
    """Closed for idleness, a series' output reopens when frames come again; frames are
    written once and nothing is counted missing (its frame numbers were kept)."""
    model = build_model(ModelConfig(width=4, depth=1))
    frames: queue.Queue = queue.Queue()
    metrics = Metrics(CollectorRegistry())
    out = tmp_path / "s_n2s.h5"
    loop = make_loop(
        tmp_path / "state",
        frames,
        model=model,
        metrics=metrics,
        store=ModelStore(copy_state(model), 0),
        options=InferenceOptions(series_idle_close=0.5),
    )

    def frame(index):
        return Frame("s", index, np.full((16, 16), 5 + index, np.uint16), time.time(), out)

    loop.start()
    for index in range(4):
        frames.put(frame(index))
    frames.put(frame(2))  # sent twice: skipped, not counted
    deadline = time.monotonic() + 20
    while not h5py.is_hdf5(out) or metrics.frames_denoised._value.get() < 4:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(1.5)  # idle: the output is closed
    with h5py.File(out) as handle:  # closed: any reader opens it
        assert handle["/entry/provenance/source_frame"][()].tolist() == [0, 1, 2, 3]
    for index in range(4, 8):
        frames.put(frame(index))
    frames.put(SeriesEnd("s", 8, out, sender_count=True))
    loop.stop()
    with h5py.File(out) as handle:
        assert handle["/entry/provenance/source_frame"][()].tolist() == list(range(8))
    value = metrics.registry.get_sample_value
    assert value("n2s_frames_missing_total") == 0
    assert value("n2s_frames_denoised_total") == 8
    # one idle close, then the end the source sent
    assert value("n2s_series_ended_total", {"complete": "false"}) == 1
    assert value("n2s_series_ended_total", {"complete": "true"}) == 1


def test_an_output_that_cannot_be_resumed_refuses_its_series_only(tmp_path):
    model = build_model(ModelConfig(width=4, depth=1))
    frames: queue.Queue = queue.Queue()
    metrics = Metrics(CollectorRegistry())
    broken, good = tmp_path / "a_n2s.h5", tmp_path / "b_n2s.h5"
    broken.write_bytes(b"not an HDF5 file at all" * 100)
    for index in range(3):
        for series, out in (("a", broken), ("b", good)):
            frames.put(Frame(series, index, np.full((16, 16), 9, np.uint16), time.time(), out))
    loop = make_loop(
        tmp_path / "state",
        frames,
        model=model,
        metrics=metrics,
        store=ModelStore(copy_state(model), 0),
    )
    loop.start()
    loop.stop()
    value = metrics.registry.get_sample_value
    assert value("n2s_frames_rejected_total", {"reason": "output_unreadable"}) == 3
    assert value("n2s_frames_denoised_total") == 3
    with h5py.File(good) as handle:
        assert handle["/entry/provenance/source_frame"][()].tolist() == [0, 1, 2]
    assert broken.read_bytes().startswith(b"not an HDF5")  # left for the operator
