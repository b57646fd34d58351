"""Per-series bookkeeping of the inference loop: order, duplicates, gaps, context windows
and idleness. Knows nothing of models or files: the loop tells it how to open a series
and asks it which frames are ready.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from n2s_stream.frames import Frame, SeriesEnd
from n2s_stream.metrics import Metrics
from n2s_stream.n2s.context import ContextWindow
from n2s_stream.n2s.masking import MaskerConfig

log = logging.getLogger(__name__)

Ready = tuple[Any, np.ndarray]
"""A frame's item (what the loop pushed) and its network input ``(K, H, W)``."""


class DroppedFrames:
    """Frames dropped before inference (``drop_when_full``), per series: they were counted
    as rejected when dropped, so the gaps they leave are not counted again as missing.
    Shared by the source thread (``add``) and the inference thread (``take``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_series: dict[str, set[int]] = {}

    def add(self, series: str, index: int) -> None:
        """Note that frame ``index`` of ``series`` was dropped."""
        with self._lock:
            self._by_series.setdefault(series, set()).add(index)

    def take(self, series: str, first: int, last: int) -> int:
        """How many of frames ``first`` to ``last`` (inclusive) of ``series`` were dropped;
        they are forgotten, as is the series once it has none left."""
        with self._lock:
            dropped = self._by_series.get(series, set())
            taken = {i for i in dropped if first <= i <= last}
            dropped -= taken
            if not dropped:
                self._by_series.pop(series, None)
            return len(taken)


@dataclass
class _Series:
    window: ContextWindow
    last: int = -1  # newest frame number taken (written, skipped or rejected) or on disk
    last_frame_at: float = field(default_factory=time.monotonic)
    shape: tuple[int, ...] | None = None  # set when the series is opened for writing


class SeriesTracker:
    """Which frames of which series to denoise, and when they are ready.

    ``last_written(series, output)`` tells where an output already stands (an earlier run
    may have written part of the series): frames at or before it are skipped, so each
    source frame is written once. Frames that never came are counted as missing, less
    those the daemon dropped itself.
    """

    def __init__(self, masker: MaskerConfig, metrics: Metrics, *,
                 last_written: Callable[[str, Path], int], count_gaps: bool = True,
                 dropped: DroppedFrames | None = None) -> None:
        self._masker, self._metrics = masker, metrics
        self._last_written = last_written
        self._count_gaps = count_gaps
        self.dropped = dropped or DroppedFrames()
        self._series: dict[str, _Series] = {}

    def _state(self, series: str) -> _Series:
        state = self._series.get(series)
        if state is None:
            window = ContextWindow(self._masker.context_frames, self._masker.causal)
            state = self._series[series] = _Series(window)
        return state

    def seen(self, frame: Frame) -> int:
        """Note that ``frame`` arrived (also one that will be refused, so that it is not
        counted as missing); returns the newest frame number taken before it."""
        state = self._state(frame.series)
        before = state.last
        state.last = max(before, frame.index)
        state.last_frame_at = time.monotonic()
        return before

    def admit(self, frame: Frame, before: int, *, open_series: Callable[[Frame], None],
              reject: Callable[[str, str], None]) -> bool:
        """True if ``frame`` is to be denoised now: its series is opened (``open_series``)
        on its first frame of this run; a shape change is refused, a frame already written
        skipped, and the frames between the last one taken and this one counted missing."""
        state = self._state(frame.series)
        if state.shape is None:
            open_series(frame)
            state.shape = frame.data.shape
            before = max(before, self._last_written(frame.series, frame.output))
            state.last = max(state.last, before)
        if frame.data.shape != state.shape:
            reject("shape_change", f"shape {frame.data.shape} in a series of {state.shape} "
                                   "frames")
            return False
        if frame.index <= before:
            log.debug("frame %d of %s already written; skipped", frame.index, frame.series)
            return False
        if frame.index > before + 1:
            self._missing(frame.series, before + 1, frame.index - 1,
                          f"before frame {frame.index}")
        return True

    def push(self, series: str, item: Any, network_input: np.ndarray) -> list[Ready]:
        """Add an admitted frame to its series' context window; returns the frames whose
        context is now complete."""
        return self._state(series).window.push(item, network_input)

    def end(self, end: SeriesEnd) -> list[Ready]:
        """The series ended: its held frames (mirrored context), and a lost tail counted
        as missing when the sender said how many frames it sent."""
        state = self._series.pop(end.series, None)
        ready = state.window.flush() if state is not None else []
        if end.sender_count:
            last = max(state.last if state else -1, self._last_written(end.series, end.output))
            if end.n_frames - 1 > last:
                self._missing(end.series, last + 1, end.n_frames - 1,
                              f"before the end of the series (frame {end.n_frames})")
        return ready

    def waited_too_long(self, seconds: float) -> list[Ready]:
        """Frames that waited more than ``seconds`` for later neighbours (the detector
        paused): released with mirrored context, as at a series' end."""
        now, ready = time.monotonic(), []
        for state in self._series.values():
            if len(state.window) and now - state.last_frame_at > seconds:
                ready += state.window.flush()
        return ready

    def idle(self, seconds: float) -> list[str]:
        """Series that got no frame for ``seconds`` (0: never idle)."""
        if seconds <= 0:
            return []
        now = time.monotonic()
        return [name for name, state in self._series.items()
                if now - state.last_frame_at > seconds]

    def flush_all(self) -> list[Ready]:
        """Every frame still waiting for context (the daemon stops: all are written)."""
        ready = []
        for state in self._series.values():
            ready += state.window.flush()
        return ready

    def forget(self, series: str) -> None:
        """Drop what is known of ``series`` (after a failure lost its held frames)."""
        self._series.pop(series, None)

    def held(self, series: str) -> int:
        """Frames of ``series`` waiting in its context window."""
        state = self._series.get(series)
        return 0 if state is None else len(state.window)

    def _missing(self, series: str, first: int, last: int, where: str) -> None:
        if not self._count_gaps:
            return
        missing = last - first + 1 - self.dropped.take(series, first, last)
        if missing > 0:
            log.warning("%s: %d frames missing %s", series, missing, where)
            self._metrics.frames_missing.inc(missing)
