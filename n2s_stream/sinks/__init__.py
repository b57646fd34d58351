"""Where denoised frames go. Each sink implements `Sink`; the inference loop calls every
sink in order for each denoised frame and knows none of them by name.

A sink's failure policy is part of it. A ``required`` sink (the HDF5 output) is one whose
failure loses the frame: an OSError from it (disk, file system) stops intake and the
daemon exits 1; any other exception is taken as a bug met by odd input and refuses the
frames of that batch (``internal_error``), as everywhere in the loop. The other sinks
(viewers, republishing, the training tap) log and count any failure in
``n2s_sink_errors_total{sink}``, and the frame goes on to the next sink.

Built-in sinks are chosen by config (`make_sinks`); more come from ``sinks = ["module:
factory"]``, each factory called with the `SinkContext` and returning a `Sink`.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from n2s_stream.errors import UsageError
from n2s_stream.frames import Frame, SeriesEnd
from n2s_stream.writer import OutputAccess

if TYPE_CHECKING:
    from n2s_stream.buffer import RollingBuffer
    from n2s_stream.coldstart import ColdStart
    from n2s_stream.config import DaemonConfig
    from n2s_stream.metrics import Metrics
    from n2s_stream.preview import Preview
    from n2s_stream.state import StateDir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SeriesStart:
    """The first frame of ``series`` this run is about to be written: ``output`` is the
    file the source named for it, ``frame_shape`` and ``dtype`` are the raw frames',
    ``notes`` what the output should record about how it is made (cold start),
    ``attribute_names`` the names of the numbers that came with the first frame, and
    ``mean_count`` the first frame's mean over its measured pixels (a lossy codec's error
    bound follows its noise)."""

    series: str
    output: Path
    frame_shape: tuple[int, int]
    dtype: np.dtype
    notes: dict[str, str] = field(default_factory=dict)
    attribute_names: tuple[str, ...] = ()
    mean_count: float = 1.0


@dataclass(frozen=True)
class FrameMeta:
    """How a denoised frame was made: the model ``version`` and ``denoiser`` (0 network,
    1 classical), its ``valid`` pixels, and the normalised ``network_input`` ``(K, H, W)``
    (the frame and its context) that online training learns from."""

    version: int
    denoiser: int
    valid: np.ndarray
    network_input: np.ndarray


class Abandoned(Exception):
    """Raised by a sink that gives up waiting (for disk space) because the daemon stops:
    the inference loop then stops writing and counts what it did not write."""


@runtime_checkable
class Sink(Protocol):
    """What happens to denoised frames. Called from the inference thread only."""

    name: str
    required: bool  # True: its failure loses the frame (see above); False: counted, go on

    def open_series(self, start: SeriesStart) -> None:
        """A series' first frame of this run is coming."""

    def write(self, frame: Frame, denoised: np.ndarray, meta: FrameMeta) -> None:
        """Take one denoised frame (float32, detector units; do not modify it)."""

    def end_series(self, end: SeriesEnd) -> None:
        """No more frames of ``end.series`` (``end.complete``: the source said so; else
        the series went idle and may resume later)."""

    def close(self) -> None:
        """The daemon stops: release everything."""


@runtime_checkable
class RefinedListener(Protocol):
    """A sink that also shows refined frames (``refine.py``): told, from the refiner's
    thread, of each output to which refined frames were appended."""

    def refined(self, output: Path) -> None:
        """``output`` now holds more of ``/entry/refined/data`` (all its frames, or all
        of them up to where its series went idle)."""


@dataclass
class SinkContext:
    """What the daemon hands to sink factories: the whole config (each sink reads its
    own options), metrics, the state dir, the stop flag (a sink waiting for something,
    such as disk space, gives up once it is set), the shared tables that the
    preview page and the trainer read, and the cold start (None: none)."""

    config: DaemonConfig
    metrics: Metrics
    state: StateDir
    stopping: threading.Event
    preview: Preview
    buffer: RollingBuffer
    val_buffer: RollingBuffer
    cold_start: ColdStart | None = None
    outputs: OutputAccess = field(default_factory=OutputAccess)  # shared with the refiner


