"""Read detector frames from HDF5 files as one ``(N, H, W)`` stack, a chunk at a time.

Shared by the offline tools and the daemon. Finds the frame dataset the way DESIGN.md
says (``--dataset``, ``/entry/data/data``, ``/data``, ``/X``, or an Eiger master file's
``/entry/data/data_NNNNNN`` links), accepts ``(N,H,W)``, ``(N0,N1,H,W)`` (flattened) and
``(H,W)``, and decodes every filter hdf5plugin knows (bitshuffle-LZ4 from Eiger included).
Every problem becomes an `InputError` naming the file and the reason.

Frames stored one per chunk, uncompressed or bitshuffle-LZ4 (what Eiger detectors and
areaDetector's NDFileHDF5 write), are read as whole chunks (``read_direct_chunk``: HDF5's
filter pipeline and its global lock are skipped) and decoded by the caller's thread pool,
where bitshuffle runs without the GIL; any other layout goes through h5py as usual.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (registers the compression filters with h5py)
import numpy as np

from n2s_stream.errors import InputError
from n2s_stream.formats.codecs import MessageError, bslz4_decode, raw_decode
from n2s_stream.formats.output_format import BITSHUFFLE_FILTER, dataset_filters
from n2s_stream.stages import MAX_FRAME_PIXELS

log = logging.getLogger(__name__)

DEFAULT_DATASETS = ("/entry/data/data", "/data", "/X")
EIGER_DATA_GROUP = "/entry/data"
PIXEL_MASK_PATHS = (
    "/entry/instrument/detector/detectorSpecific/pixel_mask",
    "/entry/instrument/detector/pixel_mask",
)
_EIGER_LINK = re.compile(r"^data_\d{6}$")
BITSHUFFLE_LZ4 = 2  # the filter's compression option (cd_values[4]) for LZ4
# Bigger than h5py's 1 MiB default so that a whole chunk row of a large frame stays cached.
CHUNK_CACHE_BYTES = 64 * 2**20


Decoder = Callable[[bytes], np.ndarray]


@dataclass(frozen=True)
class _Segment:
    """One HDF5 dataset holding consecutive frames of the stack; ``decoder`` turns one of
    its stored chunks into a frame where frames are stored one per chunk in a codec
    decoded here (else None: read through h5py)."""

    name: str
    dataset: h5py.Dataset
    decoder: Decoder | None = None

    @property
    def n_frames(self) -> int:
        """Frames in the dataset now (it may grow)."""
        shape = self.dataset.shape
        return 1 if len(shape) == 2 else int(np.prod(shape[:-2]))


class FrameStack:
    """Frames of one HDF5 file seen as an ``(N, H, W)`` stack; use as a context manager."""

    def __init__(self, path: Path, dataset: str | None = None, *, swmr: bool = False) -> None:
        self.path = Path(path)
        self.swmr = swmr
        self._file = _open_file(self.path, swmr=swmr)
        try:
            self.dataset_name, self._segments = _find_segments(self._file, self.path, dataset)
            first = self._segments[0].dataset
            self.frame_shape: tuple[int, int] = tuple(first.shape[-2:])
            self.dtype = np.dtype(first.dtype)
            self.pixel_mask = self._read_pixel_mask()
        except BaseException:
            self._file.close()
            raise

    def __enter__(self) -> FrameStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the underlying HDF5 file."""
        self._file.close()

    def _read_pixel_mask(self) -> np.ndarray | None:
        """Eiger/NeXus ``pixel_mask`` (non-zero = gap, dead, hot...) as a bool map of bad
        pixels, or None. A mask of the wrong shape is ignored with a warning."""
        for name in PIXEL_MASK_PATHS:
            if name in self._file:
                mask = np.asarray(self._file[name][()]) != 0
                if mask.shape == self.frame_shape:
                    return mask if mask.any() else None
                log.warning(
                    "%s:%s: pixel mask shape %s does not match frames %s; ignored",
                    self.path,
                    name,
                    mask.shape,
                    self.frame_shape,
                )
        return None

    @property
    def linked(self) -> bool:
        """True for an Eiger master: frames live in data files that may still appear."""
        return any(_EIGER_LINK.match(seg.name.rsplit("/", 1)[-1]) for seg in self._segments)

    def refresh(self) -> int:
        """Catch up with a file another process is still writing (SWMR); returns the
        number of frames now visible. Frames are never visible before they are whole."""
        if self.swmr:
            for segment in self._segments:
                try:
                    segment.dataset.refresh()
                except (OSError, RuntimeError) as exc:
                    raise InputError(
                        f"{self.path}:{segment.name}: refresh failed: {_first_line(exc)}",
                        reason="read_error",
                    ) from exc
        return len(self)

    def __len__(self) -> int:
        return sum(segment.n_frames for segment in self._segments)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(N, H, W)`` of the stack as it is now."""
        return (len(self), *self.frame_shape)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Frames ``start:stop`` as an ``(n, H, W)`` array in the source dtype."""
        stop = min(stop, len(self))
        parts = []
        offset = 0
        for segment in self._segments:
            lo, hi = max(start - offset, 0), min(stop - offset, segment.n_frames)
            if lo < hi:
                parts.append(self._read_segment(segment, lo, hi))
            offset += segment.n_frames
        if not parts:
            return np.empty((0, *self.frame_shape), dtype=self.dtype)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def read_frames(self, indices: np.ndarray) -> np.ndarray:
        """Frames at the given sorted indices, ``(len(indices), H, W)``."""
        out = np.empty((len(indices), *self.frame_shape), dtype=self.dtype)
        for k, index in enumerate(indices):
            out[k] = self.read(int(index), int(index) + 1)[0]
        return out

    def read_list(self, start: int, stop: int, pool: Executor | None = None) -> list[np.ndarray]:
        """Frames ``start:stop`` as a list of ``(H, W)`` arrays in the source dtype; whole
        stored chunks are decoded by ``pool`` (in parallel) where the layout allows."""
        stop = min(stop, len(self))
        frames: list[np.ndarray] = []
        offset = 0
        for segment in self._segments:
            lo, hi = max(start - offset, 0), min(stop - offset, segment.n_frames)
            if lo < hi:
                chunks = self._read_chunks(segment, lo, hi)
                if chunks is None:
                    frames += list(self._read_segment(segment, lo, hi))
                else:
                    decode = self._decode_with(segment)
                    frames += list(pool.map(decode, chunks) if pool else map(decode, chunks))
            offset += segment.n_frames
        return frames

    def _read_chunks(self, segment: _Segment, lo: int, hi: int) -> list[bytes] | None:
        """The stored chunks of frames ``lo:hi``, or None where they are not whole frames
        in a codec decoded here (or a chunk skipped a filter)."""
        if segment.decoder is None:
            return None
        chunks = []
        try:
            for index in range(lo, hi):
                mask, chunk = segment.dataset.id.read_direct_chunk((index, 0, 0))
                if mask:
                    return None
                chunks.append(chunk)
        except (OSError, RuntimeError, ValueError):
            return None  # e.g. a chunk not stored yet in a growing file: h5py says what
        return chunks

    def _decode_with(self, segment: _Segment) -> Decoder:
        decoder = segment.decoder
        assert decoder is not None

        def decode(chunk: bytes) -> np.ndarray:
            try:
                return decoder(chunk)
            except MessageError as exc:
                raise InputError(
                    f"{self.path}:{segment.name}: a stored frame does not decode: {exc}",
                    reason="read_error",
                ) from exc

        return decode

    def iter_chunks(self, frames_per_chunk: int) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(first_index, frames)`` chunks covering the stack; memory stays bounded."""
        for start in range(0, len(self), frames_per_chunk):
            yield start, self.read(start, start + frames_per_chunk)

    def _read_segment(self, segment: _Segment, lo: int, hi: int) -> np.ndarray:
        ds = segment.dataset
        try:
            if ds.ndim == 2:
                return ds[()][np.newaxis]
            if ds.ndim == 3:
                return ds[lo:hi]
            inner = ds.shape[1]
            outer_lo, outer_hi = lo // inner, (hi - 1) // inner + 1
            block = ds[outer_lo:outer_hi].reshape(-1, *self.frame_shape)
            return block[lo - outer_lo * inner : hi - outer_lo * inner]
        except (OSError, RuntimeError, ValueError) as exc:
            raise InputError(
                f"{self.path}:{segment.name}: cannot read frames {lo}-{hi - 1}: {_first_line(exc)}",
                reason="read_error",
            ) from exc


def open_stack(path: str | Path, dataset: str | None = None, *, swmr: bool = False) -> FrameStack:
    """Open ``path`` and find its frames; raises `InputError` with a one-line reason."""
    return FrameStack(Path(path), dataset, swmr=swmr)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _open_file(path: Path, *, swmr: bool) -> h5py.File:
    if not path.exists():
        raise InputError(f"{path}: no such file", reason="missing")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not an HDF5 file", reason="not_hdf5")
    try:
        with open(path, "rb") as handle:  # a permission problem is said as such
            handle.read(8)
        if not h5py.is_hdf5(path):
            raise InputError(f"{path}: not an HDF5 file", reason="not_hdf5")
        # locking=False: a detector writer may hold the file; HDF5's lock would refuse us.
        return h5py.File(path, "r", swmr=swmr, locking=False, rdcc_nbytes=CHUNK_CACHE_BYTES)
    except PermissionError as exc:
        raise InputError(f"{path}: permission denied", reason="unreadable") from exc
    except OSError as exc:
        raise InputError(
            f"{path}: unreadable HDF5 file (truncated or corrupt): {_first_line(exc)}",
            reason="unreadable",
        ) from exc


def _find_segments(file: h5py.File, path: Path, dataset: str | None) -> tuple[str, list[_Segment]]:
    if dataset is not None:
        if dataset not in file:
            raise InputError(f"{path}: no dataset {dataset!r}", reason="no_dataset")
        names = [dataset]
    else:
        names = [name for name in DEFAULT_DATASETS if name in file]
        names = names[:1] or _eiger_links(file, path)
    if not names:
        looked = ", ".join((*DEFAULT_DATASETS, f"{EIGER_DATA_GROUP}/data_NNNNNN"))
        raise InputError(f"{path}: no frame dataset (looked for {looked})", reason="no_dataset")
    segments = [_segment(file, path, name) for name in names]
    shapes = {segment.dataset.shape[-2:] for segment in segments}
    if len(shapes) > 1:
        raise InputError(f"{path}: linked data files disagree on frame shape", reason="shape")
    return names[0] if len(names) == 1 else EIGER_DATA_GROUP, segments


def _eiger_links(file: h5py.File, path: Path) -> list[str]:
    group = file.get(EIGER_DATA_GROUP, getlink=False) if EIGER_DATA_GROUP in file else None
    if not isinstance(group, h5py.Group):
        return []
    return [f"{EIGER_DATA_GROUP}/{key}" for key in sorted(group) if _EIGER_LINK.match(key)]


def _segment(file: h5py.File, path: Path, name: str) -> _Segment:
    try:
        ds = file[name]
    except KeyError as exc:
        raise InputError(
            f"{path}:{name}: cannot open (missing linked data file?): {_first_line(exc)}",
            reason="missing",
        ) from exc
    if not isinstance(ds, h5py.Dataset):
        raise InputError(f"{path}:{name}: is a group, not a dataset", reason="no_dataset")
    if ds.dtype.kind not in "iuf":
        raise InputError(
            f"{path}:{name}: dtype {ds.dtype} is not numeric (integer or float)", reason="dtype"
        )
    if ds.ndim not in (2, 3, 4):
        raise InputError(
            f"{path}:{name}: shape {ds.shape} has rank {ds.ndim};"
            " expected (N,H,W), (N0,N1,H,W) or (H,W)",
            reason="rank",
        )
    if min(ds.shape[-2:]) < 1:
        raise InputError(f"{path}:{name}: empty frames, shape {ds.shape}", reason="empty")
    if ds.shape[-2] * ds.shape[-1] > MAX_FRAME_PIXELS:
        raise InputError(
            f"{path}:{name}: frames of {ds.shape[-2]}x{ds.shape[-1]} exceed "
            f"{MAX_FRAME_PIXELS} pixels",
            reason="too_large",
        )
    return _Segment(name, ds, _chunk_decoder(ds))


def _chunk_decoder(ds: h5py.Dataset) -> Decoder | None:
    """How to decode one stored chunk of ``ds`` into a frame, where ``ds`` holds one
    ``(N, H, W)`` frame per chunk, uncompressed or bitshuffle-LZ4 alone; else None."""
    if ds.ndim != 3 or ds.chunks != (1, *ds.shape[1:]) or ds.dtype.kind not in "iuf":
        return None
    shape, dtype = tuple(ds.shape[1:]), ds.dtype
    filters = dataset_filters(ds)
    if not filters:
        return lambda chunk: raw_decode(chunk, shape, dtype)
    code, values = filters[0]
    if (
        len(filters) == 1
        and code == BITSHUFFLE_FILTER
        and len(values) > 4
        and values[4] == BITSHUFFLE_LZ4
    ):
        return lambda chunk: bslz4_decode(chunk, shape, dtype)
    return None
