"""The raw frames of each series, kept until the series is refined (``refine.py``).

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

import hashlib
import logging
import re
from pathlib import Path

import h5py
import numpy as np

from n2s_stream.frames import Frame, SeriesEnd
from n2s_stream.names import file_safe
from n2s_stream.sinks import FrameMeta, SeriesStart, SinkContext
from n2s_stream.state import StateDir
from n2s_stream.writer import free_bytes, open_for_append

log = logging.getLogger(__name__)

READY_SUFFIX = ".ready.h5"
FAILED_SUFFIX = ".failed.h5"
DIGEST_CHARS = 10
"""Hex digits of the hash that ends a spool's name (``spool_name``)."""


def spool_name(series: str, output: Path) -> str:
    """A file name for the spool of ``series`` written to ``output``: readable, and unique
    by a hash of both (two sources may name a series alike)."""
    digest = hashlib.sha1(f"{series}\0{output}".encode()).hexdigest()[:DIGEST_CHARS]
    return f"{file_safe(Path(series).stem, limit=60)}-{digest}"


def spool_part(path: Path) -> tuple[str, int]:
    """The spool's series part: its name without the part number, and the part number
    (1, or n for ``<name>-n``: the series resumed after it went idle)."""
    stem = path.name.removesuffix(READY_SUFFIX).removesuffix(FAILED_SUFFIX).removesuffix(".h5")
    match = re.fullmatch(rf"(.*-[0-9a-f]{{{DIGEST_CHARS}}})-(\d+)", stem)
    return (match.group(1), int(match.group(2))) if match else (stem, 1)


def _eviction_order(path: Path) -> tuple[int, float]:
    """Spools to drop first: given up by the refiner, then those a stopped daemon left of
    series that never ended; oldest first within each."""
    rank = 0 if path.name.endswith(FAILED_SUFFIX) else 1
    try:
        return rank, path.stat().st_mtime
    except OSError:
        return rank, 0.0


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
            self.raw = self.file.create_dataset(
                "raw",
                shape=(0, *shape),
                maxshape=(None, *shape),
                chunks=(1, *shape),
                dtype=frame.data.dtype,
            )
            self.index = self.file.create_dataset(
                "source_frame", shape=(0,), maxshape=(None,), chunks=(1024,), dtype=np.int64
            )
            if frame.pixel_mask is not None:
                self.file["pixel_mask"] = frame.pixel_mask
            self.file.attrs.update({"series": frame.series, "output": str(output)})
        self.file.swmr_mode = True

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

    def __init__(
        self, root: Path, *, state: StateDir, max_bytes: int, reserve_bytes: int = 0
    ) -> None:
        self.root, self.state = root, state
        self.max_bytes, self.reserve_bytes = max_bytes, reserve_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        self._used = self._usage()  # an estimate between scans of the folder
        self._outputs: dict[str, Path] = {}
        self._open: dict[str, _Spool] = {}
        self._given_up: set[str] = set()

    @classmethod
    def from_context(cls, context: SinkContext) -> RawSpool:
        """The daemon's spool, under ``state_dir/refine``."""
        return cls(
            context.state.root / "refine",
            state=context.state,
            max_bytes=int(context.config.refine.max_gb * 2**30),
            reserve_bytes=int(2 * context.config.output.min_free_mb * 2**20),
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
            spool = self._open[frame.series] = _Spool(path, frame, output)
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
        for path in self.root.glob(f"{file_safe(Path(series).stem, limit=60)}-*.h5"):
            if path.name.endswith((READY_SUFFIX, FAILED_SUFFIX)) or path in in_use:
                continue
            try:
                with h5py.File(path, "r") as handle:
                    if handle.attrs.get("series") == series:
                        return path
            except OSError as exc:
                log.warning("%s: unreadable spool (%s)", path.name, exc)
        return None

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

    def _room_for(self, nbytes: int, spool: _Spool | None) -> bool:
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
        for path in sorted(droppable - in_use, key=_eviction_order):
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
