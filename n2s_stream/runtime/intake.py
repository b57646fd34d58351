"""The bounded queue between the source and the inference loop, with its overflow policy.

By default a full queue holds the source back (backpressure: the frames stay in their
files, or on the detector's side of the socket) and the time waited is counted in
``n2s_source_blocked_seconds_total``. With ``drop_when_full`` a frame that finds the queue
full is dropped, logged and counted as rejected (``dropped_queue_full``), and only there:
the gap it leaves is not counted again as missing.

The queue is bounded in frames and in bytes (``queue_size``, ``queue_mb``): 64 frames of
256 x 256 are 8 MB, of an EIGER2 16M 2.3 GB. A frame always enters an empty queue.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from n2s_stream.runtime.metrics import Metrics
from n2s_stream.runtime.series import DroppedFrames
from n2s_stream.stages import Frame, SeriesEnd

log = logging.getLogger(__name__)


class FrameQueue(queue.Queue):
    """A FIFO of frames and series ends, full at ``maxsize`` items or ``max_bytes`` of
    frame data, whichever comes first."""

    def __init__(self, maxsize: int, max_bytes: int) -> None:
        super().__init__(maxsize)
        self.max_bytes = max_bytes
        self.bytes = 0

    def qsize(self) -> int:
        """Items waiting (``full()`` may say True with fewer, once the bytes are in)."""
        with self.mutex:
            return len(self.queue)

    def _qsize(self) -> int:  # queue.Queue's "full" and "empty" ask this, under its lock
        count = len(self.queue)
        return self.maxsize if count and self.bytes >= self.max_bytes else count

    def _put(self, item: Frame | SeriesEnd) -> None:
        super()._put(item)
        if isinstance(item, Frame):
            self.bytes += item.data.nbytes

    def _get(self) -> Frame | SeriesEnd:
        item = super()._get()
        if isinstance(item, Frame):
            self.bytes -= item.data.nbytes
        return item


class Intake:
    """Sources ``emit`` here (from their threads); the inference loop takes from ``queue``."""

    def __init__(
        self,
        *,
        size: int,
        drop_when_full: bool,
        metrics: Metrics,
        stopping: threading.Event,
        max_bytes: int = 2**62,
    ) -> None:
        self.queue: queue.Queue[Frame | SeriesEnd] = FrameQueue(size, max_bytes)
        self.dropped = DroppedFrames()
        self._drop_when_full = drop_when_full
        self._metrics = metrics
        self._stopping = stopping

    def emit(self, item: Frame | SeriesEnd) -> bool:
        """Queue an item; block while full (backpressure), give up once stopping (False).
        A series end is never dropped."""
        if isinstance(item, Frame):
            self._metrics.frames_received.inc()
            if self._drop_when_full:
                self._put_or_drop(item)
                return True
        started = time.monotonic()
        while True:
            try:
                self.queue.put(item, timeout=0.1)
                break
            except queue.Full:
                if self._stopping.is_set():
                    return False
        self._metrics.source_blocked.inc(time.monotonic() - started)
        self._metrics.queue_depth.set(self.queue.qsize())
        return True

    def reject(self, reason: str, message: str) -> None:
        """Log and count something a source refused."""
        log.warning("rejected (%s): %s", reason, message)
        self._metrics.reject(reason)

    def _put_or_drop(self, frame: Frame) -> None:
        try:
            self.queue.put_nowait(frame)
        except queue.Full:
            self.dropped.add(frame.series, frame.index)
            self.reject(
                "dropped_queue_full",
                f"frame {frame.index} of {frame.series} dropped: "
                "inference queue full (drop_when_full)",
            )
