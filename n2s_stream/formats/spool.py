"""The spool file: one series' raw frames kept until it is refined, in
``state_dir/refine`` (written by the spool sink, ``sinks/spool.py``; read by the refiner,
``runtime/refine.py``).

Layout: ``raw`` (n, H, W) in the source's dtype and ``source_frame`` (n,) int64, growing
together; ``pixel_mask`` (H, W) if the source gave one; attributes ``series`` and
``output``, and ``refined_from`` once the refiner has started on it. Names: ``<series>-<hash>.h5``
while frames come, ``*.ready.h5`` once the series ended, ``*.failed.h5`` when the refiner
gave up; ``<name>-2``... for the parts of a series that resumed after it went idle.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import h5py
import numpy as np

from n2s_stream.formats.names import file_safe
from n2s_stream.formats.writer import open_for_append
from n2s_stream.stages import Frame

log = logging.getLogger(__name__)

READY_SUFFIX = ".ready.h5"
FAILED_SUFFIX = ".failed.h5"
DIGEST_CHARS = 10
"""Hex digits of the hash that ends a spool's name (``spool_name``)."""


def spool_name(series: str, output: Path) -> str:
    """A file name for the spool of ``series`` written to ``output``: readable, and unique
    by a hash of both (two sources may name a series alike)."""
    digest = hashlib.sha1(f"{series}\0{output}".encode()).hexdigest()[:DIGEST_CHARS]
    return f"{_readable(series)}-{digest}"


def _readable(series: str) -> str:
    """The readable part of a spool's name (before its hash)."""
    return file_safe(Path(series).stem, limit=60)


def spool_part(path: Path) -> tuple[str, int]:
    """The spool's series part: its name without the part number, and the part number
    (1, or n for ``<name>-n``: the series resumed after it went idle)."""
    stem = path.name.removesuffix(READY_SUFFIX).removesuffix(FAILED_SUFFIX).removesuffix(".h5")
    match = re.fullmatch(rf"(.*-[0-9a-f]{{{DIGEST_CHARS}}})-(\d+)", stem)
    return (match.group(1), int(match.group(2))) if match else (stem, 1)


def eviction_order(path: Path) -> tuple[int, float]:
    """Spools to drop first: given up by the refiner, then those a stopped daemon left of
    series that never ended; oldest first within each."""
    rank = 0 if path.name.endswith(FAILED_SUFFIX) else 1
    try:
        return rank, path.stat().st_mtime
    except OSError:
        return rank, 0.0


class SpoolFile:
    """One series' spool, open for appending: ``raw`` (n, H, W) and ``source_frame`` (n,),
    growing; ``pixel_mask`` and the attributes ``series`` and ``output`` once."""

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


def unfinished_spool(root: Path, series: str, exclude: set[Path]) -> Path | None:
    """The spool under ``root`` that a series still receiving frames left (not ready,
    not failed, not in ``exclude``), if any."""
    for path in root.glob(f"{_readable(series)}-*.h5"):
        if path.name.endswith((READY_SUFFIX, FAILED_SUFFIX)) or path in exclude:
            continue
        try:
            with h5py.File(path, "r") as handle:
                if handle.attrs.get("series") == series:
                    return path
        except OSError as exc:
            log.warning("%s: unreadable spool (%s)", path.name, exc)
    return None


# ---- reading a spool (the refiner) --------------------------------------------------------
def output_of(spool: h5py.File) -> Path:
    """The output file whose rows this spool's frames are."""
    return Path(spool.attrs["output"])


def positions(spool: h5py.File) -> dict[int, int]:
    """Where each source frame the spool holds is in its ``raw`` frames."""
    return {int(s): k for k, s in enumerate(spool["source_frame"][:])}


def raw_frames(spool: h5py.File) -> h5py.Dataset:
    """The raw frames, ``(n, H, W)`` in the source's type, in arrival order."""
    return spool["raw"]


def pixel_mask_of(spool: h5py.File) -> np.ndarray | None:
    """The series' pixel mask (True: not measured), None if it came without one."""
    return spool["pixel_mask"][()] if "pixel_mask" in spool else None


def stored_refined(spool: h5py.File) -> tuple[h5py.Dataset, h5py.Dataset]:
    """The refined frames and their model versions that the spool holds."""
    return spool["refined"], spool["refined_version"]


def refined_from(spool: h5py.File) -> int:
    """The first output row the spool's refined frames stand for."""
    return int(spool.attrs.get("refined_from", 0))


def refined_datasets(spool: h5py.File, refined_rows: int) -> tuple[h5py.Dataset, h5py.Dataset]:
    """The spool's growing ``refined`` frames and ``refined_version`` column (created on
    first use, before SWMR mode, for the output's rows from ``refined_rows`` on: those not
    refined yet); then SWMR mode, so a kill leaves whole frames."""
    if "refined" not in spool:
        shape = spool["raw"].shape[1:]
        spool.create_dataset(
            "refined",
            shape=(0, *shape),
            maxshape=(None, *shape),
            chunks=(1, *shape),
            dtype=np.float32,
        )
        spool.create_dataset(
            "refined_version", shape=(0,), maxshape=(None,), chunks=(1024,), dtype=np.int64
        )
        spool.attrs["refined_from"] = refined_rows
    refined, versions = spool["refined"], spool["refined_version"]
    whole = min(refined.shape[0], versions.shape[0])
    refined.resize(whole, axis=0)
    versions.resize(whole, axis=0)
    spool.swmr_mode = True
    return refined, versions
