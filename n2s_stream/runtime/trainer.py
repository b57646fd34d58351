"""Online training: keeps improving the model on the rolling buffer, in the background.

The trainer owns its model and optimizer. Every ``publish_every`` steps it scores the
model on held-out frames (masked loss, or photon splits under binomial training: no
ground truth needed) and publishes a copy of
the weights with a new version number; inference swaps them in between frames. What is
published, scored and checkpointed is a moving average of the trained weights
(``average_steps``): steadier from version to version than the weights of one step. Inference
has priority: while frames wait in the queue, the trainer yields. A step whose loss is
NaN/inf, or far above its recent level, is undone from the last published weights.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from n2s_stream.config import TrainingOptions
from n2s_stream.formats.checkpoint import Checkpoint
from n2s_stream.models import StateDict, use_fast_layout
from n2s_stream.n2s.binomial import PhotonSplit, not_photon_counts, photon_split
from n2s_stream.n2s.denoising import Network
from n2s_stream.n2s.optim import LossWatch, all_finite, make_optimizer, weight_average
from n2s_stream.n2s.patches import center_crop
from n2s_stream.n2s.specs import Objective
from n2s_stream.n2s.training import held_out_loss, train_step
from n2s_stream.runtime.buffer import RollingBuffer
from n2s_stream.runtime.coldstart import ColdStart
from n2s_stream.runtime.scheduler import Services
from n2s_stream.runtime.snapshot import ModelStore, copy_state
from n2s_stream.runtime.worker import BackgroundWorker

log = logging.getLogger(__name__)

MIN_FRAMES = 2  # frames in the buffer before training starts
VAL_CROP = 256
"""Held-out frames are scored on their central crop of this side (0: whole frames): whole
2048x2048 frames cost seconds per publication, time taken from inference."""


class OnlineTrainer(BackgroundWorker):
    """Background worker running self-supervised training steps on the rolling buffer."""

    def __init__(
        self,
        *,
        network: Network,
        buffer: RollingBuffer,
        val_buffer: RollingBuffer,
        services: Services,
        options: TrainingOptions,
        save: Callable[[StateDict, torch.optim.Optimizer, int, int, Objective], None],
        resume: Checkpoint | None = None,
        cold_start: ColdStart | None = None,
    ) -> None:
        super().__init__("online-trainer", join_timeout=30.0)
        # the starting weights are worth scoring against the classical denoiser: the
        # shipped pretrained network, which the cold start holds
        self.score_start = cold_start is not None and cold_start.has_starting_network
        self.model = use_fast_layout(network.model, network.device)
        self.masker, self.device = network.masker, network.device
        self.buffer, self.val_buffer, self.cold_start = buffer, val_buffer, cold_start
        self.store, self.metrics, self.options = services.store, services.metrics, options
        scheduler = services.scheduler
        self._busy = lambda: not scheduler.trainer_may_run()
        self._save = save
        optimizer_state = resume.optimizer_state if resume is not None else None
        step = resume.step if resume is not None else 0
        self.val_crop = VAL_CROP
        self.optimizer = make_optimizer(self.model, options.lr)
        self._average = (
            weight_average(self.model, options.average_steps) if options.average_steps > 1 else None
        )
        if optimizer_state:
            try:
                self.optimizer.load_state_dict(optimizer_state)
            except (ValueError, KeyError) as exc:
                log.warning("optimizer state not restored (%s); starting it afresh", exc)
        self.step = step
        self._rng = np.random.default_rng(options.seed)
        self._good = copy_state(self.model)  # the trained and averaged weights of the last
        self._good_average = None if self._average is None else copy_state(self._average)
        self._loss_watch = LossWatch()  # published version: where a rollback returns
        self._scored_start = False
        self._published = False  # nothing to checkpoint before this trainer's first version
        self._objective: Objective | None = None  # decided at the first step
        if resume is not None:
            log_objective_change(resume, options.objective)

    def _run(self) -> None:
        last_save = time.monotonic()
        loss_sum, n_losses = 0.0, 0
        try:
            while not self._stopping.is_set():  # stop(): the step finishes, a checkpoint follows
                if self._starting_model_unscored():
                    self._publish(math.nan)  # a pretrained start may beat classical at once
                if (
                    len(self.buffer) < MIN_FRAMES
                    or self._busy()
                    or (self.score_start and not self._scored_start)
                ):
                    self._stopping.wait(0.01)  # inference first
                    continue
                loss = self._step()
                if loss is not None:
                    loss_sum, n_losses = loss_sum + loss, n_losses + 1
                if self.step % self.options.publish_every == 0 and n_losses:
                    self._publish(loss_sum / n_losses)
                    loss_sum, n_losses = 0.0, 0
                if time.monotonic() - last_save > self.options.checkpoint_every:
                    self._save_published()
                    last_save = time.monotonic()
        except Exception as exc:  # policy: inference goes on with the last weights, visibly
            self.error = exc
            log.exception(
                "online trainer failed: training stopped, inference goes on with "
                'model version %d (n2s_worker_up{worker="trainer"} 0)',
                self.store.version,
            )
            return
        self._save_published()

    def _save_published(self) -> None:
        """Checkpoint the published weights under their version number (the average keeps
        moving between publications, so its current state would carry a wrong version).
        Before the first publication there is nothing learnt to keep, and a checkpoint of
        the starting weights would make a restart skip the cold start."""
        if not self._published:
            log.info("no checkpoint: no model version published since the start")
            return
        snapshot = self.store.snapshot()
        objective = self._objective or self.options.objective
        self._save(snapshot.weights, self.optimizer, self.step, snapshot.version, objective)

    @property
    def published_model(self) -> nn.Module:
        """The weights that are published, scored and checkpointed: the moving average of
        the trained ones, or the trained ones themselves (``average_steps`` 0 or 1)."""
        return self.model if self._average is None else self._average.module

    def _starting_model_unscored(self) -> bool:
        """With ``score_start`` (a pretrained start), True once, as soon as held-out frames
        exist while the cold start is active: the weights as shipped are scored before any
        step changes them, and write from then on if they beat the classical denoiser."""
        if self._scored_start:
            return False
        if not self.score_start or self.cold_start is None or not self.cold_start.active:
            self._scored_start = True
            return False
        if len(self.val_buffer) == 0 or self._busy():
            return False
        self._scored_start = True
        return True

    def _step(self) -> float | None:
        patches, valid = self.buffer.sample(
            batch=self.options.batch,
            patch=self.options.patch,
            rng=self._rng,
            recent=self.options.recent_frames,
        )
        batch = torch.from_numpy(patches).to(self.device)
        valid_t = None if valid is None else torch.from_numpy(valid).to(self.device)
        objective = self._objective_in_use()
        split = self._photon_split()
        loss = float(
            train_step(
                self.model,
                self.optimizer,
                self.masker,
                batch,
                rng=self._rng,
                objective=objective,
                valid=valid_t,
                split=split,
            )
        )  # host sync
        self.step += 1
        self.metrics.train_steps.inc()
        if self._loss_watch.diverging(loss):
            self._roll_back(self._loss_watch.describe(loss))
            return None
        if self._average is not None:
            self._average.update_parameters(self.model)
        return loss

    def _objective_in_use(self) -> Objective:
        """The configured objective; but binomial splitting, on frames that are not photon
        counts (a float source, or frames whose noise shows other than one count per
        photon), falls back to neighbor2neighbor: the same network without a blind spot,
        trained on sub-images instead. Decided, and logged, once the counts per photon
        is known (frames are taken as counts until then)."""
        if self._objective is not None:
            return self._objective
        if self.options.objective != "binomial":
            self._objective = self.options.objective
            return self._objective
        snapshot = self.store.snapshot()
        assert snapshot.normalizer is not None  # set before frames reach the buffer
        frames_dtype = snapshot.frames_dtype or snapshot.normalizer.source_dtype
        why = not_photon_counts(frames_dtype, snapshot.counts_per_photon)
        if why is not None:
            log.warning("%s: training uses neighbor2neighbor instead", why)
            self._objective = "neighbor2neighbor"
            return self._objective
        if snapshot.counts_per_photon is not None:
            self._objective = "binomial"
        return "binomial"

    def _photon_split(self) -> PhotonSplit | None:
        """How frames are split photon by photon while binomial training on photon counts
        is in use, for its steps and its held-out scores; None otherwise (then held-out
        frames are scored masked)."""
        if self._objective_in_use() != "binomial":
            return None
        normalizer = self.store.snapshot().normalizer
        assert normalizer is not None  # set before frames reach the buffers
        return photon_split(normalizer, self.options.split_keep)

    def _roll_back(self, reason: str) -> None:
        """Return the trained and the averaged weights to the last published version: a
        step's loss is measured before its update, so a bad update has already entered the
        average by the time the next step finds it."""
        log.warning(
            "training step %d: %s; rolling back to version %d",
            self.step,
            reason,
            self.store.version,
        )
        self.model.load_state_dict(self._good)
        if self._average is not None and self._good_average is not None:
            self._average.load_state_dict(self._good_average)
        self.optimizer = make_optimizer(self.model, self.options.lr)
        self.metrics.train_rollbacks.inc()

    def _wait_while_busy(self) -> None:
        """Inference first: scoring held-out frames (tens of forward passes at each
        publication) pauses while a frame is being denoised, as training steps do."""
        while self._busy() and not self._stopping.is_set():
            self._stopping.wait(0.005)

    def _publish(self, train_loss: float) -> None:
        if not all_finite(self.published_model):
            self._roll_back("weights not finite at publication")
            return
        if math.isfinite(train_loss):
            self.metrics.train_loss.set(train_loss)
        val_frames = self.val_buffer.snapshot()
        val_loss = None
        if val_frames is not None:
            crops = np.ascontiguousarray(center_crop(val_frames, self.val_crop))
            frames = torch.from_numpy(crops).to(self.device)

            split = self._photon_split()

            def loss_of(model: nn.Module) -> float:
                return held_out_loss(
                    model, self.masker, frames, split, before_chunk=self._wait_while_busy
                )

            val_loss = loss_of(self.published_model)
            self.metrics.selfsup_val_loss.set(val_loss)
        self._good = copy_state(self.model)
        if self._average is not None:
            self._good_average = copy_state(self._average)
        version = self.store.version + 1
        self.store.publish(copy_state(self.published_model), version)
        self._published = True
        if val_loss is not None and self.cold_start is not None and self.cold_start.active:
            self.cold_start.compare(val_loss, loss_of)
        log.debug("published model version %d (step %d, loss %.4g)", version, self.step, train_loss)


def log_objective_change(resume: Checkpoint, objective: Objective) -> None:
    """Say so when resumed weights were trained by another objective than the configured
    one (a state dir begun under an older default, or an edited config): training goes
    on by the configured one, and a network trained with a blind spot loses it. Weights
    that binomial training's fallback made are no news to a binomial config."""
    trained_by = resume.extra.get("objective")
    fell_back = (trained_by, objective) == ("neighbor2neighbor", "binomial")  # both unblind
    if trained_by is not None and trained_by != objective and not fell_back:
        log.warning(
            "%s was trained by objective %s; training goes on by the configured %s",
            resume.path,
            trained_by,
            objective,
        )


class CheckpointFollower(BackgroundWorker):
    """For inference-only workers of a fan-out: adopts the newest checkpoint that the
    one training worker writes to its state dir (shared storage), as new model versions."""

    def __init__(self, checkpoints: Path, store: ModelStore, *, interval: float = 2.0) -> None:
        super().__init__("checkpoint-follower")
        self.checkpoints, self.store, self.interval = Path(checkpoints), store, interval

    def poll(self) -> bool:
        """Load the newest checkpoint if it is newer than what inference has."""
        from n2s_stream.runtime.state import newest_checkpoint

        checkpoint = newest_checkpoint(self.checkpoints)
        if checkpoint is None or checkpoint.version <= self.store.version:
            return False
        self.store.publish(checkpoint.state_dict, checkpoint.version, checkpoint.normalizer)
        log.info("adopted model version %d from %s", checkpoint.version, checkpoint.path)
        return True

    def _run(self) -> None:
        while not self._stopping.wait(self.interval):
            try:
                self.poll()
            except Exception:  # shared storage hiccups must not stop inference
                log.exception("following checkpoints in %s failed", self.checkpoints)
