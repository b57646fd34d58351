"""Follow HDF5 files appearing and growing under a directory.

New files are noticed through watchdog (inotify), or by polling where inotify cannot see
writes (NFS, GPFS, Lustre: writes from other hosts raise no event), chosen by ``poll`` or
detected from the mount table. Each file is followed while it grows (SWMR files through
``refresh()``, plain files by re-opening) and counts as finished when its writer closes it
or when it has not grown for ``settle_seconds``. Every frame is emitted exactly once: a
series resumes at the number of frames already written for it.
"""

from __future__ import annotations

import fnmatch
import logging
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from n2s_stream.config import DaemonConfig, DirectoryOptions
from n2s_stream.errors import InputError, UsageError
from n2s_stream.formats.stack import FrameStack, open_stack
from n2s_stream.formats.writer import output_name
from n2s_stream.runtime.worker import BackgroundWorker
from n2s_stream.sources import SourceContext
from n2s_stream.stages import Frame, SeriesEnd

log = logging.getLogger(__name__)

HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".nxs")
NETWORK_FILESYSTEMS = (
    "nfs",
    "nfs4",
    "gpfs",
    "lustre",
    "cifs",
    "smb3",
    "smbfs",
    "beegfs",
    "ceph",
    "fuse.sshfs",
    "9p",
)
_EIGER_DATA_FILE = re.compile(r"_data_\d{6}$")
_SCAN_NUMBER = re.compile(r"^(.*?)(\d+)$")


def series_successor(earlier: Path, later: Path) -> bool:
    """True when ``later`` is a later file of the same numbered series in the same folder
    (``scan_0007.h5`` after ``scan_0006.h5``): the detector has moved on."""
    if earlier.parent != later.parent or earlier.suffix != later.suffix:
        return False
    a = _SCAN_NUMBER.match(earlier.stem.removesuffix("_master"))
    b = _SCAN_NUMBER.match(later.stem.removesuffix("_master"))
    return bool(a and b and a.group(1) == b.group(1) and int(b.group(2)) > int(a.group(2)))


# Reasons for which a young file is retried: it may still be being created.
_RETRY_REASONS = ("unreadable", "no_dataset", "not_hdf5", "missing", "read_error")


READ_BATCH = 16
"""Frames read from a file at once ..."""
READ_BYTES = 64 * 2**20
"""... and at most this many bytes of them (16 frames of an EIGER2 16M are 580 MB)."""


def filesystem_type(path: Path, mounts: str | None = None) -> str:
    """The type of the file system holding ``path``, from /proc/mounts ("" if unknown)."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return ""
    resolved, best, kind = path.resolve(), "", ""
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) >= 3 and resolved.is_relative_to(parts[1]) and len(parts[1]) > len(best):
            best, kind = parts[1], parts[2]
    return kind


@dataclass
class _Followed:
    path: Path
    series: str
    output: Path
    first_seen: float
    last_growth: float
    stack: FrameStack | None = None
    position: int = 0
    closed_by_writer: bool = False
    superseded: bool = False  # a later file of the same numbered series appeared


@dataclass(eq=False)
class _Events(FileSystemEventHandler):
    """Collects paths that watchdog says were created, moved, modified or closed."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    changed: set[Path] = field(default_factory=set)
    closed: set[Path] = field(default_factory=set)
    moved: list[tuple[Path, Path]] = field(default_factory=list)

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            return
        path = Path(str(getattr(event, "dest_path", "") or event.src_path))
        with self.lock:
            self.changed.add(path)
            if event.event_type == "closed":
                self.closed.add(path)
            elif event.event_type == "moved":
                self.moved.append((Path(str(event.src_path)), path))

    def take(self) -> tuple[set[Path], set[Path], list[tuple[Path, Path]]]:
        with self.lock:
            changed, closed, moved = self.changed, self.closed, self.moved
            self.changed, self.closed, self.moved = set(), set(), []
        return changed, closed, moved


def _is_utf8(path: Path) -> bool:
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes came in as surrogate escapes
        return False
    return True


