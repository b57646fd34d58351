"""Online trainer: publishes versions, yields to inference, rolls back a bad step."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from n2s_stream.buffer import RollingBuffer
from n2s_stream.metrics import Metrics
from n2s_stream.models import ModelConfig, build_model
from n2s_stream.n2s.masking import Masker
from n2s_stream.trainer import ModelStore, OnlineTrainConfig, OnlineTrainer, copy_state
from n2s_stream.training import center_crop, masked_validation_loss


def _trainer(buffer, *, busy=lambda: False, publish_every=5):
    model = build_model(ModelConfig(width=4, depth=1))
    metrics = Metrics(CollectorRegistry())
    store = ModelStore(copy_state(model), 0)
    saved = []
    trainer = OnlineTrainer(
        model=model, masker=Masker(), buffer=buffer, val_buffer=RollingBuffer(
            max_frames=2, max_bytes=2**20), store=store, metrics=metrics,
        config=OnlineTrainConfig(patch=16, batch=2, publish_every=publish_every),
        device=torch.device("cpu"), busy=busy,
        save=lambda m, o, step, version: saved.append((step, version)))
    return trainer, store, metrics, saved


def _wait(condition, seconds=20.0):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


def test_publishes_versions_and_checkpoints_on_stop():
    buffer = RollingBuffer(max_frames=4, max_bytes=2**20)
    for _ in range(4):
        buffer.add(np.random.default_rng(0).normal(size=(24, 24)).astype(np.float32))
    trainer, store, metrics, saved = _trainer(buffer)
    trainer.start()
    assert _wait(lambda: store.version >= 2)
    trainer.stop()
    assert saved and saved[-1][1] == store.version
    assert metrics.registry.get_sample_value("n2s_train_steps_total") >= 10


def test_yields_while_inference_is_busy():
    buffer = RollingBuffer(max_frames=4, max_bytes=2**20)
    buffer.add(np.zeros((24, 24), np.float32))
    buffer.add(np.zeros((24, 24), np.float32))
    trainer, _, metrics, _ = _trainer(buffer, busy=lambda: True)
    trainer.start()
    time.sleep(0.5)
    trainer.stop()
    assert metrics.registry.get_sample_value("n2s_train_steps_total") == 0


def test_non_finite_loss_rolls_back_to_the_last_good_weights():
    buffer = RollingBuffer(max_frames=4, max_bytes=2**20)
    buffer.add(np.full((24, 24), 1e30, np.float32))  # squares overflow float32: loss inf
    buffer.add(np.full((24, 24), 1e30, np.float32))
    trainer, store, metrics, _ = _trainer(buffer)
    good = {k: v.clone() for k, v in store.latest()[1].items()}
    trainer.start()
    assert _wait(lambda: (metrics.registry.get_sample_value("n2s_train_rollbacks_total") or 0)
                 >= 3)
    trainer.stop()
    assert store.version == 0  # nothing bad was published
    for name, value in trainer.model.state_dict().items():
        assert torch.isfinite(value).all() and torch.equal(value, good[name])


def test_held_out_frames_are_scored_on_their_central_crop():
    frames = np.arange(2 * 3 * 10 * 12, dtype=np.float32).reshape(2, 3, 10, 12)
    crop = center_crop(frames, 4)
    assert crop.shape == (2, 3, 4, 4)
    np.testing.assert_array_equal(crop, frames[..., 3:7, 4:8])
    assert center_crop(frames, 16).shape == frames.shape  # shorter sides kept whole
    assert center_crop(frames, 0) is frames
    buffer = RollingBuffer(max_frames=4, max_bytes=2**22)
    for _ in range(4):
        buffer.add(np.random.default_rng(0).normal(size=(1, 96, 96)).astype(np.float32))
    trainer, store, metrics, _ = _trainer(buffer, publish_every=2)
    trainer.val_buffer.add(np.random.default_rng(1).normal(size=(1, 96, 96)).astype(np.float32))
    trainer.config = OnlineTrainConfig(patch=16, batch=2, publish_every=2, val_crop=32)
    trainer._step()
    trainer._publish(1.0)
    assert store.version == 1
    val = metrics.selfsup_val_loss._value.get()
    expected = masked_validation_loss(
        trainer.model, trainer.masker,
        torch.from_numpy(np.ascontiguousarray(center_crop(trainer.val_buffer.snapshot(), 32))))
    assert val == pytest.approx(expected)
