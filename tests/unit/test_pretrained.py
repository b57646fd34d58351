"""The shipped starting models: they load without unpickling objects, fit exactly the
default network (one per training objective) or its 3-frame centred form (non-blind
objectives), and their training script is reproducible (same settings, same weights)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from n2s_stream.config import NetworkOptions, TrainConfig, TrainingOptions
from n2s_stream.errors import UsageError
from n2s_stream.formats.checkpoint import load_checkpoint
from n2s_stream.n2s.specs import OBJECTIVES
from n2s_stream.options import make
from n2s_stream.pretrained import (
    BLIND,
    IMAGES,
    MORE_IMAGES,
    NONBLIND,
    NONBLIND_K3,
    SHIPPED,
    starting_model,
)
from n2s_stream.pretrained.__main__ import batch, training_images


def test_every_objective_has_its_shipped_model_in_the_package():
    """Package data, not an optional download: a missing file is a broken package."""
    assert {objective for objective, frames in SHIPPED if frames == 1} == set(OBJECTIVES)
    missing = [str(path) for path in SHIPPED.values() if not path.is_file()]
    assert not missing
    assert {BLIND, NONBLIND, NONBLIND_K3} == set(SHIPPED.values())


def test_shipped_model_loads_safely_and_fits_only_the_default_network():
    shipped = load_checkpoint(BLIND)  # torch.load(weights_only=True) inside
    settings = shipped.extra["pretrained"]
    assert settings["script"] == "python -m n2s_stream.pretrained" and settings["steps"] > 0
    # the benchmarks' held-out images stay held out: only the listed ones and synthetic blobs
    assert settings["images"] == [*IMAGES, *MORE_IMAGES, "blobs"] and settings["augment"]
    network = make(NetworkOptions)
    model, masker = network.model_config(), network.masker_config()
    assert starting_model(model, masker) is not None
    assert starting_model(model, replace(masker, causal=True)) is not None  # K=1: same
    assert starting_model(replace(model, width=8), masker) is None
    assert starting_model(replace(model, in_channels=3), replace(masker, context_frames=3)) is None


def test_each_objective_starts_from_its_own_shipped_model():
    network = make(NetworkOptions)
    model, masker = network.model_config(), network.masker_config()
    blind = starting_model(model, masker, "noise2self")
    nonblind = starting_model(model, masker, "neighbor2neighbor")
    assert blind is not None and nonblind is not None
    assert nonblind.extra["pretrained"]["objective"] == "neighbor2neighbor"
    # one recipe for both files: the same images
    assert nonblind.extra["pretrained"]["images"] == blind.extra["pretrained"]["images"]
    assert set(IMAGES) < set(nonblind.extra["pretrained"]["images"])
    binomial = starting_model(model, masker, "binomial")  # the same unmasked use
    assert binomial is not None
    assert torch.equal(binomial.state_dict["head.weight"], nonblind.state_dict["head.weight"])
    assert not torch.equal(blind.state_dict["head.weight"], nonblind.state_dict["head.weight"])
    assert starting_model(replace(model, width=8), masker, "neighbor2neighbor") is None
    assert starting_model(model, replace(masker, grid_size=2), "neighbor2neighbor") is not None
    assert starting_model(model, replace(masker, grid_size=2), "noise2self") is None


def test_a_centred_three_frame_network_starts_from_its_own_shipped_model():
    """``context_frames = 3`` (centred) under a non-blind objective starts from the 3-frame
    file, trained by the same recipe on neighbours of the same window; a causal or blind
    3-frame network has no shipped file and starts from random weights."""
    network = make(NetworkOptions, context_frames=3)
    model, masker = network.model_config(), network.masker_config()
    for objective in ("binomial", "neighbor2neighbor"):
        shipped = starting_model(model, masker, objective)
        assert shipped is not None and shipped.path == NONBLIND_K3
    settings = shipped.extra["pretrained"]
    assert settings["context_frames"] == 3 and settings["objective"] == "neighbor2neighbor"
    assert settings["images"] == load_checkpoint(NONBLIND).extra["pretrained"]["images"]
    assert shipped.masker_config.context_frames == 3 and not shipped.masker_config.causal
    assert starting_model(model, masker, "noise2self") is None
    causal = make(NetworkOptions, context_frames=3, causal_context=True)
    assert starting_model(causal.model_config(), causal.masker_config(), "binomial") is None
    unregistered = replace(masker, register=False)  # registration only aligns: it loads
    assert starting_model(model, unregistered, "binomial") is not None


def test_a_given_starting_model_must_fit_and_says_why_not(tmp_path):
    """A model file the user names is used where it fits; otherwise the start stops with
    the reason (missing, unreadable, another objective, other options) instead of quietly
    starting from random weights, as a misfit shipped file does."""
    network = make(NetworkOptions)
    model, masker = network.model_config(), network.masker_config()
    own = tmp_path / "own.pt"
    shutil.copy(BLIND, own)
    assert starting_model(model, masker, "noise2self", own).path == own
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    cases = [
        (tmp_path / "absent.pt", model, masker, "noise2self", "no such file"),
        (broken, model, masker, "noise2self", ""),
        (NONBLIND, model, masker, "noise2self", "trained for objective"),
        (own, model, masker, "neighbor2neighbor", "trained for objective noise2self"),
        (own, replace(model, width=8), masker, "noise2self", "does not fit"),
        (own, model, replace(masker, grid_size=2), "noise2self", "does not fit"),
        (own, model, replace(masker, context_frames=3), "noise2self", "context_frames 3"),
    ]
    for path, model_config, masker_config, objective, reason in cases:
        with pytest.raises(UsageError, match=f"pretrained_model {path}: .*{reason}"):
            starting_model(model_config, masker_config, objective, path)
    # the shipped file that does not fit: None, the network starts from random weights
    assert starting_model(replace(model, width=8), masker) is None


def test_a_given_starting_model_needs_a_fresh_start_from_a_pretrained_model(tmp_path):
    """pretrained_model only says where a network without a checkpoint begins: with a
    checkpoint given (or, in the daemon, pretrained off) it would be ignored, so it is
    refused; for ``train``, whose pretrained is off by default, naming it is enough."""
    with pytest.raises(UsageError, match="needs pretrained and no ckpt"):
        make(TrainingOptions, pretrained=False, pretrained_model=BLIND)
    with pytest.raises(UsageError, match="needs pretrained and no ckpt"):
        make(TrainingOptions, ckpt=BLIND, pretrained_model=BLIND)
    with pytest.raises(UsageError, match="give it or --ckpt"):
        make(TrainConfig, h5=BLIND, ckpt=BLIND, pretrained_model=BLIND)
    assert make(TrainingOptions, pretrained_model=BLIND).pretrained_model == BLIND
    # offline, naming the file is enough (train's pretrained is off by default)
    assert make(TrainConfig, h5=BLIND, pretrained_model=BLIND).starts_pretrained


@pytest.mark.parametrize(
    "augmented, doses, sums",
    [(False, (2.0, 300.0), (5839.613, 5939.492)), (True, (1.0, 300.0), (-2289.820, -2066.964))],
)
def test_training_batches_are_those_the_shipped_files_were_made_from(augmented, doses, sums):
    """The first batch of the shipped recipe (augmented) and of the plain one
    (``--no-augment``), pinned: a change to the images or the draws (which would stop the
    slow test below reproducing a shipped file) fails here in seconds."""
    noisy, clean = batch(
        training_images(augmented), np.random.default_rng(0), 16, 64, doses, augmented=augmented
    )
    assert (float(noisy.sum()), float(clean.sum())) == pytest.approx(sums, abs=0.01)


def _train(tmp_path, name: str, *args: str, timeout: float = 600) -> dict[str, torch.Tensor]:
    out = tmp_path / name
    subprocess.run(
        [sys.executable, "-m", "n2s_stream.pretrained", "--out", str(out), *args],
        check=True,
        capture_output=True,
        timeout=timeout,
    )
    return load_checkpoint(out).state_dict


@pytest.mark.parametrize(
    "objective, augment",
    [("noise2self", "--augment"), ("neighbor2neighbor", "--no-augment")],
)
def test_training_script_is_deterministic(tmp_path, objective, augment):
    first, second = (
        _train(tmp_path, f"{k}.pt", "--steps", "3", "--objective", objective, augment)
        for k in (1, 2)
    )
    assert all(torch.equal(first[key], second[key]) for key in first)


@pytest.mark.slow  # the whole training runs: 25-27 minutes each on one core
@pytest.mark.parametrize("path", sorted(set(SHIPPED.values())), ids=lambda path: path.stem)
def test_training_script_reproduces_the_shipped_model(tmp_path, path):
    settings = load_checkpoint(path).extra["pretrained"]
    assert settings.get("init") is None  # trained from scratch: the script alone remakes it
    recorded = ("steps", "seed", "batch", "patch", "lr", "min_dose", "max_dose", "objective")
    options = [
        item for key in recorded for item in (f"--{key.replace('_', '-')}", str(settings[key]))
    ]
    # older records: the default network's
    options += ["--width", str(settings.get("width", 16)), "--depth", str(settings.get("depth", 2))]
    options += ["--context-frames", str(settings.get("context_frames", 1))]
    options += ["--augment" if settings.get("augment") else "--no-augment"]
    again = _train(tmp_path, "again.pt", *options, timeout=2400)
    shipped = load_checkpoint(path).state_dict
    for key, value in shipped.items():
        torch.testing.assert_close(again[key], value, rtol=1e-4, atol=1e-5)


def test_a_context_model_is_trained_on_neighbours_and_fits_only_its_context(tmp_path):
    """``--context-frames 3`` trains on the centre patch and two neighbouring frames of
    the same window, each with noise of its own (mostly within a pixel of the centre,
    as registration leaves them), toward the clean centre; the file starts only a network
    of 3 centred frames."""
    noisy, clean = batch(
        training_images(True),
        np.random.default_rng(0),
        16,
        64,
        (100.0, 100.0),
        augmented=True,
        context_frames=3,
    )
    assert noisy.shape == (16, 3, 64, 64) and clean.shape == (16, 1, 64, 64)
    centre, neighbour = noisy[:, 0], noisy[:, 1]
    same_place = torch.corrcoef(torch.stack([centre.flatten(), neighbour.flatten()]))[0, 1]
    assert 0.5 < same_place < 0.99  # the same structure near the same place, own noise
    out = tmp_path / "k3.pt"
    command = [
        sys.executable,
        "-m",
        "n2s_stream.pretrained",
        "--objective",
        "neighbor2neighbor",
        "--context-frames",
        "3",
        "--steps",
        "2",
        "--out",
        str(out),
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    refusals = [
        (["neighbor2neighbor", "--context-frames", "2"], "must be odd"),
        (["neighbor2neighbor", "--context-frames", "3", "--width", "8"], "need --out"),
        (["noise2self", "--context-frames", "3"], "need --out"),  # none shipped
    ]
    before = {path: path.read_bytes() for path in SHIPPED.values()}
    for refused, why in refusals:
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "n2s_stream.pretrained",
                "--objective",
                *refused,
                "--steps",
                "1",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 2 and why in run.stderr
    assert all(path.read_bytes() == content for path, content in before.items())
    network = make(NetworkOptions, context_frames=3)
    model, masker = network.model_config(), network.masker_config()
    assert starting_model(model, masker, "binomial", out).path == out
    single = make(NetworkOptions)
    with pytest.raises(UsageError, match="a model of 3 frames does not fit context_frames 1"):
        starting_model(single.model_config(), single.masker_config(), "binomial", out)
    causal = make(NetworkOptions, context_frames=3, causal_context=True)
    with pytest.raises(UsageError, match="does not fit"):
        starting_model(causal.model_config(), causal.masker_config(), "binomial", out)
