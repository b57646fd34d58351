"""Apply a trained network to frames: the same code offline and in the daemon."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from n2s_stream.coldstart import CLASSICAL, NETWORK, ColdStart
from n2s_stream.frames import Frame
from n2s_stream.models import use_fast_layout
from n2s_stream.n2s.context import ContextWindow
from n2s_stream.n2s.masking import Masker
from n2s_stream.n2s.normalize import Normalizer, fill_invalid, fit_normalizer, valid_pixels
from n2s_stream.onnx_engine import OnnxRuntimeModel
from n2s_stream.preview import Preview
from n2s_stream.state import last_written_source_frame
from n2s_stream.training import autocast
from n2s_stream.worker import BackgroundWorker
from n2s_stream.writer import close_left_open, free_bytes

log = logging.getLogger(__name__)


@torch.inference_mode()
def denoise_normalized(
    model: nn.Module,
    masker: Masker,
    inputs: np.ndarray,
    *,
    jinv: bool,
    device: torch.device,
    amp: bool = False,
) -> np.ndarray:
    """Denoise normalised frames: ``(n, H, W)``, or ``(n, C, H, W)`` frames with their
    temporal context; returns the ``(n, H, W)`` denoised centre frames, float32, on the host."""
    x = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32))
    if x.ndim == 3:
        x = x.unsqueeze(1)
    x = x.to(device, non_blocking=True)
    with autocast(device, amp):
        infer = masker.infer_full_image if jinv else masker.infer_single_pass
        y = infer(x, model)
    return y.float().squeeze(1).cpu().numpy()  # host sync


def denoise_series(
    model: nn.Module,
    masker: Masker,
    normalizer: Normalizer,
    chunks: Iterable[tuple[int, np.ndarray]],
    *,
    jinv: bool,
    device: torch.device,
    batch: int = 8,
    amp: bool = False,
    pixel_mask: np.ndarray | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Denoise one series read in ``(first index, (n, H, W) frames)`` chunks, in order;
    yields ``(indices, denoised frames)`` in detector units, float32, ``batch`` at a time.

    Each frame sees the temporal context its masker asks for (``context.py``: neighbours
    of the same series, mirrored at its ends). Sentinel, NaN and inf pixels, and those in
    ``pixel_mask`` (True = bad), are in-filled for the network and keep their source value
    in the output, so nothing is invented where the detector measured nothing.
    """
    window: ContextWindow[tuple[int, np.ndarray, np.ndarray]] = ContextWindow(
        masker.config.context_frames, masker.config.causal)
    ready: list[tuple[tuple[int, np.ndarray, np.ndarray], np.ndarray]] = []

    def run(items) -> tuple[np.ndarray, np.ndarray]:
        stacks = np.stack([stack for _, stack in items])
        denoised = normalizer.inverse(
            denoise_normalized(model, masker, stacks, jinv=jinv, device=device, amp=amp))
        for k, ((_, raw, valid), _) in enumerate(items):
            if not valid.all():
                denoised[k][~valid] = raw[~valid]
        return np.array([index for (index, _, _), _ in items]), denoised

    for start, frames in chunks:
        valid = valid_pixels(frames, frames.dtype)
        if pixel_mask is not None:
            valid &= ~pixel_mask
        normalized = normalizer.forward(fill_invalid(frames, valid))
        for k in range(len(frames)):
            ready += window.push((start + k, frames[k], valid[k]), normalized[k])
        while len(ready) >= batch:
            yield run(ready[:batch])
            ready = ready[batch:]
    ready += window.flush()
    for first in range(0, len(ready), batch):
        yield run(ready[first : first + batch])


