"""The network's forward pass through ONNX Runtime (optional extra ``[onnx]``).

On this project's CPU machine ONNX Runtime ran the default UNet 1.6x (512x512) to 1.9x
(1024x1024) faster than torch's channels_last forward (benchmarks/model_speed.py). The graph
is exported with the weights baked in (ONNX Runtime pre-packs them; fed as inputs instead
it ran at half speed), so it is exported again whenever training publishes new weights.
Exporting traces the model on a small frame with height and width left free, so it costs
about a tenth of a second whatever the detector's frame size.
"""

from __future__ import annotations

import io
import logging
import warnings

import torch
from torch import nn

from n2s_stream.errors import UsageError

log = logging.getLogger(__name__)

# Frames are traced at 64 + (size mod 64): the UNet pads to a multiple of 2**depth, a
# branch the trace fixes, and the same remainder keeps the same branch.
TRACE_BASE = 64


def require_onnxruntime() -> None:
    """Refuse early, with the fix, when the optional extra is not installed."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise UsageError("engine onnxruntime needs the optional extra: "
                         "pip install 'n2s-stream[onnx]'") from exc


class OnnxRuntimeModel:
    """Called like the torch model (``(N, C, H, W)`` tensor in, tensor out, on the CPU);
    runs ONNX Runtime sessions exported from ``model``'s current weights."""

    def __init__(self, model: nn.Module, threads: int) -> None:
        require_onnxruntime()
        self.model, self.threads = model, threads
        self._sessions: dict[tuple[int, int, int], object] = {}

    def refresh(self) -> None:
        """The weights of ``model`` changed: the next call exports them again."""
        self._sessions.clear()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        key = (x.shape[1], height % TRACE_BASE, width % TRACE_BASE)
        session = self._sessions.get(key)
        if session is None:
            session = self._sessions[key] = self._export(*key)
        output = session.run(None, {"x": x.detach().contiguous().numpy()})[0]
        return torch.from_numpy(output)

    def _export(self, channels: int, rem_h: int, rem_w: int):
        import onnxruntime

        example = torch.zeros(1, channels, TRACE_BASE + rem_h, TRACE_BASE + rem_w)
        graph = io.BytesIO()
        with warnings.catch_warnings():  # the tracer's notes on the padding branch
            warnings.simplefilter("ignore")
            torch.onnx.export(self.model.eval(), (example,), graph, input_names=["x"],
                              output_names=["y"], dynamo=False,
                              dynamic_axes={"x": {0: "n", 2: "h", 3: "w"},
                                            "y": {0: "n", 2: "h", 3: "w"}})
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # warnings about unused initialisers are noise here
        log.debug("exported the model to ONNX for %d-channel frames", channels)
        return onnxruntime.InferenceSession(graph.getvalue(), options,
                                            providers=["CPUExecutionProvider"])
