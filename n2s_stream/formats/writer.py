"""Denoised output: one growing NeXus-style HDF5 file per input series.

Layout (DESIGN.md):
  /entry/data/data                  (n, H, W) frames, chunks (1, H, W), growing
  /entry/provenance/source_frame    index of the source frame each row came from
  /entry/provenance/model_version   version of the weights that produced it
  /entry/provenance/t_received      unix time the frame arrived
  /entry/provenance/t_written       unix time it was written
  /entry/provenance/denoiser        0 = the network, 1 = the cold-start classical denoiser
  /entry/provenance/t_source        unix time the detector took it (NaN: the source did not say)
  /entry/provenance/source_id       the detector's own frame number (areaDetector uniqueId; -1:
                                    none)
  /entry/provenance/attributes/NAME numbers that came with the frames (areaDetector
                                    NDAttributes); NaN where a frame had none of that name
  /entry/process/{program,version,config,source[,cold_start]}
  /entry/refined/data               (m, H, W) the first m frames denoised again once the
                                    series ended (runtime/refine.py), same order as /entry/data/data
  /entry/refined/model_version      version of the weights that refined each

Frames are stored in the `OutputFormat` asked for (dtype, codec): lossless chunks arrive
encoded (``append_chunks``, stored whole with ``write_direct_chunk``), lossy ones go
through HDF5's filter. Provenance rows are kept in memory and appended in blocks when the
file is flushed: at most once per ``flush_seconds`` (0: after every append), so a frame
that comes after a quiet spell is flushed at once and frames that come faster wait at
most that long, as areaDetector's NDFileHDF5 flushes every N frames. The file is in SWMR mode
from its first frame on, so a reader opened with ``swmr=True`` sees every frame within
that bound, and a crash leaves only whole frames: a frame counts once its provenance row
is in, and rows are flushed only after their frames. The object that opens a file is its
only writer.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (registers the output codecs' filters with h5py)
import numpy as np

from n2s_stream import __version__
from n2s_stream.errors import OutputError
from n2s_stream.formats.output_format import OutputFormat, filter_options, format_of
from n2s_stream.formats.superblock import clear_write_flags

log = logging.getLogger(__name__)

PROVENANCE_FIELDS = {
    "source_frame": np.int64,
    "model_version": np.int64,
    "t_received": np.float64,
    "t_written": np.float64,
    "denoiser": np.uint8,
    "t_source": np.float64,
    "source_id": np.int64,
}
MAX_ATTRIBUTES = 64
"""Attribute columns per file; more names (a misbehaving feed) are logged and left out."""


def whole_frames(file: h5py.File) -> int:
    """Frames of an output file that are complete: a frame counts once its data and every
    provenance row are in (they are written and flushed in that order)."""
    provenance = file["/entry/provenance"]
    lengths = [provenance[name].shape[0] for name in PROVENANCE_FIELDS]
    return min(file["/entry/data/data"].shape[0], *lengths)


def last_written_source_frame(output: Path) -> int | None:
    """Highest source frame number in an output file's provenance, None if none."""
    row = last_provenance_row(output)
    return None if row is None else int(row["source_frame"])


def last_provenance_row(output: Path) -> dict[str, float] | None:
    """The provenance of an output file's last whole frame (``source_frame``,
    ``t_received``, ``t_source``, ...), None if it has none."""
    if not output.exists():
        return None
    try:
        with h5py.File(output, "r", swmr=True, locking=False) as handle:
            whole = whole_frames(handle)
            if not whole:
                return None
            provenance = handle["/entry/provenance"]
            return {
                name: float(column[whole - 1])
                for name, column in provenance.items()
                if isinstance(column, h5py.Dataset)
            }
    except (OSError, KeyError) as exc:
        raise OutputError(f"{output}: existing output cannot be read to resume: {exc}") from exc


def whole_refined(file: h5py.File) -> int:
    """Refined frames of an output that are complete (data, then its version; 0: none)."""
    if "/entry/refined" not in file:
        return 0
    refined = file["/entry/refined"]
    return min(refined["data"].shape[0], refined["model_version"].shape[0])


def free_bytes(directory: Path) -> int:
    """Bytes an unprivileged writer may still use on the file system of ``directory``."""
    stats = os.statvfs(directory)
    return stats.f_bavail * stats.f_frsize


