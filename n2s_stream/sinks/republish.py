"""Denoised frames republished on a ZeroMQ PUB socket (native protocol) for live viewers.

Never blocks the daemon: a message that a viewer too slow to keep up cannot take (ZeroMQ's
high-water mark reached) is not sent and is counted in
``n2s_output_dropped_total{output="zmq_out"}``; the output files lose nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import zmq

from n2s_stream.frames import Frame, SeriesEnd
from n2s_stream.sinks import FrameMeta, SeriesStart, SinkContext
from n2s_stream.sources import protocols

log = logging.getLogger(__name__)


class ZmqRepublishSink:
    """Publishes each denoised frame (raw float32) and each series' end."""

    name = "zmq_out"
    required = False

    def __init__(self, endpoint: str, hwm: int = 100,
                 dropped: Callable[[], None] = lambda: None) -> None:
        self._dropped = dropped
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.PUB)
        self._socket.setsockopt(zmq.SNDHWM, hwm)
        self._socket.setsockopt(zmq.XPUB_NODROP, 1)  # full: EAGAIN (counted), not silent
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(endpoint)
        log.info("publishing denoised frames on %s", endpoint)

    @classmethod
    def from_context(cls, context: SinkContext) -> ZmqRepublishSink:
        """Bound where ``zmq_out`` says."""
        assert context.config.zmq.out is not None
        counter = context.metrics.output_dropped.labels(output="zmq_out")
        return cls(context.config.zmq.out, dropped=counter.inc)

    def open_series(self, start: SeriesStart) -> None:
        """Nothing to announce: the first frame names its series."""

    def write(self, frame: Frame, denoised: np.ndarray, meta: FrameMeta) -> None:
        """Send one denoised frame, or count it when a viewer cannot take it now."""
        self._send(protocols.native_frame(frame.series, frame.index, denoised, "raw"))

    def end_series(self, end: SeriesEnd) -> None:
        """Send the end of a finished series."""
        if end.complete:
            self._send(protocols.native_end(end.series))

    def _send(self, message: list[bytes]) -> None:
        try:
            self._socket.send_multipart(message, zmq.NOBLOCK)
        except zmq.Again:
            self._dropped()

    def close(self) -> None:
        """Unbind and release the socket."""
        self._socket.close()
        self._context.term()
