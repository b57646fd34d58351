"""Denoised frames republished on a ZeroMQ PUB socket (native protocol) for live viewers.

PUB never blocks the daemon: a viewer too slow to keep up loses frames (ZeroMQ's
high-water mark), the output files do not.
"""

from __future__ import annotations

import logging

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

    def __init__(self, endpoint: str, hwm: int = 100) -> None:
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.PUB)
        self._socket.setsockopt(zmq.SNDHWM, hwm)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(endpoint)
        log.info("publishing denoised frames on %s", endpoint)

    @classmethod
    def from_context(cls, context: SinkContext) -> ZmqRepublishSink:
        """Bound where ``zmq_out`` says."""
        assert context.config.zmq.out is not None
        return cls(context.config.zmq.out)

    def open_series(self, start: SeriesStart) -> None:
        """Nothing to announce: the first frame names its series."""

    def write(self, frame: Frame, denoised: np.ndarray, meta: FrameMeta) -> None:
        """Send one denoised frame, dropped by ZeroMQ when no viewer keeps up."""
        self._socket.send_multipart(
            protocols.native_frame(frame.series, frame.index, denoised, "raw"), zmq.NOBLOCK)

    def end_series(self, end: SeriesEnd) -> None:
        """Send the end of a finished series."""
        if end.complete:
            self._socket.send_multipart(protocols.native_end(end.series), zmq.NOBLOCK)

    def close(self) -> None:
        """Unbind and release the socket."""
        self._socket.close()
        self._context.term()