def numeric_names(attributes: Mapping[str, float | str]) -> tuple[str, ...]:
    """The names of the attributes whose value is a number: the output's columns."""
    return tuple(name for name, value in attributes.items() if not isinstance(value, str))


def attribute_column(name: str) -> str:
    """An HDF5-safe dataset name for an attribute (never a path: no ``/``, no dots first)."""
    return re.sub(r"[^A-Za-z0-9_.:-]", "_", name).lstrip(".")[:100] or "_"


OUTPUT_SUFFIX = "_n2s.h5"
"""What every output's name ends with; this module alone builds and parses output names."""


def output_name(source: Path) -> str:
    """Name of the output file for a source file: ``scan_0001.h5`` → ``scan_0001_n2s.h5``."""
    return source.stem + OUTPUT_SUFFIX


def series_output(root: Path, series: str) -> Path:
    """The output file under ``root`` of a series that a feed names (ZeroMQ, PVA,
    Bluesky): ``<series>_n2s.h5``."""
    return root / f"{series}{OUTPUT_SUFFIX}"


def output_stem(output: Path) -> str:
    """The name an output is named after (``scan_0001_n2s.h5`` → ``scan_0001``)."""
    return output.name.removesuffix(".h5").removesuffix("_n2s")


def rerun_output(output: Path, run: int) -> Path:
    """The output of the ``run``-th series of the same name (``<name>_r2_n2s.h5``...)."""
    return output.with_name(f"{output_stem(output)}_r{run}{OUTPUT_SUFFIX}")


@dataclass(frozen=True)
class Provenance:
    """What the provenance rows of appended frames say: per frame (sequences) or for all
    of them (scalars); ``attributes`` one mapping per frame, or none."""

    source_frames: np.ndarray | Sequence[int]
    model_version: int
    t_received: np.ndarray | float
    denoiser: int = 0
    t_source: np.ndarray | float | None = None
    source_ids: Sequence[int | None] | None = None
    attributes: Sequence[Mapping[str, float | str]] = ()

    def columns(self, n: int) -> dict[str, np.ndarray]:
        """The ``n`` rows, one array per column of `PROVENANCE_FIELDS`."""
        return {
            "source_frame": np.asarray(self.source_frames, dtype=np.int64),
            "model_version": np.full(n, self.model_version, dtype=np.int64),
            "t_received": np.broadcast_to(np.asarray(self.t_received, dtype=np.float64), (n,)),
            "t_written": np.full(n, time.time(), dtype=np.float64),
            "denoiser": np.full(n, self.denoiser, dtype=np.uint8),
            "t_source": np.broadcast_to(
                np.asarray(np.nan if self.t_source is None else self.t_source, dtype=np.float64),
                (n,),
            ),
            "source_id": np.array(
                [-1 if i is None else i for i in (self.source_ids or [None] * n)], dtype=np.int64
            ),
        }


@dataclass(frozen=True)
class OutputHeader:
    """What a new output records about where its frames come from: the configuration
    that made it (TOML text), the source (series or file), notes (``/entry/process``),
    and the names of the per-frame attributes its provenance gets columns for."""

    config_text: str = ""
    source: str = ""
    notes: Mapping[str, str] = field(default_factory=dict)
    attribute_names: Sequence[str] = ()


