"""What flows between the daemon's stages."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

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
