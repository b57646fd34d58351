"""Follow an areaDetector NTNDArray PV over EPICS PVAccess (NDPluginPva / NDPluginPvxs).

A p4p monitor delivers each update; ``formats/ntndarray.py`` decodes it. Discovery and ports come
from the standard ``EPICS_PVA_*`` variables, as for every EPICS client. Series come from the
stream itself: a new one when ``uniqueId`` goes backwards (a new acquisition reset the
counter), when the frame shape or type changes, or after ``pva_series_gap`` seconds
without frames; with ``pva_acquire_pv`` (the driver's ``cam1:Acquire``) also when it goes
to 1 (frames the detector took before that, by the IOC's clock, still belong to the old
one), and a series ends soon after it goes to 0. The value present when the daemon
connects (or reconnects) is the previous acquisition's last frame: it is not denoised.
PVA drops updates for a client that falls behind; the frame numbers within a series are
``uniqueId`` (from the series' first one), so the frames it dropped are counted as missing
by the inference loop.

The open series is remembered in the state dir (``pva/<PV>.json``): a daemon restarted
mid-acquisition continues its output file when the first frame it gets belongs to it (the
counter went on, same shape and type, and the detector's time per frame since the last
written one is under ``pva_series_gap``); otherwise that series is ended.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from n2s_stream.config import DaemonConfig, PvaOptions
from n2s_stream.errors import OutputError, UsageError
from n2s_stream.formats.codecs import MessageError
from n2s_stream.formats.names import file_safe
from n2s_stream.formats.ntndarray import NDArrayFrame, decode
from n2s_stream.formats.writer import last_provenance_row, series_output
from n2s_stream.runtime.state import atomic_write_text, pva_dir
from n2s_stream.runtime.worker import BackgroundWorker
from n2s_stream.sources import Emit, Reject, SourceContext
from n2s_stream.stages import Frame, SeriesEnd

log = logging.getLogger(__name__)

ACQUIRE_DRAIN = 1.0
"""Seconds without frames after Acquire went to 0 that end the series."""


def pv_file_name(pv: str) -> str:
    """``pv`` as a file name (no separators, no leading dots)."""
    return file_safe(pv, limit=80, fallback="pva")


def series_name(pv: str, started: float) -> str:
    """A file-name-safe series name that sorts by time: the PV name and the start time."""
    stamp = time.strftime("%Y%m%d_%H%M%S", time.gmtime(started))
    return f"{pv_file_name(pv)}_{stamp}_{int(started * 1000) % 1000:03d}"


@dataclass
class _Series:
    """The acquisition being followed: ``base`` is its first ``uniqueId`` (frame 0)."""

    name: str
    base: int
    shape: tuple[int, ...]
    dtype: str
    last_id: int
    frames: int = 0
    last_at: float = 0.0  # time.monotonic() of its newest frame

    @classmethod
    def first(cls, name: str, frame: NDArrayFrame) -> _Series:
        """A series that ``frame`` opens."""
        return cls(
            name,
            frame.unique_id,
            frame.data.shape,
            frame.data.dtype.str,
            frame.unique_id - 1,
            last_at=time.monotonic(),
        )

    def continues(self, frame: NDArrayFrame) -> bool:
        """False when ``frame`` starts a new acquisition."""
        return (
            frame.unique_id > self.last_id
            and frame.data.shape == self.shape
            and frame.data.dtype == np.dtype(self.dtype)
        )

    def took(self, frame: NDArrayFrame) -> None:
        """Note ``frame`` as this series' newest."""
        self.last_id, self.frames, self.last_at = (
            frame.unique_id,
            self.frames + 1,
            time.monotonic(),
        )


