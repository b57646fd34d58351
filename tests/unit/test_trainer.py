"""Online trainer: publishes versions, yields to inference, rolls back a bad step."""

from __future__ import annotations

import logging
import queue
import time

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from n2s_stream.config import TrainingOptions
from n2s_stream.formats.checkpoint import load_checkpoint, save_checkpoint
from n2s_stream.models import build_model, use_fast_layout
from n2s_stream.n2s import training
from n2s_stream.n2s.binomial import PhotonSplit
from n2s_stream.n2s.denoising import Network
from n2s_stream.n2s.masking import Masker
from n2s_stream.n2s.normalize import Normalizer
from n2s_stream.n2s.optim import LossWatch, make_optimizer, weight_average
from n2s_stream.n2s.patches import center_crop
from n2s_stream.n2s.specs import MaskerConfig, ModelConfig
from n2s_stream.n2s.training import masked_validation_loss, split_validation_loss, train_step
from n2s_stream.runtime.buffer import RollingBuffer
from n2s_stream.runtime.metrics import Metrics
from n2s_stream.runtime.scheduler import Scheduler, Services
from n2s_stream.runtime.snapshot import ModelStore, copy_state
from n2s_stream.runtime.trainer import OnlineTrainer, log_objective_change


class Inference:
    """Stands for the inference loop in the scheduler: busy as the test says."""

    def __init__(self, busy: bool = False) -> None:
        self.busy = busy


def _trainer(
    buffer,
    *,
    inference=None,
    publish_every=5,
    objective="noise2self",
    normalizer=None,
    split_keep=0.9,
):
    model = build_model(ModelConfig(width=4, depth=1))
    metrics = Metrics(CollectorRegistry())
    store = ModelStore(copy_state(model), 0, normalizer)
    scheduler = Scheduler(queue.Queue())
    scheduler.attach(inference=inference or Inference())
    saved = []
    trainer = OnlineTrainer(
        network=Network(model, Masker(), torch.device("cpu")),
        buffer=buffer,
        val_buffer=RollingBuffer(max_frames=2, max_bytes=2**20),
        services=Services(store, metrics, scheduler, fail=lambda exc: None),
        options=TrainingOptions(
            patch=16,
            batch=2,
            publish_every=publish_every,
            objective=objective,
            split_keep=split_keep,
        ),
        save=lambda m, o, step, version, objective: saved.append((step, version, objective)),
    )
    return trainer, store, metrics, saved


def _count_calls(monkeypatch, name: str) -> list[dict]:
    """A list that grows by the keyword arguments of each call of ``training.<name>``
    (which still runs)."""
    calls: list[dict] = []
    loss = getattr(training, name)

    def counted(*args, **kwargs):
        calls.append(kwargs)
        return loss(*args, **kwargs)

    monkeypatch.setattr(training, name, counted)
    return calls


def _wait(condition, seconds=20.0):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


@pytest.mark.parametrize("objective", ["noise2self", "neighbor2neighbor", "binomial"])
def test_publishes_versions_and_checkpoints_on_stop(objective, monkeypatch):
    # normalised photon counts (10 on average), as the daemon's buffer holds them
    counts = Normalizer("meanstd", shift=10.0, divisor=3.0, source_dtype="uint16")
    buffer = RollingBuffer(max_frames=4, max_bytes=2**20)
    for _ in range(4):
        frame = np.random.default_rng(0).poisson(10, size=(24, 24))
        buffer.add(counts.forward(frame))
    sub_image_losses = _count_calls(monkeypatch, "neighbor2neighbor_loss")
    trainer, store, metrics, saved = _trainer(buffer, objective=objective, normalizer=counts)
    trainer.start()
    assert _wait(lambda: store.version >= 2)
    trainer.stop()
    assert trainer.error is None
    assert saved and saved[-1][1] == store.version
    assert saved[-1][2] == objective  # what the checkpoint records as having trained it
    steps = metrics.registry.get_sample_value("n2s_train_steps_total")
    assert steps >= 10
    assert len(sub_image_losses) == (steps if objective == "neighbor2neighbor" else 0)


