"""The denoised frames' files: one growing SWMR HDF5 output per series (``formats/writer.py``),
and the ledger entry that says where each series stands.

The required sink: a frame it cannot write for an OSError (disk, file system) stops
intake (the daemon exits 1 and the directory source re-reads the frame at the next start);
an existing output it cannot resume refuses that series' frames (``output_unreadable``).
While the output disk is (nearly) full it holds writing, and with it the queue and the
source, until space returns; HDF5 never sees ENOSPC, which it could not survive.

Frames are encoded (cast to the output dtype, compressed) by a pool of threads while the
inference thread goes on with the next frames; encoded chunks are stored in order, from
the inference thread, which alone touches the files. At most ``2 * encode_threads``
frames wait to be stored, so memory stays bounded. Files are flushed at most
``flush_seconds`` after a frame was stored (`tick`, every round of the inference loop).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from n2s_stream.config import OutputOptions, as_toml
from n2s_stream.errors import OutputError
from n2s_stream.formats.writer import (
    FrameWriter,
    OutputAccess,
    OutputHeader,
    Provenance,
    close_left_open,
    free_bytes,
    last_written_source_frame,
)
from n2s_stream.n2s.denoising import to_source_dtype
from n2s_stream.runtime.metrics import Metrics
from n2s_stream.runtime.state import StateDir
from n2s_stream.sinks import SinkContext
from n2s_stream.stages import Abandoned, Frame, FrameMeta, SeriesEnd, SeriesStart

log = logging.getLogger(__name__)


class StoreError(OSError):
    """A frame could not be encoded for its output: like a disk error, it stops intake."""


@dataclass
class _Encoding:
    """A frame whose chunk a pool thread is encoding, and what its provenance row says."""

    writer: FrameWriter
    chunk: Future
    frame: Frame
    meta: FrameMeta


class Hdf5Sink:
    """Writes each series to its output file and keeps the ledger up to date."""

    name = "hdf5"
    required = True

    def __init__(
        self,
        options: OutputOptions,
        *,
        state: StateDir,
        metrics: Metrics,
        stopping: threading.Event,
        config_text: str,
        outputs: OutputAccess | None = None,
    ) -> None:
        self.paused = False  # holding frames back: the output disk is nearly full
        self.options, self.state, self.metrics = options, state, metrics
        self._stopping = stopping
        self._outputs = outputs or OutputAccess()  # shared with the refiner
        self._config_text = config_text
        self._writers: dict[str, FrameWriter] = {}
        self._format = options.storage.output_format()
        self._encoding: deque[_Encoding] = deque()
        self._pool: ThreadPoolExecutor | None = None  # started with the first frame
        self._failed = False  # a frame could not be stored: none after it is
        self._closed_rows: dict[str, int] = {}  # frames of the outputs series ends closed

    @classmethod
    def from_context(cls, context: SinkContext) -> Hdf5Sink:
        """The daemon's output sink."""
        return cls(
            context.config.output,
            state=context.state,
            metrics=context.metrics,
            stopping=context.stopping,
            config_text=as_toml(context.config, "daemon"),
            outputs=context.outputs,
        )

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
        self._closed_rows.pop(start.series, None)
        dtype = start.dtype if self.options.require_reconstructable else None
        path = self.state.output_for(start.series, start.output)
        existed = path.exists()
        try:
            with self._outputs.opening_live(path):
                self._writers[start.series] = FrameWriter(
                    path,
                    frame_shape=start.frame_shape,
                    dtype=dtype,
                    output_format=self._format.for_source(start.dtype),
                    mean_count=start.mean_count,
                    flush_seconds=self.options.flush_seconds,
                    header=OutputHeader(
                        self._config_text,
                        start.series,
                        start.notes or {},
                        start.attribute_names,
                    ),
                    resume=True,
                )
        except (OSError, KeyError, ValueError) as exc:
            if not existed:
                raise  # a new file that cannot be made: the disk, not the file
            raise OutputError(
                f"{path}: existing output cannot be resumed ({exc}); move it "
                "away to write the series again"
            ) from exc

    def rows_written(self, series: str) -> int:
        """Frames of ``series`` that readers of its output see (an earlier run's
        included): of the open output, or of the one its end just closed; else 0."""
        writer = self._writers.get(series)
        return self._closed_rows.get(series, 0) if writer is None else writer.n_flushed

    def stored_dtype(self, series: str) -> np.dtype:
        """The dtype the open output of ``series`` stores its frames in (as begun, when
        it was resumed)."""
        return np.dtype(self._writers[series].format.dtype)

    def frame_shape(self, series: str) -> tuple[int, int] | None:
        """Shape of the frames in the open output of ``series``."""
        writer = self._writers.get(series)
        return None if writer is None else writer.frame_shape

    def write(self, frame: Frame, denoised: np.ndarray, meta: FrameMeta) -> None:
        """Encode the frame (in the pool) and store it with its provenance row; readers
        see it within ``flush_seconds``."""
        writer = self._writers[frame.series]
        self._wait_for_space(writer, denoised.nbytes)
        writer.last_source_frame = frame.index  # taken: written before the series ends
        if self.options.require_reconstructable:
            denoised = to_source_dtype(denoised, frame.data.dtype)
        if not writer.format.direct:  # a lossy codec: HDF5 encodes, in order
            self._store_encoded(wait=True)
            writer.append_frames(denoised[np.newaxis], _row(frame, meta))
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                self.options.encode_threads, thread_name_prefix="encode"
            )
        self._encoding.append(
            _Encoding(writer, self._pool.submit(writer.format.encode, denoised), frame, meta)
        )
        while len(self._encoding) > 2 * self.options.encode_threads:
            self._store_next()
        self._store_encoded(wait=False)

    def tick(self) -> None:
        """Store what the pool has encoded and flush the outputs that are due."""
        self._store_encoded(wait=False)
        for writer in self._writers.values():
            writer.flush_if_due()

    def _store_encoded(self, *, wait: bool) -> None:
        """Store encoded frames, oldest first: those ready, or (``wait``) all of them."""
        while self._encoding and (wait or self._encoding[0].chunk.done()):
            self._store_next()

    def _store_next(self) -> None:
        """Store the oldest encoded frame. If its encoding or storing fails, no frame
        after it is stored either (rows must stay in source order): the error stops the
        daemon (exit 1), the outputs keep every frame before it, and a restart resumes
        there."""
        job = self._encoding.popleft()
        try:
            job.writer.append_chunks([job.chunk.result()], _row(job.frame, job.meta))
        except Exception as exc:
            dropped = 1 + len(self._encoding)
            self._encoding.clear()
            self._failed = True
            if isinstance(exc, OSError):
                raise
            raise StoreError(
                f"{job.writer.path}: frame {job.frame.index} could not be "
                f"encoded ({exc}); it and {dropped - 1} after it were not "
                "stored"
            ) from exc

    def end_series(self, end: SeriesEnd) -> None:
        """Close the series' output and note in the ledger whether it is complete."""
        self._store_encoded(wait=True)
        writer = self._writers.pop(end.series, None)
        if writer is not None:
            try:
                writer.close()
            finally:
                self._outputs.closed_live(writer.path)
            self._closed_rows[end.series] = writer.n_written
            self.state.record(
                end.series, output=writer.path, written=writer.n_written, finished=end.complete
            )
        elif end.complete:
            output = self.state.output_for(end.series, end.output)
            with self._outputs.opening_briefly(output) as free:
                if free and output.exists():
                    close_left_open(output)
            log.info(
                "series %s ended with nothing new to write (an earlier run wrote it)", end.series
            )
            self.state.record(end.series, output=end.output, written=0, finished=True)

    def close(self) -> None:
        """Store what is encoded (unless storing already failed), close every open
        output, each even if another fails; their series stay unfinished in the ledger."""
        errors: list[BaseException] = []
        try:
            if not self._failed:
                self._store_encoded(wait=True)
        except Exception as exc:
            errors.append(exc)
        finally:
            self._encoding.clear()
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
        for series in list(self._writers):
            writer = self._writers.pop(series)
            try:
                writer.close()
                self.state.record(
                    series, output=writer.path, written=writer.n_written, finished=False
                )
            except Exception as exc:
                log.error("closing %s failed: %s", writer.path, exc)
                errors.append(exc)
            finally:
                self._outputs.closed_live(writer.path)
        if errors:
            raise errors[0]

    def _wait_for_space(self, writer: FrameWriter, nbytes: int) -> None:
        needed = self.options.min_free_bytes + 4 * nbytes
        free = free_bytes(writer.path.parent)
        if free >= needed:
            return
        log.error(
            "output disk of %s nearly full (%.1f MiB free, %.1f MiB needed): holding "
            "frames until space returns",
            writer.path,
            free / 2**20,
            needed / 2**20,
        )
        self.paused = True
        self.metrics.output_paused.set(1)
        while free < needed:
            if self._stopping.wait(1.0):
                raise Abandoned(f"stopping while the output disk of {writer.path} is full")
            free = free_bytes(writer.path.parent)
        self.paused = False
        self.metrics.output_paused.set(0)
        log.info("space returned on the output disk (%.1f MiB free): writing again", free / 2**20)


def _row(frame: Frame, meta: FrameMeta) -> Provenance:
    """The provenance row of one frame."""
    return Provenance(
        [frame.index],
        meta.version,
        frame.received_at,
        meta.denoiser,
        frame.t_source,
        [frame.source_id],
        [frame.attributes],
    )
