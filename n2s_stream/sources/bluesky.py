"""Follow a Bluesky experiment through its documents (a bluesky 0MQ proxy's output).

Instead of guessing from the file system, the daemon reads what the RunEngine announces:
a ``stream_resource`` names the HDF5 file and dataset an area detector writes, each
``stream_datum`` says up to which frame it has landed (flushed), and the run's ``stop``
ends the series. The file's path is the detector host's: ``bluesky_path_map`` rewrites its
prefix into the daemon's view, and the result must lie under a mapped prefix (or under
``bluesky_root``). Frames are read from the SWMR file from the last one read up to what
the newest StreamDatum announces, so a StreamDatum lost on the way (ZeroMQ PUB drops for
slow or late subscribers) loses no frame. Documents are JSON or msgpack; a pickle is
counted (``pickle``) and never unpickled. The output is named after the run (scan number,
uid prefix, data key) and records the RunStart in ``/entry/process/bluesky_start``. What a
restart needs (the resources of runs still open) is kept in ``state_dir/bluesky/``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import h5py
import hdf5plugin  # noqa: F401  (registers the filters areaDetector files use)
import numpy as np
import zmq

from n2s_stream.config import BlueskyOptions, DaemonConfig
from n2s_stream.errors import UsageError
from n2s_stream.frames import Frame, SeriesEnd
from n2s_stream.sources import Emit, Reject, SourceContext, StartPosition
from n2s_stream.sources.codecs import MessageError
from n2s_stream.sources.documents import (
    FrameStream,
    decode_message,
    frame_stream,
    frames_per_event,
    series_name,
    start_notes,
)
from n2s_stream.state import atomic_write_text
from n2s_stream.worker import BackgroundWorker

log = logging.getLogger(__name__)


@dataclass
class _Run:
    """What is known of one run: its RunStart (None if it came before we listened) and
    the shapes of its data keys (from its descriptors)."""

    start: dict[str, Any] | None = None
    shapes: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class _Followed:
    """A frame stream being read: where its frames go and how far they were read."""

    stream: FrameStream
    local_path: str
    series: str
    output: str
    notes: dict[str, str]
    rows_read: int
    done: bool = False  # an earlier run wrote all of it


class BlueskySource(BackgroundWorker):
    """Emits the frames that a Bluesky run's documents announce; one output per detector
    stream of each run."""

    def __init__(self, options: BlueskyOptions, *, out_root: Path, state_dir: Path,
                 emit: Emit, reject: Reject, start_position: StartPosition) -> None:
        super().__init__("bluesky-source")
        if options.endpoint is None:
            raise UsageError("the Bluesky source needs --bluesky ENDPOINT")
        self.options, self.out_root = options, out_root
        self._emit, self._reject, self._start_position = emit, reject, start_position
        self._path_map = parse_path_map(options.path_map)
        self._records = state_dir / "bluesky"
        self._records.mkdir(parents=True, exist_ok=True)
        self._runs: dict[str, _Run] = {}
        self._followed: dict[str, _Followed] = self._load_records()
        self._files: dict[str, h5py.File] = {}
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.SUB)
        self._socket.setsockopt(zmq.RCVHWM, 0)  # the proxy's PUB drops what we do not take
        self._socket.setsockopt(zmq.MAXMSGSIZE, options.max_message_mb << 20)
        self._socket.setsockopt(zmq.LINGER, 0)
        prefix = options.prefix.encode()
        self._socket.setsockopt(zmq.SUBSCRIBE, prefix + b" " if prefix else b"")

    @classmethod
    def from_config(cls, config: DaemonConfig, context: SourceContext) -> BlueskySource:
        """The source ``--bluesky`` selects."""
        return cls(config.bluesky, out_root=config.output.out,
                   state_dir=config.service.state_dir, emit=context.emit,
                   reject=context.reject, start_position=context.start_position)

    def start(self) -> None:
        """Connect to the proxy's output and start reading."""
        assert self.options.endpoint is not None
        self._socket.connect(self.options.endpoint)
        log.info("following Bluesky documents from %s%s", self.options.endpoint,
                 f" (prefix {self.options.prefix!r})" if self.options.prefix else "")
        super().start()

    def stop(self) -> None:
        """Stop reading; open runs are remembered for the next start."""
        super().stop()
        for file in self._files.values():
            file.close()
        self._socket.close()
        self._context.term()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        while not self._stopping.is_set():
            if not poller.poll(100):
                continue
            message = self._socket.recv()
            try:
                name, document = decode_message(message)
                if not self._handle(name, document):
                    return
            except MessageError as exc:
                self._reject(exc.reason, f"{self.options.endpoint}: {exc}")
            except Exception as exc:  # a bug met by an odd document must not stop the feed
                log.exception("handling a Bluesky document failed")
                self._reject("internal_error", f"{self.options.endpoint}: {exc}")

    # ---- documents ----------------------------------------------------------------------
    def _handle(self, name: str, document: dict[str, Any]) -> bool:
        """Act on one document; False once the daemon stops."""
        if name == "start":
            self._runs[document["uid"]] = _Run(start=document)
            log.info("run %s started (scan %s, plan %s)", document["uid"],
                     document.get("scan_id", "?"), document.get("plan_name", "?"))
        elif name == "descriptor":
            run = self._runs.setdefault(document["run_start"], _Run())
            for key, data_key in document["data_keys"].items():
                if isinstance(data_key, dict) and isinstance(data_key.get("shape"), list):
                    run.shapes[key] = data_key["shape"]
        elif name == "stream_resource":
            self._follow(document)
        elif name == "stream_datum":
            return self._datum(document)
        elif name == "stop":
            return self._stop(document)
        return True

    def _follow(self, resource: dict[str, Any]) -> None:
        """Start following the frames a StreamResource announces (images of the selected
        data key only)."""
        wanted = self.options.data_key
        if wanted is not None and resource["data_key"] != wanted:
            return
        run_start = str(resource.get("run_start") or "")
        run = self._runs.get(run_start, _Run())
        shape = run.shapes.get(resource["data_key"])
        chunks = resource["parameters"].get("chunk_shape") or []
        multiplier = frames_per_event(shape) if shape is not None else (
            1 if len(chunks) == 3 else None)
        if multiplier is None:
            return  # not images (a scalar or waveform beside the detector)
        stream = frame_stream(resource, run_start, multiplier)
        local = self._local_path(stream.path)
        series = series_name(run.start, run_start or stream.uid, stream.data_key)
        output = self.out_root / f"{series}_n2s.h5"
        position = self._start_position(series, output)
        followed = _Followed(stream, str(local), series, str(output),
                             start_notes(run.start, stream.data_key), position or 0,
                             done=position is None)
        self._followed[stream.uid] = followed
        self._remember(followed)
        log.info("run %s: following %s %s as series %s%s", run_start or "?", local,
                 stream.dataset, series, " (already written)" if followed.done else "")

    def _datum(self, datum: dict[str, Any]) -> bool:
        """Read and emit the frames a StreamDatum says have landed."""
        followed = self._followed.get(str(datum["stream_resource"]))
        if followed is None or followed.done:
            return True  # not a stream we follow (another data key, not images)
        stop_row = int(datum["indices"]["stop"]) * followed.stream.multiplier
        return self._read_up_to(followed, stop_row, datum)

    def _read_up_to(self, followed: _Followed, stop_row: int,
                    datum: dict[str, Any] | None = None) -> bool:
        if stop_row <= followed.rows_read:
            return True
        try:
            frames = self._dataset(followed)
            frames.refresh()
            available = min(stop_row, frames.shape[0])
            block = frames[followed.rows_read : available]
        except (OSError, KeyError) as exc:
            self._reject("unreadable", f"{followed.local_path}: frames {followed.rows_read}-"
                         f"{stop_row - 1} announced but not readable: {exc}")
            self._files.pop(followed.stream.uid, None)
            return True
        received = time.time()
        first_seq = int(datum["seq_nums"]["start"]) if datum and "seq_nums" in datum else None
        first_event = int(datum["indices"]["start"]) if datum else 0
        for data in block:
            row = followed.rows_read
            seq = (None if first_seq is None
                   else first_seq + row // followed.stream.multiplier - first_event)
            frame = Frame(followed.series, row, np.asarray(data), received,
                          Path(followed.output), source_id=seq, notes=followed.notes)
            if not self._emit(frame):
                return False
            followed.rows_read = row + 1
        return True

    def _stop(self, stop: dict[str, Any]) -> bool:
        """The run ended (whatever its exit status): each of its series ends with what
        its file holds."""
        run_start = str(stop["run_start"])
        status = stop.get("exit_status", "?")
        for uid, followed in list(self._followed.items()):
            if followed.stream.run_start != run_start:
                continue
            if not followed.done:
                try:
                    total = int(self._dataset(followed).shape[0])
                except (OSError, KeyError):
                    total = followed.rows_read
                if not self._read_up_to(followed, total):
                    return False
                if not self._emit(SeriesEnd(followed.series, followed.rows_read,
                                            Path(followed.output))):
                    return False
            file = self._files.pop(uid, None)
            if file is not None:
                file.close()
            del self._followed[uid]
            (self._records / f"{_file_safe(uid)}.json").unlink(missing_ok=True)
            log.info("run %s ended (%s): series %s, %d frames", run_start, status,
                     followed.series, followed.rows_read)
        self._runs.pop(run_start, None)
        return True

    # ---- files and state ----------------------------------------------------------------
    def _dataset(self, followed: _Followed) -> h5py.Dataset:
        file = self._files.get(followed.stream.uid)
        if file is None:
            file = h5py.File(followed.local_path, "r", swmr=True, libver="latest")
            self._files[followed.stream.uid] = file
        frames = file[followed.stream.dataset]
        if not isinstance(frames, h5py.Dataset) or frames.ndim != 3:
            raise KeyError(f"{followed.stream.dataset} is not a stack of frames")
        return frames

    def _local_path(self, path: str) -> Path:
        """The detector's path in the daemon's view; `MessageError` (``outside_root``) if
        it lies under no mapped prefix (or outside ``bluesky_root``)."""
        for remote, local in self._path_map:
            if path == remote or path.startswith(remote.rstrip("/") + "/"):
                mapped = Path(local) / Path(path[len(remote):].lstrip("/"))
                return _inside(mapped, Path(local), path)
        if self._path_map:
            raise MessageError(f"{path}: under no prefix of bluesky_path_map",
                               reason="outside_root")
        return _inside(Path(path), self.options.root, path)

    def _remember(self, followed: _Followed) -> None:
        record = {**asdict(followed), "stream": asdict(followed.stream)}
        atomic_write_text(self._records / f"{_file_safe(followed.stream.uid)}.json",
                          json.dumps(record))

    def _load_records(self) -> dict[str, _Followed]:
        """Streams of runs that were open when the daemon stopped: they continue where
        their outputs end."""
        followed = {}
        for path in sorted(self._records.glob("*.json")):
            try:
                record = json.loads(path.read_text())
                stream = FrameStream(**record.pop("stream"))
                item = _Followed(stream=stream, **record)
            except (OSError, ValueError, TypeError) as exc:
                log.warning("%s: unreadable record of an open run (%s); ignored", path, exc)
                continue
            position = self._start_position(item.series, Path(item.output))
            item.rows_read, item.done = position or 0, position is None
            followed[stream.uid] = item
            log.info("run %s still open: series %s continues at frame %d", stream.run_start,
                     item.series, item.rows_read)
        return followed


def parse_path_map(entries: tuple[str, ...]) -> list[tuple[str, str]]:
    """``DETECTOR_PREFIX=LOCAL_PREFIX`` entries, longest prefix first."""
    pairs = []
    for entry in entries:
        remote, sep, local = entry.partition("=")
        if not sep or not remote.startswith("/") or not local:
            raise UsageError(f"bluesky_path_map: {entry!r} is not /DETECTOR/PREFIX=/LOCAL/PREFIX")
        pairs.append((remote, local))
    return sorted(pairs, key=lambda pair: -len(pair[0]))


def _inside(path: Path, root: Path, announced: str) -> Path:
    """``path`` resolved, if it stays under ``root`` (no ``..`` or symlink out of it)."""
    resolved, base = path.resolve(), root.resolve()
    if resolved != base and base not in resolved.parents:
        raise MessageError(f"{announced}: resolves to {resolved}, outside {base}",
                           reason="outside_root")
    return resolved


def _file_safe(uid: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in uid)[:120]
