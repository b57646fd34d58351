"""The raw frames of each series, kept until the series is refined (``refine.py``).

A feed (ZeroMQ, PVA) cannot be read twice, so refining a series needs its raw frames:
this sink keeps them, in the order written, in one SWMR HDF5 file per series under
``state_dir/refine``. When the source ends the series, its spool is renamed
``*.ready.h5`` and the refiner takes it from there. A spool that would pass
``refine_max_gb`` is given up (deleted, logged): that series is not refined. Spools of
series that went idle stay, and grow again if the series resumes after a restart.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import h5py
import numpy as np

from n2s_stream.frames import Frame, SeriesEnd
from n2s_stream.sinks import FrameMeta, SeriesStart, SinkContext
from n2s_stream.state import StateDir
from n2s_stream.writer import open_for_append

log = logging.getLogger(__name__)

READY_SUFFIX = ".ready.h5"


def spool_name(series: str) -> str:
    """A file name for the spool of ``series``: readable, and unique by a hash of it."""
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(series).stem)[:60] or "series"
    return f"{stem}-{hashlib.sha1(series.encode()).hexdigest()[:10]}"


class _Spool:
    """One series' raw frames: ``raw`` (n, H, W) and ``source_frame`` (n,), growing."""

    def __init__(self, path: Path, frame: Frame, output: Path) -> None:
        self.path = path
        if path.exists():
            self.file = open_for_append(path)
            self.raw, self.index = self.file["raw"], self.file["source_frame"]
            whole = min(self.raw.shape[0], self.index.shape[0])
            self.raw.resize(whole, axis=0)
            self.index.resize(whole, axis=0)
        else:
            self.file = h5py.File(path, "w", libver="latest")
            shape = frame.data.shape
            self.raw = self.file.create_dataset("raw", shape=(0, *shape),
                                                maxshape=(None, *shape), chunks=(1, *shape),
                                                dtype=frame.data.dtype)
            self.index = self.file.create_dataset("source_frame", shape=(0,),
                                                  maxshape=(None,), chunks=(1024,),
                                                  dtype=np.int64)
            if frame.pixel_mask is not None:
                self.file["pixel_mask"] = frame.pixel_mask
            self.file.attrs.update({"series": frame.series, "output": str(output)})
        self.file.swmr_mode = True

    @property
    def nbytes(self) -> int:
        return int(self.raw.shape[0]) * self.raw.dtype.itemsize * int(np.prod(self.raw.shape[1:]))

    def append(self, frame: Frame) -> None:
        n = self.raw.shape[0]
        self.raw.resize(n + 1, axis=0)
        self.raw[n] = frame.data
        self.index.resize(n + 1, axis=0)
        self.index[n] = frame.index
        self.file.flush()

    def close(self) -> None:
        if self.file.id.valid:
            self.file.close()


class RawSpool:
    """Keeps each written frame's raw data for the refiner."""

    name = "refine_spool"
    required = False  # losing the spool loses the refinement, never a live frame

    def __init__(self, root: Path, *, state: StateDir, max_bytes: int) -> None:
        self.root, self.state, self.max_bytes = root, state, max_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        self._outputs: dict[str, Path] = {}
        self._open: dict[str, _Spool] = {}
        self._given_up: set[str] = set()

    @classmethod
    def from_context(cls, context: SinkContext) -> RawSpool:
        """The daemon's spool, under ``state_dir/refine``."""
        return cls(context.state.root / "refine", state=context.state,
                   max_bytes=int(context.config.refine.max_gb * 2**30))

    def open_series(self, start: SeriesStart) -> None:
        """Note where the series' output is; its spool opens with its first frame."""
        self._outputs[start.series] = self.state.output_for(start.series, start.output)

    def write(self, frame: Frame, denoised: np.ndarray, meta: FrameMeta) -> None:
        """Keep the raw frame (unless this series' spool was given up)."""
        if frame.series in self._given_up:
            return
        spool = self._open.get(frame.series)
        if spool is None:
            path = self.root / (spool_name(frame.series) + ".h5")
            output = self._outputs.get(frame.series, frame.output)
            spool = self._open[frame.series] = _Spool(path, frame, output)
        if spool.nbytes + frame.data.nbytes > self.max_bytes:
            self._give_up(frame.series, "its raw frames pass refine_max_gb")
            return
        try:
            spool.append(frame)
        except OSError:
            self._give_up(frame.series, "its raw frames could not be kept")
            raise  # counted by the sink chain

    def end_series(self, end: SeriesEnd) -> None:
        """Close the series' spool; once the source says it is complete, it is ready."""
        self._given_up.discard(end.series)
        spool = self._open.pop(end.series, None)
        if spool is None:
            return
        spool.close()
        if end.complete:
            spool.path.rename(spool.path.with_name(spool.path.stem + READY_SUFFIX))
            log.info("series %s: %s ready to be refined", end.series, spool.path.name)

    def close(self) -> None:
        """Close every spool; unfinished series keep theirs for the next run."""
        for series in list(self._open):
            self._open.pop(series).close()

    def _give_up(self, series: str, why: str) -> None:
        log.warning("series %s will not be refined: %s", series, why)
        self._given_up.add(series)
        spool = self._open.pop(series, None)
        if spool is not None:
            spool.close()
            spool.path.unlink(missing_ok=True)