def denoise_counts(
    model: nn.Module,
    masker: Masker,
    normalizer: Normalizer,
    frames: np.ndarray,
    *,
    jinv: bool,
    device: torch.device,
    amp: bool = False,
    pixel_mask: np.ndarray | None = None,
) -> np.ndarray:
    """Denoise the ``(n, H, W)`` frames of one series (in order) held in memory; returns
    float32 in detector units. See :func:`denoise_series`."""
    parts = [out for _, out in denoise_series(model, masker, normalizer, [(0, frames)],
                                              jinv=jinv, device=device, batch=max(len(frames), 1),
                                              amp=amp, pixel_mask=pixel_mask)]
    return np.concatenate(parts) if parts else np.empty((0, *frames.shape[1:]), np.float32)


def to_source_dtype(frames: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Round and clip float frames into ``dtype`` (integers) or cast (floats)."""
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.clip(np.rint(frames), info.min, info.max).astype(dtype)
    return frames.astype(dtype)


STOP = object()
"""Put on the queue to wake the inference worker when it should stop."""


@dataclass
class InferenceSettings:
    """How frames are denoised and written."""

    jinv: bool = False
    require_reconstructable: bool = False
    val_every: int = 10  # every n-th frame goes to the held-out set, not the training buffer
    max_batch: int = 8  # frames denoised in one forward pass when they queue up
    series_idle_close: float = 300.0  # seconds without frames before an output is closed
    context_flush_seconds: float = 2.0  # frames waiting this long for later neighbours go
    count_gaps: bool = True  # False when workers share a feed: gaps are the others' frames
    compile: bool = False  # run the model through torch.compile
    engine: str = "torch"  # or "onnxruntime" (CPU)
    onnx_reload_seconds: float = 10.0  # onnxruntime: newer weights taken at most this often
    min_free_mb: float = 64.0  # below this much free space on the output disk, writing waits
    normalize: str = "meanstd"
    scale_integers: bool = True


class DroppedFrames:
    """Frames dropped before inference (``drop_when_full``), per series: they were counted
    as rejected when dropped, so the gaps they leave are not counted again as missing.
    Shared by the source thread (``add``) and the inference thread (``take``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_series: dict[str, set[int]] = {}

    def add(self, series: str, index: int) -> None:
        """Note that frame ``index`` of ``series`` was dropped."""
        with self._lock:
            self._by_series.setdefault(series, set()).add(index)

    def take(self, series: str, first: int, last: int) -> int:
        """How many of frames ``first`` to ``last`` (inclusive) of ``series`` were dropped;
        they are forgotten, as is the series once it has none left."""
        with self._lock:
            dropped = self._by_series.get(series, set())
            taken = {i for i in dropped if first <= i <= last}
            dropped -= taken
            if not dropped:
                self._by_series.pop(series, None)
            return len(taken)


class InferenceWorker(BackgroundWorker):
    """Takes frames off the queue, denoises them with the newest weights, writes them.

    The only thread that touches output files. Bad frames are rejected with a reason and
    counted; nothing already accepted is lost when stopping: the queue is drained first.
    """

    def __init__(self, *, frames: queue.Queue, model: nn.Module, masker: Masker,
                 normalizer: Normalizer | None, store, outputs, buffer, val_buffer,
                 metrics, state, device: torch.device, settings: InferenceSettings,
                 on_fatal: Callable[[BaseException], None],
                 republisher: Republisher | None = None,
                 cold_start: ColdStart | None = None,
                 preview: Preview | None = None,
                 dropped: DroppedFrames | None = None) -> None:
        super().__init__("inference", join_timeout=120.0)
        self.model = use_fast_layout(model, device)
        # Weights are swapped into self.model with load_state_dict; a compiled wrapper of
        # the same module sees them (parameters are inputs of the compiled graph), the
        # ONNX Runtime one exports them again when told (refresh).
        self.forward_model: Callable[[torch.Tensor], torch.Tensor] = self.model
        if settings.engine == "onnxruntime":
            self.forward_model = OnnxRuntimeModel(self.model, torch.get_num_threads())
        elif settings.compile:
            self.forward_model = torch.compile(self.model)
        self.frames, self.masker, self.normalizer = frames, masker, normalizer
        self.store, self.outputs, self.buffer, self.val_buffer = store, outputs, buffer, val_buffer
        self.metrics, self.state, self.device, self.settings = metrics, state, device, settings
        self._on_fatal = on_fatal
        self.republisher = republisher
        self.cold_start = cold_start
        self.preview = preview
        self.dropped = dropped or DroppedFrames()
        self.version = -1
        self.written = 0
        self._seen = 0
        self._last_seen: dict[str, int] = {}
        self._last_frame_at: dict[str, float] = {}
        self._windows: dict[str, ContextWindow] = {}
        self._refused = 0
        self._working = threading.Event()
        self._loaded_at = 0.0

    @property
    def busy(self) -> bool:
        """True while a batch is being denoised and written: training waits meanwhile, or
        both would share the cores and every frame would take twice as long."""
        return self._working.is_set()

    def stop(self) -> None:
        """Process everything queued so far, then stop (the stop sentinel queues behind
        the frames; only a wait for disk space looks at ``_stopping``)."""
        if self.alive:
            self.frames.put(STOP)
            super().stop()

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            self._flush_waiting_windows()
            if not batch:
                self._close_idle_series()
                continue
            frames = [item for item in batch if isinstance(item, Frame)]
            self._working.set()
            try:
                self._process(batch, frames)
            except OSError as exc:  # disk full, file system gone: cannot go on safely
                log.error("writing failed: %s", exc)
                self._on_fatal(exc)
                break
            finally:
                self._working.clear()
            if batch[-1] is STOP:
                for series in list(self._windows):  # SIGTERM: every accepted frame written
                    self._flush_series(series)
                break
        for series, writer in self.outputs.close_all():
            self.state.record(series, output=writer.path, written=writer.n_written,
                              finished=False)
        if self.republisher is not None:
            self.republisher.close()
        if isinstance(self.forward_model, OnnxRuntimeModel):
            self.forward_model.close()

    def _process(self, batch: list, frames: list[Frame]) -> None:
        """Denoise and write a batch, then end the series it ends. A bug met by odd input
        refuses the frames it touched (counted) and the daemon serves the rest."""
        written, refused = self.written, self._refused
        held = {f.series: len(self._windows.get(f.series, ())) for f in frames}
        try:
            if frames:
                self._denoise_and_write(frames)
            for item in batch:
                if not isinstance(item, Frame) and item is not STOP:
                    self._end_series(item)
        except OSError:
            raise
        except Exception:
            log.exception("inference failed on frames %s",
                          ", ".join(f"{f.series}:{f.index}" for f in frames))
            for series in held:
                self._windows.pop(series, None)  # what they held is lost with this batch
            unwritten = (len(frames) + sum(held.values()) - (self.written - written)
                         - (self._refused - refused))
            self.metrics.reject("internal_error", max(unwritten, 0))

    def _next_batch(self) -> list:
        """The next queue item, plus the frames queued right behind it (up to
        ``max_batch``): when frames pile up, one forward pass serves several. A series end
        or the stop sentinel closes the batch, so order is kept."""
        try:
            batch = [self.frames.get(timeout=1.0)]
        except queue.Empty:
            return []
        while isinstance(batch[-1], Frame) and len(batch) < self.settings.max_batch:
            try:
                batch.append(self.frames.get_nowait())
            except queue.Empty:
                break
        self.metrics.queue_depth.set(self.frames.qsize())
        return batch

    def _flush_waiting_windows(self) -> None:
        """Write frames that have waited ``context_flush_seconds`` for later neighbours
        (the detector paused): their context is mirrored as at a series' end."""
        now = time.monotonic()
        for series, window in list(self._windows.items()):
            last = self._last_frame_at.get(series, now)
            if len(window) and now - last > self.settings.context_flush_seconds:
                self._flush_series(series)

    def _close_idle_series(self) -> None:
        """Close outputs that got no frame for ``series_idle_close`` seconds: their end
        message may have gone to another worker (fan-out) or been lost with a restart.
        They stay unfinished in the ledger, so late frames would resume them."""
        limit = self.settings.series_idle_close
        if limit <= 0:
            return
        now = time.monotonic()
        for series, last in list(self._last_frame_at.items()):
            if now - last > limit:
                del self._last_frame_at[series]
                self._flush_series(series)
                writer = self.outputs.close(series)
                if writer is not None:
                    log.info("series %s idle for %.0f s: output closed", series, now - last)
                    self.state.record(series, output=writer.path, written=writer.n_written,
                                      finished=False)

    def _reject(self, frame, reason: str, why: str) -> None:
        self._refused += 1
        log.warning("rejected (%s): frame %d of %s: %s", reason, frame.index, frame.series,
                    why)
        self.metrics.reject(reason)

    def _refresh_weights(self) -> None:
        """Take the newest published weights; the version written beside each frame is
        always the one that made it."""
        version, weights = self.store.latest()
        if isinstance(self.forward_model, OnnxRuntimeModel) and self.version >= 0:
            self._refresh_onnx_sessions(version, weights)
        elif version != self.version:  # (ONNX: the first weights, before any session)
            self.model.load_state_dict(weights)
            self.model.eval()
            self._loaded_at = time.monotonic()
            self._now_using(version)

    def _refresh_onnx_sessions(self, version: int, weights: dict) -> None:
        """With ONNX Runtime new weights mean a new export (0.1 - 0.5 s of CPU): it runs
        in a background thread while frames go on through the current sessions, at most
        every ``settings.onnx_reload_seconds``, and is swapped in between batches."""
        engine = self.forward_model
        assert isinstance(engine, OnnxRuntimeModel)
        exported = engine.finished_export()
        if exported is not None:
            self._now_using(exported)
        if (version != self.version and not engine.exporting and
                time.monotonic() - self._loaded_at >= self.settings.onnx_reload_seconds):
            engine.start_export(weights, version)
            self._loaded_at = time.monotonic()

    def _now_using(self, version: int) -> None:
        self.version = version
        self.metrics.model_version.set(version)
        log.info("inference now uses model version %d", version)

    def _accept(self, frame):
        """Checks, output file and normalised input of one frame; None if refused.

        ``self._last_seen`` holds the newest frame number taken per series, written or
        rejected, so a rejected frame is not also counted as missing.
        """
        last = self._last_seen.get(frame.series, -1)
        self._last_seen[frame.series] = max(last, frame.index)
        self._last_frame_at[frame.series] = time.monotonic()
        data = frame.data
        valid = valid_pixels(data, data.dtype)
        if data.dtype.kind == "f" and not valid.all():
            self._reject(frame, "nan", "NaN or inf pixels in a float frame")
            return None
        if frame.pixel_mask is not None:
            valid &= ~frame.pixel_mask
        if not valid.any():
            self._reject(frame, "no_valid_pixels", "every pixel is a sentinel or masked")
            return None
        if self.normalizer is None:
            self.normalizer = fit_normalizer(
                data[np.newaxis], mode=self.settings.normalize,
                scale_integers=self.settings.scale_integers, source_dtype=data.dtype,
                valid=valid[np.newaxis])
            log.info("normalisation fitted on the first frame: %s", self.normalizer.describe())
        if self.cold_start is not None and self.cold_start.classical is None:
            self.cold_start.denoiser_for(
                self.normalizer.forward(fill_invalid(data[np.newaxis], valid[np.newaxis]))[0])
        out_dtype = data.dtype if self.settings.require_reconstructable else np.dtype("f4")
        writer = self.outputs.get(frame.series)
        if writer is None:
            output = self.state.output_for(frame.series, frame.output)
            notes = None
            if self.cold_start is not None and self.cold_start.classical is not None:
                notes = {"cold_start": self.cold_start.classical.describe()}
            writer = self.outputs.writer_for(frame.series, output, frame_shape=data.shape,
                                             dtype=out_dtype, source=frame.series, notes=notes)
        if writer.frame_shape != data.shape:
            self._reject(frame, "shape_change", f"shape {data.shape} in a series of "
                         f"{writer.frame_shape} frames")
            return None
        last = max(writer.last_source_frame, last)
        if frame.index <= last:
            log.debug("frame %d of %s already written; skipped", frame.index, frame.series)
            return None
        if frame.index > last + 1 and self.settings.count_gaps:
            self._count_missing(frame.series, last + 1, frame.index - 1,
                                f"before frame {frame.index}")
        normalized = self.normalizer.forward(fill_invalid(data[np.newaxis], valid[np.newaxis]))
        return frame, writer, valid, normalized[0]

    def _denoise_and_write(self, frames: list) -> None:
        """Accept frames, pass them through their series' context window, denoise and
        write those whose context is complete (all of them without temporal context)."""
        ready = []
        for accepted in filter(None, (self._accept(frame) for frame in frames)):
            frame, _, _, normalized = accepted
            ready += self._window(frame.series).push(accepted, normalized)
        self._denoise_ready(ready)

    def _window(self, series: str) -> ContextWindow:
        window = self._windows.get(series)
        if window is None:
            config = self.masker.config
            window = self._windows[series] = ContextWindow(config.context_frames, config.causal)
        return window

    def _flush_series(self, series: str) -> None:
        """Write what the series' context window still holds (its end, mirrored)."""
        window = self._windows.pop(series, None)
        if window is not None:
            self._denoise_ready(window.flush())

    def _denoise_ready(self, ready: list) -> None:
        """One forward pass per run of equal shapes; each frame then written in order."""
        if not ready:
            return
        self._refresh_weights()
        start = 0
        while start < len(ready):
            shape = ready[start][1].shape
            stop = start
            while stop < len(ready) and ready[stop][1].shape == shape:
                stop += 1
            group = ready[start:stop]
            stacked = np.stack([stack for _, stack in group])  # (n, K, H, W)
            if self.cold_start is not None and self.cold_start.active:
                classical = self.cold_start.classical
                assert classical is not None  # calibrated on the first accepted frame
                method = CLASSICAL
                denoised = self.normalizer.inverse(np.stack([classical(s[0]) for s in stacked]))
            else:
                method = NETWORK
                with self.metrics.forward_seconds.time():
                    network_output = denoise_normalized(
                        self.forward_model, self.masker, stacked, jinv=self.settings.jinv,
                        device=self.device)
                denoised = self.normalizer.inverse(network_output)
            for ((frame, writer, valid, _), stack), out in zip(group, denoised, strict=True):
                self._write(frame, writer, valid, stack, out, method)
            start = stop

    def _wait_for_space(self, writer, nbytes: int) -> None:
        """Hold writing while the output disk is (nearly) full, and go on when space comes
        back. HDF5 cannot survive a write failing for lack of space, so this never lets it
        get there; meanwhile the queue fills and the source stops reading."""
        needed = int(self.settings.min_free_mb * 2**20) + 4 * nbytes
        free = free_bytes(writer.path.parent)
        if free >= needed:
            return
        log.error("output disk of %s nearly full (%.1f MiB free, %.1f MiB needed): holding "
                  "frames until space returns", writer.path, free / 2**20, needed / 2**20)
        self.metrics.output_paused.set(1)
        while free < needed:
            if self._stopping.wait(1.0):
                raise OSError(f"stopping while the output disk of {writer.path} is full; "
                              "unwritten frames are read again at the next start")
            free = free_bytes(writer.path.parent)
        self.metrics.output_paused.set(0)
        log.info("space returned on the output disk (%.1f MiB free): writing again",
                 free / 2**20)

    def _write(self, frame, writer, valid: np.ndarray, network_input: np.ndarray,
               denoised: np.ndarray, method: int = NETWORK) -> None:
        """Write one denoised frame; its network input (frame and context) goes on to
        the training or the held-out buffer."""
        data = frame.data
        self._wait_for_space(writer, denoised.nbytes)
        if not valid.all():
            denoised[~valid] = data[~valid]
        if self.settings.require_reconstructable:
            denoised = to_source_dtype(denoised, data.dtype)
        writer.append(denoised[np.newaxis], source_frames=[frame.index],
                      model_version=self.version, t_received=frame.received_at,
                      denoiser=method)
        self.written += 1
        self.metrics.frames_denoised.inc()
        if self.republisher is not None:
            self.republisher.publish(frame.series, frame.index, denoised)
        if self.preview is not None:
            self.preview.show(frame.series, frame.index, data, denoised)
        self.metrics.frame_latency.observe(time.time() - frame.received_at)
        self._seen += 1
        valid_map = None if valid.all() else valid.astype(np.float32)
        target = self.val_buffer if self._seen % self.settings.val_every == 0 else self.buffer
        target.add(network_input, valid_map)

    def _count_missing(self, series: str, first: int, last: int, where: str) -> None:
        """Count frames ``first`` to ``last`` that never came as missing, less those the
        daemon dropped itself (already counted as rejected)."""
        missing = last - first + 1 - self.dropped.take(series, first, last)
        if missing > 0:
            log.warning("%s: %d frames missing %s", series, missing, where)
            self.metrics.frames_missing.inc(missing)

    def _end_series(self, end) -> None:
        self._flush_series(end.series)
        last = self._last_seen.get(end.series, -1)
        writer = self.outputs.get(end.series)
        if writer is not None:
            last = max(last, writer.last_source_frame)
        elif end.sender_count:  # nothing of it came this run: what did earlier runs write?
            done = last_written_source_frame(self.state.output_for(end.series, end.output))
            last = max(last, -1 if done is None else done)
        if end.sender_count and end.n_frames - 1 > last and self.settings.count_gaps:
            self._count_missing(end.series, last + 1, end.n_frames - 1,
                                f"before the end of the series (frame {end.n_frames})")
        self._last_seen.pop(end.series, None)
        self._last_frame_at.pop(end.series, None)
        if self.republisher is not None:
            self.republisher.end(end.series)
        writer = self.outputs.close(end.series)
        if writer is None:
            output = self.state.output_for(end.series, end.output)
            if output.exists():
                close_left_open(output)
            log.info("series %s ended with nothing new to write (an earlier run wrote it)",
                     end.series)
            self.state.record(end.series, output=end.output, written=0, finished=True)
        else:
            self.state.record(end.series, output=writer.path, written=writer.n_written,
                              finished=True)


class Republisher:
    """Publishes denoised frames (native protocol) on a PUB socket for live viewers.

    PUB never blocks the daemon: a viewer too slow to keep up loses frames (ZeroMQ's
    high-water mark), the output files do not. Used from the inference thread only.
    """

    def __init__(self, endpoint: str, hwm: int = 100) -> None:
        import zmq

        from n2s_stream.sources import protocols

        self._protocols = protocols
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.PUB)
        self._socket.setsockopt(zmq.SNDHWM, hwm)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(endpoint)
        log.info("publishing denoised frames on %s", endpoint)

    def publish(self, series: str, index: int, frame: np.ndarray) -> None:
        """Send one denoised frame (raw float32)."""
        self._socket.send_multipart(self._protocols.native_frame(series, index, frame, "raw"))

    def end(self, series: str) -> None:
        """Send the end of a series."""
        self._socket.send_multipart(self._protocols.native_end(series))

    def close(self) -> None:
        """Unbind and release the socket."""
        self._socket.close()
        self._context.term()