@pytest.mark.parametrize(
    ("source_dtype", "frames_dtype", "counts_per_photon", "splits"),
    [
        ("uint16", "uint16", 1.02, True),  # photon counts: split photon by photon
        ("uint16", None, None, True),  # no frame could tell yet: taken as counts
        ("uint16", "uint16", 2.1, False),  # two counts a photon: not photons
        ("float32", None, 1.0, False),  # floats cannot be split
        ("uint16", "float32", 1.0, False),  # live floats, a normaliser fitted on counts
        ("float32", "uint16", 1.0, True),  # live counts, a normaliser fitted on floats
    ],
)
def test_binomial_training_falls_back_to_sub_images_on_frames_that_are_not_photon_counts(
    source_dtype, frames_dtype, counts_per_photon, splits, monkeypatch, caplog
):
    """Frames that are not photon counts cannot be split photon by photon: the trainer
    says why once and trains by neighbor2neighbor (the same network without a blind spot)
    rather than learn from a wrong split."""
    normalizer = Normalizer("meanstd", shift=10.0, divisor=3.0, source_dtype=source_dtype)
    buffer = RollingBuffer(max_frames=4, max_bytes=2**20)
    for _ in range(4):
        buffer.add(normalizer.forward(np.random.default_rng(0).poisson(10, size=(24, 24))))
    split = _count_calls(monkeypatch, "binomial_split_loss")
    sub_image = _count_calls(monkeypatch, "neighbor2neighbor_loss")
    trainer, store, _, saved = _trainer(
        buffer, objective="binomial", normalizer=normalizer, split_keep=0.6
    )
    store.set_counts_per_photon(counts_per_photon)
    if frames_dtype is not None:  # as the calibration of the first frame notes it
        store.set_frames_dtype(frames_dtype)
    trainer.start()
    assert _wait(lambda: store.version >= 2)
    trainer.stop()
    assert trainer.error is None
    assert len(split if splits else sub_image) == len(split) + len(sub_image) > 0
    assert all(call["keep"] == 0.6 for call in split)  # the split_keep option
    assert saved[-1][2] == ("binomial" if splits else "neighbor2neighbor")  # what trained it
    fallbacks = [r.message for r in caplog.records if "uses neighbor2neighbor" in r.message]
    assert len(fallbacks) == (0 if splits else 1)
    if "float32" in (source_dtype, frames_dtype) and not splits:
        assert "the frames are float32" in fallbacks[0]
    elif not splits:
        assert "shows 2.10 counts per photon" in fallbacks[0]


def test_binomial_training_decides_once_the_counts_per_photon_is_known(monkeypatch, caplog):
    """Until a frame could tell, frames are taken as counts; once the estimate says they
    are not photons, training falls back for good."""
    normalizer = Normalizer("meanstd", shift=10.0, divisor=3.0, source_dtype="uint16")
    buffer = RollingBuffer(max_frames=4, max_bytes=2**20)
    for _ in range(4):
        buffer.add(normalizer.forward(np.random.default_rng(0).poisson(10, size=(24, 24))))
    split = _count_calls(monkeypatch, "binomial_split_loss")
    sub_image = _count_calls(monkeypatch, "neighbor2neighbor_loss")
    trainer, store, _, _ = _trainer(buffer, objective="binomial", normalizer=normalizer)
    trainer.start()
    assert _wait(lambda: len(split) >= 3)
    store.set_counts_per_photon(3.0)
    assert _wait(lambda: len(sub_image) >= 3)
    store.set_counts_per_photon(1.0)  # decided: a later estimate changes nothing
    before = len(split)
    assert _wait(lambda: len(sub_image) >= 10)
    trainer.stop()
    assert len(split) <= before + 1  # at most the step under way
    assert sum("uses neighbor2neighbor" in r.message for r in caplog.records) == 1


