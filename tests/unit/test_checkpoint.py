"""Checkpoints: plain dicts, safe loading, and clear errors for the wrong file or model."""

from __future__ import annotations

import pickle

import pytest
import torch

from n2s_stream.errors import CheckpointError
from n2s_stream.formats.checkpoint import load_checkpoint, save_checkpoint
from n2s_stream.models import build_model
from n2s_stream.n2s.normalize import Normalizer
from n2s_stream.n2s.specs import MaskerConfig, ModelConfig


def _save(path, config=None):
    config = config or ModelConfig(width=4, depth=1)
    model = build_model(config)
    return save_checkpoint(
        path,
        model=model,
        model_config=config,
        masker_config=MaskerConfig(),
        normalizer=Normalizer("meanstd", 3.0, 2.0),
        step=7,
        version=7,
    ), model


def test_round_trip(tmp_path):
    path, model = _save(tmp_path / "c.pt")
    checkpoint = load_checkpoint(path)
    assert checkpoint.step == 7 and checkpoint.normalizer.shift == 3.0
    rebuilt = checkpoint.build_model()
    x = torch.randn(1, 1, 8, 8)
    assert torch.allclose(rebuilt(x), model.eval()(x))
    assert not (tmp_path / "c.pt.tmp").exists()


def test_other_architecture_is_a_clear_error(tmp_path):
    path, _ = _save(tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match=r"checkpoint is for model name=unet.*width=4"):
        load_checkpoint(path).check_compatible(ModelConfig(width=8, depth=1))


def test_weights_that_do_not_fit_their_config(tmp_path):
    path, _ = _save(tmp_path / "c.pt")
    raw = torch.load(path, weights_only=True)
    raw["model_config"]["width"] = 6
    torch.save(raw, path)
    with pytest.raises(CheckpointError, match="weights do not fit the saved model config"):
        load_checkpoint(path).build_model()


def test_pickled_objects_are_never_executed(tmp_path):
    class Evil:
        def __reduce__(self):
            return (exec, ("import pathlib; pathlib.Path('PWNED').touch()",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"format": "x", "payload": Evil()}, handle)
    with pytest.raises(CheckpointError, match="not a loadable checkpoint"):
        load_checkpoint(path)
    assert not (tmp_path / "PWNED").exists()


def test_foreign_and_corrupt_files(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not an n2s-stream checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    (tmp_path / "bad.pt").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match=r"bad\.pt: not a loadable checkpoint"):
        load_checkpoint(tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "absent.pt")
