"""An inference loop wired as the daemon wires it (HDF5 output and training tap), on a
queue the test fills: for tests of the loop without sources or threads around it."""

from __future__ import annotations

import queue
import threading
from pathlib import Path

import torch
from torch import nn

from n2s_stream.config import InferenceOptions, NetworkOptions, OutputOptions, StorageOptions
from n2s_stream.n2s.masking import Masker
from n2s_stream.runtime.buffer import RollingBuffer
from n2s_stream.runtime.calibration import Calibration
from n2s_stream.runtime.engine import Engine
from n2s_stream.runtime.inference import InferenceLoop
from n2s_stream.runtime.metrics import Metrics
from n2s_stream.runtime.scheduler import Scheduler, Services
from n2s_stream.runtime.series import SeriesTracker
from n2s_stream.runtime.snapshot import ModelStore
from n2s_stream.sinks.hdf5 import Hdf5Sink
from n2s_stream.sinks.training_tap import TrainingTap
from n2s_stream.stages import Sink, SinkChain


def make_loop(
    state_dir: Path,
    frames: queue.Queue,
    *,
    model: nn.Module,
    store: ModelStore,
    metrics: Metrics,
    masker: Masker | None = None,
    options: InferenceOptions | None = None,
    max_batch: int = 1,
    buffer: RollingBuffer | None = None,
    val_buffer: RollingBuffer | None = None,
    extra_sinks: tuple[Sink, ...] = (),
) -> InferenceLoop:
    """An `InferenceLoop` over ``frames`` writing outputs as the daemon does."""
    from n2s_stream.runtime.state import StateDir

    masker = masker or Masker()
    options = options or InferenceOptions()
    if buffer is None:
        buffer = RollingBuffer(max_frames=8, max_bytes=2**20)
    if val_buffer is None:
        val_buffer = RollingBuffer(max_frames=8, max_bytes=2**20)
    output = Hdf5Sink(
        OutputOptions(storage=StorageOptions("float32", "none")),
        state=StateDir(state_dir),
        metrics=metrics,
        stopping=threading.Event(),
        config_text="",
    )
    sinks = [output, TrainingTap(buffer, val_buffer), *extra_sinks]
    loop = InferenceLoop(
        frames=frames,
        services=Services(store, metrics, Scheduler(frames), fail=lambda exc: None),
        options=options,
        engine=Engine(model, masker, device=torch.device("cpu"), options=options, metrics=metrics),
        series=SeriesTracker(masker.config, metrics, last_written=output.last_written),
        sinks=SinkChain(sinks, metrics.sink_error),
        calibration=Calibration(store, NetworkOptions(), None),
        cold_start=None,
    )
    loop.max_batch = max_batch  # the test's, not the one the options and device give
    return loop