SinkFactory = Callable[[SinkContext], Sink]


class SinkChain:
    """The sinks in order, each called with its failure policy."""

    def __init__(self, sinks: Sequence[Sink], metrics: Metrics) -> None:
        self.sinks = list(sinks)
        self._metrics = metrics

    def open_series(self, start: SeriesStart) -> None:
        """Tell every sink a series starts."""
        for sink in self.sinks:
            self._call(sink, "open_series", start)

    def write(self, frame: Frame, denoised: np.ndarray, meta: FrameMeta) -> None:
        """Hand one denoised frame to every sink."""
        for sink in self.sinks:
            self._call(sink, "write", frame, denoised, meta)

    def end_series(self, end: SeriesEnd) -> None:
        """Tell every sink a series ended."""
        for sink in self.sinks:
            self._call(sink, "end_series", end)

    def tick(self) -> None:
        """Once per round of the inference loop (at least every 0.25 s): sinks that have
        a ``tick()`` method (the HDF5 output flushes by time) do their periodic work."""
        for sink in self.sinks:
            if hasattr(sink, "tick"):
                self._call(sink, "tick")

    def close(self) -> None:
        """Close every sink; a failure of one does not keep the others open."""
        for sink in self.sinks:
            try:
                sink.close()
            except Exception:
                log.exception("closing sink %s failed", sink.name)
                self._metrics.sink_errors.labels(sink=sink.name).inc()

    def _call(self, sink: Sink, method: str, *args: object) -> None:
        try:
            getattr(sink, method)(*args)
        except Exception as exc:
            if sink.required:
                raise
            log.warning("sink %s: %s failed: %s", sink.name, method, exc)
            self._metrics.sink_errors.labels(sink=sink.name).inc()


def load_factory(spec: str) -> SinkFactory:
    """The factory named ``module:attribute`` (a class or a function of `SinkContext`)."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise UsageError(f"sinks: {spec!r} is not 'module:factory'")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise UsageError(f"sinks: cannot load {spec!r}: {exc}") from exc
    if not callable(factory):
        raise UsageError(f"sinks: {spec!r} is not callable")
    return factory


def make_sinks(context: SinkContext, *, train: bool, refine: bool) -> list[Sink]:
    """The sinks this config asks for, in the order they are called: the HDF5 output
    first (required), the training tap (when training), the refiner's raw spool (when
    refining),
    republishing (ZeroMQ, PVA), the preview table, Tiled, then the configured extra
    sinks."""
    from n2s_stream.sinks.hdf5 import Hdf5Sink
    from n2s_stream.sinks.preview import PreviewSink
    from n2s_stream.sinks.pva import PvaServeSink
    from n2s_stream.sinks.republish import ZmqRepublishSink
    from n2s_stream.sinks.spool import RawSpool
    from n2s_stream.sinks.training_tap import TrainingTap

    config = context.config
    output = Hdf5Sink.from_context(context)
    sinks: list[Sink] = [output]
    if train:
        sinks.append(TrainingTap.from_context(context))
    if refine:
        sinks.append(RawSpool.from_context(context))
    if config.zmq.out:
        sinks.append(ZmqRepublishSink.from_context(context))
    if config.pva.serve:
        sinks.append(PvaServeSink.from_context(context))
    if config.service.metrics_port >= 0:
        sinks.append(PreviewSink.from_context(context))
    if config.tiled.uri:
        from n2s_stream.sinks.tiled import TiledSink  # needs the optional tiled client

        sinks.append(
            TiledSink.from_context(
                context, rows_written=output.rows_written, stored_dtype=output.stored_dtype
            )
        )
    for spec in config.output.sinks:
        sink = load_factory(spec)(context)
        if not isinstance(sink, Sink):
            raise UsageError(
                f"sinks: {spec!r} made {sink!r}, which is not a Sink "
                "(open_series, write, end_series, close, name, required)"
            )
        log.info("sink %s from %s", sink.name, spec)
        sinks.append(sink)
    return sinks