class DirectorySource(BackgroundWorker):
    """Emits the frames of every HDF5 series under ``options.root``, each exactly once."""

    def __init__(
        self, options: DirectoryOptions, *, out_root: Path, context: SourceContext
    ) -> None:
        super().__init__("directory-source")
        if options.root is None:
            raise UsageError("the directory source needs --watch DIR")
        self.config = options
        self.out_root = out_root
        self._root = options.root.resolve()
        self._ignore = tuple(p.resolve() for p in (out_root, *context.ignore))
        self._emit, self._reject = context.emit, context.reject
        self._start_position = context.start_position
        self._events = _Events()
        self._followed: dict[Path, _Followed] = {}
        self._done: set[Path] = set()
        self._observer: BaseObserver | None = None
        self._decoders: ThreadPoolExecutor | None = None  # started with the source
        self.polling = options.poll > 0 or filesystem_type(self._root) in NETWORK_FILESYSTEMS

    @classmethod
    def from_config(cls, config: DaemonConfig, context: SourceContext) -> DirectorySource:
        """The source ``--watch`` selects."""
        return cls(config.directory, out_root=config.output.out, context=context)

    def start(self) -> None:
        """Start watching; existing files are picked up first when configured."""
        if not self._root.is_dir():
            raise UsageError(f"{self._root}: watch directory does not exist")
        interval = self.config.poll or 1.0
        self._observer = PollingObserver(timeout=interval) if self.polling else Observer()
        self._decoders = ThreadPoolExecutor(self.config.decode_threads, thread_name_prefix="decode")
        self._observer.schedule(self._events, str(self._root), recursive=True)
        self._observer.start()
        log.info(
            "watching %s (%s)",
            self._root,
            f"polling every {interval:g}s" if self.polling else "inotify",
        )
        if self.config.process_existing:
            for path in sorted(self._root.rglob("*")):
                if path.is_file():
                    self._consider(path)
        super().start()

    def stop(self) -> None:
        """Stop reading; frames already emitted stay emitted, the rest are read on restart."""
        if self._observer is not None and self._observer.is_alive():
            self._observer.stop()
            self._observer.join(timeout=10)
        super().stop()
        stuck = self.alive  # left behind in a read that does not return (a hung mount)
        if self._decoders is not None:
            # never wait here for a decode that does not return: the CLI bounds the exit
            self._decoders.shutdown(wait=not stuck, cancel_futures=True)
        if stuck:
            log.error("the source's files stay open: a read of them does not return")
            return
        for followed in self._followed.values():
            if followed.stack is not None:
                followed.stack.close()

    def _run(self) -> None:
        while not self._stopping.is_set():
            changed, closed, moved = self._events.take()
            for old, new in moved:
                self._renamed(old, new)
            for path in changed:
                self._consider(path)
            for path in closed:
                if path in self._followed:
                    self._followed[path].closed_by_writer = True
            busy = False
            for followed in list(self._followed.values()):
                if self._stopping.is_set():
                    return
                try:
                    busy |= self._follow(followed)
                except Exception as exc:  # a bad file must never stop the daemon
                    log.exception("%s: unexpected error while following", followed.path)
                    self._finish(followed, reason="internal_error", message=str(exc))
            if not busy:
                self._stopping.wait(0.05)

    def _renamed(self, old: Path, new: Path) -> None:
        """A file renamed within the watched tree is the same series under a new name:
        it is followed on (or stays finished), never read again from its first frame."""
        followed = self._followed.pop(old, None)
        if followed is not None:
            followed.path = new
            self._followed[new] = followed
            log.info("%s renamed to %s: still series %s", old, new, followed.series)
        elif old in self._done:
            self._done.add(new)
            log.info("%s renamed to %s: already finished", old, new)

    def _wanted(self, path: Path) -> bool:
        if path.suffix.lower() not in HDF5_SUFFIXES or path.name.endswith(".recovering"):
            return False
        try:
            relative = path.relative_to(self._root)
        except ValueError:
            return False
        if any(part.startswith(".") for part in relative.parts):
            return False
        if any(path.resolve().is_relative_to(p) for p in self._ignore):
            return False  # our own outputs and state are never read back
        if _EIGER_DATA_FILE.search(path.stem):
            return False  # read through its master file
        return fnmatch.fnmatch(path.name, self.config.pattern)

    def _consider(self, path: Path) -> None:
        path = Path(path)
        if path in self._followed or path in self._done or not self._wanted(path):
            return
        if not path.resolve().is_relative_to(self._root):
            self._done.add(path)
            self._reject("path_escape", f"{path}: resolves outside the watched directory")
            return
        if not _is_utf8(path):  # series names go into HDF5 strings, JSON and metrics
            self._done.add(path)
            self._reject("bad_name", f"{str(path)!a}: file name is not valid UTF-8")
            return
        relative = path.relative_to(self._root)
        stem = relative.stem.removesuffix("_master")
        series = str(relative.parent / stem)
        output = self.out_root / relative.parent / output_name(Path(stem + ".h5"))
        now = time.monotonic()
        for earlier in self._followed.values():
            if series_successor(earlier.path, path):
                log.info("%s: the next file of its series appeared; finishing it", earlier.path)
                earlier.superseded = True
        self._followed[path] = _Followed(path, series, output, now, now)
        log.info("found %s (series %s)", path, series)

    def _open(self, followed: _Followed) -> bool:
        last_error: InputError | None = None
        for swmr in (True, False):
            try:
                followed.stack = open_stack(followed.path, self.config.dataset, swmr=swmr)
                break
            except InputError as exc:
                last_error = exc
        if followed.stack is None:
            assert last_error is not None
            young = time.monotonic() - followed.first_seen < self.config.settle_seconds
            if young and last_error.reason in _RETRY_REASONS and followed.path.exists():
                return False
            self._finish(followed, reason=last_error.reason, message=str(last_error))
            return False
        start = self._start_position(followed.series, followed.output)
        if start is None:
            log.info("%s: series %s already complete", followed.path, followed.series)
            followed.stack.close()
            followed.stack = None
            self._finish(followed)
            return False
        followed.position = start
        log.info(
            "opened %s: %d frames %dx%d %s, resuming at frame %d",
            followed.path,
            len(followed.stack),
            *followed.stack.frame_shape,
            followed.stack.dtype,
            start,
        )
        return True

    def _follow(self, followed: _Followed) -> bool:
        """Read what is new in one file; True if frames were read."""
        if followed.stack is None and not self._open(followed):
            return False
        stack = followed.stack
        assert stack is not None
        try:
            if not stack.swmr or stack.linked:
                # A plain file shows growth only when re-opened; a master file may gain
                # links to new data files.
                stack.close()
                stack = followed.stack = open_stack(
                    followed.path, self.config.dataset, swmr=stack.swmr
                )
            available = stack.refresh()
            if available > followed.position:
                frame_bytes = stack.dtype.itemsize * stack.frame_shape[0] * stack.frame_shape[1]
                batch = max(1, min(READ_BATCH, READ_BYTES // frame_bytes))
                stop = min(available, followed.position + batch)
                frames = stack.read_list(followed.position, stop, self._decoders)
                for data in frames:
                    frame = Frame(
                        followed.series,
                        followed.position,
                        data,
                        time.time(),
                        followed.output,
                        stack.pixel_mask,
                    )
                    if not self._emit(frame):
                        return False
                    followed.position += 1
                followed.last_growth = time.monotonic()
                return True
        except InputError as exc:
            self._finish(followed, reason=exc.reason, message=str(exc))
            return False
        quiet = time.monotonic() - followed.last_growth
        # A master file is closed long before its data files are complete: for it, only
        # a quiet spell ends the series.
        closed = followed.closed_by_writer and not stack.linked
        if closed or followed.superseded or quiet > self.config.settle_seconds:
            self._finish(followed)
        return False

    def _finish(self, followed: _Followed, *, reason: str = "", message: str = "") -> None:
        if reason:
            self._reject(reason, message)
        if followed.stack is not None:
            followed.stack.close()
            followed.stack = None
            self._emit(SeriesEnd(followed.series, followed.position, followed.output))
            log.info("finished %s after %d frames", followed.path, followed.position)
        self._followed.pop(followed.path, None)
        self._done.add(followed.path)
