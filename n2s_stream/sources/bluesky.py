"""Follow a Bluesky experiment through its documents (a bluesky 0MQ proxy's output).

Instead of guessing from the file system, the daemon reads what the RunEngine announces:
a ``stream_resource`` names the HDF5 file and dataset an area detector writes, each
``stream_datum`` says up to which frame it has landed (flushed), and the run's ``stop``
ends the series. The file's path is the detector host's: ``bluesky_path_map`` rewrites its
prefix into the daemon's view, and the result must lie under a mapped prefix (or under
``bluesky_root``). Frames are read from the SWMR file from the last one read up to what
the newest StreamDatum announces (at most ``READ_BATCH`` at a time), so a StreamDatum lost
on the way (ZeroMQ PUB drops for slow or late subscribers) loses no frame; at RunStop, all
the file holds is read, and frames announced but missing from it are counted as missing.
A second StreamResource of the same run and data key (a detector that starts a new file)
makes a series of its own (``..._2``). Documents are JSON or msgpack; a pickle is
counted (``pickle``) and never unpickled. The output is named after the run (scan number,
uid prefix, data key) and records the RunStart in ``/entry/process/bluesky_start``. What a
restart needs (the resources of runs still open, and of runs stopped whose series may not
be written to the end yet) is kept in ``state_dir/bluesky/``.
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
from n2s_stream.errors import OutputError, UsageError
from n2s_stream.frames import Frame, SeriesEnd
from n2s_stream.names import file_safe
from n2s_stream.sources import Emit, Reject, SourceContext, StartPosition
from n2s_stream.sources.codecs import MessageError
from n2s_stream.sources.documents import (
    FrameStream,
    datums,
    decode_message,
    events,
    frame_stream,
    frames_per_event,
    legacy_stream,
    series_name,
    start_notes,
)
from n2s_stream.state import atomic_write_text
from n2s_stream.worker import BackgroundWorker

log = logging.getLogger(__name__)

READ_BATCH = 16
"""Frames read from the detector's file at once."""

RECEIVE_LIMIT = 100_000
"""Documents held in the socket while the daemon is busy (beyond: the proxy drops them)."""

PRUNE_SECONDS = 10.0
"""How often records of stopped runs are checked for series written to the end (and open
runs for silence)."""

DATUMS_KEPT = 100_000
"""Datums waiting for their event; beyond, the oldest are forgotten."""

STALE_RECORD_DAYS = 7.0
"""A record of a run still open after this long is dropped at start (its stop was lost)."""


@dataclass
class _Run:
    """What is known of one run: its RunStart (None if it came before we listened), the
    shapes of its data keys and those whose events name datums of older resources (from
    its descriptors)."""

    start: dict[str, Any] | None = None
    shapes: dict[str, list[int]] = field(default_factory=dict)
    legacy_keys: set[str] = field(default_factory=set)


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
    announced: int = 0  # frames the StreamDatum documents said have landed
    stopped: bool = False  # the run's RunStop came (its series was ended)
    descriptors: list[str] = field(default_factory=list)  # older resources: whose events
    idle_ended: bool = False  # ended for silence; resumes if documents come again
    heard: float = 0.0  # time.monotonic() of its last document (this process)