class FrameWriter:
    """Appends denoised frames and their provenance rows to an SWMR output file.

    A new file is created with ``header``, or with ``resume=True`` an existing one is
    continued in the format it was begun with: it is first cut back to its whole frames
    (a frame counts once its last provenance row is in), and a file left "open for write"
    by a killed process is rewritten first. ``dtype`` overrides ``output_format``'s;
    ``mean_count`` (the series' mean count) sets a lossy codec's error bound.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        frame_shape: tuple[int, int],
        dtype: np.dtype | str | None = None,
        output_format: OutputFormat | None = None,
        mean_count: float = 1.0,
        flush_seconds: float = 0.0,
        header: OutputHeader | None = None,
        resume: bool = False,
    ) -> None:
        self.path = Path(path)
        self.format = output_format or OutputFormat("float32", "none")
        if dtype is not None:
            self.format = replace(self.format, dtype=np.dtype(dtype).name)
        self.flush_seconds = flush_seconds
        self._unkept: set[str] = set()
        self._columns: dict[str, str] = {}  # attribute name -> its column's name
        self._rows: list[dict[str, np.ndarray]] = []  # provenance not yet in the file
        self._attribute_rows: list[Mapping[str, float | str]] = []
        self._flushed_at = -math.inf  # monotonic time of the last flush
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume and self.path.exists():
            self._file = open_for_append(self.path)
            try:
                self._attach_layout(tuple(frame_shape), np.dtype(self.format.dtype))
                self._file.swmr_mode = True
            except BaseException:
                self._file.close()
                raise
            self.last_source_frame = (
                int(self._provenance["source_frame"][self.n_written - 1]) if self.n_written else -1
            )
            log.info(
                "resumed output %s: %d frames (%s), last source frame %d",
                self.path,
                self.n_written,
                self.format.describe(),
                self.last_source_frame,
            )
            return
        self._file = h5py.File(self.path, "w", libver="latest")
        try:
            self._create_layout(tuple(frame_shape), mean_count, header or OutputHeader())
            self._file.swmr_mode = True
        except BaseException:
            self._file.close()
            raise
        self.last_source_frame = -1
        log.info(
            "opened output %s (%dx%d %s)", self.path, *frame_shape, self.format.describe(mean_count)
        )

    def _attach_layout(self, frame_shape: tuple[int, ...], dtype: np.dtype) -> None:
        self._count = 0
        self._frames = self._file["/entry/data/data"]
        if self._frames.dtype.kind == dtype.kind == "f":
            dtype = self._frames.dtype  # float16 or float32: continued as begun (below)
        if self._frames.shape[1:] != frame_shape or self._frames.dtype != dtype:
            raise ValueError(
                f"{self.path}: existing output holds {self._frames.shape[1:]} {self._frames.dtype}"
                f" frames, not {frame_shape} {dtype}"
            )
        stored = format_of(self._frames)
        if (stored.dtype, stored.compression) != (self.format.dtype, self.format.compression):
            log.warning(
                "%s: begun as %s; continued so (not %s)",
                self.path,
                stored.describe(),
                self.format.describe(),
            )
        self.format = replace(self.format, dtype=stored.dtype, compression=stored.compression)
        whole = whole_frames(self._file)
        group = self._file["/entry/provenance"]
        self._provenance = {name: group[name] for name in PROVENANCE_FIELDS}
        self._attributes = dict(group["attributes"].items()) if "attributes" in group else {}
        for ds in (self._frames, *self._provenance.values(), *self._attributes.values()):
            if ds.shape[0] != whole:
                ds.resize(whole, axis=0)  # attribute columns may be short: NaN-filled

    def _create_layout(
        self, frame_shape: tuple[int, ...], mean_count: float, header: OutputHeader
    ) -> None:
        self._count = 0
        entry = self._file.create_group("entry")
        entry.attrs["NX_class"] = "NXentry"
        data = entry.create_group("data")
        data.attrs.update({"NX_class": "NXdata", "signal": "data"})
        self._frames = data.create_dataset(
            "data",
            shape=(0, *frame_shape),
            maxshape=(None, *frame_shape),
            chunks=(1, *frame_shape),
            **self.format.dataset_options(mean_count),
        )
        provenance = entry.create_group("provenance")
        provenance.attrs["NX_class"] = "NXcollection"
        self._provenance = {
            name: _column(provenance, name, kind) for name, kind in PROVENANCE_FIELDS.items()
        }
        columns = sorted({attribute_column(name) for name in header.attribute_names})
        if len(columns) > MAX_ATTRIBUTES:
            log.warning(
                "%s: %d attribute names; the first %d (by name) are kept",
                self.path,
                len(columns),
                MAX_ATTRIBUTES,
            )
        attributes = provenance.create_group("attributes") if columns else None
        self._attributes = (
            {name: _column(attributes, name, np.float64) for name in columns[:MAX_ATTRIBUTES]}
            if attributes
            else {}
        )
        self._provenance["denoiser"].attrs["meaning"] = (
            "0: the network (weights of model_version); 1: the calibrated classical denoiser "
            "of /entry/process/cold_start, used until the network measured better"
        )
        process = entry.create_group("process")
        process.attrs["NX_class"] = "NXprocess"
        process["program"] = "n2s-stream"
        process["version"] = __version__
        process["config"] = header.config_text
        process["source"] = header.source
        for key, text in header.notes.items():
            process[key] = text

    @property
    def frame_shape(self) -> tuple[int, int]:
        """``(H, W)`` of the frames this file holds."""
        return tuple(self._frames.shape[1:])

    @property
    def n_written(self) -> int:
        """Frames in the file so far (still known after closing)."""
        if self._file.id.valid:
            self._count = int(self._frames.shape[0])
        return self._count

    @property
    def n_flushed(self) -> int:
        """Frames that SWMR readers see: those whose provenance rows are in the file."""
        if self._file.id.valid:
            return int(self._provenance["source_frame"].shape[0])
        return self._count

    def append(
        self,
        frames: np.ndarray,
        *,
        source_frames: np.ndarray | Sequence[int],
        model_version: int,
        t_received: np.ndarray | float,
        denoiser: int = 0,
        t_source: np.ndarray | float | None = None,
        source_ids: Sequence[int | None] | None = None,
        attributes: Sequence[Mapping[str, float | str]] = (),
    ) -> None:
        """Append ``(n, H, W)`` frames (float32, detector units) with one provenance row
        each: encoded here (lossless codecs) or by HDF5's filter (lossy). ``attributes``:
        one mapping per frame (or none), each name whose value is a number a column of
        its own. Flushed when due (``flush_seconds``)."""
        self.append_frames(
            frames,
            Provenance(
                source_frames, model_version, t_received, denoiser, t_source, source_ids, attributes
            ),
        )

    def append_frames(self, frames: np.ndarray, rows: Provenance) -> None:
        """As `append`, with the rows as one `Provenance`."""
        if self.format.direct:
            self.append_chunks([self.format.encode(frame) for frame in frames], rows)
            return
        start = self.n_written
        with self._undone_on_failure(start):
            self._frames.resize(start + len(frames), axis=0)
            self._frames[start:] = frames
        self._add_rows(len(frames), rows)

    def append_chunks(self, chunks: Sequence[bytes | np.ndarray], rows: Provenance) -> None:
        """As `append`, for frames already encoded by ``self.format.encode`` (one stored
        chunk each, written whole)."""
        start = self.n_written
        with self._undone_on_failure(start):
            self._frames.resize(start + len(chunks), axis=0)
            for k, chunk in enumerate(chunks):
                self._frames.id.write_direct_chunk((start + k, 0, 0), chunk)
        self._add_rows(len(chunks), rows)

    @contextmanager
    def _undone_on_failure(self, start: int) -> Iterator[None]:
        """Frames that fail to be stored are cut off again, so that the next frame lands
        where its provenance row says (best effort: the rows decide what is whole)."""
        try:
            yield
        except BaseException:
            try:
                self._frames.resize(start, axis=0)
            except Exception as exc:  # the file system is gone: the rows still decide
                log.error("%s: could not cut back to %d frames: %s", self.path, start, exc)
            raise

    def _add_rows(self, n: int, rows: Provenance) -> None:
        if not n:
            return
        self._rows.append(rows.columns(n))
        self._attribute_rows += list(rows.attributes) or [{}] * n
        self.last_source_frame = max(
            self.last_source_frame, int(self._rows[-1]["source_frame"][-1])
        )
        self.flush_if_due()

    def flush_if_due(self) -> None:
        """Flush what is appended unless the last flush is less than ``flush_seconds`` old:
        a frame after a quiet spell is visible at once, frames that come faster are
        flushed together (call this now and then: the daemon does on every round of its
        inference loop)."""
        if self._rows and time.monotonic() - self._flushed_at >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Make every frame appended so far visible to SWMR readers, with its provenance
        rows: the frames reach the disk first, then the rows that count them whole."""
        if not self._rows:
            return
        # HDF5 may write any dataset's new extent to disk before the next flush; flushing
        # the frames first means a process killed mid-append never leaves provenance rows
        # on disk for frames that are not (a SWMR reader trusts the provenance length).
        self._file.flush()
        start = int(self._provenance["source_frame"].shape[0])
        rows = {
            name: np.concatenate([block[name] for block in self._rows])
            for name in PROVENANCE_FIELDS
        }
        n = len(rows["source_frame"])
        self._append_attributes(start, n, self._attribute_rows)
        for name, values in rows.items():
            ds = self._provenance[name]
            ds.resize(start + n, axis=0)
            ds[start:] = values
        self._file.flush()
        self._rows, self._attribute_rows = [], []
        self._flushed_at = time.monotonic()

    def _append_attributes(
        self, start: int, n: int, attributes: Sequence[Mapping[str, float | str]]
    ) -> None:
        """Grow every attribute column by ``n`` rows (NaN where a frame lacks the name).
        SWMR allows no new datasets once writing began: names that the series' first
        frame did not have are logged once and not kept."""
        values = {name: np.full(n, np.nan) for name in self._attributes}
        unknown = set()
        for k, row in enumerate(attributes):
            for key, value in row.items():
                if isinstance(value, str):
                    continue  # text is served, not kept: a column holds numbers
                column = self._columns.setdefault(key, attribute_column(key))
                if column in values:
                    values[column][k] = value
                else:
                    unknown.add(key)
        for name, ds in self._attributes.items():
            ds.resize(start + n, axis=0)
            ds[start:] = values[name]
        unknown -= self._unkept
        if unknown:
            log.warning(
                "%s: attributes %s were not on the series' first frame; not kept",
                self.path,
                ", ".join(sorted(unknown)),
            )
            self._unkept |= unknown

    def close(self) -> None:
        """Flush and close; the file then holds exactly the frames appended."""
        if self._file.id.valid:
            try:
                self.flush()
            finally:
                n = self.n_written
                self._file.close()
            log.info("closed output %s (%d frames)", self.path, n)

    def __enter__(self) -> FrameWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RefinedWriter:
    """Appends refined frames to ``/entry/refined`` of a finished output (its live frames
    are never touched), in SWMR mode like the live writer: a killed writer leaves whole
    frames and the next one continues after them. Raises `FileBusy` while another
    process has the output open."""

    def __init__(self, path: Path, *, description: str) -> None:
        self.path = path
        self._file = open_for_append(path, busy_raises=True)
        try:
            live = self._file["/entry/data/data"]
            self.n_live = whole_frames(self._file)
            self.source_frames = self._file["/entry/provenance/source_frame"][: self.n_live]
            if "/entry/refined" not in self._file:
                group = self._file["/entry"].create_group("refined")
                group.attrs.update(
                    {"NX_class": "NXdata", "signal": "data", "description": description}
                )
                group.create_dataset(
                    "data",
                    shape=(0, *live.shape[1:]),
                    maxshape=(None, *live.shape[1:]),
                    chunks=(1, *live.shape[1:]),
                    dtype=live.dtype,
                    **filter_options(live),
                )
                _column(group, "model_version", np.int64)
            self._data = self._file["/entry/refined/data"]
            self._versions = self._file["/entry/refined/model_version"]
            self.n_done = whole_refined(self._file)
            for ds in (self._data, self._versions):
                ds.resize(self.n_done, axis=0)
            self._file.swmr_mode = True
        except BaseException:
            self._file.close()
            raise

    @property
    def dtype(self) -> np.dtype:
        """The live frames' dtype, which refined frames are written in."""
        return self._data.dtype

    def append(self, frames: np.ndarray, model_versions: np.ndarray | int) -> None:
        """Append the next ``(n, H, W)`` refined frames and the version of the weights
        that made each, then flush."""
        n, start = frames.shape[0], self.n_done
        self._data.resize(start + n, axis=0)
        self._data[start:] = frames
        self._file.flush()  # frames on disk before the versions that name them
        self._versions.resize(start + n, axis=0)
        self._versions[start:] = model_versions
        self._file.flush()
        self.n_done = start + n

    def close(self) -> None:
        """Flush and close."""
        if self._file.id.valid:
            self._file.close()


