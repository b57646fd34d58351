"""The denoised frames' files: one growing SWMR HDF5 output per series (``writer.py``),
and the ledger entry that says where each series stands.

The required sink: a frame it cannot write for an OSError (disk, file system) stops
intake (the daemon exits 1 and the directory source re-reads the frame at the next start);
an existing output it cannot resume refuses that series' frames (``output_unreadable``).
While the output disk is (nearly) full it holds writing, and with it the queue and the
source, until space returns; HDF5 never sees ENOSPC, which it could not survive.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np

from n2s_stream.config import OutputOptions, as_toml
from n2s_stream.denoising import to_source_dtype
from n2s_stream.errors import OutputError
from n2s_stream.frames import Frame, SeriesEnd
from n2s_stream.metrics import Metrics
from n2s_stream.sinks import Abandoned, FrameMeta, SeriesStart, SinkContext
from n2s_stream.state import StateDir, last_written_source_frame
from n2s_stream.writer import FrameWriter, OutputAccess, close_left_open, free_bytes

log = logging.getLogger(__name__)


class Hdf5Sink:
    """Writes each series to its output file and keeps the ledger up to date."""

    name = "hdf5"
    required = True

    def __init__(self, options: OutputOptions, *, state: StateDir, metrics: Metrics,
                 stopping: threading.Event, config_text: str,
                 outputs: OutputAccess | None = None) -> None:
        self.options, self.state, self.metrics = options, state, metrics
        self._stopping = stopping
        self._outputs = outputs or OutputAccess()  # shared with the refiner
        self._config_text = config_text
        self._writers: dict[str, FrameWriter] = {}

    @classmethod
    def from_context(cls, context: SinkContext) -> Hdf5Sink:
        """The daemon's output sink."""
        return cls(context.config.output, state=context.state, metrics=context.metrics,
                   stopping=context.stopping, config_text=as_toml(context.config, "daemon"),
                   outputs=context.outputs)

    def last_written(self, series: str, output: Path) -> int:
        """The newest source frame of ``series`` already in its output (this run's or an
        earlier run's; -1 if none): the outputs are the authority on what was written."""
        writer = self._writers.get(series)
        if writer is not None:
            return writer.last_source_frame
        done = last_written_source_frame(self.state.output_for(series, output))
        return -1 if done is None else done

    def open_series(self, start: SeriesStart) -> None:
        """Open the series' output: resumed where an earlier run stopped, or new."""
        if start.series in self._writers:
            return
        dtype = start.dtype if self.options.require_reconstructable else np.dtype("f4")
        path = self.state.output_for(start.series, start.output)
        existed = path.exists()
        try:
            with self._outputs.opening_live(path):
                self._writers[start.series] = FrameWriter(
                    path, frame_shape=start.frame_shape, dtype=dtype,
                    config_text=self._config_text, source=start.series,
                    notes=start.notes or None, attribute_names=start.attribute_names,
                    resume=True)
        except (OSError, KeyError, ValueError) as exc:
            if not existed:
                raise  # a new file that cannot be made: the disk, not the file
            raise OutputError(f"{path}: existing output cannot be resumed ({exc}); move it "
                              "away to write the series again") from exc

    def rows_written(self, series: str) -> int:
        """Frames in the open output of ``series`` (an earlier run's included); 0 if none."""
        writer = self._writers.get(series)
        return 0 if writer is None else writer.n_written

    def frame_shape(self, series: str) -> tuple[int, int] | None:
        """Shape of the frames in the open output of ``series``."""
        writer = self._writers.get(series)
        return None if writer is None else writer.frame_shape

    def write(self, frame: Frame, denoised: np.ndarray, meta: FrameMeta) -> None:
        """Append the frame and its provenance row, flushed: SWMR readers see it now."""
        writer = self._writers[frame.series]
        self._wait_for_space(writer, denoised.nbytes)
        if self.options.require_reconstructable:
            denoised = to_source_dtype(denoised, frame.data.dtype)
        writer.append(denoised[np.newaxis], source_frames=[frame.index],
                      model_version=meta.version, t_received=frame.received_at,
                      denoiser=meta.denoiser, t_source=frame.t_source,
                      source_ids=[frame.source_id],
                      attributes=[frame.attributes])

    def end_series(self, end: SeriesEnd) -> None:
        """Close the series' output and note in the ledger whether it is complete."""
        writer = self._writers.pop(end.series, None)
        if writer is not None:
            writer.close()
            self._outputs.closed_live(writer.path)
            self.state.record(end.series, output=writer.path, written=writer.n_written,
                              finished=end.complete)
        elif end.complete:
            output = self.state.output_for(end.series, end.output)
            with self._outputs.opening_briefly(output) as free:
                if free and output.exists():
                    close_left_open(output)
            log.info("series %s ended with nothing new to write (an earlier run wrote it)",
                     end.series)
            self.state.record(end.series, output=end.output, written=0, finished=True)

    def close(self) -> None:
        """Close every open output; their series stay unfinished in the ledger."""
        for series in list(self._writers):
            writer = self._writers.pop(series)
            writer.close()
            self._outputs.closed_live(writer.path)
            self.state.record(series, output=writer.path, written=writer.n_written,
                              finished=False)

    def _wait_for_space(self, writer: FrameWriter, nbytes: int) -> None:
        needed = int(self.options.min_free_mb * 2**20) + 4 * nbytes
        free = free_bytes(writer.path.parent)
        if free >= needed:
            return
        log.error("output disk of %s nearly full (%.1f MiB free, %.1f MiB needed): holding "
                  "frames until space returns", writer.path, free / 2**20, needed / 2**20)
        self.metrics.output_paused.set(1)
        while free < needed:
            if self._stopping.wait(1.0):
                raise Abandoned(f"stopping while the output disk of {writer.path} is full")
            free = free_bytes(writer.path.parent)
        self.metrics.output_paused.set(0)
        log.info("space returned on the output disk (%.1f MiB free): writing again",
                 free / 2**20)