@pytest.mark.parametrize(
    ("trained_by", "configured", "warned"),
    [
        ("noise2self", "binomial", True),  # a state dir begun under the older default
        ("binomial", "binomial", False),
        ("neighbor2neighbor", "binomial", False),  # binomial's own fallback: no news
        ("neighbor2neighbor", "noise2self", True),
        (None, "binomial", False),  # a checkpoint from before objectives were recorded
    ],
)
def test_resumed_weights_of_another_objective_are_named_in_the_log(
    trained_by, configured, warned, tmp_path, caplog
):
    config = ModelConfig(width=4, depth=1)
    path = save_checkpoint(
        tmp_path / "ckpt_v00000003.pt",
        model=build_model(config),
        model_config=config,
        masker_config=MaskerConfig(),
        normalizer=Normalizer(),
        version=3,
        extra={} if trained_by is None else {"objective": trained_by},
    )
    resume = load_checkpoint(path)
    assert resume.extra.get("objective") == trained_by
    with caplog.at_level(logging.WARNING, logger="n2s_stream.runtime.trainer"):
        log_objective_change(resume, configured)
    said = [r.message for r in caplog.records]
    expected = (
        f"{path} was trained by objective {trained_by}; training goes on by the configured "
        f"{configured}"
    )
    assert said == ([expected] if warned else [])


def test_yields_while_inference_is_busy_and_trains_once_it_is_not():
    buffer = RollingBuffer(max_frames=4, max_bytes=2**20)
    buffer.add(np.zeros((24, 24), np.float32))
    buffer.add(np.zeros((24, 24), np.float32))
    asked = []

    class Watched:
        working = True

        @property
        def busy(self) -> bool:
            asked.append(1)
            return self.working

    inference = Watched()
    trainer, _, metrics, _ = _trainer(buffer, inference=inference)
    steps = lambda: metrics.registry.get_sample_value("n2s_train_steps_total") or 0  # noqa: E731
    trainer.start()
    assert _wait(lambda: len(asked) >= 5)  # the trainer runs and keeps asking
    assert steps() == 0  # and takes no step while inference is busy
    inference.working = False
    assert _wait(lambda: steps() >= 3)  # it trains as soon as inference is idle
    trainer.stop()


def test_non_finite_loss_rolls_back_to_the_last_good_weights():
    buffer = RollingBuffer(max_frames=4, max_bytes=2**20)
    buffer.add(np.full((24, 24), 1e30, np.float32))  # squares overflow float32: loss inf
    buffer.add(np.full((24, 24), 1e30, np.float32))
    trainer, store, metrics, _ = _trainer(buffer)
    good = {k: v.clone() for k, v in store.snapshot().weights.items()}
    trainer.start()
    assert _wait(lambda: (metrics.registry.get_sample_value("n2s_train_rollbacks_total") or 0) >= 3)
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
    trainer.val_crop = 32
    trainer._step()
    trainer._publish(1.0)
    assert store.version == 1
    val = metrics.selfsup_val_loss._value.get()
    expected = masked_validation_loss(
        trainer.model,
        trainer.masker,
        torch.from_numpy(np.ascontiguousarray(center_crop(trainer.val_buffer.snapshot(), 32))),
    )
    assert val == pytest.approx(expected)


