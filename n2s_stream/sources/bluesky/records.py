"""What a restart needs of each followed frame stream, one JSON file each in
``state_dir/bluesky/``.

A stream's record is written when it is first followed and when its run stops, and kept
until its series is written to the end: a daemon restarted in between resumes the open
runs where their outputs end and finishes the stopped ones. A record of a run open for
more than ``STALE_RECORD_DAYS`` is dropped at start (its RunStop was lost).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from n2s_stream.errors import OutputError
from n2s_stream.formats.names import file_safe
from n2s_stream.runtime.state import atomic_write_text
from n2s_stream.sources import StartPosition
from n2s_stream.sources.bluesky.documents import FrameStream

log = logging.getLogger(__name__)

STALE_RECORD_DAYS = 7.0
"""A record of a run still open after this long is dropped at start (its stop was lost)."""


@dataclass
class Followed:
    """A frame stream being read: where its frames go and how far they were read."""

    stream: FrameStream
    local_path: str
    series: str
    output: str
    notes: dict[str, str]
    rows_read: int
    done: bool = False  # an earlier run wrote all of it
    announced: int = 0  # frames the documents said have landed
    stopped: bool = False  # the run's RunStop came (its series was ended)
    descriptors: list[str] = field(default_factory=list)  # older resources: whose events
    idle_ended: bool = False  # ended for silence; resumes if documents come again
    heard: float = 0.0  # time.monotonic() of its last document (this process)


class RunRecords:
    """The records of followed streams; those of ended series are kept until written."""

    def __init__(self, folder: Path, start_position: StartPosition) -> None:
        self._folder = folder
        self._folder.mkdir(parents=True, exist_ok=True)
        self._start_position = start_position
        self._ended: dict[str, Followed] = {}  # series ended, maybe not written yet

    def save(self, followed: Followed) -> None:
        """Write (or rewrite) the record of ``followed``."""
        record = {**asdict(followed), "stream": asdict(followed.stream)}
        atomic_write_text(self._path(followed.stream.uid), json.dumps(record))

    def ended(self, followed: Followed) -> None:
        """``followed``'s series was ended: its record goes once the series is written."""
        self._ended[followed.stream.uid] = followed

    def ended_of(self, run_start: str) -> set[str]:
        """The uids of the run's streams whose series were ended."""
        return {uid for uid, f in self._ended.items() if f.stream.run_start == run_start}

    def prune(self) -> None:
        """Forget ended streams whose series are written to the end."""
        for uid, followed in list(self._ended.items()):
            try:
                written = self._start_position(followed.series, Path(followed.output)) is None
            except OutputError as exc:
                log.debug("%s: not checked yet (%s)", followed.output, exc)
                continue
            if written or followed.done:
                self._path(uid).unlink(missing_ok=True)
                del self._ended[uid]

    def load(self) -> list[Followed]:
        """Streams that were followed when the daemon stopped, each to continue where its
        output ends (stopped ones to be finished)."""
        loaded = []
        for path in sorted(self._folder.glob("*.json")):
            try:
                record = json.loads(path.read_text())
                stream = FrameStream(**record.pop("stream"))
                item = Followed(stream=stream, **record)
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
                log.warning(
                    "run %s: open for more than %g days; its stop was lost: series %s "
                    "is not followed any more",
                    stream.run_start,
                    STALE_RECORD_DAYS,
                    item.series,
                )
                path.unlink(missing_ok=True)
                continue
            loaded.append(item)
            log.info(
                "run %s %s: series %s continues at frame %d",
                stream.run_start,
                "stopped" if item.stopped else "still open",
                item.series,
                item.rows_read,
            )
        return loaded

    def _path(self, uid: str) -> Path:
        return self._folder / f"{file_safe(uid)}.json"
