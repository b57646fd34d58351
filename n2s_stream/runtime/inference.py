"""The inference loop: take a batch off the queue, take one model snapshot, denoise, hand
each frame to the sinks in order.

It knows no source and no sink by name: frames come off a queue, series bookkeeping is the
`SeriesTracker`'s, the network is the `Engine`'s, and denoised frames go to a `SinkChain`.
Bad frames are rejected with a reason and counted. Stopping drains the queue and every
context window until the stop bound (``stop_by``); what is left then is counted, and a
directory source reads it again at the next start.

Frames are taken off the queue a few ahead of the batch being written (``PREPARE_AHEAD``,
at most ``AHEAD_BYTES`` of them) and prepared (valid pixels found, in-filled, normalised)
by a pool of threads while this thread denoises and hands over the ones before; a second
pool restores the denoised frames to detector units, two at once: at detector sizes
preparation and restoration cost as much as the I/O. Admission, context and the order of
frames stay on this thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from n2s_stream.config import InferenceOptions
from n2s_stream.errors import OutputError
from n2s_stream.formats.writer import numeric_names
from n2s_stream.n2s.denoising import Unusable, check_usable, prepare, restore_invalid
from n2s_stream.n2s.guards import flux_ratio, preserve_frame_flux
from n2s_stream.n2s.normalize import Normalizer
from n2s_stream.runtime.calibration import Calibration
from n2s_stream.runtime.coldstart import NETWORK, ColdStart
from n2s_stream.runtime.engine import Engine, max_batch
from n2s_stream.runtime.scheduler import Services
from n2s_stream.runtime.series import Ready, SeriesTracker
from n2s_stream.runtime.snapshot import Snapshot
from n2s_stream.runtime.worker import BackgroundWorker
from n2s_stream.stages import Abandoned, Frame, FrameMeta, SeriesEnd, SeriesStart, SinkChain

log = logging.getLogger(__name__)

FLUX_EVERY_SECONDS = 1.0
"""How often n2s_flux_ratio is measured (on the frame being restored then)."""
PREPARE_AHEAD = 4
"""Frames in a batch (at least), and frames taken off the queue beyond it to be prepared
meanwhile."""
AHEAD_BYTES = 64 * 2**20
"""At most this much raw frame data is taken ahead of the batch (the queue's own bound,
``queue_mb``, no longer counts it): 4 frames of an EIGER2 4M, 2 of a 16M."""
POOL_THREADS = 2
"""Threads that prepare frames, and threads that restore denoised ones."""


@dataclass(frozen=True)
class Pending:
    """An admitted frame waiting for its context: the raw frame and its valid pixels."""

    frame: Frame
    valid: np.ndarray


@dataclass
class InHand:
    """An item taken off the queue, not yet processed; a frame's preparation, once
    started in the pool."""

    item: Frame | SeriesEnd
    prepared: Future | None = None


class InferenceLoop(BackgroundWorker):
    """The one thread that denoises and hands frames to the sinks."""

    def __init__(
        self,
        *,
        frames: queue.Queue,
        engine: Engine,
        series: SeriesTracker,
        sinks: SinkChain,
        services: Services,
        calibration: Calibration,
        cold_start: ColdStart | None,
        options: InferenceOptions,
    ) -> None:
        super().__init__("inference", join_timeout=120.0)
        self.frames, self.engine, self.series, self.sinks = frames, engine, series, sinks
        self.store, self.calibration, self.cold_start = services.store, calibration, cold_start
        self.options, self.metrics = options, services.metrics
        self.max_batch = max_batch(options, engine.device)  # frames per forward pass
        self._on_fatal = services.fail
        self.taken = 0  # frames taken off the queue
        self.written = 0
        self.refused = 0
        self.lost = 0  # refused as internal_error by a failed batch
        self.unwritten = 0  # accepted, not written when the loop stopped early
        self.last_progress = time.monotonic()  # a loop round or a frame written
        self._flux_measured_at = -FLUX_EVERY_SECONDS  # n2s_flux_ratio: the next frame
        self._abandon = threading.Event()
        self._working = threading.Event()
        self._preparers: ThreadPoolExecutor | None = None  # started with the first frames
        self._restorers: ThreadPoolExecutor | None = None
        self._in_hand: deque[InHand] = deque()  # taken off the queue, not yet processed

    @property
    def busy(self) -> bool:
        """True while a batch is being denoised and written, or frames taken off the queue
        wait for it: training waits meanwhile, or both would share the cores and every
        frame would take twice as long."""
        return self._working.is_set() or bool(self._in_hand)

    @property
    def alive(self) -> bool:
        """Its thread runs and makes progress: a forward pass or a write that has not
        returned for ``stall_seconds`` counts as dead (a disk-full pause does not)."""
        if not self._thread.is_alive():
            return False
        if self.sinks.paused():
            # the stall clock starts again when the pause ends, not when it began
            self.last_progress = time.monotonic()
            return True
        return time.monotonic() - self.last_progress < self.options.stall_seconds

    @property
    def version(self) -> int:
        """The model version of the newest frames written."""
        return self.engine.version

    def stop_by(self, deadline: float, grace: float = 10.0) -> None:
        """Drain (every queued and held frame written) until ``deadline`` (monotonic
        seconds); past it, stop writing, wait at most ``grace`` for the frame being written, and
        count what was left (``n2s_frames_unwritten_at_stop_total``), so a stop is bounded
        in every state. Call it after the source stopped, so the count is final."""
        self._stopping.set()
        self._thread.join(timeout=max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            log.warning(
                "stop bound reached while frames were still being written; abandoning the rest"
            )
            self._abandon.set()
            self._thread.join(timeout=grace)
            if self._thread.is_alive():
                log.error(
                    "inference is stuck (a forward pass or a write that does not "
                    "return); leaving it behind"
                )
        self.unwritten = self._count_unwritten()

    def _run(self) -> None:
        try:
            while not self._abandon.is_set():
                draining = self._stopping.is_set()  # stop(): the queue is emptied first
                items = self._next_batch(wait=not draining)
                self.last_progress = time.monotonic()
                if draining and not items:
                    break
                self._working.set()
                try:
                    self._process_guarded(items)
                    self.sinks.tick()
                finally:
                    self._working.clear()
            if not self._abandon.is_set():
                self._write(self.series.flush_all(), self.store.snapshot())
        except Abandoned as exc:
            log.warning("%s", exc)
        except OSError as exc:  # disk full, file system gone: cannot go on safely
            log.error("writing failed: %s", exc)
            self._on_fatal(exc)
        finally:
            for pool in (self._preparers, self._restorers):
                if pool is not None:
                    pool.shutdown(wait=True, cancel_futures=True)
            self.sinks.close()
            self.engine.close()

    def _count_unwritten(self) -> int:
        """Frames accepted but not written when the loop ended early (stop bound, stop
        during a disk-full pause, a fatal error): the directory source reads them again at
        the next start; a feed cannot resend them, so they are counted and logged."""
        while True:
            try:
                if isinstance(self.frames.get_nowait(), Frame):
                    self.taken += 1
            except queue.Empty:
                break
        unwritten = self.taken - self._accounted() - self.lost
        if unwritten > 0:
            log.warning(
                "%d accepted frames were not written (a directory source reads them "
                "again at the next start; a feed's are lost)",
                unwritten,
            )
            self.metrics.frames_unwritten_at_stop.inc(unwritten)
        return max(unwritten, 0)

    def _next_batch(self, *, wait: bool) -> list[InHand]:
        """The next items to process: the oldest in hand (else the next queue item) and
        the frames right behind it, up to ``max_batch`` or ``PREPARE_AHEAD``; a series end
        closes the batch, so order is kept. Then up to ``PREPARE_AHEAD`` more frames are
        taken and their preparation started: the pool works on them while this batch is
        denoised and written."""
        if not self._in_hand and not self._pull(timeout=0.25 if wait else None):
            return []
        limit = max(self.max_batch, PREPARE_AHEAD)
        self._pull_ahead(limit)
        batch = [self._in_hand.popleft()]
        while self._in_hand and isinstance(batch[-1].item, Frame) and len(batch) < limit:
            batch.append(self._in_hand.popleft())
        self._pull_ahead(PREPARE_AHEAD, max_bytes=AHEAD_BYTES)
        self.metrics.queue_depth.set(self.frames.qsize() + len(self._in_hand))
        return batch

    def _pull_ahead(self, count: int, max_bytes: int | None = None) -> None:
        """Take queued items, without waiting, until ``count`` are in hand (or frames of
        ``max_bytes``)."""
        while len(self._in_hand) < count and self._pull(timeout=None):
            if max_bytes is not None and self._bytes_in_hand() >= max_bytes:
                break

    def _bytes_in_hand(self) -> int:
        return sum(each.item.data.nbytes for each in self._in_hand if isinstance(each.item, Frame))

    def _pull(self, *, timeout: float | None) -> bool:
        """Take one item off the queue (waiting at most ``timeout`` seconds; None: not at
        all) and start preparing it if it is a frame; False if there was none."""
        try:
            item = self.frames.get(timeout=timeout) if timeout else self.frames.get_nowait()
        except queue.Empty:
            return False
        in_hand = InHand(item)
        if isinstance(item, Frame):
            self.taken += 1
            normalizer = self.store.snapshot().normalizer  # set once, by the first frame
            if normalizer is not None:
                in_hand.prepared = self._preparing().submit(_prepared, item, normalizer)
        self._in_hand.append(in_hand)
        return True

    def _preparing(self) -> ThreadPoolExecutor:
        """The pool that prepares frames (started with the first frames)."""
        if self._preparers is None:
            self._preparers = ThreadPoolExecutor(POOL_THREADS, thread_name_prefix="prepare")
        return self._preparers

    def _restoring(self) -> ThreadPoolExecutor:
        """The pool that restores denoised frames: apart from the preparing one, so that
        the frames being handed over never wait behind the next frames' preparation."""
        if self._restorers is None:
            self._restorers = ThreadPoolExecutor(POOL_THREADS, thread_name_prefix="restore")
        return self._restorers

    def _accounted(self) -> int:
        """Frames taken off the queue that have an outcome: written, refused with a
        reason, or skipped as already written."""
        return self.written + self.refused + self.series.skipped

    def _process_guarded(self, items: list[InHand]) -> None:
        """Process a batch; a bug met by odd input refuses the frames it touched
        (counted as ``internal_error``, with the traceback logged) and the rest goes on."""
        frames = [each.item for each in items if isinstance(each.item, Frame)]
        done_before = self._accounted()
        held_before = self.series.held()
        try:
            self._process(items)
        except (OSError, Abandoned):
            raise
        except Exception:
            log.exception(
                "inference failed on frames %s",
                ", ".join(f"{f.series}:{f.index}" for f in frames) or "(held ones)",
            )
            for series in {f.series for f in frames}:
                self.series.drop_held(series)  # what its window held is lost with this batch
            done = self._accounted() - done_before
            lost = max(len(frames) + held_before - self.series.held() - done, 0)
            self.lost += lost
            self.metrics.reject("internal_error", lost)

    def _process(self, items: list[InHand]) -> None:
        """One snapshot for the whole batch; frames are written once their context is
        complete, series ends after their last frame; then the housekeeping."""
        snapshot = self.store.snapshot()
        ready: list[Ready] = []
        for each in items:
            if isinstance(each.item, SeriesEnd):
                self._write(ready, snapshot)
                ready = []
                self._end(each.item, snapshot)
            else:
                snapshot, released = self._take(each.item, snapshot, each.prepared)
                ready += released
        self._write(ready, snapshot)
        self._write(self.series.waited_too_long(self.options.context_flush_seconds), snapshot)
        for series in self.series.idle(self.options.series_idle_close):
            log.info(
                "series %s: no frame for %g s; its output is closed (it resumes if frames come)",
                series,
                self.options.series_idle_close,
            )
            self._end(self.series.idle_end(series), snapshot)

    def _end(self, end: SeriesEnd, snapshot: Snapshot) -> None:
        """Write what the series still holds, then end it in every sink."""
        self._write(self.series.end(end), snapshot)
        self.sinks.end_series(end)
        self.series.closed(end)
        self.metrics.series_ended.labels(str(end.complete).lower()).inc()

    def _take(
        self, frame: Frame, snapshot: Snapshot, ahead: Future | None = None
    ) -> tuple[Snapshot, list[Ready]]:
        """Admit one frame and push it into its series' window; returns the snapshot (now
        with a normaliser) and the frames whose context is complete. ``ahead``: the
        frame's preparation, started in the pool (none before the normaliser is set)."""
        before = self.series.seen(frame)
        normalized = None
        try:
            if ahead is not None:
                valid, normalized = ahead.result()
            else:
                valid = check_usable(frame.data, frame.pixel_mask)
            snapshot = self.calibration.ready(snapshot, frame.data, valid)
            admitted = self.series.admit(
                frame,
                before,
                open_series=lambda f: self._open_series(f, valid),
                reject=lambda reason, why: self._reject(frame, reason, why),
            )
        except Unusable as exc:
            self._reject(frame, exc.reason, str(exc))
            return snapshot, []
        except OutputError as exc:
            self._reject(frame, "output_unreadable", str(exc))
            return snapshot, []
        if not admitted:
            return snapshot, []
        if normalized is None:
            assert snapshot.normalizer is not None
            normalized = prepare(frame.data, valid, snapshot.normalizer).normalized
        return snapshot, self.series.push(frame.series, Pending(frame, valid), normalized)

    def _open_series(self, frame: Frame, valid: np.ndarray) -> None:
        notes = dict(frame.notes)
        if self.cold_start is not None and self.cold_start.classical is not None:
            notes["cold_start"] = self.cold_start.classical.describe()
        mean_count = float(np.mean(frame.data, where=valid, dtype=np.float64))
        self.sinks.open_series(
            SeriesStart(
                frame.series,
                frame.output,
                frame.data.shape,
                frame.data.dtype,
                notes,
                numeric_names(frame.attributes),
                mean_count,
            )
        )

    def _write(self, ready: list[Ready], snapshot: Snapshot) -> None:
        """Denoise ready frames (one forward pass per run of equal shapes), restore them
        to detector units in the pool, a few at once, and hand each to the sinks, in
        order."""
        if not ready:
            return
        if self._abandon.is_set():
            raise Abandoned("stop bound reached")
        version = self.engine.use(snapshot)
        normalizer = snapshot.normalizer
        assert normalizer is not None  # set by the first frame's calibration
        restoring: deque[tuple[Pending, np.ndarray, int, Future]] = deque()
        for group in _runs_of_equal_shape(ready, self.max_batch):
            stacks = (
                group[0][1][np.newaxis]
                if len(group) == 1  # (n, K, H, W), normalised
                else np.stack([stack for _, stack in group])
            )
            denoiser, out = (
                self.cold_start.denoise(stacks, self.engine, snapshot)
                if self.cold_start
                else (NETWORK, self.engine(stacks))
            )
            for (pending, stack), image in zip(group, out, strict=True):
                restored = self._restoring().submit(
                    _restored,
                    image,
                    pending,
                    normalizer,
                    flux=self._flux_due(),
                    preserve=self.options.preserve_flux,
                )
                restoring.append((pending, stack, denoiser, restored))
            while len(restoring) > POOL_THREADS:
                self._hand_over(*restoring.popleft(), version)
        while restoring:
            self._hand_over(*restoring.popleft(), version)

    def _hand_over(
        self, pending: Pending, stack: np.ndarray, denoiser: int, restored: Future, version: int
    ) -> None:
        """Give one restored frame to the sinks."""
        if self._abandon.is_set():
            raise Abandoned("stop bound reached")
        image, ratio = restored.result()
        if ratio is not None:
            self.metrics.flux_ratio.set(ratio)
        frame = pending.frame
        self.sinks.write(frame, image, FrameMeta(version, denoiser, pending.valid, stack))
        self.written += 1
        self.last_progress = time.monotonic()
        self.metrics.frames_denoised.inc()
        self.metrics.frame_latency.observe(time.time() - frame.received_at)

    def _flux_due(self) -> bool:
        """Whether the next frame's flux ratio is measured: every frame with
        ``preserve_flux`` (it is scaled by it), else one frame a second (two sums over a
        large frame cost milliseconds, too much for every frame of a fast detector)."""
        now = time.monotonic()
        if self.options.preserve_flux or now - self._flux_measured_at >= FLUX_EVERY_SECONDS:
            self._flux_measured_at = now
            return True
        return False

    def _reject(self, frame: Frame, reason: str, why: str) -> None:
        self.refused += 1
        log.warning("rejected (%s): frame %d of %s: %s", reason, frame.index, frame.series, why)
        self.metrics.reject(reason)