@pytest.mark.parametrize("counts_per_photon", [1.0, 2.5])
def test_binomial_training_scores_held_out_frames_by_photon_splits_of_photon_counts(
    counts_per_photon,
):
    """Under binomial training on photon counts, n2s_selfsup_val_loss is the split loss of
    the single pass, on fixed draws (the same number whatever the global random state);
    once training has fallen back to neighbor2neighbor it is masked again."""
    counts = Normalizer("meanstd", shift=20.0, divisor=4.5, source_dtype="uint16")
    rng = np.random.default_rng(0)
    buffer = RollingBuffer(max_frames=4, max_bytes=2**22)
    for _ in range(4):
        buffer.add(counts.forward(rng.poisson(20, size=(1, 48, 48))))
    trainer, store, metrics, _ = _trainer(buffer, objective="binomial", normalizer=counts)
    store.set_counts_per_photon(counts_per_photon)
    trainer.val_buffer.add(counts.forward(rng.poisson(20, size=(1, 48, 48))))
    trainer._step()
    torch.manual_seed(123)  # the draws are the scorer's own
    trainer._publish(1.0)
    frames = torch.from_numpy(trainer.val_buffer.snapshot())
    if counts_per_photon == 1.0:
        split = PhotonSplit(20.0, 4.5, 0.9)
        expected = split_validation_loss(trainer.published_model, trainer.masker, frames, split)
    else:
        expected = masked_validation_loss(trainer.published_model, trainer.masker, frames)
    assert metrics.selfsup_val_loss._value.get() == pytest.approx(expected)


def test_training_layout_and_fused_adam_give_the_plain_steps():
    """channels_last weights and the fused Adam (both faster on CPU) take the same steps
    as a contiguous model with plain Adam, and each resumes the other's optimizer state."""
    torch.manual_seed(0)
    config = ModelConfig(width=4, depth=1)
    plain, fast = build_model(config), build_model(config)
    fast.load_state_dict(plain.state_dict())
    use_fast_layout(fast, torch.device("cpu"))
    assert fast.head.weight.is_contiguous(memory_format=torch.channels_last)
    optimizers = (torch.optim.Adam(plain.parameters(), lr=1e-2), make_optimizer(fast, 1e-2))
    masker = Masker()
    batch = torch.rand(4, 1, 16, 16)
    for _ in range(3):
        losses = [
            float(train_step(model, optimizer, masker, batch, rng=np.random.default_rng(0)))
            for model, optimizer in zip((plain, fast), optimizers, strict=True)
        ]
        assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    for name, weight in plain.state_dict().items():
        torch.testing.assert_close(fast.state_dict()[name], weight, rtol=1e-4, atol=1e-5)
    resumed = make_optimizer(plain, 1e-2)
    resumed.load_state_dict(optimizers[0].state_dict())  # plain Adam's state into fused
    train_step(plain, resumed, masker, batch, rng=np.random.default_rng(0))


def test_weight_average_is_a_mean_first_then_a_moving_average():
    model = torch.nn.Linear(1, 1, bias=False)
    averaged = weight_average(model, steps=4)
    seen = []
    for value in [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]:
        with torch.no_grad():
            model.weight.fill_(value)
        averaged.update_parameters(model)
        seen.append(averaged.module.weight.item())
    # a plain mean while n < steps (1, 1.5, 2, 2.5), then each step weighs 1/4
    assert seen[:4] == pytest.approx([1.0, 1.5, 2.0, 2.5])
    assert seen[4] == pytest.approx(2.5 + (5.0 - 2.5) / 4)
    assert seen[5] == pytest.approx(seen[4] + (6.0 - seen[4]) / 4)