class BlueskySource(BackgroundWorker):
    """Emits the frames that a Bluesky run's documents announce; one output per detector
    stream of each run."""

    def __init__(self, options: BlueskyOptions, *, out_root: Path, state_dir: Path,
                 emit: Emit, reject: Reject, start_position: StartPosition) -> None:
        super().__init__("bluesky-source")
        if options.endpoint is None:
            raise UsageError("the Bluesky source needs --bluesky ENDPOINT")
        if not options.path_map and options.root is None:
            raise UsageError("the Bluesky source needs --bluesky-root FOLDER (announced files "
                             "must lie under it) or --bluesky-path-map")
        self.options, self.out_root = options, out_root
        self._emit, self._reject, self._start_position = emit, reject, start_position
        self._path_map = parse_path_map(options.path_map)
        self._records = state_dir / "bluesky"
        self._records.mkdir(parents=True, exist_ok=True)
        self._runs: dict[str, _Run] = {}
        self._descriptors: dict[str, str] = {}  # descriptor uid: its run
        self._resources: dict[str, dict[str, Any]] = {}  # older resources not yet followed
        self._datums: dict[str, tuple[str, int]] = {}  # datum id: (resource, point number)
        self._files: dict[str, h5py.File] = {}
        self._stopped: dict[str, _Followed] = {}  # ended; record kept until written
        self._followed: dict[str, _Followed] = self._load_records()
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.SUB)
        self._socket.setsockopt(zmq.RCVHWM, RECEIVE_LIMIT)
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
        if self.alive:
            return  # stuck in a read (logged): its files and socket go with the process
        for file in self._files.values():
            file.close()
        self._socket.close()
        self._context.term()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        for followed in [f for f in self._followed.values() if f.stopped]:
            if not self._guarded(self._finish, followed):  # stopped while the daemon was down
                return
        pruned = time.monotonic()
        while not self._stopping.is_set():
            if time.monotonic() - pruned > PRUNE_SECONDS:
                if not self._guarded(self._housekeeping):
                    return
                pruned = time.monotonic()
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

    def _guarded(self, step: Any, *args: Any) -> bool:
        """Run a step outside the handling of a document; an error is logged and counted,
        not fatal. False once the daemon stops."""
        try:
            return step(*args) is not False
        except Exception as exc:
            log.exception("Bluesky source: %s failed", getattr(step, "__name__", step))
            self._reject("internal_error", f"{self.options.endpoint}: {exc}")
            return True

    def _housekeeping(self) -> bool:
        """Forget stopped runs whose series are written; end the series of open runs that
        have been silent for ``bluesky_idle_end_seconds`` (their RunStop may have been
        lost, or sent while the daemon was down)."""
        self._prune_records()
        now = time.monotonic()
        for followed in list(self._followed.values()):
            if (followed.done or followed.stopped or followed.idle_ended
                    or now - followed.heard < self.options.idle_end_seconds):
                continue
            log.warning("run %s: no document for %.0f s: series %s ends with what %s holds "
                        "(it continues if the run does)", followed.stream.run_start,
                        now - followed.heard, followed.series, followed.local_path)
            if not self._read_up_to(followed, None):
                return False
            followed.idle_ended = True
            if not self._emit(SeriesEnd(followed.series, max(followed.rows_read,
                                                             followed.announced),
                                        Path(followed.output), sender_count=True,
                                        complete=False)):
                return False
            file = self._files.pop(followed.stream.uid, None)
            if file is not None:
                file.close()
        return True

    # ---- documents ----------------------------------------------------------------------
    def _handle(self, name: str, document: dict[str, Any]) -> bool:
        """Act on one document; False once the daemon stops."""
        if name == "start":
            self._runs[document["uid"]] = _Run(start=document)
            log.info("run %s started (scan %s, plan %s)", document["uid"],
                     document.get("scan_id", "?"), document.get("plan_name", "?"))
        elif name == "descriptor":
            run = self._runs.setdefault(document["run_start"], _Run())
            self._descriptors[str(document["uid"])] = str(document["run_start"])
            for key, data_key in document["data_keys"].items():
                if isinstance(data_key, dict) and isinstance(data_key.get("shape"), list):
                    run.shapes[key] = data_key["shape"]
                if isinstance(data_key, dict) and str(data_key.get("external", "")).startswith(
                        "FILESTORE"):
                    run.legacy_keys.add(key)
        elif name == "stream_resource":
            self._follow(document)
        elif name == "stream_datum":
            return self._datum(document)
        elif name == "resource":
            self._resources[str(document["uid"])] = document
        elif name in ("datum", "datum_page"):
            for datum_id, point in datums(document, name):
                self._datums[datum_id] = (str(document["resource"]), point)
            if len(self._datums) > DATUMS_KEPT:  # datums of events we will never see
                for datum_id in list(self._datums)[: DATUMS_KEPT // 10]:
                    del self._datums[datum_id]
        elif name in ("event", "event_page"):
            return all(self._event(event) for event in events(document, name))
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
        self._remember(self._start_following(frame_stream(resource, run_start, multiplier)))

    def _start_following(self, stream: FrameStream) -> _Followed:
        """Follow ``stream`` into the output named after its run and data key (resumed
        where an earlier daemon left it)."""
        if stream.uid in self._followed:  # the same document again (a second Publisher)
            return self._followed[stream.uid]
        run_start = stream.run_start
        run = self._runs.get(run_start, _Run())
        local = self._local_path(stream.path)
        series = series_name(run.start, run_start or stream.uid, stream.data_key)
        earlier = sum(f.stream.run_start == run_start and f.stream.data_key == stream.data_key
                      for f in self._followed.values())
        if earlier:  # the detector started another file in the same run
            series = f"{series}_{earlier + 1}"
        output = self.out_root / f"{series}_n2s.h5"
        position = self._start_position(series, output)
        followed = _Followed(stream, str(local), series, str(output),
                             start_notes(run.start, stream.data_key), position or 0,
                             done=position is None, heard=time.monotonic())
        self._followed[stream.uid] = followed
        log.info("run %s: following %s %s as series %s%s", run_start or "?", local,
                 stream.dataset, series, " (already written)" if followed.done else "")
        return followed

    def _event(self, event: dict[str, Any]) -> bool:
        """Read the frames of the datums an event of an older area detector names (each
        image key on its own: one that cannot be followed is counted, the others go on)."""
        descriptor = str(event["descriptor"])
        run_start = self._descriptors.get(descriptor)
        run = self._runs.get(run_start) if run_start is not None else None
        if run is None or run_start is None:  # a run we joined late: its datums go too
            for value in event["data"].values():
                if isinstance(value, str):
                    self._datums.pop(value, None)
            return True
        wanted = self.options.data_key
        for key in sorted(run.legacy_keys & set(event["data"])):
            located = self._datums.pop(str(event["data"][key]), None)
            if (wanted is not None and key != wanted) or located is None:
                continue  # another detector, or its datum came before we listened
            try:
                followed = self._legacy_followed(located[0], run, run_start, key, descriptor)
            except MessageError as exc:
                self._reject(exc.reason, f"{self.options.endpoint}: {key}: {exc}")
                continue
            if followed is None or followed.done:
                continue
            followed.heard, followed.idle_ended = time.monotonic(), False
            stop_row = (located[1] + 1) * followed.stream.multiplier
            followed.announced = max(followed.announced, stop_row)
            where = {"seq_nums": {"start": int(event["seq_num"])},
                     "indices": {"start": located[1]}}
            if not self._read_up_to(followed, stop_row, where):
                return False
        return True

    def _legacy_followed(self, resource_uid: str, run: _Run, run_start: str, key: str,
                         descriptor: str) -> _Followed | None:
        """The followed stream of an older resource, followed from its first event on
        (None: the resource came before we listened, or the key is not images)."""
        followed = self._followed.get(resource_uid)
        if followed is not None:
            return followed
        shape = run.shapes.get(key)
        if shape is not None and frames_per_event(shape) is None:
            return None  # a waveform or scalar kept in files
        resource = self._resources.pop(resource_uid, None)
        if resource is None:
            return None
        followed = self._start_following(legacy_stream(resource, run_start, key))
        followed.descriptors = [descriptor]
        self._remember(followed)
        return followed

    def _datum(self, datum: dict[str, Any]) -> bool:
        """Read and emit the frames a StreamDatum says have landed."""
        followed = self._followed.get(str(datum["stream_resource"]))
        if followed is None or followed.done:
            return True  # not a stream we follow (another data key, not images)
        followed.heard, followed.idle_ended = time.monotonic(), False
        stop_row = int(datum["indices"]["stop"]) * followed.stream.multiplier
        followed.announced = max(followed.announced, stop_row)
        return self._read_up_to(followed, stop_row, datum)

    def _read_up_to(self, followed: _Followed, stop_row: int | None,
                    datum: dict[str, Any] | None = None) -> bool:
        """Emit the frames from the last one read up to ``stop_row`` (None: all the file
        holds), as far as the file holds them; False once the daemon stops."""
        first_seq = int(datum["seq_nums"]["start"]) if datum and "seq_nums" in datum else None
        first_event = int(datum["indices"]["start"]) if datum else 0
        while stop_row is None or followed.rows_read < stop_row:
            start = followed.rows_read
            try:
                frames = self._dataset(followed)
                frames.refresh()
                available = frames.shape[0] if stop_row is None else min(stop_row,
                                                                          frames.shape[0])
                block = frames[start : min(available, start + READ_BATCH)]
            except (OSError, KeyError) as exc:
                self._reject("unreadable", f"{followed.local_path}: frames {start}-"
                             f"{'end' if stop_row is None else stop_row - 1} announced but "
                             f"not readable: {exc}")
                file = self._files.pop(followed.stream.uid, None)
                if file is not None:
                    file.close()
                return True
            if not len(block):
                return True
            received = time.time()
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
        for followed in list(self._followed.values()):
            if followed.stream.run_start != run_start:
                continue
            followed.stopped = True
            self._remember(followed)  # a restart before the series is written ends it
            if not self._finish(followed):
                return False
            log.info("run %s ended (%s): series %s, %d frames", run_start, status,
                     followed.series, followed.rows_read)
        self._forget_run(run_start)
        return True

    def _forget_run(self, run_start: str) -> None:
        """Drop what was kept of a run's documents once it stopped."""
        self._runs.pop(run_start, None)
        for uid in [u for u, run in self._descriptors.items() if run == run_start]:
            del self._descriptors[uid]
        ended = {u for u, f in self._stopped.items() if f.stream.run_start == run_start}
        ended |= {u for u, r in self._resources.items() if r.get("run_start") == run_start}
        for uid in ended:
            self._resources.pop(uid, None)
        for datum_id in [d for d, (resource, _) in self._datums.items() if resource in ended]:
            del self._datums[datum_id]

    def _finish(self, followed: _Followed) -> bool:
        """End the series of a stopped run with all its file holds: frames announced but
        not in the file are counted as missing (the end carries the announced count)."""
        uid = followed.stream.uid
        if not followed.done:
            if not self._read_up_to(followed, None):
                return False
            if followed.rows_read < followed.announced:
                log.warning("%s: %d frames announced, the file holds %d", followed.local_path,
                            followed.announced, followed.rows_read)
            end = SeriesEnd(followed.series, max(followed.rows_read, followed.announced),
                            Path(followed.output), sender_count=True)
            if not self._emit(end):
                return False
        file = self._files.pop(uid, None)
        if file is not None:
            file.close()
        del self._followed[uid]
        self._stopped[uid] = followed
        return True

    def _prune_records(self) -> None:
        """Forget stopped runs whose series are written to the end."""
        for uid, followed in list(self._stopped.items()):
            try:
                written = self._start_position(followed.series, Path(followed.output)) is None
            except OutputError as exc:
                log.debug("%s: not checked yet (%s)", followed.output, exc)
                continue
            if written or followed.done:
                (self._records / f"{file_safe(uid)}.json").unlink(missing_ok=True)
                del self._stopped[uid]

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
        assert self.options.root is not None  # checked in __init__
        return _inside(Path(path), self.options.root, path)

    def _remember(self, followed: _Followed) -> None:
        record = {**asdict(followed), "stream": asdict(followed.stream)}
        atomic_write_text(self._records / f"{file_safe(followed.stream.uid)}.json",
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
            item.heard, item.idle_ended = time.monotonic(), False
            if item.stopped and item.done:
                path.unlink(missing_ok=True)  # stopped, and written to the end
                continue
            if not item.stopped and time.time() - path.stat().st_mtime > STALE_RECORD_DAYS * 86400:
                log.warning("run %s: open for more than %g days; its stop was lost: series %s "
                            "is not followed any more", stream.run_start, STALE_RECORD_DAYS,
                            item.series)
                path.unlink(missing_ok=True)
                continue
            for descriptor in item.descriptors:  # an older detector's events find it again
                self._descriptors[descriptor] = stream.run_start
                self._runs.setdefault(stream.run_start, _Run()).legacy_keys.add(stream.data_key)
            followed[stream.uid] = item
            log.info("run %s %s: series %s continues at frame %d", stream.run_start,
                     "stopped" if item.stopped else "still open", item.series, item.rows_read)
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

