"""Offline train/denoise on real files: quality rises, layout and counts are right."""

from __future__ import annotations

import logging
import multiprocessing
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from n2s_stream.commands.offline import denoise, resolve_output, train
from n2s_stream.commands.simulate import clean_frames, poisson_frames
from n2s_stream.config import DenoiseConfig, StorageOptions, TrainConfig
from n2s_stream.errors import CheckpointError, UsageError
from n2s_stream.formats.checkpoint import load_checkpoint, save_checkpoint
from n2s_stream.n2s.quality import psnr
from n2s_stream.options import make
from n2s_stream.pretrained import BLIND
from n2s_stream.runtime.onnx_engine import check_engine
from tests.helpers.daemon import write_stack

TINY = dict(device="cpu", width=12, depth=2, patch=32, batch=8, progress=False)


@pytest.fixture(scope="module")
def trained(noisy_series, tmp_path_factory):
    """A tiny UNet trained for a few seconds on the shared noisy series."""
    path, _, _ = noisy_series
    out_dir = tmp_path_factory.mktemp("runs")
    result = train(
        make(
            TrainConfig,
            h5=path,
            epochs=6,
            steps_per_epoch=40,
            val_frac=0.15,
            save_best=True,
            out_dir=out_dir,
            **TINY,
        )
    )
    return result


def test_training_writes_checkpoints_and_reports_losses(trained):
    assert trained.last.name == "ckpt_last.pt" and trained.last.is_file()
    assert trained.best is not None and trained.best.name == "ckpt_best.pt"
    assert len(trained.epochs) == 6
    assert all(e.val_loss is not None and e.val_loss > 0 for e in trained.epochs)
    # the masked loss falls as the network learns
    assert trained.epochs[-1].train_loss < trained.epochs[0].train_loss


@pytest.mark.parametrize("jinv", [False, True])
def test_denoising_raises_psnr(noisy_series, trained, tmp_path, jinv):
    path, clean, dose = noisy_series
    result = denoise(
        DenoiseConfig(
            h5=path,
            ckpt=trained.best,
            out=tmp_path / "o.h5",
            device="cpu",
            batch=5,
            jinv=jinv,
            progress=False,
        )
    )
    with h5py.File(path) as handle:
        noisy = handle["/data"][()].astype(np.float32)
    with h5py.File(result.out) as handle:
        denoised = handle["/entry/data/data"][()]
        provenance = {
            k: handle[f"/entry/provenance/{k}"][()]
            for k in ("source_frame", "model_version", "t_received", "t_written")
        }
        assert handle["/entry/process/program"][()] == b"n2s-stream"
        assert b"jinv = " in handle["/entry/process/config"][()]
        assert handle["/entry/data/data"].chunks == (1, 64, 64)
    assert denoised.dtype == np.float16 and denoised.shape == noisy.shape  # the default
    gain = psnr(clean, denoised, dose) - psnr(clean, noisy, dose)
    assert gain > 5.0, f"PSNR gain only {gain:.2f} dB"
    # counts stay counts: the mean level is preserved
    assert abs(denoised.mean() - noisy.mean()) < 0.05 * noisy.mean()
    assert np.array_equal(provenance["source_frame"], np.arange(24))
    assert (provenance["t_written"] >= provenance["t_received"]).all()
    assert (provenance["model_version"] > 0).all()


def test_require_reconstructable_round_trips_counts(tmp_path):
    """Trained with an exact normalisation, output is uint16 counts that match the input
    where the network is ~identity on a flat field and never overflow the dtype."""
    rng = np.random.default_rng(0)
    frames = rng.poisson(20, size=(8, 32, 32)).astype(np.uint16)
    frames[:, 3, 4] = np.iinfo(np.uint16).max  # a dead pixel: kept as is
    src = write_stack(tmp_path / "flat.h5", frames, "/entry/data/data")
    result = train(
        make(
            TrainConfig,
            h5=src,
            epochs=4,
            steps_per_epoch=30,
            normalize="none",
            no_scale_integers=True,
            out_dir=tmp_path / "r",
            **TINY,
        )
    )
    out = denoise(
        DenoiseConfig(
            h5=src,
            ckpt=result.last,
            out=tmp_path / "den",
            device="cpu",
            require_reconstructable=True,
            progress=False,
        )
    )
    assert out.out == tmp_path / "den" / "flat_n2s.h5"
    with h5py.File(out.out) as handle:
        denoised = handle["/entry/data/data"][()]
    assert denoised.dtype == np.uint16
    assert (denoised[:, 3, 4] == np.iinfo(np.uint16).max).all()
    body = np.delete(denoised.reshape(8, -1), 3 * 32 + 4, axis=1)
    assert abs(float(body.mean()) - 20) < 2  # still counts around the true mean
    assert body.std() < frames.std()  # and less noisy