def test_published_and_saved_weights_are_the_average_not_the_last_step():
    buffer = RollingBuffer(max_frames=4, max_bytes=2**20)
    for seed in range(4):
        buffer.add(np.random.default_rng(seed).normal(size=(24, 24)).astype(np.float32))
    trainer, store, _, _ = _trainer(buffer)
    at_publication, saved = [], []
    publish = store.publish

    def watched_publish(weights, version, normalizer=None):
        at_publication.append(
            (weights, copy_state(trainer.published_model), copy_state(trainer.model))
        )
        publish(weights, version, normalizer)

    store.publish = watched_publish
    trainer._save = lambda weights, o, step, version, objective: saved.append(
        (dict(weights), version)
    )
    trainer.start()
    assert _wait(lambda: store.version >= 3)
    trainer.stop()
    assert trainer.published_model is not trainer.model
    for published, averaged, trained in at_publication:
        assert all(torch.equal(published[k], averaged[k]) for k in averaged)
        assert not all(torch.equal(published[k], trained[k]) for k in trained)
    final = store.snapshot()  # checkpoints hold the weights of the version they name
    assert saved[-1][1] == final.version
    assert all(torch.equal(saved[-1][0][k], final.weights[k]) for k in final.weights)
    for _ in range(2):  # the average moves on after a publication; a checkpoint does not
        trainer._step()
    trainer._save_published()
    moved_on = copy_state(trainer.published_model)
    assert saved[-1][1] == final.version
    assert all(torch.equal(saved[-1][0][k], final.weights[k]) for k in final.weights)
    assert not all(torch.equal(saved[-1][0][k], moved_on[k]) for k in moved_on)


def test_a_rollback_also_takes_a_bad_update_out_of_the_average():
    buffer = RollingBuffer(max_frames=4, max_bytes=2**20)
    for seed in range(4):
        buffer.add(np.random.default_rng(seed).normal(size=(24, 24)).astype(np.float32))
    trainer, store, metrics, _ = _trainer(buffer)
    for _ in range(3):
        trainer._step()
    trainer._publish(1.0)
    good = copy_state(trainer.published_model)
    with torch.no_grad():  # an update that broke the weights, already averaged in
        next(trainer.model.parameters()).fill_(float("nan"))
    trainer._average.update_parameters(trainer.model)
    assert trainer._step() is None  # its loss is NaN: rolled back
    restored = copy_state(trainer.published_model)
    assert all(torch.equal(restored[k], good[k]) for k in good)
    with torch.no_grad():  # a publication never hands out non-finite weights
        next(trainer.published_model.parameters()).fill_(float("nan"))
    trainer._publish(1.0)
    assert store.version == 1
    assert metrics.registry.get_sample_value("n2s_train_rollbacks_total") == 2
    assert all(torch.isfinite(v).all() for v in trainer.published_model.state_dict().values())


def test_nothing_is_checkpointed_before_the_first_publication():
    """A stop before any version was published saves no checkpoint: the starting weights
    (random, or the shipped ones) would otherwise make the restart skip the cold start."""
    buffer = RollingBuffer(max_frames=4, max_bytes=2**20)  # empty: no step, no version
    trainer, store, _, saved = _trainer(buffer)
    trainer.start()
    trainer.stop()
    assert store.version == 0 and saved == []


def test_loss_watch_flags_non_finite_and_exploding_losses_without_learning_them():
    watch = LossWatch()
    assert not watch.diverging(1.0) and watch.recent == 1.0
    assert not watch.diverging(2.0) and watch.recent == pytest.approx(1.02)
    assert watch.diverging(float("nan")) and watch.diverging(float("inf"))
    assert watch.diverging(20.5) and not watch.diverging(20.3)  # 20x the recent level
    assert watch.describe(30.0) == f"loss 30 (recent {watch.recent:.4g})"
    assert LossWatch().describe(5.0) == "loss 5"


def test_split_scores_run_a_network_with_a_mask_channel_as_it_writes():
    """A state dir begun by noise2self with ``mask_as_input`` and resumed under binomial
    training: the held-out split score runs the network as inference does (a zero mask
    channel beside the frame), rather than failing on the channel count."""
    masker = Masker(MaskerConfig(mask_as_input=True))
    model = build_model(ModelConfig(width=4, depth=1, in_channels=masker.config.in_channels))
    frames = torch.from_numpy(np.random.default_rng(0).poisson(20.0, (2, 1, 32, 32)) - 20.0) / 4.5
    loss = split_validation_loss(model, masker, frames.float(), PhotonSplit(20.0, 4.5, 0.9))
    assert np.isfinite(loss) and loss > 0
