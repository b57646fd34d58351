"""Reading a followed stream's frames from the detector's growing SWMR file."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import h5py
import hdf5plugin  # noqa: F401  (registers the filters areaDetector files use)
import numpy as np

from n2s_stream.sources import Emit, Reject
from n2s_stream.sources.bluesky.records import Followed
from n2s_stream.stages import Frame

READ_BATCH = 16
"""Frames read from the detector's file at once."""


class FrameReader:
    """Emits followed streams' frames from their files, keeping each file open between
    announcements; an unreadable file is counted (``unreadable``) and reopened next time."""

    def __init__(self, emit: Emit, reject: Reject) -> None:
        self._emit, self._reject = emit, reject
        self._files: dict[str, h5py.File] = {}

    def read_up_to(
        self, followed: Followed, stop_row: int | None, datum: dict[str, Any] | None = None
    ) -> bool:
        """Emit the frames from the last one read up to ``stop_row`` (None: all the file
        holds), as far as the file holds them; False once the daemon stops."""
        first_seq = int(datum["seq_nums"]["start"]) if datum and "seq_nums" in datum else None
        first_event = int(datum["indices"]["start"]) if datum else 0
        while stop_row is None or followed.rows_read < stop_row:
            start = followed.rows_read
            try:
                frames = self._dataset(followed)
                frames.refresh()
                available = frames.shape[0] if stop_row is None else min(stop_row, frames.shape[0])
                block = frames[start : min(available, start + READ_BATCH)]
            except (OSError, KeyError) as exc:
                self._reject(
                    "unreadable",
                    f"{followed.local_path}: frames {start}-"
                    f"{'end' if stop_row is None else stop_row - 1} announced but "
                    f"not readable: {exc}",
                )
                self.close(followed)
                return True
            if not len(block):
                return True
            received = time.time()
            for data in block:
                row = followed.rows_read
                seq = (
                    None
                    if first_seq is None
                    else first_seq + row // followed.stream.multiplier - first_event
                )
                frame = Frame(
                    followed.series,
                    row,
                    np.asarray(data),
                    received,
                    Path(followed.output),
                    source_id=seq,
                    notes=followed.notes,
                )
                if not self._emit(frame):
                    return False
                followed.rows_read = row + 1
        return True

    def _dataset(self, followed: Followed) -> h5py.Dataset:
        file = self._files.get(followed.stream.uid)
        if file is None:
            file = h5py.File(followed.local_path, "r", swmr=True, libver="latest")
            self._files[followed.stream.uid] = file
        frames = file[followed.stream.dataset]
        if not isinstance(frames, h5py.Dataset) or frames.ndim != 3:
            raise KeyError(f"{followed.stream.dataset} is not a stack of frames")
        return frames

    def close(self, followed: Followed) -> None:
        """Close ``followed``'s file (reopened when more frames are announced)."""
        file = self._files.pop(followed.stream.uid, None)
        if file is not None:
            file.close()

    def close_all(self) -> None:
        """Close every file (the source stops)."""
        for file in self._files.values():
            file.close()
        self._files.clear()
