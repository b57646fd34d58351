"""The seed's offline tools: ``n2s-stream train`` and ``n2s-stream denoise``."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from n2s_stream.config import DenoiseConfig, TrainConfig, as_toml
from n2s_stream.errors import CheckpointError, InputError, UsageError
from n2s_stream.formats.checkpoint import load_checkpoint, save_checkpoint
from n2s_stream.formats.stack import FrameStack, open_stack
from n2s_stream.formats.writer import FrameWriter, OutputHeader, output_name
from n2s_stream.models import StateDict, build_model, count_parameters, use_fast_layout
from n2s_stream.n2s.binomial import PhotonSplit, not_photon_counts, photon_split
from n2s_stream.n2s.context import context_indices, context_stack
from n2s_stream.n2s.denoising import denoise_series, to_source_dtype
from n2s_stream.n2s.device import amp_enabled, resolve_device
from n2s_stream.n2s.masking import Masker
from n2s_stream.n2s.normalize import Normalizer, fill_invalid, valid_pixels
from n2s_stream.n2s.optim import LossWatch, all_finite, cosine_lr, make_optimizer
from n2s_stream.n2s.patches import sample_patches
from n2s_stream.n2s.photons import first_counts_per_photon
from n2s_stream.n2s.specs import Objective, context_offsets
from n2s_stream.n2s.training import masked_validation_loss, train_step
from n2s_stream.pretrained import starting_model
from n2s_stream.runtime.onnx_engine import OnnxRuntimeModel, check_engine
from n2s_stream.runtime.snapshot import copy_state

log = logging.getLogger(__name__)

# Validation frames are scored on a centre crop of at most this size, to keep it cheap.
VAL_CROP = 256


@dataclass
class EpochReport:
    """What one epoch of offline training achieved."""

    epoch: int
    step: int
    train_loss: float
    val_loss: float | None
    lr: float
    elapsed: float


@dataclass
class TrainResult:
    """Where the checkpoints went and how training went."""

    last: Path
    best: Path | None
    epochs: list[EpochReport] = field(default_factory=list)
    stopped_early: bool = False
    rollbacks: int = 0  # diverging steps undone


@dataclass
class _Data:
    train: np.ndarray  # (N, K, H, W) normalised float32: each frame and its context
    train_valid: np.ndarray | None  # (N, H, W) 1/0 float32 of the frames, None if all valid
    val: torch.Tensor | None  # (M, K, h, w) normalised, centre crops
    val_valid: torch.Tensor | None
    normalizer: Normalizer
    photons: tuple[int, float] | None  # binomial on counts: a frame's index, its estimate


def train(
    config: TrainConfig,
    *,
    on_epoch: Callable[[EpochReport, nn.Module], None] | None = None,
) -> TrainResult:
    """Train a denoiser on the noisy stack ``config.h5`` alone; write checkpoints.

    ``ckpt_last.pt`` is written after every epoch, ``ckpt_best.pt`` (with ``save_best``)
    whenever the validation loss (training loss without validation) improves.
    ``on_epoch`` sees each report and the model, e.g. to measure PSNR against a truth.
    """
    if config.h5 is None:
        raise UsageError("train: --h5 is required")
    run = _OfflineRun(config)
    out_dir = Path(config.out_dir)
    result = TrainResult(last=out_dir / "ckpt_last.pt", best=None)
    best_loss, epochs_without_gain = math.inf, 0
    for epoch in range(1, config.epochs + 1):
        report = run.epoch(epoch)
        if report is None:  # the time budget ran out before a step
            break
        result.epochs.append(report)
        run.save(result.last, epoch, report)
        score = report.val_loss if report.val_loss is not None else report.train_loss
        if score < best_loss - config.early_stop_min_delta:
            best_loss, epochs_without_gain = score, 0
            if config.save_best:
                result.best = out_dir / "ckpt_best.pt"
                run.save(result.best, epoch, report)
        else:
            epochs_without_gain += 1
        if on_epoch is not None:
            on_epoch(report, run.model)
        if config.early_stop_patience and epochs_without_gain >= config.early_stop_patience:
            log.info(
                "early stop: no gain above %g for %d epochs",
                config.early_stop_min_delta,
                epochs_without_gain,
            )
            result.stopped_early = True
            break
        if run.out_of_time():
            log.info("time budget of %.0fs reached", config.max_seconds)
            break
    result.rollbacks = run.rollbacks
    return result


class _OfflineRun:
    """The state of one offline training: data, model, optimizer, step, clock."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.amp = amp_enabled(config.amp, self.device)
        self.rng = np.random.default_rng(config.seed)
        torch.manual_seed(config.seed)
        self.data = _load_training_data(config, self.rng, self.device)
        self.split: PhotonSplit | None = None  # binomial: back to photon counts, and split
        self.objective = self._objective_in_use()
        if self.objective == "binomial":
            self.split = photon_split(self.data.normalizer, config.split_keep)
        self.model_config = config.network.model_config()
        self.model = use_fast_layout(build_model(self.model_config).to(self.device), self.device)
        self.masker = Masker(config.network.masker_config())
        self.start_version, shipped = _maybe_resume(config, self.model)
        self.peak_lr = config.pretrained_lr if shipped else config.lr
        self.optimizer = make_optimizer(self.model, self.peak_lr)
        self.loss_watch = LossWatch()
        self.good = copy_state(self.model)  # where a diverging step rolls back to
        self.good_epoch = 0
        self.candidate: tuple[StateDict, int] | None = None  # an epoch's end, unconfirmed
        self.rollbacks = 0
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp)
        n, _, height, width = self.data.train.shape
        patch_pixels = (
            height * width
            if config.patch <= 0
            else min(config.patch, height) * min(config.patch, width)
        )
        self.steps_per_epoch = config.steps_per_epoch or max(
            1, math.ceil(n * height * width / (config.batch * patch_pixels))
        )
        self.total_steps = self.steps_per_epoch * config.epochs
        self.step = 0
        self.started = time.monotonic()
        log.info(
            "training %s (%d parameters) on %d frames %dx%d from %s: %d epochs x %d "
            "steps, device %s",
            config.network.model,
            count_parameters(self.model),
            n,
            height,
            width,
            config.h5,
            config.epochs,
            self.steps_per_epoch,
            self.device,
        )

    def out_of_time(self) -> bool:
        """True once the time budget (``max_seconds``) is spent."""
        budget = self.config.max_seconds
        return budget > 0 and time.monotonic() - self.started >= budget

    def epoch(self, epoch: int) -> EpochReport | None:
        """One epoch of self-supervised steps (cosine learning rate over the run or the time
        budget), then the held-out loss; None if no step fitted in the budget. A diverging
        step is undone (`LossWatch`) and left out of the epoch's training loss."""
        config = self.config
        loss_sum, steps, attempted, lr = 0.0, 0, 0, self.peak_lr
        for _ in tqdm(
            range(self.steps_per_epoch),
            desc=f"epoch {epoch}/{config.epochs}",
            unit="step",
            leave=False,
            disable=not config.progress,
        ):
            progress = self.step / self.total_steps
            if config.max_seconds > 0:
                if self.out_of_time():
                    break
                progress = max(progress, (time.monotonic() - self.started) / config.max_seconds)
            lr = cosine_lr(self.peak_lr, progress)
            loss = self._checked_step(lr)
            attempted += 1
            if loss is not None:
                loss_sum += loss
                steps += 1
        if attempted == 0:
            return None
        train_loss = loss_sum / steps if steps else math.nan  # nan: every step undone
        if not all_finite(self.model):
            self._roll_back("weights not finite at the end of the epoch")
        elif steps:
            self.candidate = (copy_state(self.model), epoch)
        val_loss = None
        if self.data.val is not None:
            val_loss = masked_validation_loss(
                self.model, self.masker, self.data.val, valid=self.data.val_valid, amp=self.amp
            )
        report = EpochReport(
            epoch, self.step, train_loss, val_loss, lr, time.monotonic() - self.started
        )
        log.info(
            "epoch %d/%d: train %s loss %.5f, val masked loss %s, lr %.2e, %.1fs",
            epoch,
            config.epochs,
            TRAIN_LOSS_NAMES[self.objective],
            train_loss,
            "n/a" if val_loss is None else f"{val_loss:.5f}",
            lr,
            report.elapsed,
        )
        return report

    def _checked_step(self, lr: float) -> float | None:
        """A training step, and what its loss says of the weights it started from: None
        after a rollback (they were damaged) or an update the AMP scaler skipped; else its
        loss, and the weights saved at the last epoch's end become the rollback point (a
        step's loss is measured before its update, so the end of an epoch is confirmed
        only by the next step)."""
        loss = self._step(lr)
        if self.amp and not math.isfinite(loss):
            return None  # the GradScaler skipped this update: nothing to undo
        if self.loss_watch.diverging(loss):
            self._roll_back(self.loss_watch.describe(loss))
            return None
        if self.candidate is not None:
            (self.good, self.good_epoch), self.candidate = self.candidate, None
        return loss

    def _step(self, lr: float) -> float:
        """One self-supervised training step on random patches; its loss (a host sync per
        step: the price of catching a diverging step before the next builds on it)."""
        config = self.config
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        patches, valid = sample_patches(
            self.data.train,
            self.data.train_valid,
            batch=config.batch,
            patch=config.patch,
            rng=self.rng,
        )
        batch = torch.from_numpy(patches).to(self.device)
        valid_t = None if valid is None else torch.from_numpy(valid).to(self.device)
        loss = train_step(
            self.model,
            self.optimizer,
            self.masker,
            batch,
            rng=self.rng,
            objective=self.objective,
            valid=valid_t,
            scaler=self.scaler,
            amp=self.amp,
            split=self.split,
        )
        self.step += 1
        return float(loss)

    def _objective_in_use(self) -> Objective:
        """The configured objective; but binomial splitting on frames that are not photon
        counts trains by neighbor2neighbor instead, as the daemon does (logged)."""
        config = self.config
        if config.objective != "binomial":
            return config.objective
        index, estimate = self.data.photons or (None, None)
        why = not_photon_counts(self.data.normalizer.source_dtype, estimate)  # the stack's
        if why is not None:
            where = "" if index is None else f" (frame {index})"
            log.warning("%s%s: %s; training uses neighbor2neighbor instead", config.h5, where, why)
            return "neighbor2neighbor"
        if estimate is not None:
            log.info("%s: frame %d shows %.2f counts per photon", config.h5, index, estimate)
        return "binomial"

    def _roll_back(self, reason: str) -> None:
        """Undo a diverging step: the weights of the last finished epoch (or the start)
        and a fresh Adam, as the daemon's trainer does."""
        log.warning(
            "training step %d: %s; rolling back to the weights after epoch %d",
            self.step,
            reason,
            self.good_epoch,
        )
        self.model.load_state_dict(self.good)
        self.candidate = None  # unconfirmed, and the weights after it were damaged
        self.optimizer = make_optimizer(self.model, self.peak_lr)
        self.rollbacks += 1

    def save(self, path: Path, epoch: int, report: EpochReport) -> None:
        """A checkpoint of the model now (its version counts steps)."""
        save_checkpoint(
            path,
            model=self.model,
            model_config=self.model_config,
            masker_config=self.masker.config,
            normalizer=self.data.normalizer,
            optimizer=self.optimizer,
            step=self.step,
            version=self.start_version + self.step,
            extra={
                "epoch": epoch,
                "train_loss": report.train_loss,
                "val_loss": report.val_loss,
                "config": as_toml(self.config, "train"),
            },
        )


