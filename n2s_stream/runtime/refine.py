"""Refined output: a finished series denoised again, with the newest model, when idle.

Live frames are denoised by whatever model existed when they arrived: the first frames of
a scan by a model that had seen little of it. Once a series has ended and no frame has
waited for ``refine_idle_seconds``, the refiner takes its raw frames from the spool
(``sinks/spool.py``), denoises them again with the newest weights, averaged over
``refine_tta`` orientations, and appends them to ``/entry/refined/data`` of the same
output (same order as ``/entry/data/data``; ``/entry/refined/model_version`` per row).
The live frames are never touched. A series that went idle is refined too; if it resumes,
its later frames are refined after it ends again (from a spool of their own). A new frame
to denoise pauses it after the current one; a stop or a crash leaves whole refined frames,
and the next run continues after them.
Refining waits while the cold-start classical denoiser writes (the network has not yet
measured better) and while the output disk has less than twice ``min_free_mb`` free.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np

from n2s_stream.config import RefineOptions
from n2s_stream.formats.spool import (
    FAILED_SUFFIX,
    READY_SUFFIX,
    output_of,
    pixel_mask_of,
    positions,
    raw_frames,
    refined_datasets,
    refined_from,
    spool_part,
    stored_refined,
)
from n2s_stream.formats.writer import (
    FileBusy,
    OutputAccess,
    RefinedWriter,
    free_bytes,
    open_for_append,
    whole_frames,
    whole_refined,
)
from n2s_stream.n2s.augment import augmented
from n2s_stream.n2s.denoising import Network, check_usable, denoise_series, to_source_dtype
from n2s_stream.runtime.calibration import Calibration
from n2s_stream.runtime.coldstart import ColdStart
from n2s_stream.runtime.scheduler import Services
from n2s_stream.runtime.worker import BackgroundWorker

log = logging.getLogger(__name__)

READ_BATCH = 8
"""Raw frames read from a spool at once."""

TRIES = 3
"""Failed attempts after which a spool is set aside."""


class NotRefinable(Exception):
    """A spooled series that cannot be refined (its spool is dropped, the reason logged)."""


class Refiner(BackgroundWorker):
    """Refines the spooled series one by one, whenever the daemon is idle."""

    def __init__(
        self,
        root: Path,
        *,
        network: Network,
        services: Services,
        calibration: Calibration,
        options: RefineOptions,
        outputs: OutputAccess,
        cold_start: ColdStart | None = None,
        on_published: Sequence[Callable[[Path], None]] = (),
    ) -> None:
        super().__init__("refiner")
        self.root, self.store, self.metrics = root, services.store, services.metrics
        self.model, self.masker, self.device = network.model, network.masker, network.device
        self.jinv, self.calibration, self.options = network.jinv, calibration, options
        self.min_free_bytes = outputs.min_free_bytes
        self._idle = services.scheduler.refiner_may_run
        self._cold_start = cold_start
        self._on_published = tuple(on_published)  # told of each output that got refined
        self._outputs = outputs  # shared with the live writer
        self._busy = False
        self._idle_since: float | None = None
        self._said: set[str] = set()  # waits already logged
        self._failures: dict[str, int] = {}  # failed attempts, by spool name

    @property
    def busy(self) -> bool:
        """True while a frame is being refined: training waits meanwhile."""
        return self._busy

    def _run(self) -> None:
        while not self._stopping.is_set():
            ready = self.pending()
            self.metrics.refine_pending.set(len(ready))
            spool = next_to_refine(ready)
            if spool is not None and self._may_refine(spool):
                self._refine_guarded(spool)
            else:
                self._stopping.wait(0.5)

    def pending(self) -> list[Path]:
        """Spools of ended series, oldest first."""
        return sorted(self.root.glob("*" + READY_SUFFIX), key=_modified)

    def _may_refine(self, spool: Path) -> bool:
        if self._cold_start is not None and self._cold_start.active:
            self._say_once(
                "cold",
                "refining waits: the cold-start classical denoiser still "
                "writes (the network has not measured better yet)",
            )
            return False
        return self._quiet()

    def _quiet(self) -> bool:
        """The daemon has had nothing to denoise for ``idle_seconds``."""
        now = time.monotonic()
        if not self._idle():
            self._idle_since = None
            return False
        if self._idle_since is None:
            self._idle_since = now
        return now - self._idle_since >= self.options.idle_seconds

    def _wait_until_quiet(self) -> bool:
        """Wait for the daemon to be quiet again; False if it stops meanwhile."""
        while not self._stopping.is_set():
            if self._quiet():
                return True
            self._stopping.wait(0.2)
        return False

    def _refine_guarded(self, spool: Path) -> None:
        """Refine one series; a failure is logged and counted, and after ``TRIES`` of
        them the spool is set aside (``*.failed.h5``), so it is not tried again and again.
        A spool removed meanwhile (the spool made room for newer series) is skipped."""
        try:
            self._refine(spool)
            self._failures.pop(spool.name, None)
        except Exception as exc:
            if not spool.exists():
                log.info("%s was removed while it was being refined", spool.name)
                return
            log.exception("refining %s failed: %s", spool.name, exc)
            self.metrics.refine_errors.inc()
            tries = self._failures[spool.name] = self._failures.get(spool.name, 0) + 1
            if tries >= TRIES:
                self._failures.pop(spool.name)
                self._set_aside(spool)
            else:
                self._stopping.wait(5.0)
        finally:
            self._busy = False

    def _set_aside(self, spool: Path) -> None:
        failed = spool.with_name(spool.name.removesuffix(READY_SUFFIX) + FAILED_SUFFIX)
        try:
            spool.rename(failed)
            log.warning("set %s aside after %d failed tries", failed.name, TRIES)
        except OSError as exc:
            log.error("cannot set %s aside (%s): removing it", spool.name, exc)
            spool.unlink(missing_ok=True)

    def _refine(self, spool_path: Path) -> None:
        """Refine the output rows one spool holds into the spool itself (a killed refiner
        goes on from its whole frames), then append them to the output in one short write."""
        try:
            with open_for_append(spool_path) as spool:  # (a killed refiner left it flagged)
                output = output_of(spool)
                if not output.exists():
                    raise NotRefinable(f"its output {output} is gone")
                with h5py.File(output, "r", swmr=True) as file:
                    rows = file["/entry/provenance/source_frame"][: whole_frames(file)]
                    refined_rows = whole_refined(file)
                done = self._refine_into_spool(spool, rows, refined_rows, output)
            if done and not self._publish(spool_path, output):
                return
        except NotRefinable as exc:
            log.warning("not refining the series of %s: %s", spool_path.name, exc)
            spool_path.unlink()
            return
        if done:
            spool_path.unlink()
            self._tell_listeners(output)
            self.metrics.series_refined.inc()

    def _refine_into_spool(
        self, spool: h5py.File, rows: np.ndarray, refined_rows: int, output: Path
    ) -> bool:
        """Refine the output's rows that the spool holds (``rows``: its source frames, in
        order; ``refined_rows``: those the output holds refined already) and has not
        refined yet; True once it holds them all."""
        position = positions(spool)
        refined, versions = refined_datasets(spool, _first_row(rows, position, refined_rows))
        first_row, stop_row = _rows_held(spool, rows, position)
        start = first_row + min(refined.shape[0], versions.shape[0])
        if start >= stop_row:
            return True
        snapshot = self.store.snapshot()
        if snapshot.normalizer is None:  # a restart without a checkpoint, no frame yet
            first = raw_frames(spool)[0]
            valid = check_usable(first, pixel_mask_of(spool))
            snapshot = replace(snapshot, normalizer=self.calibration.normalizer_for(first, valid))
        assert snapshot.normalizer is not None  # published, or fitted just above
        self.model.load_state_dict(snapshot.weights)
        self.model.eval()
        begun = time.monotonic()
        log.info(
            "refining %s from frame %d of %d%s with model version %d",
            output,
            start,
            len(rows),
            "" if stop_row == len(rows) else f" (up to {stop_row})",
            snapshot.version,
        )
        raw = raw_frames(spool)
        mask = pixel_mask_of(spool)
        first = max(first_row, start - (self.masker.config.context_frames - 1))

        def chunks() -> Iterator[tuple[int, np.ndarray]]:
            for row in range(first, stop_row, READ_BATCH):
                take = [position[int(s)] for s in rows[row : min(row + READ_BATCH, stop_row)]]
                yield row, np.stack([raw[k] for k in take])

        frames = denoise_series(
            augmented(self.model, self.options.tta),
            self.masker,
            snapshot.normalizer,
            chunks(),
            jinv=self.jinv,
            preserve_flux=self.options.preserve_flux,
            device=self.device,
            batch=1,
            pixel_mask=mask,
        )
        while True:
            if not self._wait_until_quiet():
                return False
            self._busy = True
            try:
                row_indices, denoised = next(frames)
            except StopIteration:
                break
            finally:
                self._busy = False
            keep = row_indices >= start
            if keep.any() and not self._wait_for_space(Path(spool.filename), denoised[keep].nbytes):
                return False
            if keep.any():
                n = refined.shape[0]
                for ds, values in (
                    (refined, denoised[keep]),
                    (versions, np.full(int(keep.sum()), snapshot.version)),
                ):
                    ds.resize(n + len(values), axis=0)
                    ds[n:] = values
                spool.flush()
                self.metrics.frames_refined.inc(int(keep.sum()))
        log.info(
            "refined %s: %d frames with model version %d in %.1f s",
            output,
            stop_row - start,
            snapshot.version,
            time.monotonic() - begun,
        )
        return True

    def _publish(self, spool_path: Path, output: Path) -> bool:
        """Append the spool's refined frames to the output; False while another process
        holds the output open or its disk is nearly full (tried again later)."""
        with h5py.File(spool_path, "r") as spool:
            refined, versions = stored_refined(spool)
            first_row = refined_from(spool)
            if not self._wait_for_space(output, refined.nbytes):
                return False
            with self._outputs.opening_briefly(output) as free:
                try:
                    if not free:
                        raise FileBusy(f"{output}: its series writes to it again")
                    writer = RefinedWriter(output, description=self._description())
                except FileBusy:
                    self._say_once(
                        f"busy {output}", f"refined frames of {output} wait: it is open for writing"
                    )
                    self._stopping.wait(5.0)
                    return False
                try:
                    _append_refined(writer, refined, versions, first_row)
                finally:
                    writer.close()
        self._said.discard(f"busy {output}")
        log.info("wrote %d refined frames to %s", writer.n_done, output)
        return True

    def _tell_listeners(self, output: Path) -> None:
        """Tell the listeners (the Tiled sink) of refined frames appended to ``output``;
        a listener's failure is theirs, logged, never the refinement's."""
        for listener in self._on_published:
            try:
                listener(output)
            except Exception:
                log.exception("telling %s of the refined frames of %s failed", listener, output)

    def _wait_for_space(self, file: Path, nbytes: int) -> bool:
        """Hold refined frames while the disk of ``file`` (the spool, the output) would
        keep less than twice the live writer's reserve: they never take the space live
        frames, checkpoints and the ledger need."""
        while free_bytes(file.parent) < 2 * self.min_free_bytes + nbytes:
            self._say_once("space", f"refining waits: the disk of {file} is nearly full")
            if self._stopping.wait(5.0):
                return False
        self._said.discard("space")
        return True

    def _description(self) -> str:
        return (
            f"the series denoised again after it ended, with the newest network, "
            f"averaged over {self.options.tta} orientations of each frame"
        )

    def _say_once(self, key: str, message: str) -> None:
        if key not in self._said:
            self._said.add(key)
            log.info("%s", message)


def next_to_refine(ready: list[Path]) -> Path | None:
    """The first of the ``ready`` spools whose series has no earlier part waiting: a
    series that resumed after it went idle has a spool per part, refined in order."""
    parts = [spool_part(spool) for spool in ready]
    for spool, (series, n) in zip(ready, parts, strict=True):
        if not any(other == series and m < n for other, m in parts):
            return spool
    return None


def _modified(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:  # removed meanwhile: sorts first, and is then skipped
        return 0.0


def _append_refined(
    writer: RefinedWriter, refined: h5py.Dataset, versions: h5py.Dataset, first_row: int
) -> None:
    """Append the spool's refined frames (output rows from ``first_row`` on) that the
    output does not hold yet; `NotRefinable` if rows before them were never refined."""
    if writer.n_done < first_row:
        raise NotRefinable(
            f"frames {writer.n_done}-{first_row - 1} of {writer.path} were "
            "not refined (their spool was dropped or set aside)"
        )
    stop_row = min(first_row + refined.shape[0], writer.n_live)
    for row in range(writer.n_done, stop_row, 32):
        stop = min(row + 32, stop_row)
        writer.append(
            to_source_dtype(refined[row - first_row : stop - first_row], writer.dtype),
            versions[row - first_row : stop - first_row],
        )


def _first_row(rows: np.ndarray, position: dict[int, int], refined_rows: int) -> int:
    """The first output row a spool is to refine: the first it holds, after those the
    output holds refined already."""
    return next(
        (row for row in range(refined_rows, len(rows)) if int(rows[row]) in position), refined_rows
    )


def _rows_held(spool: h5py.File, rows: np.ndarray, position: dict[int, int]) -> tuple[int, int]:
    """The output rows this spool refines: from ``refined_from`` on, as long as it holds
    their raw frames (a series that resumed after it went idle has a spool for each part).
    `NotRefinable` if it holds none of them (and some are left to refine)."""
    first_row = refined_from(spool)
    stop_row = first_row
    while stop_row < len(rows) and int(rows[stop_row]) in position:
        stop_row += 1
    if stop_row == first_row and first_row < len(rows):
        raise NotRefinable(
            f"the raw frame of its row {first_row} (source frame "
            f"{int(rows[first_row])}) was not kept"
        )
    held_later = sum(int(s) in position for s in rows[stop_row:])
    if held_later:
        log.warning(
            "%s: rows from %d on are not refined: the raw frame of row %d was not kept",
            output_of(spool),
            stop_row,
            stop_row,
        )
    return first_row, stop_row
