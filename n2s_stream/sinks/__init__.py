"""Where denoised frames go. Each sink implements `n2s_stream.stages.Sink` (the
interface, its failure policy and `SinkChain` live there, beside the frames, since the
inference loop knows sinks only through it and none of them by name).

Built-in sinks are chosen by config (`make_sinks`); more come from ``sinks = ["module:
factory"]``, each factory called with the `SinkContext` and returning a `Sink`.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from n2s_stream.errors import UsageError
from n2s_stream.formats.writer import OutputAccess
from n2s_stream.stages import Sink

if TYPE_CHECKING:
    from n2s_stream.config import DaemonConfig
    from n2s_stream.runtime.buffer import RollingBuffer
    from n2s_stream.runtime.coldstart import ColdStart
    from n2s_stream.runtime.metrics import Metrics
    from n2s_stream.runtime.preview import Preview
    from n2s_stream.runtime.state import StateDir

log = logging.getLogger(__name__)


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
