"""The daemon's state directory: versioned checkpoints and the ledger of series.

Layout: ``checkpoints/ckpt_v00000012.pt`` (the newest few are kept) and ``ledger.json``
(for each series: its output file, frames written, finished or not). Both are written
atomically (temp file, fsync, rename). The output files themselves are the authority on
which source frames were written: the ledger only remembers which series are complete.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from n2s_stream.checkpoint import Checkpoint, load_checkpoint
from n2s_stream.errors import CheckpointError, UsageError
from n2s_stream.writer import whole_frames

log = logging.getLogger(__name__)

KEEP_CHECKPOINTS = 3


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that a crash leaves the old or the new file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def last_written_source_frame(output: Path) -> int | None:
    """Highest source frame number in an output file's provenance, None if none."""
    if not output.exists():
        return None
    try:
        with h5py.File(output, "r", swmr=True, locking=False) as handle:
            whole = whole_frames(handle)
            return int(handle["/entry/provenance/source_frame"][whole - 1]) if whole else None
    except (OSError, KeyError) as exc:
        raise UsageError(f"{output}: existing output cannot be read to resume: {exc}") from exc


def newest_checkpoint(checkpoints: Path) -> Checkpoint | None:
    """The newest loadable ``ckpt_v*.pt`` in a folder, without writing anything there."""
    for path in sorted(Path(checkpoints).glob("ckpt_v*.pt"), reverse=True):
        try:
            return load_checkpoint(path)
        except CheckpointError as exc:
            log.warning("skipping checkpoint: %s", exc)
    return None


class SeriesHeaders(MutableMapping):
    """Per-series header details (the pixel mask) kept as ``series_headers/<series>.npz``
    so a daemon restarted mid-series still decodes that series' images correctly.

    A mapping ``series -> mask or None``, as the stream decoders expect.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._cache: dict[str, np.ndarray | None] = {}

    def _path(self, series: str) -> Path:
        return self.root / f"{series}.npz"  # series names are checked file names

    def __getitem__(self, series: str) -> np.ndarray | None:
        if series not in self._cache:
            try:
                with np.load(self._path(series), allow_pickle=False) as saved:
                    self._cache[series] = saved["mask"] if saved["has_mask"] else None
            except (OSError, KeyError, ValueError) as exc:
                raise KeyError(series) from exc
            log.info("series %s: header details restored from %s", series, self.root)
        return self._cache[series]

    def __setitem__(self, series: str, mask: np.ndarray | None) -> None:
        self._cache[series] = mask
        tmp = self._path(series).with_suffix(".tmp.npz")
        np.savez(tmp, has_mask=mask is not None,
                 mask=mask if mask is not None else np.zeros((0, 0), bool))
        os.replace(tmp, self._path(series))

    def __delitem__(self, series: str) -> None:
        self._cache.pop(series, None)
        self._path(series).unlink(missing_ok=True)

    def __contains__(self, series: object) -> bool:
        if series in self._cache:
            return True
        try:
            self[series]  # type: ignore[index]
        except KeyError:
            return False
        return True

    def __iter__(self):
        return iter(sorted(p.stem for p in self.root.glob("*.npz")))

    def __len__(self) -> int:
        return len(list(self.root.glob("*.npz")))


class StateDir:
    """Checkpoints and ledger under one directory, created if needed."""

    def __init__(self, root: Path, on_write_error: Callable[[], None] = lambda: None) -> None:
        self.root = Path(root)
        self._on_write_error = on_write_error
        self.checkpoints = self.root / "checkpoints"
        try:
            self.checkpoints.mkdir(parents=True, exist_ok=True)
            probe = self.root / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise UsageError(f"{self.root}: state directory is not writable: {exc}") from exc
        self.series_headers = SeriesHeaders(self.root / "series_headers")
        self._ledger_path = self.root / "ledger.json"
        self._lock = threading.Lock()
        self._series: dict[str, dict[str, Any]] = self._read_ledger()

    def _read_ledger(self) -> dict[str, dict[str, Any]]:
        if not self._ledger_path.exists():
            return {}
        try:
            return dict(json.loads(self._ledger_path.read_text())["series"])
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("%s unreadable (%s); rebuilding it from the outputs",
                        self._ledger_path, exc)
            return {}

    def start_position(self, series: str, output: Path) -> int | None:
        """Next source frame to read for ``series``; None when it is already complete."""
        with self._lock:
            entry = self._series.get(series, {})
        if entry.get("finished"):
            return None
        last = last_written_source_frame(output)
        return 0 if last is None else last + 1

    def output_for(self, series: str, default: Path) -> Path:
        """The output file of ``series``: the one in progress, else ``default``; a series
        name seen again after it finished (a detector restarted its numbering) gets a new
        file ``<name>_r2_n2s.h5``, ``_r3``... so earlier output is never appended to."""
        with self._lock:
            entry = self._series.get(series)
        if entry is None:
            return default
        if not entry.get("finished"):
            return Path(entry["output"])
        stem = default.name.removesuffix("_n2s.h5")
        run = 2
        while (candidate := default.with_name(f"{stem}_r{run}_n2s.h5")).exists():
            run += 1
        self.record(series, output=candidate, written=0, finished=False)
        log.info("series %s seen again after it finished: writing to %s", series, candidate)
        return candidate

    def record(self, series: str, *, output: Path, written: int, finished: bool) -> None:
        """Note progress of a series and persist the ledger.

        A ledger that cannot be written (state dir gone read-only or full) is logged and
        counted, not fatal: outputs stay the authority on what was written, and the next
        write that succeeds carries every entry.
        """
        with self._lock:
            self._series[series] = {"output": str(output), "written": written,
                                    "finished": finished}
            text = json.dumps({"series": self._series}, indent=1, sort_keys=True)
            try:
                atomic_write_text(self._ledger_path, text)
            except OSError as exc:
                self.write_failed(f"ledger {self._ledger_path}", exc)

    def write_failed(self, what: str, exc: OSError) -> None:
        """Log and count a failed write to the state dir; the daemon carries on."""
        log.error("cannot write %s: %s (denoising goes on; restart point not updated)",
                  what, exc.strerror or exc)
        self._on_write_error()

    def checkpoint_path(self, version: int) -> Path:
        """Where the checkpoint of ``version`` goes."""
        return self.checkpoints / f"ckpt_v{version:08d}.pt"

    def prune_checkpoints(self) -> None:
        """Keep the newest few checkpoints."""
        for old in sorted(self.checkpoints.glob("ckpt_v*.pt"))[:-KEEP_CHECKPOINTS]:
            old.unlink(missing_ok=True)

    def latest_checkpoint(self) -> Checkpoint | None:
        """The newest checkpoint that loads; a corrupt one is skipped with a warning."""
        return newest_checkpoint(self.checkpoints)
