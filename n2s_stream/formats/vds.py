"""One stack from the shards of a fanned-out series, as an HDF5 virtual dataset (what
``n2s-stream merge`` writes).

Each worker of a fan-out writes its own shard (frames in the order it got them). The
merged file holds an HDF5 virtual dataset ``/entry/data/data`` of shape ``(N, H, W)``
whose row ``i`` is source frame ``i``, read from whichever shard has it (no pixel is
copied), plus the merged provenance. Frames no shard has read as NaN and are reported.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from n2s_stream.errors import UsageError
from n2s_stream.formats.writer import whole_frames

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MergeResult:
    """What the merged file presents."""

    out: Path
    n_frames: int
    missing: list[int]


def _shard_index(path: Path) -> tuple[np.ndarray, tuple[int, int], np.dtype, int]:
    try:
        with h5py.File(path, "r", swmr=True) as handle:
            data = handle["/entry/data/data"]
            whole = whole_frames(handle)
            frames = handle["/entry/provenance/source_frame"][:whole]
            return frames, tuple(data.shape[1:]), data.dtype, whole
    except (OSError, KeyError) as exc:
        raise UsageError(f"{path}: not an n2s-stream output shard: {exc}") from exc


def merge_shards(shards: list[Path], out: Path) -> MergeResult:
    """Write ``out`` with a virtual dataset ordering the shards' frames by source number."""
    if not shards:
        raise UsageError("merge: give at least one shard")
    indexes = [_shard_index(Path(shard)) for shard in shards]
    shapes = {(shape, np.dtype(dtype).str) for _, shape, dtype, _ in indexes}
    if len(shapes) != 1:
        raise UsageError(f"merge: shards disagree on frame shape or dtype: {sorted(shapes)}")
    ((frame_shape, dtype_str),) = shapes
    everything = np.concatenate([frames for frames, *_ in indexes])
    values, counts = np.unique(everything, return_counts=True)
    if (counts > 1).any():
        raise UsageError(
            f"merge: source frames {values[counts > 1][:10].tolist()} are in more than one shard"
        )
    n_frames = int(values.max()) + 1 if len(values) else 0
    layout = h5py.VirtualLayout(shape=(n_frames, *frame_shape), dtype=np.dtype(dtype_str))
    owner = np.full(n_frames, -1, dtype=np.int64)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for number, (shard, (frames, _, _, whole)) in enumerate(zip(shards, indexes, strict=True)):
        # Relative names: HDF5 looks for them beside the merged file, so the set can move.
        name = os.path.relpath(Path(shard).resolve(), out.resolve().parent)
        source = h5py.VirtualSource(name, "/entry/data/data", shape=(whole, *frame_shape))
        for row, frame in enumerate(frames):
            layout[int(frame)] = source[row]
            owner[int(frame)] = number
    with h5py.File(out, "w", libver="latest") as handle:
        entry = handle.create_group("entry")
        entry.attrs["NX_class"] = "NXentry"
        data = entry.create_group("data")
        data.attrs.update({"NX_class": "NXdata", "signal": "data"})
        fill = np.nan if np.dtype(dtype_str).kind == "f" else 0
        data.create_virtual_dataset("data", layout, fillvalue=fill)
        provenance = entry.create_group("provenance")
        provenance["source_frame"] = np.arange(n_frames)
        provenance["shard"] = owner
        provenance["shards"] = [str(s) for s in shards]
    missing = np.flatnonzero(owner < 0).tolist()
    log.info(
        "merged %d shards into %s: %d frames, %d missing", len(shards), out, n_frames, len(missing)
    )
    return MergeResult(out, n_frames, missing)
