"""The ONNX Runtime engine gives the torch model's answers and follows new weights (the
daemon on it: tests/integration/test_daemon.py::test_faster_engines_write_the_same_series)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from n2s_stream.models import build_model
from n2s_stream.n2s.specs import ModelConfig
from n2s_stream.runtime.onnx_engine import OnnxRuntimeModel

pytest.importorskip("onnxruntime", reason="optional extra [onnx] not installed")


@pytest.mark.parametrize("graphs", ["fixed shape", "free size"])
@pytest.mark.parametrize(("shape", "channels"), [((32, 32), 1), ((30, 37), 1), ((24, 40), 3)])
def test_matches_the_torch_model_and_follows_new_weights(shape, channels, graphs):
    model = build_model(ModelConfig(in_channels=channels, width=8, depth=2)).eval()
    engine = OnnxRuntimeModel(
        model, threads=1, fixed_shape_max_pixels=10**6 if graphs == "fixed shape" else 0
    )
    x = torch.randn(2, channels, *shape)
    with torch.inference_mode():
        expected = model(x)
        np.testing.assert_allclose(engine(x).numpy(), expected.numpy(), atol=1e-5)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.mul_(1.5)
        changed = model(x)
        assert not torch.allclose(changed, expected, atol=1e-3)
        np.testing.assert_allclose(engine(x).numpy(), expected.numpy(), atol=1e-5)  # stale
        engine.start_export(model.state_dict(), version=1)
        deadline = time.monotonic() + 30
        while engine.finished_export() is None:
            assert time.monotonic() < deadline, "the export never finished"
            time.sleep(0.01)
        np.testing.assert_allclose(engine(x).numpy(), changed.numpy(), atol=1e-5)
    engine.close()


def test_background_export_is_swapped_in_only_when_finished():
    model = build_model(ModelConfig(width=8, depth=2)).eval()
    engine = OnnxRuntimeModel(model, threads=1)
    x = torch.randn(1, 1, 32, 32)
    with torch.inference_mode():
        old = model(x)
        engine(x)  # a session for this frame kind exists before the export
        doubled = {k: v * 2 for k, v in model.state_dict().items()}
        new_model = build_model(ModelConfig(width=8, depth=2)).eval()
        new_model.load_state_dict(doubled)
        new = new_model(x)
        engine.start_export(doubled, version=7)
        assert engine.exporting
        with pytest.raises(RuntimeError, match="already running"):
            engine.start_export(doubled, version=8)
        np.testing.assert_allclose(engine(x).numpy(), old.numpy(), atol=1e-5)
        deadline = time.monotonic() + 30
        while (version := engine.finished_export()) is None:
            assert time.monotonic() < deadline, "the export never finished"
            np.testing.assert_allclose(engine(x).numpy(), old.numpy(), atol=1e-5)
            time.sleep(0.01)
        assert version == 7 and not engine.exporting
        np.testing.assert_allclose(engine(x).numpy(), new.numpy(), atol=1e-5)
        # a frame kind first seen after the swap is exported from the new weights too
        odd = torch.randn(1, 1, 30, 37)
        np.testing.assert_allclose(engine(odd).numpy(), new_model(odd).numpy(), atol=1e-5)
    engine.close()
