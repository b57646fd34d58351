"""The Bluesky source: frames announced by a run's documents, read from the detector's file.

Instead of guessing from the file system, the daemon reads what the RunEngine announces:
a ``stream_resource`` names the HDF5 file and dataset an area detector writes, each
``stream_datum`` says up to which frame it has landed (flushed), and the run's ``stop``
ends the series (older detectors: ``legacy.py``). The file's path is the detector host's
(``paths.py``). Frames are read from the SWMR file from the last one read up to what the
newest announcement says (at most ``READ_BATCH`` at a time), so an announcement lost on the
way (ZeroMQ PUB drops for slow or late subscribers) loses no frame; at RunStop, all the
file holds is read, and frames announced but missing from it are counted as missing. A
second StreamResource of the same run and data key (a detector that starts a new file)
makes a series of its own (``..._2``). A run silent for ``bluesky_idle_end_seconds`` has
its series ended (incomplete) and resumed if documents come again. The output is named
after the run (scan number, uid prefix, data key) and records the RunStart in
``/entry/process/bluesky_start``. What a restart needs is kept by ``records.py``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hdf5plugin  # noqa: F401  (registers the filters areaDetector files use)
import zmq

from n2s_stream.config import BlueskyOptions, DaemonConfig
from n2s_stream.errors import UsageError
from n2s_stream.formats.codecs import MessageError
from n2s_stream.formats.writer import series_output
from n2s_stream.runtime.state import bluesky_dir
from n2s_stream.runtime.worker import BackgroundWorker
from n2s_stream.sources import Emit, Reject, SourceContext, StartPosition
from n2s_stream.sources.bluesky.documents import (
    FrameStream,
    decode_message,
    events,
    frame_stream,
    frames_per_event,
    legacy_stream,
    series_name,
    start_notes,
)
from n2s_stream.sources.bluesky.legacy import LegacyDocuments, LegacyPoint
from n2s_stream.sources.bluesky.paths import DetectorPaths
from n2s_stream.sources.bluesky.reader import FrameReader
from n2s_stream.sources.bluesky.records import Followed, RunRecords
from n2s_stream.stages import SeriesEnd

log = logging.getLogger(__name__)

RECEIVE_LIMIT = 100_000
"""Documents held in the socket while the daemon is busy (beyond: the proxy drops them)."""

HOUSEKEEPING_SECONDS = 10.0
"""How often records of stopped runs are checked for series written to the end (and open
runs for silence)."""


@dataclass
class _Run:
    """What is known of one run: its RunStart (None if it came before we listened) and
    the shapes of its data keys (from its descriptors)."""

    start: dict[str, Any] | None = None
    shapes: dict[str, list[int]] = field(default_factory=dict)


class BlueskySource(BackgroundWorker):
    """Emits the frames that a Bluesky run's documents announce; one output per detector
    stream of each run."""

    def __init__(
        self,
        options: BlueskyOptions,
        *,
        out_root: Path,
        state_dir: Path,
        emit: Emit,
        reject: Reject,
        start_position: StartPosition,
    ) -> None:
        super().__init__("bluesky-source")
        if options.endpoint is None:
            raise UsageError("the Bluesky source needs --bluesky ENDPOINT")
        self.options, self.out_root = options, out_root
        self._emit, self._reject, self._start_position = emit, reject, start_position
        self._paths = DetectorPaths(options.path_map, options.root)
        self._runs: dict[str, _Run] = {}
        self._legacy = LegacyDocuments(options.data_key)
        self._reader = FrameReader(emit, reject)
        self._records = RunRecords(bluesky_dir(state_dir), start_position)
        self._followed: dict[str, Followed] = {}
        for followed in self._records.load():
            self._followed[followed.stream.uid] = followed
            if followed.descriptors:
                self._legacy.restore(
                    followed.descriptors, followed.stream.run_start, followed.stream.data_key
                )
        self._context = zmq.Context()  # no thread until start() makes the socket
        self._socket: zmq.Socket | None = None

    @classmethod
    def from_config(cls, config: DaemonConfig, context: SourceContext) -> BlueskySource:
        """The source ``--bluesky`` selects."""
        return cls(
            config.bluesky,
            out_root=config.output.out,
            state_dir=config.service.state_dir,
            emit=context.emit,
            reject=context.reject,
            start_position=context.start_position,
        )

    def start(self) -> None:
        """Connect to the proxy's output and start reading."""
        assert self.options.endpoint is not None
        self._socket = self._context.socket(zmq.SUB)
        self._socket.setsockopt(zmq.RCVHWM, RECEIVE_LIMIT)
        self._socket.setsockopt(zmq.MAXMSGSIZE, self.options.max_message_mb << 20)
        self._socket.setsockopt(zmq.LINGER, 0)
        prefix = self.options.prefix.encode()
        self._socket.setsockopt(zmq.SUBSCRIBE, prefix + b" " if prefix else b"")
        self._socket.connect(self.options.endpoint)
        log.info(
            "following Bluesky documents from %s%s",
            self.options.endpoint,
            f" (prefix {self.options.prefix!r})" if self.options.prefix else "",
        )
        super().start()

    def stop(self) -> None:
        """Stop reading; open runs are remembered for the next start."""
        super().stop()
        if self.alive:
            return  # stuck in a read (logged): its files and socket go with the process
        self._reader.close_all()
        if self._socket is not None:  # else never started
            self._socket.close()
        self._context.term()

    def _run(self) -> None:
        socket = self._socket
        assert socket is not None, "start() makes the socket"
        poller = zmq.Poller()
        poller.register(socket, zmq.POLLIN)
        for followed in [f for f in self._followed.values() if f.stopped]:
            if not self._guarded(self._finish, followed):  # stopped while the daemon was down
                return
        pruned = time.monotonic()
        while not self._stopping.is_set():
            if time.monotonic() - pruned > HOUSEKEEPING_SECONDS:
                if not self._guarded(self._housekeeping):
                    return
                pruned = time.monotonic()
            if not poller.poll(100):
                continue
            message = socket.recv()
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
        self._records.prune()
        now = time.monotonic()
        for followed in list(self._followed.values()):
            if (
                followed.done
                or followed.stopped
                or followed.idle_ended
                or now - followed.heard < self.options.idle_end_seconds
            ):
                continue
            log.warning(
                "run %s: no document for %.0f s: series %s ends with what %s holds "
                "(it continues if the run does)",
                followed.stream.run_start,
                now - followed.heard,
                followed.series,
                followed.local_path,
            )
            followed.idle_ended = True
            if not self._end_series(followed, complete=False):
                return False
        return True

    # ---- documents ----------------------------------------------------------------------
    def _handle(self, name: str, document: dict[str, Any]) -> bool:
        """Act on one document; False once the daemon stops."""
        if name == "start":
            self._runs[document["uid"]] = _Run(start=document)
            log.info(
                "run %s started (scan %s, plan %s)",
                document["uid"],
                document.get("scan_id", "?"),
                document.get("plan_name", "?"),
            )
        elif name == "descriptor":
            run = self._runs.setdefault(document["run_start"], _Run())
            for key, data_key in document["data_keys"].items():
                if isinstance(data_key, dict) and isinstance(data_key.get("shape"), list):
                    run.shapes[key] = data_key["shape"]
            self._legacy.add(name, document)
        elif name == "stream_resource":
            self._follow(document)
        elif name == "stream_datum":
            followed = self._followed.get(str(document["stream_resource"]))
            if followed is not None:  # else not a stream we follow (another key, not images)
                return self._announced(followed, int(document["indices"]["stop"]), document)
        elif name in ("resource", "datum", "datum_page"):
            self._legacy.add(name, document)
        elif name in ("event", "event_page"):
            return all(
                self._legacy_frames(point)
                for event in events(document, name)
                for point in self._legacy.points(event)
            )
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
        shape = self._runs.get(run_start, _Run()).shapes.get(resource["data_key"])
        multiplier = frames_per_event(shape, resource["parameters"].get("chunk_shape") or ())
        if multiplier is None:
            return  # not images (a scalar or waveform beside the detector)
        self._records.save(self._start_following(frame_stream(resource, run_start, multiplier)))

    def _start_following(self, stream: FrameStream) -> Followed:
        """Follow ``stream`` into the output named after its run and data key (resumed
        where an earlier daemon left it)."""
        if stream.uid in self._followed:  # the same document again (a second Publisher)
            return self._followed[stream.uid]
        run_start = stream.run_start
        run = self._runs.get(run_start, _Run())
        local = self._paths.local(stream.path)
        series = series_name(run.start, run_start or stream.uid, stream.data_key)
        earlier = sum(
            f.stream.run_start == run_start and f.stream.data_key == stream.data_key
            for f in self._followed.values()
        )
        if earlier:  # the detector started another file in the same run
            series = f"{series}_{earlier + 1}"
        output = series_output(self.out_root, series)
        position = self._start_position(series, output)
        followed = Followed(
            stream,
            str(local),
            series,
            str(output),
            start_notes(run.start, stream.data_key),
            position or 0,
            done=position is None,
            heard=time.monotonic(),
        )
        self._followed[stream.uid] = followed
        log.info(
            "run %s: following %s %s as series %s%s",
            run_start or "?",
            local,
            stream.dataset,
            series,
            " (already written)" if followed.done else "",
        )
        return followed

    def _legacy_frames(self, point: LegacyPoint) -> bool:
        """Read the frames an older area detector's event names; a key that cannot be
        followed is counted and the others go on. False once the daemon stops."""
        try:
            followed = self._legacy_followed(point)
        except MessageError as exc:
            self._reject(exc.reason, f"{self.options.endpoint}: {point.data_key}: {exc}")
            return True
        if followed is None:
            return True
        where = {"seq_nums": {"start": point.seq_num}, "indices": {"start": point.point}}
        return self._announced(followed, point.point + 1, where)

    def _legacy_followed(self, point: LegacyPoint) -> Followed | None:
        """The followed stream of an older resource, followed from its first event on
        (None: the resource came before we listened, or the key is not images)."""
        followed = self._followed.get(point.resource)
        if followed is not None:
            return followed
        shape = self._runs.get(point.run_start, _Run()).shapes.get(point.data_key)
        if shape is not None and frames_per_event(shape) is None:
            return None  # a waveform or scalar kept in files
        resource = self._legacy.take_resource(point.resource)
        if resource is None:
            return None
        followed = self._start_following(legacy_stream(resource, point.run_start, point.data_key))
        followed.descriptors = [point.descriptor]
        self._records.save(followed)
        return followed

    def _announced(self, followed: Followed, stop_event: int, where: dict[str, Any]) -> bool:
        """The documents say the frames of events up to ``stop_event`` have landed: read
        and emit them. False once the daemon stops."""
        if followed.done:
            return True
        followed.heard, followed.idle_ended = time.monotonic(), False
        stop_row = stop_event * followed.stream.multiplier
        followed.announced = max(followed.announced, stop_row)
        return self._reader.read_up_to(followed, stop_row, where)

    def _stop(self, stop: dict[str, Any]) -> bool:
        """The run ended (whatever its exit status): each of its series ends with what
        its file holds."""
        run_start = str(stop["run_start"])
        for followed in list(self._followed.values()):
            if followed.stream.run_start != run_start:
                continue
            followed.stopped = True
            self._records.save(followed)  # a restart before the series is written ends it
            if not self._finish(followed):
                return False
            log.info(
                "run %s ended (%s): series %s, %d frames",
                run_start,
                stop.get("exit_status", "?"),
                followed.series,
                followed.rows_read,
            )
        self._runs.pop(run_start, None)  # what was kept of its documents
        self._legacy.forget_run(run_start, self._records.ended_of(run_start))
        return True

    def _finish(self, followed: Followed) -> bool:
        """End the series of a stopped run (unless an earlier daemon wrote all of it); its
        record stays until the series is written."""
        if not followed.done and not self._end_series(followed, complete=True):
            return False
        del self._followed[followed.stream.uid]
        self._records.ended(followed)
        return True

    def _end_series(self, followed: Followed, *, complete: bool) -> bool:
        """Read all the file holds and end the series: frames announced but not in the
        file are counted as missing (the end carries the announced count)."""
        if not self._reader.read_up_to(followed, None):
            return False
        if followed.rows_read < followed.announced:
            log.warning(
                "%s: %d frames announced, the file holds %d",
                followed.local_path,
                followed.announced,
                followed.rows_read,
            )
        end = SeriesEnd(
            followed.series,
            max(followed.rows_read, followed.announced),
            Path(followed.output),
            sender_count=True,
            complete=complete,
        )
        self._reader.close(followed)
        return self._emit(end)
