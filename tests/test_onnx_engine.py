"""The ONNX Runtime engine gives the torch model's answers and follows new weights (the
daemon on it: tests/test_daemon.py::test_faster_engines_write_the_same_series)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from n2s_stream.models import ModelConfig, build_model
from n2s_stream.onnx_engine import OnnxRuntimeModel

pytest.importorskip("onnxruntime", reason="optional extra [onnx] not installed")


@pytest.mark.parametrize(("shape", "channels"), [((32, 32), 1), ((30, 37), 1), ((24, 40), 3)])
def test_matches_the_torch_model_and_follows_new_weights(shape, channels):
    model = build_model(ModelConfig(in_channels=channels, width=8, depth=2)).eval()
    engine = OnnxRuntimeModel(model, threads=1)
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
        engine.refresh()
        np.testing.assert_allclose(engine(x).numpy(), changed.numpy(), atol=1e-5)
