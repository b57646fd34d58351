"""Denoised frames republished on a ZeroMQ PUB socket (native protocol) for live viewers.

Never blocks the daemon: PUB drops, per viewer, what a viewer too slow to keep up cannot
take (its high-water mark reached), and the other viewers still get every frame. ZeroMQ
does not report those drops, so they are not counted (``XPUB_NODROP`` would report them,
but then one slow viewer would stop the frames for every viewer).
"""

from __future__ import annotations

import logging

import numpy as np
import zmq

from n2s_stream.formats import protocols
from n2s_stream.sinks import SinkContext
from n2s_stream.stages import Frame, FrameMeta, SeriesEnd, SeriesStart

log = logging.getLogger(__name__)


class ZmqRepublishSink:
    """Publishes each denoised frame (raw float32) and each series' end."""

    name = "zmq_out"
    required = False

    def __init__(self, endpoint: str, hwm: int = 100) -> None:
        self.endpoint, self.hwm = endpoint, hwm
        self._context: zmq.Context | None = None
        self._socket: zmq.Socket | None = None

    def start(self) -> None:
        """Bind the PUB socket (ZMQError where the endpoint is taken)."""
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.PUB)
        self._socket.setsockopt(zmq.SNDHWM, self.hwm)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(self.endpoint)
        log.info("publishing denoised frames on %s", self.endpoint)

    @classmethod
    def from_context(cls, context: SinkContext) -> ZmqRepublishSink:
        """Bound where ``zmq_out`` says."""
        assert context.config.zmq.out is not None
        return cls(context.config.zmq.out)

    def open_series(self, start: SeriesStart) -> None:
        """Nothing to announce: the first frame names its series."""

    def write(self, frame: Frame, denoised: np.ndarray, meta: FrameMeta) -> None:
        """Send one denoised frame (dropped for a viewer that cannot take it now)."""
        self._send(protocols.native_frame(frame.series, frame.index, denoised, "raw"))

    def end_series(self, end: SeriesEnd) -> None:
        """Send the end of a finished series."""
        if end.complete:
            self._send(protocols.native_end(end.series))

    def _send(self, message: list[bytes]) -> None:
        assert self._socket is not None, "start() first"
        self._socket.send_multipart(message, zmq.NOBLOCK)  # PUB never raises Again

    def close(self) -> None:
        """Unbind and release the socket (nothing to do if never started)."""
        if self._socket is not None:
            self._socket.close()
        if self._context is not None:
            self._context.term()
        self._socket = self._context = None