TRAIN_LOSS_NAMES = {"noise2self": "masked", "neighbor2neighbor": "sub-image", "binomial": "split"}
"""How the epoch log line names each objective's training loss."""


def _maybe_resume(config: TrainConfig, model: nn.Module) -> tuple[int, bool]:
    """Load ``config.ckpt`` into ``model`` if given, else the shipped pretrained model if
    asked for and fitting; returns the version loaded (0 otherwise) and whether the shipped
    model was (it fine-tunes at ``pretrained_lr``)."""
    if config.ckpt is None:
        return 0, config.starts_pretrained and _load_shipped(config, model)
    checkpoint = load_checkpoint(config.ckpt)
    checkpoint.check_compatible(config.network.model_config())
    model.load_state_dict(checkpoint.state_dict)
    log.info("starting from %s (version %d)", config.ckpt, checkpoint.version)
    return checkpoint.version, False


def _load_shipped(config: TrainConfig, model: nn.Module) -> bool:
    """Start ``model`` from the shipped model for the objective, as the daemon does; False
    where none fits the network options."""
    shipped = starting_model(
        config.network.model_config(),
        config.network.masker_config(),
        config.objective,
        config.pretrained_model,
    )
    if shipped is None:
        log.info(
            "no shipped pretrained model fits these network options: training starts "
            "from random weights"
        )
        return False
    model.load_state_dict(shipped.state_dict)
    log.info(
        "starting from the %s pretrained model %s (peak learning rate %.1e)",
        "shipped" if config.pretrained_model is None else "given",
        shipped.path,
        config.pretrained_lr,
    )
    return True