def test_require_reconstructable_refuses_inexact_checkpoint(trained, noisy_series, tmp_path):
    path, _, _ = noisy_series
    with pytest.raises(CheckpointError, match=r"inverts exactly.*--normalize none"):
        denoise(
            DenoiseConfig(
                h5=path,
                ckpt=trained.last,
                out=tmp_path / "x.h5",
                require_reconstructable=True,
                device="cpu",
                progress=False,
            )
        )


@pytest.mark.parametrize("stack", ["doubled counts", "floats"])
def test_binomial_trains_by_sub_images_on_a_stack_that_is_not_photon_counts(
    stack, tmp_path, caplog
):
    """Two counts a photon, or float frames: splitting would not give independent halves;
    as the daemon does, training says why (naming the file, and for counts the frame
    measured and its estimate) and trains by neighbor2neighbor instead."""
    counts = 2 * poisson_frames(clean_frames(4, (64, 64), seed=3), 20.0, np.random.default_rng(7))
    frames = counts if stack == "doubled counts" else counts.astype(np.float32)
    path = write_stack(tmp_path / "stack.h5", frames)
    config = make(
        TrainConfig,
        h5=path,
        objective="binomial",
        epochs=1,
        steps_per_epoch=2,
        out_dir=tmp_path / "r",
        **TINY,
    )
    with caplog.at_level(logging.INFO):
        result = train(config)
    assert len(result.epochs) == 1
    (warning,) = [r.message for r in caplog.records if "uses neighbor2neighbor" in r.message]
    if stack == "floats":
        assert "stack.h5: objective binomial splits photon counts, but the frames are float32" in (
            warning
        )
    else:
        found = re.search(r"stack.h5 \(frame 0\): .* shows (\d\.\d\d) counts per photon", warning)
        assert found is not None and 1.8 <= float(found[1]) <= 2.3
    assert any("train sub-image loss" in r.message for r in caplog.records)


@pytest.mark.parametrize("objective", ["neighbor2neighbor", "binomial"])
def test_objectives_without_a_blind_spot_raise_psnr(objective, noisy_series, tmp_path, caplog):
    """The other objectives, same data and steps as `trained`: single-pass denoising of a
    network without a blind spot gains as much (binomial on the simulator's photon counts
    splits them: no fallback)."""
    path, clean, dose = noisy_series
    with caplog.at_level(logging.INFO):
        result = train(
            make(
                TrainConfig,
                h5=path,
                epochs=6,
                steps_per_epoch=40,
                objective=objective,
                out_dir=tmp_path / "r",
                **TINY,
            )
        )
    loss_name = {"neighbor2neighbor": "sub-image", "binomial": "split"}[objective]
    assert any(f"train {loss_name} loss" in r.message for r in caplog.records)
    assert result.epochs[-1].train_loss < result.epochs[0].train_loss
    assert f'objective = "{objective}"' in load_checkpoint(result.last).extra["config"]
    out = denoise(
        DenoiseConfig(
            h5=path, ckpt=result.last, out=tmp_path / "o.h5", device="cpu", batch=5, progress=False
        )
    )
    with h5py.File(path) as handle:
        noisy = handle["/data"][()].astype(np.float32)
    with h5py.File(out.out) as handle:
        denoised = handle["/entry/data/data"][()]
    gain = psnr(clean, denoised, dose) - psnr(clean, noisy, dose)
    assert gain > 5.0, f"PSNR gain only {gain:.2f} dB"