class PvaSource(BackgroundWorker):
    """Emits the frames of one NTNDArray PV; one output file per acquisition."""

    def __init__(
        self,
        options: PvaOptions,
        *,
        out_root: Path,
        state_dir: Path,
        emit: Emit,
        reject: Reject,
        refused: Callable[[str, int], None] = lambda s, i: None,
    ) -> None:
        super().__init__("pva-source")
        if options.pv is None:
            raise UsageError("the PVA source needs --pva PVNAME")
        try:
            import p4p.client.thread  # noqa: F401  (what start() needs, checked when built)
        except ImportError as exc:
            raise UsageError(
                "--pva needs the optional extra: pip install 'n2s-stream[pva]'"
            ) from exc
        self.options, self.out_root = options, out_root
        self._record = pva_dir(state_dir) / f"{pv_file_name(options.pv)}.json"
        self._emit, self._reject, self._refused = emit, reject, refused
        self._context: Any = None  # a p4p client runs threads: made by start()
        self._subscriptions: list[Any] = []
        self._lock = threading.RLock()  # p4p calls back from more than one thread
        self._series: _Series | None = None
        self._stale = True  # the next update is the value present at (re)connect
        self._connected = False  # connected once: a disconnect is then worth a warning
        self._acquiring: bool | None = None  # the Acquire PV's state, if followed
        self._new_from: float | None = None  # Acquire went to 1 then (IOC clock)

    @classmethod
    def from_config(cls, config: DaemonConfig, context: SourceContext) -> PvaSource:
        """The source ``--pva`` selects."""
        return cls(
            config.pva,
            out_root=config.output.out,
            state_dir=config.service.state_dir,
            emit=context.emit,
            reject=context.reject,
            refused=context.refused,
        )

    def start(self) -> None:
        """Subscribe (p4p reconnects by itself when the IOC restarts), then watch for
        acquisitions that went quiet."""
        from p4p.client.thread import Context

        request = f"record[queueSize={self.options.queue_size}]"
        self._context = Context("pva", nt=False)
        self._subscriptions.append(
            self._context.monitor(
                self.options.pv, self._update, request=request, notify_disconnect=True
            )
        )
        log.info("following PV %s over PVAccess (%s)", self.options.pv, request)
        if self.options.acquire_pv:
            self._subscriptions.append(
                self._context.monitor(
                    self.options.acquire_pv, self._acquire, notify_disconnect=True
                )
            )
            log.info("series follow %s", self.options.acquire_pv)
        super().start()

    def stop(self) -> None:
        """Unsubscribe; updates not taken are the IOC's."""
        for subscription in self._subscriptions:
            subscription.close()
        super().stop()
        if self._context is not None:  # else never started
            self._context.close()

    def _run(self) -> None:
        while not self._stopping.wait(0.2):
            gap = self.options.series_gap if self._acquiring is not False else ACQUIRE_DRAIN
            with self._lock:  # not while a frame is being handed over: see _take
                series = self._series
                if series is not None and time.monotonic() - series.last_at > gap:
                    self._end_series(
                        f"no frames for {gap:g} s"
                        + (" after Acquire went to 0" if gap == ACQUIRE_DRAIN else "")
                    )

    def _acquire(self, value: Any) -> None:
        """An update of the Acquire PV (in p4p's thread): 1 opens a series, 0 ends it."""
        try:
            if isinstance(value, Exception):
                log.warning("PV %s: %s (%s)", self.options.acquire_pv, type(value).__name__, value)
                self._acquiring = None  # unknown: series end by the gap alone
                return
            field = value["value"]  # a number (NTScalar) or a choice (NTEnum: QSRV's bo)
            acquiring = bool(field["index"] if hasattr(field, "keys") else field)
            log.info("PV %s: %d", self.options.acquire_pv, acquiring)
            stamp = float(value["timeStamp.secondsPastEpoch"]) + 1e-9 * float(
                value["timeStamp.nanoseconds"]
            )
            with self._lock:
                was, self._acquiring = self._acquiring, acquiring
                if acquiring and was is False and self._series is not None:
                    # frames taken before this (by the IOC's clock) may still be queued on
                    # the image PV, another channel: they end the old series, not start one
                    self._new_from = stamp
        except Exception:  # p4p would close the subscription for good
            log.exception("PV %s: update not understood", self.options.acquire_pv)

    def _update(self, value: Any) -> None:
        """One monitor update (in p4p's thread): a frame, or a disconnect. Nothing may
        escape: p4p closes a subscription whose callback raised."""
        try:
            self._handle(value)
        except Exception as exc:
            log.exception("PV %s: update not handled", self.options.pv)
            self._reject("internal_error", f"PV {self.options.pv}: {type(exc).__name__}: {exc}")

    def _handle(self, value: Any) -> None:
        if isinstance(value, Exception):
            level = logging.WARNING if self._connected else logging.INFO
            log.log(
                level,
                "PV %s: %s; waiting for it%s",
                self.options.pv,
                type(value).__name__,
                " to come back" if self._connected else "",
            )
            self._stale = True
            return
        self._connected = True
        if self._stale:
            self._stale = False
            log.info(
                "PV %s: connected; its current value (uniqueId %s) is the previous "
                "acquisition's and is not denoised",
                self.options.pv,
                value["uniqueId"],
            )
            return
        try:
            frame = decode(value)
        except MessageError as exc:
            unique_id = int(value["uniqueId"])
            self._reject(exc.reason, f"PV {self.options.pv} uniqueId {unique_id}: {exc}")
            with self._lock:
                series = self._series
                if series is not None and unique_id > series.last_id:
                    self._refused(series.name, unique_id - series.base)  # not also missing
            return
        self._take(frame)

    def _take(self, frame: NDArrayFrame) -> None:
        """Hand ``frame`` downstream, opening or ending series as it says. Holds the lock
        throughout (the hand-over blocks while the daemon is busy), and the series counts
        as quiet only from when the hand-over is done: a busy daemon never ends a series
        whose frames are waiting in the monitor queue."""
        with self._lock:
            series = self._series
            if series is None:
                series = self._resumed(frame)
            elif self._new_from is not None and not 0 < frame.timestamp < self._new_from:
                self._end_series(f"{self.options.acquire_pv} went to 1: a new acquisition")
                series = None
            elif not series.continues(frame):
                self._end_series(
                    f"uniqueId {frame.unique_id} after {series.last_id}, or a "
                    "new shape or type: a new acquisition"
                )
                series = None
            if series is None:
                assert self.options.pv is not None  # refused in __init__; options are frozen
                series = _Series.first(series_name(self.options.pv, time.time()), frame)
                log.info(
                    "PV %s: series %s started at uniqueId %d",
                    self.options.pv,
                    series.name,
                    frame.unique_id,
                )
                self._remember(series)
            self._series = series
            series.took(frame)
            self._emit(
                Frame(
                    series.name,
                    frame.unique_id - series.base,
                    frame.data,
                    time.time(),
                    self._output(series.name),
                    source_id=frame.unique_id,
                    t_source=frame.timestamp or None,
                    attributes=frame.attributes,
                )
            )
            series.last_at = time.monotonic()

    def _resumed(self, frame: NDArrayFrame) -> _Series | None:
        """The series an earlier run left open, if ``frame`` continues it; else it is
        ended (its output closed as it stands) and forgotten."""
        try:
            series = _Series(**json.loads(self._record.read_text()))
            series.shape = tuple(series.shape)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            log.warning("%s: unreadable (%s); not continuing an earlier series", self._record, exc)
            return None
        try:
            row = last_provenance_row(self._output(series.name))
        except OutputError as exc:
            log.warning("%s", exc)
            row = None
        if row is not None:
            series.last_id = series.base + int(row["source_frame"])
        if row is not None and series.continues(frame) and self._soon_after(row, frame, series):
            log.info(
                "PV %s: uniqueId %d continues series %s (written to uniqueId %d) after a restart",
                self.options.pv,
                frame.unique_id,
                series.name,
                series.last_id,
            )
            series.last_at = time.monotonic()
            return series
        self._emit(
            SeriesEnd(series.name, series.last_id - series.base + 1, self._output(series.name))
        )
        log.info(
            "series %s left by an earlier run ended (uniqueId %d does not continue it)",
            series.name,
            frame.unique_id,
        )
        self._forget()
        return None

    def _soon_after(self, row: dict[str, float], frame: NDArrayFrame, series: _Series) -> bool:
        """True when, by the detector's clock (arrival times if it has none), the frames
        since the last written one came less than ``pva_series_gap`` apart on average."""
        then, now = row.get("t_source", math.nan), frame.timestamp
        if not math.isfinite(then) or not now:
            then, now = row["t_received"], time.time()
        return (now - then) / (frame.unique_id - series.last_id) <= self.options.series_gap

    def _end_series(self, why: str) -> None:
        with self._lock:
            series, self._series, self._new_from = self._series, None, None
            if series is None:
                return
            log.info("series %s ended after %d frames (%s)", series.name, series.frames, why)
            self._forget()
            self._emit(
                SeriesEnd(series.name, series.last_id - series.base + 1, self._output(series.name))
            )

    def _remember(self, series: _Series) -> None:
        try:
            self._record.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self._record, json.dumps(asdict(series)))
        except OSError as exc:
            log.warning(
                "%s: cannot remember the open series (%s); a restart will start a new one",
                self._record,
                exc,
            )

    def _forget(self) -> None:
        try:
            self._record.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("%s: cannot forget the ended series (%s)", self._record, exc)

    def _output(self, series: str) -> Path:
        return series_output(self.out_root, series)
