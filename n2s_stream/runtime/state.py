"""The daemon's state directory: versioned checkpoints and the ledger of series.

Layout: ``checkpoints/ckpt_v00000012.pt`` (the newest few are kept, each written
atomically: temp file, fsync, rename) and ``ledger.jsonl``, a journal with one JSON line
per change of a series (its output file, frames written, finished or not), appended and
fsynced, and compacted to one line per series when the daemon starts. The output files
themselves are the authority on which source frames were written: the ledger only
remembers which series are complete and where unfinished ones are being written.

The other folders are named here too, so the whole layout is in one module:
``series_headers/`` (pixel masks a ZeroMQ series header announced), ``refine/`` (the raw
spools of series waiting to be refined, `refine_dir`), ``pva/`` (where each followed PV's
acquisition stands, `pva_dir`) and ``bluesky/`` (the open runs, `bluesky_dir`).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from n2s_stream.errors import CheckpointError, UsageError
from n2s_stream.formats.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from n2s_stream.formats.writer import last_written_source_frame, rerun_output
from n2s_stream.models import StateDict
from n2s_stream.n2s.normalize import Normalizer
from n2s_stream.n2s.specs import MaskerConfig, ModelConfig, Objective

log = logging.getLogger(__name__)

KEEP_CHECKPOINTS = 3


def checkpoints_dir(state_dir: Path) -> Path:
    """The versioned checkpoints (also what a fan-out worker follows in another state
    directory, ``model_from``)."""
    return Path(state_dir) / "checkpoints"


def refine_dir(state_dir: Path) -> Path:
    """The spools of series waiting to be refined (written by the spool sink, read and
    removed by the refiner)."""
    return Path(state_dir) / "refine"


def pva_dir(state_dir: Path) -> Path:
    """One record per followed PV: its current acquisition, so a restart continues it."""
    return Path(state_dir) / "pva"


def bluesky_dir(state_dir: Path) -> Path:
    """One record per open Bluesky run, so a restart continues its series."""
    return Path(state_dir) / "bluesky"


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that a crash leaves the old or the new file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


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
        np.savez(
            tmp,
            has_mask=mask is not None,
            mask=mask if mask is not None else np.zeros((0, 0), bool),
        )
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


class SeriesLedger:
    """Which series are being written (and to which file) and which are finished, kept
    on disk as an append-only journal so that noting a change costs one short fsynced
    line however many series the service has seen.

    In memory: the unfinished series' entries and the finished series' names only.
    A line torn by a crash is skipped; a failed append (state dir read-only or full) is
    reported through ``on_write_error`` and the next write that succeeds rewrites the
    whole ledger, so it carries every entry again.
    """

    def __init__(self, path: Path, on_write_error: Callable[[str, OSError], None]) -> None:
        self.path = Path(path)
        self._on_write_error = on_write_error
        self._lock = threading.Lock()
        self._open: dict[str, dict[str, Any]] = {}
        self._finished: set[str] = set()
        for entry in self._read_journal():
            try:
                self._apply(entry)
            except (ValueError, TypeError, KeyError) as exc:
                log.warning("%s: entry %r skipped (%s)", self.path, entry, exc)
        self._rewrite_needed = False
        with self._lock:
            self._rewrite()  # compact: one line per series

    def entry(self, series: str) -> dict[str, Any] | None:
        """``{"output", "written", "finished"}`` for a series, None if never recorded (a
        finished series' entry has no output: it is not needed again)."""
        with self._lock:
            if series in self._finished:
                return {"finished": True}
            entry = self._open.get(series)
            return None if entry is None else dict(entry)

    def record(self, series: str, *, output: Path, written: int, finished: bool) -> None:
        """Note where a series stands and append it to the journal."""
        entry = {"series": series, "output": str(output), "written": written, "finished": finished}
        with self._lock:
            self._apply(entry)
            try:
                if self._rewrite_needed:
                    self._rewrite()
                else:
                    with open(self.path, "a") as journal:
                        journal.write(json.dumps(entry) + "\n")
                        journal.flush()
                        os.fsync(journal.fileno())
            except OSError as exc:
                self._rewrite_needed = True
                self._on_write_error(f"ledger {self.path}", exc)

    def __len__(self) -> int:
        with self._lock:
            return len(self._open) + len(self._finished)

    def _apply(self, entry: dict[str, Any]) -> None:
        series = str(entry["series"])
        if entry.get("finished"):
            self._open.pop(series, None)
            self._finished.add(series)
        else:
            self._finished.discard(series)
            self._open[series] = {
                "output": str(entry["output"]),
                "written": int(entry.get("written", 0)),
                "finished": False,
            }

    def _rewrite(self) -> None:
        lines = [json.dumps({"series": name, "finished": True}) for name in sorted(self._finished)]
        lines += [json.dumps({"series": name, **entry}) for name, entry in self._open.items()]
        try:
            atomic_write_text(self.path, "".join(line + "\n" for line in lines))
            self._rewrite_needed = False
        except OSError as exc:
            self._rewrite_needed = True
            self._on_write_error(f"ledger {self.path}", exc)

    def _read_journal(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        entries, unreadable = [], 0
        with open(self.path, errors="replace") as journal:
            for line in journal:
                try:
                    entry = json.loads(line)
                    if (
                        isinstance(entry, dict)
                        and "series" in entry
                        and (entry.get("finished") or "output" in entry)
                    ):
                        entries.append(entry)
                        continue
                except ValueError:
                    pass
                unreadable += 1
        if unreadable:
            log.warning(
                "%s: %d unreadable line(s) skipped (a write cut short by a crash); "
                "the outputs tell where those series stand",
                self.path,
                unreadable,
            )
        return entries


class StateDir:
    """Checkpoints and ledger under one directory, created if needed."""

    def __init__(
        self, root: Path, on_write_error: Callable[[], None] = lambda: None, *, claim: bool = False
    ) -> None:
        self.root = Path(root)
        self._on_write_error = on_write_error
        self.checkpoints = checkpoints_dir(self.root)
        try:
            self.checkpoints.mkdir(parents=True, exist_ok=True)
            probe = self.root / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise UsageError(f"{self.root}: state directory is not writable: {exc}") from exc
        self._lock_fd: int | None = None
        if claim:
            self._claim()
        self.series_headers = SeriesHeaders(self.root / "series_headers")
        self.ledger = SeriesLedger(self.root / "ledger.jsonl", self.write_failed)

    def _claim(self) -> None:
        """Hold the state dir for this process: an exclusive lock on ``daemon.lock``, on a
        read-only handle (a state dir must stay remountable read-only), released when the
        process ends, however. A second daemon on the same state dir would append to the
        same ledger, spools and outputs: a usage error, raised before anything is written."""
        path = self.root / "daemon.lock"
        try:
            handle = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UsageError(f"{path}: cannot be opened: {exc}") from exc
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(handle)
            holder = path.read_text().strip() or "?"
            raise UsageError(
                f"{self.root}: state directory in use by another n2s-stream "
                f"(pid {holder}); give each daemon its own --state-dir"
            ) from exc
        path.write_text(f"{os.getpid()}\n")
        self._lock_fd = handle  # kept open: the lock lives as long as this descriptor

    def release(self) -> None:
        """Give up the claim (the daemon stopped, or its start failed): another daemon
        may take this state dir."""
        handle, self._lock_fd = self._lock_fd, None
        if handle is not None:
            os.close(handle)

    def start_position(self, series: str, output: Path) -> int | None:
        """Next source frame to read for ``series``; None when it is already complete."""
        entry = self.ledger.entry(series) or {}
        if entry.get("finished"):
            return None
        last = last_written_source_frame(output)
        return 0 if last is None else last + 1

    def output_for(self, series: str, default: Path) -> Path:
        """The output file of ``series``: the one in progress, else ``default``; a series
        name seen again after it finished (a detector restarted its numbering) gets a new
        file ``<name>_r2_n2s.h5``, ``_r3``... so earlier output is never appended to."""
        entry = self.ledger.entry(series)
        if entry is None:
            return default
        if not entry.get("finished"):
            return Path(entry["output"])
        run = 2
        while (candidate := rerun_output(default, run)).exists():
            run += 1
        self.record(series, output=candidate, written=0, finished=False)
        log.info("series %s seen again after it finished: writing to %s", series, candidate)
        return candidate

    def record(self, series: str, *, output: Path, written: int, finished: bool) -> None:
        """Note progress of a series in the ledger.

        A ledger that cannot be written (state dir gone read-only or full) is logged and
        counted, not fatal: outputs stay the authority on what was written, and the next
        write that succeeds carries every entry.
        """
        self.ledger.record(series, output=output, written=written, finished=finished)

    def write_failed(self, what: str, exc: OSError) -> None:
        """Log and count a failed write to the state dir; the daemon carries on."""
        log.error(
            "cannot write %s: %s (denoising goes on; restart point not updated)",
            what,
            exc.strerror or exc,
        )
        self._on_write_error()

    def note_last_stop(self, unwritten: int) -> None:
        """Remember how many accepted frames the stop left unwritten, so that the next
        start can export it (a counter set just before exit is rarely scraped)."""
        try:
            atomic_write_text(
                self.root / "last_stop.json", json.dumps({"unwritten_frames": unwritten}) + "\n"
            )
        except OSError as exc:
            self.write_failed("last_stop.json", exc)

    def last_stop_unwritten(self) -> int:
        """What the previous stop left unwritten (0 if unknown)."""
        try:
            return int(json.loads((self.root / "last_stop.json").read_text())["unwritten_frames"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    def checkpoint_path(self, version: int) -> Path:
        """Where the checkpoint of ``version`` goes."""
        return self.checkpoints / f"ckpt_v{version:08d}.pt"

    def prune_checkpoints(self) -> None:
        """Keep the newest few checkpoints."""
        for old in sorted(self.checkpoints.glob("ckpt_v*.pt"))[:-KEEP_CHECKPOINTS]:
            old.unlink(missing_ok=True)

    def save_checkpoint(
        self,
        *,
        model: nn.Module | StateDict,
        optimizer: torch.optim.Optimizer,
        step: int,
        version: int,
        model_config: ModelConfig,
        masker_config: MaskerConfig,
        normalizer: Normalizer,
        objective: Objective,
    ) -> None:
        """Write the checkpoint of ``version`` (with the ``objective`` that trained it) and
        keep the newest few; a failed write is logged and counted, not fatal (training goes
        on, the next interval tries again)."""
        path = self.checkpoint_path(version)
        try:
            save_checkpoint(
                path,
                model=model,
                model_config=model_config,
                masker_config=masker_config,
                normalizer=normalizer,
                optimizer=optimizer,
                step=step,
                version=version,
                extra={"objective": objective},
            )
            self.prune_checkpoints()
        except OSError as exc:
            self.write_failed(f"checkpoint {path}", exc)
            return
        log.info("checkpoint %s (step %d)", path, step)

    def starting_checkpoint(
        self, *, model_from: Path | None, ckpt: Path | None
    ) -> Checkpoint | None:
        """Where the daemon's model starts: this state dir's newest checkpoint, else the
        training worker's (fan-out, ``model_from``), else the offline ``ckpt``; None:
        from scratch."""
        checkpoint = self.latest_checkpoint()
        if checkpoint is None and model_from is not None:
            checkpoint = newest_checkpoint(checkpoints_dir(model_from))
        if checkpoint is not None:
            log.info(
                "resuming from %s (version %d, step %d)",
                checkpoint.path,
                checkpoint.version,
                checkpoint.step,
            )
        elif ckpt is not None:
            checkpoint = load_checkpoint(ckpt)
            log.info("starting from offline model %s (version %d)", ckpt, checkpoint.version)
        return checkpoint

    def latest_checkpoint(self) -> Checkpoint | None:
        """The newest checkpoint that loads; a corrupt one is skipped with a warning."""
        return newest_checkpoint(self.checkpoints)
