"""Online trainer: publishes versions, yields to inference, rolls back a bad step."""

from __future__ import annotations

import time

import numpy as np
import torch
from prometheus_client import CollectorRegistry

from n2s_stream.buffer import RollingBuffer
from n2s_stream.metrics import Metrics
from n2s_stream.models import ModelConfig, build_model
from n2s_stream.n2s.masking import Masker
from n2s_stream.trainer import ModelStore, OnlineTrainConfig, OnlineTrainer, copy_state


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