def _load_training_data(
    config: TrainConfig, rng: np.random.Generator, device: torch.device
) -> _Data:
    """Training (and held-out) frames, each with its temporal context: ``(N, K, H, W)``."""
    masker_config = config.network.masker_config()
    offsets = context_offsets(masker_config.context_frames, masker_config.causal)
    with open_stack(config.h5, config.dataset) as stack:  # type: ignore[arg-type]
        n = len(stack)
        if n == 0:
            raise InputError(f"{stack.path}: the stack holds no frames", reason="empty")
        centres = _spread_indices(n, config.max_samples)
        needed = sorted(
            {
                *centres,
                *(
                    j
                    for c in centres
                    for j in context_indices(c, n, offsets, masker_config.causal)
                    if j is not None
                ),
            }
        )
        frames = _read_frames(stack, needed)
        source_dtype = stack.dtype
        pixel_mask = stack.pixel_mask
    valid = valid_pixels(frames, source_dtype)
    if pixel_mask is not None:
        valid &= ~pixel_mask
    normalizer = config.network.fit_normalizer(frames, source_dtype=source_dtype, valid=valid)
    normalized = normalizer.forward(fill_invalid(frames, valid))
    row = {index: k for k, index in enumerate(needed)}
    by_index = _ByIndex(normalized, row, n)
    stacks = np.stack(
        [
            context_stack(by_index, c, offsets, masker_config.causal, masker_config.register)
            for c in centres
        ]
    )
    centre_valid = valid[[row[c] for c in centres]]
    valid_f = None if centre_valid.all() else centre_valid.astype(np.float32)
    order = rng.permutation(len(stacks))
    n_val = 0
    if config.val_frac > 0 and len(stacks) >= 2:
        n_val = min(max(round(config.val_frac * len(stacks)), 1), len(stacks) - 1)
    val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
    val = val_valid = None
    if n_val:
        val = _centre_crop(torch.from_numpy(stacks[val_idx])).to(device)
        if valid_f is not None:
            val_valid = _centre_crop(torch.from_numpy(valid_f[val_idx]).unsqueeze(1)).to(device)
    return _Data(
        train=stacks[train_idx],
        train_valid=None if valid_f is None else valid_f[train_idx],
        val=val,
        val_valid=val_valid,
        normalizer=normalizer,
        photons=(
            _photons(frames, valid, needed)
            if config.objective == "binomial" and np.dtype(source_dtype).kind in "iu"
            else None  # only binomial asks, and only counts can be photons
        ),
    )


