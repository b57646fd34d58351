"""The network's forward pass through ONNX Runtime (optional extra ``[onnx]``).

On this project's CPU machine ONNX Runtime ran the default UNet 1.6x (512x512) to 1.9x
(1024x1024) faster than torch's channels_last forward (benchmarks/model_speed.py). The graph
is exported with the weights baked in (ONNX Runtime pre-packs them; fed as inputs instead
it ran at half speed), so it is exported again whenever training publishes new weights.
Frames up to 1024x1024 get a graph traced at their exact shape (faster to run, 0.2 - 1 s
to export); larger ones share a graph traced on a small frame with height and width left
free (a tenth of a second to export whatever the frame size). The daemon exports in a
background thread (``start_export``) and swaps the new sessions in between frames
(``finished_export``), so frames never wait for an export.
"""

from __future__ import annotations

import copy
import io
import logging
import threading
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch
from torch import nn

from n2s_stream.config import ENGINES
from n2s_stream.errors import UsageError

if TYPE_CHECKING:
    import onnxruntime

log = logging.getLogger(__name__)

# Frames are traced at 64 + (size mod 64): the UNet pads to a multiple of 2**depth, a
# branch the trace fixes, and the same remainder keeps the same branch.
TRACE_BASE = 64
# Up to this many pixels a frame gets a graph of its exact shape, batch included: 1.20x
# (256x256) and 1.22x (1024x1024) the free-size graph here, for an export of 0.2 - 1 s
# instead of 0.06 s (with a free batch axis the gain was gone: 0.96x). Larger frames share
# the free-size graph: tracing them whole would cost seconds per export.
FIXED_SHAPE_MAX_PIXELS = 1024 * 1024


def check_engine(engine: str, device: torch.device) -> None:
    """Refuse, before any work, an engine this run cannot use: an unknown name, or ONNX
    Runtime off the CPU or without its optional extra."""
    if engine not in ENGINES:
        raise UsageError(f"engine {engine!r}: expected one of {', '.join(ENGINES)}")
    if engine == "onnxruntime":
        if device.type != "cpu":
            raise UsageError(f"engine onnxruntime runs on the CPU, not on {device}")
        require_onnxruntime()


def require_onnxruntime() -> None:
    """Refuse early, with the fix, when the optional extra is not installed."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise UsageError(
            "engine onnxruntime needs the optional extra: pip install 'n2s-stream[onnx]'"
        ) from exc


class OnnxRuntimeModel:
    """Called like the torch model (``(N, C, H, W)`` tensor in, tensor out, on the CPU);
    runs ONNX Runtime sessions exported from ``model``'s current weights."""

    def __init__(
        self, model: nn.Module, threads: int, fixed_shape_max_pixels: int = FIXED_SHAPE_MAX_PIXELS
    ) -> None:
        require_onnxruntime()
        self.model, self.threads = model, threads
        self.fixed_shape_max_pixels = fixed_shape_max_pixels
        self._sessions: dict[tuple, onnxruntime.InferenceSession] = {}  # by _graph_shape
        self._export_model = copy.deepcopy(model)  # touched by the export thread only
        self._exporter: ThreadPoolExecutor | None = None
        self._export: Future | None = None
        self._export_version = -1
        self._export_lock = threading.Lock()

    @property
    def exporting(self) -> bool:
        """True from ``start_export`` until ``finished_export`` has swapped its sessions in."""
        return self._export is not None

    def start_export(self, weights: dict[str, torch.Tensor], version: int) -> None:
        """Export ``weights`` for every frame kind seen so far, in a background thread;
        calls keep running the current sessions until ``finished_export`` swaps them."""
        if self._export is not None:
            raise RuntimeError("an export is already running")
        if self._exporter is None:
            self._exporter = ThreadPoolExecutor(1, thread_name_prefix="onnx-export")
        self._export = self._exporter.submit(self._export_weights, weights, list(self._sessions))
        self._export_version = version

    def finished_export(self) -> int | None:
        """If the background export is done, run its sessions from now on and return the
        version it exported (an export's error is raised here); else None.
        ``model`` gets the weights too, so frame kinds first seen later match them."""
        if self._export is None or not self._export.done():
            return None
        done, self._export = self._export, None
        weights, sessions = done.result()
        self.model.load_state_dict(weights)
        self._sessions = sessions
        return self._export_version

    def close(self) -> None:
        """Wait for an export under way and end the export thread."""
        if self._exporter is not None:
            self._exporter.shutdown(wait=True)
            self._exporter = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        key = self._graph_shape(*x.shape)
        session = self._sessions.get(key)
        if session is None:
            session = self._sessions[key] = self._session(self.model, key)
        output = session.run(None, {"x": x.detach().contiguous().numpy()})[0]
        return torch.from_numpy(output)

    def _export_weights(self, weights: dict[str, torch.Tensor], keys: list):
        """Sessions of ``weights`` for the frame kinds ``keys`` (in the export thread)."""
        self._export_model.load_state_dict(weights)
        return weights, {key: self._session(self._export_model, key) for key in keys}

    def _graph_shape(self, n: int, channels: int, height: int, width: int) -> tuple:
        """The input shape a graph is traced at, and the key of its session: the exact
        ``(n, C, H, W)`` for frames up to ``fixed_shape_max_pixels``, else a small frame
        with the same padding remainders and free batch, height and width (marked by
        ``None`` as batch size)."""
        if height * width <= self.fixed_shape_max_pixels:
            return (n, channels, height, width)
        return (None, channels, TRACE_BASE + height % TRACE_BASE, TRACE_BASE + width % TRACE_BASE)

    def _session(self, model: nn.Module, shape: tuple):
        """An ONNX Runtime session of ``model`` for inputs of ``shape`` (see
        ``_graph_shape``)."""
        import onnxruntime

        n, channels, height, width = shape
        example = torch.zeros(n or 1, channels, height, width)
        free = {0: "n", 2: "h", 3: "w"}
        graph = io.BytesIO()
        # Only the tracer's notes on the padding branch and the deprecation notices of the
        # TorchScript-based exporter used here (dynamo=False) are silenced; the warnings
        # filter is the process's, so exports never overlap (export thread, new frame kind).
        with self._export_lock, warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            torch.onnx.export(
                model.eval(),
                (example,),
                # torch's annotation says a path; the TorchScript exporter (dynamo=False)
                # writes to a file-like object as well (torch/onnx/_internal/torchscript_exporter)
                graph,  # type: ignore[arg-type]
                input_names=["x"],
                output_names=["y"],
                dynamo=False,
                dynamic_axes=None if n else {"x": free, "y": free},
            )
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        # Idle pool threads sleep instead of spinning: spinning took the cores from the
        # trainer and the next frame (256x256 at half rate: latency p50 54 -> 42 ms, p99
        # 135 -> 105 ms; the bare forward unchanged within this machine's noise)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3  # warnings about unused initialisers are noise here
        log.debug("exported the model to ONNX for input shape %s", shape)
        return onnxruntime.InferenceSession(
            graph.getvalue(), options, providers=["CPUExecutionProvider"]
        )
