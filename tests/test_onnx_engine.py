"""The ONNX Runtime engine gives the torch model's answers, follows new weights, and the
daemon runs on it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from daemon_helpers import DaemonProcess, read_output, start_writer

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


def test_daemon_on_onnxruntime_writes_every_frame_with_trained_weights(tmp_path):
    daemon = DaemonProcess(tmp_path, "--engine", "onnxruntime", "--no-cold-start",
                           "--publish-every", "10")
    daemon.wait_ready()
    writer = start_writer(daemon.watch, frames=40, rate=4, shape="32x32")
    assert writer.wait(timeout=120) == 0
    daemon.wait_for(r"closed output .*scan_0001_n2s.h5 \(40 frames\)", timeout=240)
    assert daemon.terminate() == 0
    frames, provenance = read_output(daemon.out / "scan_0001_n2s.h5")
    assert np.array_equal(provenance["source_frame"], np.arange(40))
    assert np.isfinite(frames).all() and provenance["model_version"][-1] > 0
