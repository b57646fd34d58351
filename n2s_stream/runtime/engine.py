"""What runs the network for the daemon: torch (optionally compiled) or ONNX Runtime, with
the weights of the snapshot it is given.

Weights are swapped into one module with ``load_state_dict``; a compiled wrapper of it sees
them (parameters are inputs of the compiled graph). ONNX Runtime needs a new export for new
weights (0.1 - 0.5 s of CPU): it runs in a background thread while frames go on through the
current sessions, at most every ``onnx_reload_seconds``, and is swapped in between batches.
The version `use` returns is always the one whose weights run.

The ``passthrough`` engine returns each frame as it came (no network): the ceiling of the
pipeline itself, and a way to commission a beamline's data path before denoising is on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from n2s_stream.config import InferenceOptions
from n2s_stream.models import use_fast_layout
from n2s_stream.n2s.denoising import HostStaging, denoise_normalized
from n2s_stream.n2s.masking import Masker
from n2s_stream.runtime.metrics import Metrics
from n2s_stream.runtime.onnx_engine import OnnxRuntimeModel
from n2s_stream.runtime.snapshot import Snapshot

log = logging.getLogger(__name__)


def max_batch(options: InferenceOptions, device: torch.device) -> int:
    """Frames per forward pass when they queue: on CPU one at a time is faster than
    batches (benchmarks/daemon_memory.py: 39.6 vs 33.3 frames/s at 256x256;
    daemon_vs_offline.py: 0.85x with 8), on a GPU batches keep it busy."""
    if options.max_batch:
        return options.max_batch
    return 8 if device.type == "cuda" else 1


class Engine:
    """Denoises normalised ``(n, K, H, W)`` stacks with the newest weights it was given."""

    def __init__(
        self,
        model: nn.Module,
        masker: Masker,
        *,
        device: torch.device,
        options: InferenceOptions,
        metrics: Metrics,
    ) -> None:
        self.model = use_fast_layout(model, device)
        self.masker, self.device, self.options, self.metrics = masker, device, options, metrics
        self.forward: Callable[[torch.Tensor], torch.Tensor] = self.model
        self._onnx: OnnxRuntimeModel | None = None
        if options.engine == "onnxruntime":
            self._onnx = OnnxRuntimeModel(self.model, torch.get_num_threads())
            self.forward = self._onnx
        elif options.compile:
            self.forward = torch.compile(self.model)
        self.version = -1
        self._loaded_at = 0.0
        self._staging = HostStaging()  # pinned host memory for a CUDA device

    def use(self, snapshot: Snapshot) -> int:
        """Run ``snapshot``'s weights from now on (ONNX: once exported); returns the
        version in force."""
        if self._onnx is not None and self.version >= 0:
            self._follow_export(snapshot)
        elif snapshot.version != self.version:  # (ONNX: the first weights, before a session)
            self.model.load_state_dict(snapshot.weights)
            self.model.eval()
            self._loaded_at = time.monotonic()
            self._now_using(snapshot.version)
        return self.version

    def __call__(self, stacks: np.ndarray) -> np.ndarray:
        """The denoised centre frames ``(n, H, W)``, normalised."""
        if self.options.engine == "passthrough":
            return stacks if stacks.ndim == 3 else stacks[:, 0]  # channel 0: the frame
        with self.metrics.forward_seconds.time():
            return denoise_normalized(
                self.forward,
                self.masker,
                stacks,
                jinv=self.options.jinv,
                device=self.device,
                precision=self.options.precision,
                tile=self.options.tile,
                overlap=self.options.tile_overlap,
                staging=self._staging,
            )

    def close(self) -> None:
        """Wait for an ONNX export under way."""
        if self._onnx is not None:
            self._onnx.close()

    def _follow_export(self, snapshot: Snapshot) -> None:
        assert self._onnx is not None
        exported = self._onnx.finished_export()
        if exported is not None:
            self._now_using(exported)
        if (
            snapshot.version != self.version
            and not self._onnx.exporting
            and time.monotonic() - self._loaded_at >= self.options.onnx_reload_seconds
        ):
            self._onnx.start_export(snapshot.weights, snapshot.version)
            self._loaded_at = time.monotonic()

    def _now_using(self, version: int) -> None:
        self.version = version
        self.metrics.model_version.set(version)
        log.info("inference now uses model version %d", version)
