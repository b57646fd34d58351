"""Denoised output: one growing NeXus-style HDF5 file per input series.

Layout (DESIGN.md):
  /entry/data/data                  (n, H, W) frames, chunks (1, H, W), growing
  /entry/provenance/source_frame    index of the source frame each row came from
  /entry/provenance/model_version   version of the weights that produced it
  /entry/provenance/t_received      unix time the frame arrived
  /entry/provenance/t_written       unix time it was written
  /entry/process/{program,version,config}

The file is in SWMR mode from its first frame on and flushed after every append, so a
reader opened with ``swmr=True`` sees every frame written so far, and a crash leaves only
whole frames. The object that opens a file is its only writer.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import h5py
import numpy as np

from n2s_stream import __version__

log = logging.getLogger(__name__)

PROVENANCE_FIELDS = {
    "source_frame": np.int64,
    "model_version": np.int64,
    "t_received": np.float64,
    "t_written": np.float64,
}


def output_name(source: Path) -> str:
    """Name of the output file for a source file: ``scan_0001.h5`` → ``scan_0001_n2s.h5``."""
    return f"{source.stem}_n2s.h5"


class FrameWriter:
    """Appends denoised frames and their provenance rows to a new SWMR output file."""

    def __init__(
        self,
        path: str | Path,
        *,
        frame_shape: tuple[int, int],
        dtype: np.dtype | str = np.float32,
        config_text: str = "",
        source: str = "",
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = h5py.File(self.path, "w", libver="latest")
        try:
            self._create_layout(tuple(frame_shape), np.dtype(dtype), config_text, source)
            self._file.swmr_mode = True
        except BaseException:
            self._file.close()
            raise
        log.info("opened output %s (%dx%d %s)", self.path, *frame_shape, np.dtype(dtype))

    def _create_layout(
        self, frame_shape: tuple[int, int], dtype: np.dtype, config_text: str, source: str
    ) -> None:
        entry = self._file.create_group("entry")
        entry.attrs["NX_class"] = "NXentry"
        data = entry.create_group("data")
        data.attrs.update({"NX_class": "NXdata", "signal": "data"})
        self._frames = data.create_dataset(
            "data", shape=(0, *frame_shape), maxshape=(None, *frame_shape),
            chunks=(1, *frame_shape), dtype=dtype,
        )
        provenance = entry.create_group("provenance")
        provenance.attrs["NX_class"] = "NXcollection"
        self._provenance = {
            name: provenance.create_dataset(
                name, shape=(0,), maxshape=(None,), chunks=(1024,), dtype=kind
            )
            for name, kind in PROVENANCE_FIELDS.items()
        }
        process = entry.create_group("process")
        process.attrs["NX_class"] = "NXprocess"
        process["program"] = "n2s-stream"
        process["version"] = __version__
        process["config"] = config_text
        process["source"] = source

    @property
    def n_written(self) -> int:
        """Frames in the file so far."""
        return int(self._frames.shape[0])

    def append(
        self,
        frames: np.ndarray,
        *,
        source_frames: np.ndarray,
        model_version: int,
        t_received: np.ndarray | float,
    ) -> None:
        """Append ``(n, H, W)`` frames with one provenance row each, then flush."""
        n = frames.shape[0]
        start = self.n_written
        self._frames.resize(start + n, axis=0)
        self._frames[start:] = frames
        rows = {
            "source_frame": np.asarray(source_frames, dtype=np.int64),
            "model_version": np.full(n, model_version, dtype=np.int64),
            "t_received": np.broadcast_to(np.asarray(t_received, dtype=np.float64), (n,)),
            "t_written": np.full(n, time.time(), dtype=np.float64),
        }
        for name, values in rows.items():
            ds = self._provenance[name]
            ds.resize(start + n, axis=0)
            ds[start:] = values
        self._file.flush()

    def close(self) -> None:
        """Flush and close; the file then holds exactly the frames appended."""
        if self._file.id.valid:
            n = self.n_written
            self._file.close()
            log.info("closed output %s (%d frames)", self.path, n)

    def __enter__(self) -> FrameWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