def _photons(frames: np.ndarray, valid: np.ndarray, indices: list[int]) -> tuple[int, float] | None:
    """The first frame read that tells its counts per photon (its index in the stack),
    and the estimate."""
    found = first_counts_per_photon(frames, valid)
    return None if found is None else (indices[found[0]], found[1])


class _ByIndex:
    """Frames read out of a series, looked up by their index in the series, so that
    :func:`context_stack` finds each neighbour where it was in the file."""

    def __init__(self, frames: np.ndarray, row: dict[int, int], n_frames: int) -> None:
        self._frames, self._row, self._n = frames, row, n_frames

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index: int) -> np.ndarray:
        return self._frames[self._row[index]]


def _spread_indices(n: int, max_samples: int) -> list[int]:
    """Up to ``max_samples`` frame indices spread evenly over a stack of ``n``."""
    if max_samples <= 0 or n <= max_samples:
        return list(range(n))
    return np.unique(np.linspace(0, n - 1, max_samples).round().astype(int)).tolist()


def _read_frames(stack: FrameStack, indices: list[int]) -> np.ndarray:
    """The frames at ``indices`` (sorted), read chunk by chunk when they are all of them."""
    if len(indices) == len(stack):
        return np.concatenate([chunk for _, chunk in stack.iter_chunks(64)])
    return stack.read_frames(np.asarray(indices))