def _column(group: h5py.Group, name: str, dtype: type, *, length: int = 0) -> h5py.Dataset:
    """A growing provenance column; unknown values read NaN (floats) or -1 (source_id)."""
    fill = np.nan if np.dtype(dtype).kind == "f" else (-1 if name == "source_id" else 0)
    return group.create_dataset(
        name, shape=(length,), maxshape=(None,), chunks=(1024,), dtype=dtype, fillvalue=fill
    )


def close_left_open(path: Path) -> None:
    """Make an output that a killed run left flagged "open for write" readable by any HDF5
    reader again (its whole frames kept); a cleanly closed file is left as it is. For
    series whose every frame a killed run had already written: no writer reopens them."""
    open_for_append(path).close()


class OutputAccess:
    """Which outputs this process has open for live writing, and a lock around opening
    one. HDF5 shares one handle per file within a process, so the live writer and a short
    open (the refiner appending refined frames, a killed writer's flags cleared) must never
    have one output open at once: a short open happens only on outputs not open for live
    writing, under the lock, and the live writer opens an output under the same lock.
    ``min_free_bytes``: the space every writer of outputs leaves free on their disk."""

    def __init__(self, min_free_bytes: int = 0) -> None:
        self.min_free_bytes = min_free_bytes
        self._lock = threading.Lock()
        self._live: set[Path] = set()

    @contextmanager
    def opening_live(self, path: Path) -> Iterator[None]:
        """Open ``path`` for live writing inside this block; it counts as open after it."""
        with self._lock:
            yield
            self._live.add(path.resolve())

    def closed_live(self, path: Path) -> None:
        """The live writer closed ``path``."""
        with self._lock:
            self._live.discard(path.resolve())

    @contextmanager
    def opening_briefly(self, path: Path) -> Iterator[bool]:
        """Inside this block, True if ``path`` may be opened for a short while (it is not
        open for live writing); the live writer waits until the block ends."""
        with self._lock:
            yield path.resolve() not in self._live


