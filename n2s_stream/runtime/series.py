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

from n2s_stream.n2s.context import ContextWindow
from n2s_stream.n2s.specs import MaskerConfig
from n2s_stream.runtime.metrics import Metrics
from n2s_stream.stages import Frame, SeriesEnd

log = logging.getLogger(__name__)

Ready = tuple[Any, np.ndarray]
"""A frame's item (what the loop pushed) and its network input ``(K, H, W)``."""


class DroppedFrames:
    """Frames dropped before inference (``drop_when_full``) or refused by the source, per
    series: they were counted as rejected, so the gaps they leave are not counted again as
    missing.
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
    output: Path  # where the source said its frames go
    last: int = -1  # newest frame number taken (written, skipped or rejected) or on disk
    last_frame_at: float = field(default_factory=time.monotonic)
    shape: tuple[int, ...] | None = None  # set when the series is opened for writing
    idle: bool = False  # closed for idleness: reopened (its outputs resumed) by a new frame


class SeriesTracker:
    """Which frames of which series to denoise, and when they are ready.

    ``last_written(series, output)`` tells where an output already stands (an earlier run
    may have written part of the series): frames at or before it are skipped, so each
    source frame is written once. Frames that never came are counted as missing, less
    those the daemon dropped itself.
    """

    def __init__(
        self,
        masker: MaskerConfig,
        metrics: Metrics,
        *,
        last_written: Callable[[str, Path], int],
        count_gaps: bool = True,
        dropped: DroppedFrames | None = None,
    ) -> None:
        self._masker, self._metrics = masker, metrics
        self._last_written = last_written
        self._count_gaps = count_gaps
        self.dropped = dropped or DroppedFrames()
        self._series: dict[str, _Series] = {}
        self.skipped = 0  # frames already written (an earlier run, or sent twice)

    def _state(self, series: str, output: Path) -> _Series:
        state = self._series.get(series)
        if state is None:
            window: ContextWindow[Any] = ContextWindow(
                self._masker.context_frames, self._masker.causal, self._masker.register
            )
            state = self._series[series] = _Series(window, output)
        return state

    def seen(self, frame: Frame) -> int:
        """Note that ``frame`` arrived (also one that will be refused, so that it is not
        counted as missing); returns the newest frame number taken before it."""
        state = self._state(frame.series, frame.output)
        before = state.last
        state.last = max(before, frame.index)
        state.last_frame_at = time.monotonic()
        return before

    def admit(
        self,
        frame: Frame,
        before: int,
        *,
        open_series: Callable[[Frame], None],
        reject: Callable[[str, str], None],
    ) -> bool:
        """True if ``frame`` is to be denoised now: its series is opened (``open_series``)
        on its first frame of this run; a shape change is refused, a frame already written
        skipped, and the frames between the last one taken and this one counted missing."""
        state = self._series[frame.series]  # seen() came first
        if state.shape is None or state.idle:
            open_series(frame)
            state.shape, state.idle = state.shape or frame.data.shape, False
            before = max(before, self._last_written(frame.series, frame.output))
            state.last = max(state.last, before)
        if frame.data.shape != state.shape:
            reject("shape_change", f"shape {frame.data.shape} in a series of {state.shape} frames")
            return False
        if frame.index <= before:
            log.debug("frame %d of %s already written; skipped", frame.index, frame.series)
            self.skipped += 1
            return False
        if frame.index > before + 1:
            self._missing(frame.series, before + 1, frame.index - 1, f"before frame {frame.index}")
        return True

    def push(self, series: str, item: Any, network_input: np.ndarray) -> list[Ready]:
        """Add an admitted frame to its series' context window; returns the frames whose
        context is now complete."""
        return self._series[series].window.push(item, network_input)

    def end(self, end: SeriesEnd) -> list[Ready]:
        """The series ends: its held frames (mirrored context), and a lost tail counted
        as missing when the sender said how many frames it sent. Call `closed` once they
        are written and the sinks have ended the series."""
        state = self._series.get(end.series)
        ready = state.window.flush() if state is not None else []
        if end.sender_count:
            last = max(state.last if state else -1, self._last_written(end.series, end.output))
            if end.n_frames - 1 > last:
                self._missing(
                    end.series,
                    last + 1,
                    end.n_frames - 1,
                    f"before the end of the series (frame {end.n_frames})",
                )
        return ready

    def closed(self, end: SeriesEnd) -> None:
        """The sinks ended the series: forget it when it is complete; an idle one keeps
        its frame numbers and shape (late frames resume it, gaps are still counted)."""
        if end.complete:
            self._series.pop(end.series, None)
        elif end.series in self._series:
            self._series[end.series].idle = True

    def idle_end(self, series: str) -> SeriesEnd:
        """The end the daemon gives a series that went idle (not complete)."""
        state = self._series[series]
        return SeriesEnd(series, state.last + 1, state.output, complete=False)

    def waited_too_long(self, seconds: float) -> list[Ready]:
        """Frames that waited more than ``seconds`` for later neighbours (the detector
        paused): released with mirrored context, as at a series' end."""
        now, ready = time.monotonic(), []
        for state in self._series.values():
            if len(state.window) and now - state.last_frame_at > seconds:
                ready += state.window.flush()
        return ready

    def idle(self, seconds: float) -> list[str]:
        """Open series that got no frame for ``seconds`` (0: never idle)."""
        if seconds <= 0:
            return []
        now = time.monotonic()
        return [
            name
            for name, state in self._series.items()
            if not state.idle and now - state.last_frame_at > seconds
        ]

    def flush_all(self) -> list[Ready]:
        """Every frame still waiting for context (the daemon stops: all are written)."""
        ready = []
        for state in self._series.values():
            ready += state.window.flush()
        return ready

    def drop_held(self, series: str) -> None:
        """Empty the context window of ``series`` (a failure lost what it held); its frame
        numbers and shape stay, so nothing is counted twice."""
        state = self._series.get(series)
        if state is not None:
            state.window.flush()

    def held(self) -> int:
        """Frames waiting in the context windows of every series."""
        return sum(len(state.window) for state in self._series.values())

    def _missing(self, series: str, first: int, last: int, where: str) -> None:
        if not self._count_gaps:
            return
        missing = last - first + 1 - self.dropped.take(series, first, last)
        if missing > 0:
            log.warning("%s: %d frames missing %s", series, missing, where)
            self._metrics.frames_missing.inc(missing)