def _centre_crop(x: torch.Tensor) -> torch.Tensor:
    height, width = x.shape[-2:]
    top, left = max((height - VAL_CROP) // 2, 0), max((width - VAL_CROP) // 2, 0)
    return x[..., top : top + VAL_CROP, left : left + VAL_CROP].contiguous()


@dataclass
class DenoiseResult:
    """Where the denoised stack went."""

    out: Path
    n_frames: int


HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".nxs")


def resolve_output(source: Path, out: Path | None) -> Path:
    """``--out`` as a file (HDF5 suffix), else a folder that gets the mirrored name
    (``scan_0001.h5`` → ``scan_0001_n2s.h5``); without ``--out``, next to the source."""
    if out is None:
        return source.with_name(output_name(source))
    if out.is_dir() or out.suffix.lower() not in HDF5_SUFFIXES:
        return out / output_name(source)
    return out


def denoise(config: DenoiseConfig) -> DenoiseResult:
    """Denoise the stack ``config.h5`` with ``config.ckpt`` into a new output file.

    Reads, denoises and writes ``batch`` frames at a time, so memory does not grow with
    the stack. Output is in the input's units, stored as ``config.storage`` says
    (float16 and bitshuffle-LZ4 by default), or in the input's dtype with
    ``require_reconstructable`` (refused unless the normalisation inverts exactly).
    """
    if config.h5 is None or config.ckpt is None:
        raise UsageError("denoise: --h5 and --ckpt are required")
    checkpoint = load_checkpoint(config.ckpt)
    recorded = checkpoint.masker_config.context_frames
    if config.context_frames is not None and config.context_frames != recorded:
        raise UsageError(
            f"denoise: --context-frames {config.context_frames} does not match "
            f"{config.ckpt}, trained with {recorded} (the checkpoint decides)"
        )
    if config.require_reconstructable and not checkpoint.normalizer.is_exact:
        raise CheckpointError(
            f"{config.ckpt}: --require-reconstructable needs a normalisation that inverts"
            f" exactly, but this checkpoint has {checkpoint.normalizer.describe()};"
            " train with --normalize none --no-scale-integers"
        )
    device = resolve_device(config.device)
    check_engine(config.engine, device)
    if config.engine == "passthrough":
        raise UsageError(
            "denoise: engine passthrough is the daemon's (it writes frames as "
            "they came); denoise runs the checkpoint with torch or onnxruntime"
        )
    amp = amp_enabled(config.amp, device)
    model: nn.Module | OnnxRuntimeModel  # either runs the forward pass of denoise_series
    model = use_fast_layout(checkpoint.build_model(device), device)
    if config.engine == "onnxruntime":
        model = OnnxRuntimeModel(model, torch.get_num_threads())
    masker = Masker(checkpoint.masker_config)
    out_path = resolve_output(Path(config.h5), config.out)
    if out_path.resolve() == Path(config.h5).resolve():
        raise UsageError(f"denoise: --out {out_path} would overwrite the input")

    with open_stack(config.h5, config.dataset) as stack:
        out_dtype = stack.dtype if config.require_reconstructable else None
        log.info(
            "denoising %s (%d frames %dx%d, %s) with %s version %d -> %s",
            config.h5,
            len(stack),
            *stack.frame_shape,
            stack.dtype,
            config.ckpt,
            checkpoint.version,
            out_path,
        )
        mean_count = (
            float(checkpoint.normalizer.shift) if checkpoint.normalizer.mode == "meanstd" else 1.0
        )
        with FrameWriter(
            out_path,
            frame_shape=stack.frame_shape,
            dtype=out_dtype,
            output_format=config.storage.output_format().for_source(stack.dtype),
            mean_count=mean_count,
            header=OutputHeader(as_toml(config, "denoise"), str(config.h5)),
        ) as writer:
            bar = tqdm(total=len(stack), unit="frame", disable=not config.progress)
            for indices, denoised in denoise_series(
                model,
                masker,
                checkpoint.normalizer,
                stack.iter_chunks(config.batch),
                jinv=config.jinv,
                device=device,
                batch=config.batch,
                amp=amp,
                pixel_mask=stack.pixel_mask,
                preserve_flux=config.preserve_flux,
            ):
                if config.require_reconstructable:
                    denoised = to_source_dtype(denoised, stack.dtype)
                writer.append(
                    denoised,
                    source_frames=indices,
                    model_version=checkpoint.version,
                    t_received=time.time(),
                )
                bar.update(len(indices))
            bar.close()
            n_written = writer.n_written
    return DenoiseResult(out_path, n_written)
