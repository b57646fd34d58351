"""What flows between the daemon's stages, and the interface of the sinks.

Sources turn detector data into `Frame` and `SeriesEnd` items; the inference loop hands
each denoised frame with its `FrameMeta` to a `SinkChain`: every `Sink`, in order, each
with its failure policy. A sink's failure policy is part of it. A ``required`` sink (the
HDF5 output) is one whose failure loses the frame: an OSError from it (disk, file system)
stops intake and the daemon exits 1; any other exception is taken as a bug met by odd
input and refuses the frames of that batch (``internal_error``), as everywhere in the
loop. The other sinks (viewers, republishing, the training tap) log and count any failure
in ``n2s_sink_errors_total{sink}``, and the frame goes on to the next sink.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

log = logging.getLogger(__name__)

MAX_FRAME_PIXELS = 8192 * 8192
"""A larger declared frame (file or message) is refused before anything is allocated."""


@dataclass(frozen=True)
class Frame:
    """One detector frame as read from a source.

    ``series`` names the acquisition it belongs to (its output file is named after it),
    ``index`` is its position in that series, ``data`` the ``(H, W)`` raw frame in the
    source's dtype, ``received_at`` the unix time it arrived, ``output`` the file its
    denoised version goes to, ``pixel_mask`` the detector's bad pixels (True), if known.
    Where the source says so: ``source_id`` is the detector's own frame number (areaDetector's
    ``uniqueId``), ``t_source`` the unix time the detector took the frame, ``attributes``
    numbers and strings that travel with it (areaDetector NDAttributes); the output files
    keep the numbers, a served PV all of them. ``notes``: texts the output records about
    the series (``/entry/process/<key>``; the first frame's count), e.g. a Bluesky RunStart.
    """

    series: str
    index: int
    data: np.ndarray
    received_at: float
    output: Path
    pixel_mask: np.ndarray | None = None
    source_id: int | None = None
    t_source: float | None = None
    attributes: Mapping[str, float | str] = field(default_factory=dict)
    notes: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SeriesEnd:
    """The source will send no more frames of ``series``; ``n_frames`` were in it.

    ``n_frames`` is what the detector says it sent where the feed says so (a lost tail is
    then counted as missing), else what this source saw. ``complete`` is False when the
    daemon itself ends a series that went idle (its end may have gone to another worker,
    or frames may still come after a restart): its output stays unfinished in the ledger.
    """

    series: str
    n_frames: int
    output: Path
    sender_count: bool = False
    complete: bool = True


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
    """A sink that also shows refined frames (``runtime/refine.py``): told, from the refiner's
    thread, of each output to which refined frames were appended."""

    def refined(self, output: Path) -> None:
        """``output`` now holds more of ``/entry/refined/data`` (all its frames, or all
        of them up to where its series went idle)."""


class SinkChain:
    """The sinks in order, each called with its failure policy."""

    def __init__(self, sinks: Sequence[Sink], on_error: Callable[[str], None]) -> None:
        self.sinks = list(sinks)
        self._on_error = on_error  # counts a failure of the named sink

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

    def start(self) -> None:
        """Start the sinks that have a ``start()`` method (those that bind a socket or run
        a thread: construction does neither). A sink that fails to start fails the
        daemon's start, whatever its policy: its configuration is wrong."""
        for sink in self.sinks:
            start = getattr(sink, "start", None)
            if start is not None:
                start()

    def paused(self) -> bool:
        """A sink holds frames back on purpose (the output disk nearly full): the loop
        waits without being stuck."""
        return any(getattr(sink, "paused", False) for sink in self.sinks)

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
                self._on_error(sink.name)

    def _call(self, sink: Sink, method: str, *args: object) -> None:
        try:
            getattr(sink, method)(*args)
        except Exception as exc:
            if sink.required:
                raise
            log.warning("sink %s: %s failed: %s", sink.name, method, exc)
            self._on_error(sink.name)