def test_training_can_start_from_the_shipped_model(noisy_series, tmp_path, caplog):
    """``--pretrained`` starts where the daemon starts: after a few steps it denoises far
    better than the same steps from random weights; it needs the default network."""
    caplog.set_level(logging.INFO)
    path, clean, dose = noisy_series
    with h5py.File(path) as handle:
        noisy = handle["/data"][()].astype(np.float32)
    common = dict(h5=path, epochs=1, steps_per_epoch=5, device="cpu", progress=False)
    gains = {}
    for pretrained in (True, False):
        result = train(
            make(TrainConfig, pretrained=pretrained, out_dir=tmp_path / str(pretrained), **common)
        )
        out = denoise(
            DenoiseConfig(
                h5=path,
                ckpt=result.last,
                out=tmp_path / f"{pretrained}.h5",
                device="cpu",
                progress=False,
            )
        )
        with h5py.File(out.out) as handle:
            gains[pretrained] = psnr(clean, handle["/entry/data/data"][()], dose) - psnr(
                clean, noisy, dose
            )
    assert f"starting from the shipped pretrained model {BLIND}" in caplog.text
    assert gains[True] > 5.0 and gains[True] > gains[False] + 3.0, gains
    # from the shipped model the peak learning rate is pretrained_lr, not lr
    unchanged = train(
        make(
            TrainConfig,
            pretrained=True,
            pretrained_lr=0.0,
            lr=3e-3,
            out_dir=tmp_path / "lr0",
            **common,
        )
    )
    weights, shipped = load_checkpoint(unchanged.last), load_checkpoint(BLIND)
    assert all(torch.equal(weights.state_dict[k], v) for k, v in shipped.state_dict.items())
    train(make(TrainConfig, pretrained=True, out_dir=tmp_path / "w12", **{**common, **TINY}))
    assert "no shipped pretrained model fits these network options" in caplog.text


def test_training_can_start_from_a_given_starting_model(noisy_series, tmp_path, caplog):
    """``--pretrained-model`` starts from a model file the training script wrote (a
    facility's own prior) instead of the shipped one; one that does not fit the network
    options is refused with its name, not silently replaced by random weights."""
    caplog.set_level(logging.INFO)
    path, _, _ = noisy_series
    given = load_checkpoint(BLIND)
    weights = {**given.state_dict, "head.weight": given.state_dict["head.weight"] + 0.5}
    own = tmp_path / "own.pt"  # a model of the shipped one's shape, not the shipped one
    save_checkpoint(
        own,
        model=weights,
        model_config=given.model_config,
        masker_config=given.masker_config,
        normalizer=given.normalizer,
        version=0,
        step=1,
    )
    common = dict(h5=path, epochs=1, steps_per_epoch=2, device="cpu", progress=False)
    result = train(
        make(
            TrainConfig,
            pretrained=True,
            pretrained_model=own,
            pretrained_lr=0.0,
            out_dir=tmp_path / "own",
            **common,
        )
    )
    assert f"starting from the given pretrained model {own}" in caplog.text
    trained = load_checkpoint(result.last).state_dict
    assert all(torch.equal(trained[k], v) for k, v in weights.items())
    with pytest.raises(UsageError, match=f"pretrained_model {own}: made for .* does not fit"):
        train(
            make(
                TrainConfig,
                pretrained=True,
                pretrained_model=own,
                out_dir=tmp_path / "w12",
                **{**common, **TINY},
            )
        )


def test_a_diverging_step_is_rolled_back(noisy_series, tmp_path, caplog):
    """A learning rate far too high blows the loss up; each such step is undone (the
    weights of the last finished epoch and a fresh Adam) instead of being trained on, so
    the checkpoint and the epochs' losses stay finite."""
    caplog.set_level(logging.WARNING)
    path, _, _ = noisy_series
    for steps in (20, 21):  # epochs ending on a rolled-back step and on a kept one
        result = train(
            make(
                TrainConfig,
                h5=path,
                epochs=3,
                steps_per_epoch=steps,
                lr=50.0,
                out_dir=tmp_path / str(steps),
                **TINY,
            )
        )
        assert result.rollbacks > 0 and len(result.epochs) == 3
        weights = load_checkpoint(result.last).state_dict
        assert all(torch.isfinite(w).all() for w in weights.values())
        assert all(np.isfinite(e.train_loss) and e.train_loss < 10 for e in result.epochs)
    assert caplog.text.count("rolling back to the weights after epoch") > result.rollbacks


