"""Follow an areaDetector NTNDArray PV over EPICS PVAccess (NDPluginPva / NDPluginPvxs).

A p4p monitor delivers each update; ``ntndarray.py`` decodes it. Discovery and ports come
from the standard ``EPICS_PVA_*`` variables, as for every EPICS client. Series come from the
stream itself: a new one when ``uniqueId`` goes backwards (a new acquisition reset the
counter), when the frame shape or type changes, or after ``pva_series_gap`` seconds
without frames. The value present when the daemon connects (or reconnects) is the
previous acquisition's last frame: it is not denoised. PVA drops updates for a client that
falls behind; the frame numbers within a series are ``uniqueId`` (from the series' first
one), so the frames it dropped are counted as missing by the inference loop.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from pathlib import Path
from typing import Any

from n2s_stream.config import DaemonConfig, PvaOptions
from n2s_stream.errors import UsageError
from n2s_stream.frames import Frame, SeriesEnd
from n2s_stream.sources import Emit, Reject, SourceContext
from n2s_stream.sources.codecs import MessageError
from n2s_stream.sources.ntndarray import NDArrayFrame, decode
from n2s_stream.worker import BackgroundWorker

log = logging.getLogger(__name__)


def series_name(pv: str, started: float) -> str:
    """A file-name-safe series name that sorts by time: the PV name and the start time."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", pv).strip("._-") or "pva"
    stamp = time.strftime("%Y%m%d_%H%M%S", time.gmtime(started))
    return f"{safe[:80]}_{stamp}_{int(started * 1000) % 1000:03d}"


class _Series:
    """The acquisition being followed."""

    def __init__(self, name: str, first: NDArrayFrame) -> None:
        self.name, self.base = name, first.unique_id
        self.shape, self.dtype = first.data.shape, first.data.dtype
        self.last_id, self.frames, self.last_at = first.unique_id - 1, 0, time.monotonic()

    def continues(self, frame: NDArrayFrame) -> bool:
        """False when ``frame`` starts a new acquisition."""
        return (frame.unique_id > self.last_id and frame.data.shape == self.shape
                and frame.data.dtype == self.dtype)


class PvaSource(BackgroundWorker):
    """Emits the frames of one NTNDArray PV; one output file per acquisition."""

    def __init__(self, options: PvaOptions, *, out_root: Path, emit: Emit,
                 reject: Reject) -> None:
        super().__init__("pva-source")
        if options.pv is None:
            raise UsageError("the PVA source needs --pva PVNAME")
        try:
            from p4p.client.thread import Context
        except ImportError as exc:
            raise UsageError("--pva needs the optional extra: pip install "
                             "'n2s-stream[pva]'") from exc
        self.options, self.out_root = options, out_root
        self._emit, self._reject = emit, reject
        self._context = Context("pva", nt=False)
        self._subscription: Any = None
        self._lock = threading.Lock()
        self._series: _Series | None = None
        self._stale = True  # the next update is the value present at (re)connect

    @classmethod
    def from_config(cls, config: DaemonConfig, context: SourceContext) -> PvaSource:
        """The source ``--pva`` selects."""
        return cls(config.pva, out_root=config.output.out, emit=context.emit,
                   reject=context.reject)

    def start(self) -> None:
        """Subscribe (p4p reconnects by itself when the IOC restarts), then watch for
        acquisitions that went quiet."""
        request = f"record[queueSize={self.options.queue_size}]"
        self._subscription = self._context.monitor(self.options.pv, self._update,
                                                   request=request, notify_disconnect=True)
        log.info("following PV %s over PVAccess (%s)", self.options.pv, request)
        super().start()

    def stop(self) -> None:
        """Unsubscribe; updates not taken are the IOC's."""
        if self._subscription is not None:
            self._subscription.close()
        super().stop()
        self._context.close()

    def _run(self) -> None:
        while not self._stopping.wait(0.5):
            with self._lock:
                series = self._series
                quiet = series is not None and (
                    time.monotonic() - series.last_at > self.options.series_gap)
            if quiet:
                self._end_series(f"no frames for {self.options.series_gap:g} s")

    def _update(self, value: Any) -> None:
        """One monitor update (in p4p's thread): a frame, or a disconnect."""
        if isinstance(value, Exception):
            log.warning("PV %s: %s; waiting for it to come back", self.options.pv,
                        type(value).__name__)
            self._stale = True
            return
        if self._stale:
            self._stale = False
            log.info("PV %s: connected; its current value (uniqueId %s) is the previous "
                     "acquisition's and is not denoised", self.options.pv,
                     value["uniqueId"])
            return
        try:
            frame = decode(value)
        except MessageError as exc:
            self._reject(exc.reason, f"PV {self.options.pv} uniqueId {value['uniqueId']}: "
                                     f"{exc}")
            return
        self._take(frame)

    def _take(self, frame: NDArrayFrame) -> None:
        with self._lock:
            series = self._series
        if series is not None and not series.continues(frame):
            self._end_series(f"uniqueId {frame.unique_id} after {series.last_id}, or a "
                             "new shape or type: a new acquisition")
            series = None
        if series is None:
            series = _Series(series_name(self.options.pv, time.time()), frame)
            log.info("PV %s: series %s started at uniqueId %d", self.options.pv,
                     series.name, frame.unique_id)
            with self._lock:
                self._series = series
        series.last_id, series.frames, series.last_at = (frame.unique_id, series.frames + 1,
                                                         time.monotonic())
        self._emit(Frame(series.name, frame.unique_id - series.base, frame.data, time.time(),
                         self._output(series.name)))

    def _end_series(self, why: str) -> None:
        with self._lock:
            series, self._series = self._series, None
        if series is None:
            return
        log.info("series %s ended after %d frames (%s)", series.name, series.frames, why)
        self._emit(SeriesEnd(series.name, series.frames, self._output(series.name)))

    def _output(self, series: str) -> Path:
        return self.out_root / f"{series}_n2s.h5"
