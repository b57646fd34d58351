"""The raw frames of each series, kept until the series is refined (``runtime/refine.py``).

A feed (ZeroMQ, PVA) cannot be read twice, so refining a series needs its raw frames:
this sink keeps them, in the order written, in one SWMR HDF5 file per series under
``state_dir/refine``. When the series ends (the source ended it, or it went idle for
``series_idle_close``), its spool is renamed ``*.ready.h5`` and the refiner takes it from
there. A series that resumes after that gets a new spool (``<name>-2``...) for its new
frames, refined after the first. The raw frames of all spools stay within
``refine_max_gb``, and the state dir's disk keeps twice ``min_free_mb`` free: to make
room, spools the refiner gave up on go first, then those a stopped daemon left of series
that never ended, oldest first (each logged: that series is not refined); spools waiting
to be refined are kept, first come first served, and a series that does not fit beside
them is not refined. A spool left by a stopped daemon grows again if its series resumes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from n2s_stream.formats.spool import (
    FAILED_SUFFIX,
    READY_SUFFIX,
    SpoolFile,
    eviction_order,
    spool_name,
    unfinished_spool,
)
from n2s_stream.formats.writer import free_bytes
from n2s_stream.runtime.state import StateDir, refine_dir
from n2s_stream.sinks import SinkContext
from n2s_stream.stages import Frame, FrameMeta, SeriesEnd, SeriesStart

log = logging.getLogger(__name__)


class RawSpool:
    """Keeps each written frame's raw data for the refiner."""

    name = "refine_spool"
    required = False  # losing the spool loses the refinement, never a live frame

    def __init__(
        self, root: Path, *, state: StateDir, max_bytes: int, reserve_bytes: int = 0
    ) -> None:
        self.root, self.state = root, state
        self.max_bytes, self.reserve_bytes = max_bytes, reserve_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        self._used = self._usage()  # an estimate between scans of the folder
        self._outputs: dict[str, Path] = {}
        self._open: dict[str, SpoolFile] = {}
        self._given_up: set[str] = set()

    @classmethod
    def from_context(cls, context: SinkContext) -> RawSpool:
        """The daemon's spool, under ``state_dir/refine``."""
        return cls(
            refine_dir(context.state.root),
            state=context.state,
            max_bytes=int(context.config.refine.max_gb * 2**30),
            reserve_bytes=2 * context.config.output.min_free_bytes,
        )

    def open_series(self, start: SeriesStart) -> None:
        """Note where the series' output is; its spool opens with its first frame."""
        self._outputs[start.series] = self.state.output_for(start.series, start.output)

    def write(self, frame: Frame, denoised: np.ndarray, meta: FrameMeta) -> None:
        """Keep the raw frame (unless this series' spool was given up)."""
        if frame.series in self._given_up:
            return
        if not self._room_for(frame.data.nbytes, self._open.get(frame.series)):
            self._give_up(
                frame.series,
                "no room in state_dir/refine (refine_max_gb, or the disk's free space)",
            )
            return
        spool = self._open.get(frame.series)
        if spool is None:
            output = self._output_of(frame.series, frame.output)
            path = self._spool_of(frame.series) or self._path_for(spool_name(frame.series, output))
            spool = self._open[frame.series] = SpoolFile(path, frame, output)
            self._used = self._usage()
        try:
            spool.append(frame)
            self._used += frame.data.nbytes
        except OSError:
            self._give_up(frame.series, "its raw frames could not be kept")
            raise  # counted by the sink chain

    def end_series(self, end: SeriesEnd) -> None:
        """Close the series' spool: it is ready to be refined (the series ended, or went
        idle: frames that come later go to a spool of their own)."""
        self._given_up.discard(end.series)
        self._outputs.pop(end.series, None)
        spool = self._open.pop(end.series, None)
        if spool is not None:
            spool.close()
            path = spool.path
        else:  # nothing new since a restart: the spool of the earlier run is complete
            found = self._spool_of(end.series)
            if found is None:
                return
            path = found
        self._used = self._usage()
        path.rename(path.with_name(path.stem + READY_SUFFIX))
        log.info(
            "series %s: %s ready to be refined%s",
            end.series,
            path.name,
            "" if end.complete else " (it went idle: frames that come later are refined after it)",
        )

    def close(self) -> None:
        """Close every spool; unfinished series keep theirs for the next run."""
        for series in list(self._open):
            self._open.pop(series).close()

    def _path_for(self, name: str) -> Path:
        """A new spool for a series: ``name``, or ``name-2``... beside the parts of it
        already ended (it resumed after it went idle)."""
        for n in range(1, 10_000):
            stem = name if n == 1 else f"{name}-{n}"
            if not any(
                (self.root / f"{stem}{suffix}").exists()
                for suffix in (".h5", READY_SUFFIX, FAILED_SUFFIX)
            ):
                return self.root / f"{stem}.h5"
        raise OSError(f"{name}: too many spools")

    def _spool_of(self, series: str) -> Path | None:
        """The unfinished spool an earlier run kept for ``series``, if any."""
        in_use = {spool.path for spool in self._open.values()}
        return unfinished_spool(self.root, series, exclude=in_use)

    def _output_of(self, series: str, default: Path) -> Path:
        if series not in self._outputs:
            self._outputs[series] = self.state.output_for(series, default)
        return self._outputs[series]

    def _usage(self) -> int:
        """Bytes the spools take now."""
        total = 0
        for path in self.root.glob("*.h5"):
            try:
                total += path.stat().st_size
            except OSError:
                continue  # the refiner just removed it
        return total

    def _room_for(self, nbytes: int, spool: SpoolFile | None) -> bool:
        """Whether ``nbytes`` more fit, dropping older spools if need be (not for a series
        that alone passes the cap)."""
        if self._fits(nbytes):
            return True
        self._used = self._usage()  # the refiner's work adds to the spools, too
        if self._fits(nbytes):
            return True
        if spool is not None and spool.path.stat().st_size + nbytes > self.max_bytes:
            return False
        in_use = {spool.path for spool in self._open.values()}
        droppable = {p for p in self.root.glob("*.h5") if not p.name.endswith(READY_SUFFIX)}
        for path in sorted(droppable - in_use, key=eviction_order):
            try:
                size = path.stat().st_size
                path.unlink()
            except OSError:
                continue
            self._used -= size
            log.warning(
                "dropped the spool %s to make room for newer series: its series "
                "will not be refined",
                path.name,
            )
            if self._fits(nbytes):
                return True
        return False

    def _fits(self, nbytes: int) -> bool:
        return (
            self._used + nbytes <= self.max_bytes
            and free_bytes(self.root) >= self.reserve_bytes + nbytes
        )

    def _give_up(self, series: str, why: str) -> None:
        log.warning("series %s will not be refined: %s", series, why)
        self._given_up.add(series)
        spool = self._open.pop(series, None)
        if spool is not None:
            spool.close()
            spool.path.unlink(missing_ok=True)
            self._used = self._usage()