class FileBusy(OSError):
    """Another process has the file open (HDF5's lock): try again later."""


def open_for_append(path: Path, *, busy_raises: bool = False) -> h5py.File:
    """Open an output for appending. A crash leaves it flagged "open for write", which
    HDF5 refuses: the flags are cleared (the file was in SWMR mode, so what was flushed is
    consistent) and the file is appended to as it is; only a file that still cannot be
    opened then has its whole frames copied to a fresh file that replaces it. With
    ``busy_raises``, a file that another process holds open raises `FileBusy` instead."""
    try:
        return h5py.File(path, "a", libver="latest")
    except OSError as exc:
        if busy_raises and (exc.errno == errno.EAGAIN or "unable to lock file" in str(exc)):
            raise FileBusy(errno.EAGAIN, f"{path} is open in another process") from exc
        reason = str(exc).splitlines()[0]
    try:
        if clear_write_flags(path):
            file = h5py.File(path, "a", libver="latest")
            log.warning("%s: left open by a stopped writer; its write flags were cleared", path)
            return file
    except (OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0]
    log.warning("%s: cannot be opened for appending (%s); rewriting its whole frames", path, reason)
    tmp = path.with_name(path.name + ".recovering")
    with h5py.File(path, "r", swmr=True) as old, h5py.File(tmp, "w", libver="latest") as new:
        whole, refined = whole_frames(old), whole_refined(old)
        for name, obj in _walk(old):
            if isinstance(obj, h5py.Group):
                new.require_group(name).attrs.update(obj.attrs)
            elif obj.maxshape and obj.maxshape[0] is None:
                rows = refined if name.startswith("entry/refined/") else whole
                copy = new.create_dataset(
                    name,
                    shape=(rows, *obj.shape[1:]),
                    maxshape=obj.maxshape,
                    chunks=obj.chunks,
                    dtype=obj.dtype,
                    fillvalue=obj.fillvalue,
                    **filter_options(obj),
                )
                for start in range(0, rows, 256):
                    copy[start : start + 256] = obj[start : min(start + 256, rows)]
                copy.attrs.update(obj.attrs)
            else:
                new[name] = obj[()]
        new.flush()
    os.replace(tmp, path)
    return h5py.File(path, "a", libver="latest")


def _walk(file: h5py.File) -> list[tuple[str, h5py.Group | h5py.Dataset]]:
    items: list[tuple[str, h5py.Group | h5py.Dataset]] = []
    file.visititems(lambda name, obj: items.append((name, obj)))
    return items