def _prepared(frame: Frame, normalizer: Normalizer) -> tuple[np.ndarray, np.ndarray]:
    """A frame's valid pixels and its normalised, in-filled image. Raises `Unusable`,
    also for a bug met by odd input (``internal_error``, logged): that frame alone is
    refused."""
    valid = check_usable(frame.data, frame.pixel_mask)
    try:
        return valid, prepare(frame.data, valid, normalizer).normalized
    except Exception as exc:
        log.exception("preparing frame %d of %s failed", frame.index, frame.series)
        raise Unusable("internal_error", f"preparation failed: {exc}") from exc


def _restored(
    image: np.ndarray, pending: Pending, normalizer: Normalizer, *, flux: bool, preserve: bool
) -> tuple[np.ndarray, float | None]:
    """A denoised frame in detector units, its unmeasured pixels given back their source
    value; and the network's flux ratio where ``flux`` (else None). With ``preserve``,
    the frame is scaled to its raw total, before the sentinels return."""
    denoised = normalizer.inverse(image)
    raw, valid = pending.frame.data, pending.valid
    ratio = None
    if preserve:
        ratio = preserve_frame_flux(denoised, raw, valid)
    elif flux:
        ratio = flux_ratio(denoised, raw, valid)
    return restore_invalid(denoised, raw, valid), ratio


def _runs_of_equal_shape(ready: list[Ready], limit: int) -> Iterator[list[Ready]]:
    """Consecutive frames of one shape, at most ``limit``, which one forward pass can
    take together."""
    start = 0
    while start < len(ready):
        stop = start + 1
        while (
            stop < len(ready)
            and stop - start < limit
            and ready[stop][1].shape == ready[start][1].shape
        ):
            stop += 1
        yield ready[start:stop]
        start = stop