def test_early_stopping_and_max_seconds(noisy_series, tmp_path):
    path, _, _ = noisy_series
    stopped = train(
        make(
            TrainConfig,
            h5=path,
            epochs=50,
            steps_per_epoch=5,
            val_frac=0.2,
            early_stop_patience=1,
            early_stop_min_delta=10.0,
            out_dir=tmp_path / "a",
            **TINY,
        )
    )
    assert stopped.stopped_early and len(stopped.epochs) == 2
    timed = train(
        make(
            TrainConfig,
            h5=path,
            epochs=1000,
            steps_per_epoch=5,
            max_seconds=2.0,
            out_dir=tmp_path / "b",
            **TINY,
        )
    )
    assert len(timed.epochs) < 1000 and timed.epochs[-1].elapsed < 10


def test_full_frame_and_dncnn_and_mask_channel(noisy_series, tmp_path):
    path, _, _ = noisy_series
    config = make(
        TrainConfig,
        h5=path,
        epochs=1,
        steps_per_epoch=3,
        patch=0,
        batch=2,
        model="dncnn",
        layers=4,
        mask_as_input=True,
        out_dir=tmp_path / "r",
        device="cpu",
        width=8,
        progress=False,
    )
    result = train(config)
    out = denoise(
        DenoiseConfig(
            h5=path,
            ckpt=result.last,
            out=tmp_path / "o.h5",
            device="cpu",
            jinv=True,
            progress=False,
        )
    )
    assert out.n_frames == 24


def test_resume_from_other_architecture_is_refused(trained, noisy_series, tmp_path):
    path, _, _ = noisy_series
    with pytest.raises(CheckpointError, match="checkpoint is for model"):
        train(
            make(
                TrainConfig,
                h5=path,
                ckpt=trained.last,
                epochs=1,
                steps_per_epoch=1,
                out_dir=tmp_path,
                **{**TINY, "width": 16},
            )
        )


def test_output_naming():
    src = Path("/acq/scan_0001.h5")
    assert resolve_output(src, None) == Path("/acq/scan_0001_n2s.h5")
    assert resolve_output(src, Path("/den")) == Path("/den/scan_0001_n2s.h5")
    assert resolve_output(src, Path("/den/x.h5")) == Path("/den/x.h5")


def _swmr_reader(path: str, queue) -> None:
    with h5py.File(path, "r", swmr=True) as handle:
        queue.put(int(handle["/entry/data/data"].shape[0]))


def test_output_is_readable_with_swmr_while_open(tmp_path):
    from n2s_stream.formats.writer import FrameWriter

    path = tmp_path / "live.h5"
    with FrameWriter(path, frame_shape=(4, 4)) as writer:
        for k in range(3):
            writer.append(
                np.full((1, 4, 4), k, np.float32),
                source_frames=[k],
                model_version=1,
                t_received=0.0,
            )
        queue = multiprocessing.get_context("spawn").Queue()
        reader = multiprocessing.get_context("spawn").Process(
            target=_swmr_reader, args=(str(path), queue)
        )
        reader.start()
        seen = queue.get(timeout=60)
        reader.join(timeout=30)
    assert seen == 3  # another process saw all frames while the writer still held the file


def test_denoise_on_onnxruntime_writes_what_torch_writes(noisy_series, trained, tmp_path):
    pytest.importorskip("onnxruntime", reason="optional extra [onnx] not installed")
    path, _, _ = noisy_series
    outputs = {}
    for engine in ("torch", "onnxruntime"):
        result = denoise(
            DenoiseConfig(
                h5=path,
                ckpt=trained.best,
                out=tmp_path / f"{engine}.h5",
                device="cpu",
                batch=5,
                engine=engine,
                progress=False,
                storage=StorageOptions("float32", "none"),
            )
        )
        with h5py.File(result.out) as handle:
            outputs[engine] = handle["/entry/data/data"][()]
            assert b'engine = "' + engine.encode() in handle["/entry/process/config"][()]
    assert outputs["torch"].shape == outputs["onnxruntime"].shape == (24, 64, 64)
    np.testing.assert_allclose(outputs["onnxruntime"], outputs["torch"], rtol=1e-4, atol=1e-3)


def test_engine_is_refused_where_it_cannot_run():
    with pytest.raises(UsageError, match="engine 'tensorrt': expected one of torch, onnxruntime"):
        check_engine("tensorrt", torch.device("cpu"))
    with pytest.raises(UsageError, match="runs on the CPU, not on cuda"):
        check_engine("onnxruntime", torch.device("cuda"))
