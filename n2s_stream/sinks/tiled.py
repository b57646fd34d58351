"""Register the denoised outputs in a Tiled server, where users of Bluesky beamlines look.

Each series' output is registered as external HDF5 data (``/entry/data/data``, read by the
server from the file, SWMR) in a container for its run: the Bluesky run's uid when the
series came from Bluesky documents (``/entry/process/bluesky_start``), else the series
name; the array's key is ``<data_key>_denoised`` (or ``denoised``) and its metadata
``{parent_uid, scan_id, data_key, model_version, program, output}``. The registered shape
follows the frames written, at most every ``tiled_update_seconds`` and once at the series'
end. Refined frames (``runtime/refine.py``) are registered beside them as ``<data_key>_refined``
(``/entry/refined/data``) once the refiner has appended them. All calls to the server run
in a thread of their own: an outage never holds up denoising, it is logged once, counted
(``n2s_tiled_errors_total``) and retried; one array the server refuses does not hold up
the others. The API key comes from ``TILED_API_KEY`` or ``tiled_api_key_file``, never
from the command line.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from n2s_stream import __version__
from n2s_stream.config import TiledOptions
from n2s_stream.errors import UsageError
from n2s_stream.formats.names import file_safe
from n2s_stream.formats.writer import output_stem
from n2s_stream.runtime.metrics import Metrics
from n2s_stream.runtime.state import StateDir
from n2s_stream.runtime.worker import BackgroundWorker
from n2s_stream.sinks import SinkContext
from n2s_stream.stages import Frame, FrameMeta, SeriesEnd, SeriesStart

log = logging.getLogger(__name__)

GIVE_UP = 20
"""Refusals after which an ended series' registration is dropped."""


@dataclass
class _Registration:
    """What the server should show of one series."""

    container: str
    key: str
    path: str
    frame_shape: tuple[int, ...]
    dtype: str
    metadata: dict[str, Any]
    frames: int = 0
    registered: int = -1  # frames the server shows (-1: not registered yet)
    ended: bool = False
    dataset: str = "/entry/data/data"
    failures: int = 0  # refused calls in a row (a bad one waits longer between tries)
    ident: str = ""  # its key among the sink's registrations
    resolved: bool = False  # ``key`` is this output's on the server (not another's)


def run_identity(notes: dict[str, str], series: str) -> tuple[str, dict[str, Any]]:
    """The container key and metadata of a series' run: its Bluesky RunStart when it came
    from Bluesky documents, else the series itself."""
    start = json.loads(notes["bluesky_start"]) if "bluesky_start" in notes else None
    if start is None:
        return file_safe(series), {"series": series}
    return file_safe(str(start["uid"])), {
        "parent_uid": start["uid"],
        "scan_id": start.get("scan_id"),
        "plan_name": start.get("plan_name"),
    }


def array_key(data_key: str | None, kind: str) -> str:
    """The array's key in its run's container: ``<data_key>_denoised`` (or ``_refined``)."""
    return file_safe(f"{data_key}_{kind}") if data_key else kind


class TiledSink:
    """Keeps a Tiled server's view of the outputs up to date (see the module docstring)."""

    name = "tiled"
    required = False

    def __init__(
        self,
        options: TiledOptions,
        *,
        state: StateDir,
        metrics: Metrics,
        rows_written: Callable[[str], int],
        stored_dtype: Callable[[str], np.dtype],
    ) -> None:
        if not options.uri:
            raise UsageError("the Tiled sink needs --tiled URI")
        _api_key(options)  # a key file that cannot be read is a usage error now, not later
        self.options, self.state, self.metrics = options, state, metrics
        self._rows_written, self._stored_dtype = rows_written, stored_dtype
        self._registrations: dict[str, _Registration] = {}
        self._lock = threading.Lock()
        self._worker = _Registrar(self)

    def start(self) -> None:
        """Start the thread that registers outputs (and retries while the server is down)."""
        self._worker.start()

    @classmethod
    def from_context(
        cls,
        context: SinkContext,
        *,
        rows_written: Callable[[str], int],
        stored_dtype: Callable[[str], np.dtype],
    ) -> TiledSink:
        """The daemon's Tiled sink; ``rows_written(series)``: frames in its output,
        ``stored_dtype(series)``: the type they are stored in (the HDF5 sink knows)."""
        return cls(
            context.config.tiled,
            state=context.state,
            metrics=context.metrics,
            rows_written=rows_written,
            stored_dtype=stored_dtype,
        )

    def open_series(self, start: SeriesStart) -> None:
        """Note what to register for the series (done by the registrar thread; the HDF5
        sink, called first, has opened its output)."""
        output = self.state.output_for(start.series, start.output)
        registration = self._registration(
            start.notes,
            start.series,
            output,
            "denoised",
            start.frame_shape,
            self._stored_dtype(start.series),
            extra={"series": start.series},
            frames=self._rows_written(start.series),
            ident=start.series,
        )
        with self._lock:
            self._registrations[start.series] = registration

    def write(self, frame: Frame, denoised: np.ndarray, meta: FrameMeta) -> None:
        """Note the frames that readers of the output see (the HDF5 sink, called first,
        flushes them within ``flush_seconds``)."""
        rows = self._rows_written(frame.series)
        with self._lock:
            registration = self._registrations.get(frame.series)
            if registration is not None:
                registration.frames = rows
                registration.metadata["model_version"] = meta.version

    def end_series(self, end: SeriesEnd) -> None:
        """Register the series' final shape now (the HDF5 sink, called first, has closed
        the output with every frame)."""
        rows = self._rows_written(end.series)
        with self._lock:
            registration = self._registrations.get(end.series)
            if registration is not None:
                registration.frames = max(registration.frames, rows)
                registration.ended = True
        self._worker.wake()

    def refined(self, output: Path) -> None:
        """Register the refined frames the refiner has just appended to ``output``."""
        try:
            with h5py.File(output, "r", swmr=True) as file:
                notes = {
                    key: _text(value[()])
                    for key, value in file["/entry/process"].items()
                    if key.startswith("bluesky_")
                }
                refined = file["/entry/refined/data"]
                frames, frame_shape, dtype = refined.shape[0], refined.shape[1:], refined.dtype
            series = output_stem(output)
            registration = self._registration(
                notes,
                series,
                output,
                "refined",
                frame_shape,
                dtype,
                extra={"refined": True},
                frames=int(frames),
                ended=True,
                dataset="/entry/refined/data",
                ident=f"{output}#refined",
            )
        except (OSError, KeyError, ValueError) as exc:
            self.metrics.tiled_errors.inc()
            log.warning("Tiled: cannot read the refined frames of %s (%s)", output, exc)
            return
        with self._lock:
            self._registrations[registration.ident] = registration
        self._worker.wake()

    def close(self) -> None:
        """Give the registrar a last chance to bring the server up to date, then stop."""
        self._worker.wake()
        self._worker.stop()

    def pending(self) -> list[_Registration]:
        """Registrations the server does not show as they are (a copy of each)."""
        with self._lock:
            out = [
                _Registration(**{**vars(r), "metadata": dict(r.metadata)})
                for r in self._registrations.values()
                if r.registered != r.frames and r.frames > 0
            ]
            for series in [
                s
                for s, r in self._registrations.items()
                if r.ended and (r.registered == r.frames or r.frames == 0)
            ]:
                del self._registrations[series]
            return out

    def registered(self, ident: str, key: str, frames: int) -> None:
        """The server now shows ``frames`` frames of that registration, as ``key``."""
        with self._lock:
            registration = self._registrations.get(ident)
            if registration is not None:
                registration.registered = max(registration.registered, frames)
                registration.key, registration.resolved = key, True
                registration.failures = 0

    def failed(self, ident: str) -> int:
        """The server refused a call for that registration; returns how many in a row. An
        ended one refused ``GIVE_UP`` times is dropped (logged)."""
        with self._lock:
            registration = self._registrations.get(ident)
            if registration is None:
                return 0
            registration.failures += 1
            if registration.ended and registration.failures >= GIVE_UP:
                log.error(
                    "Tiled: giving up registering %s %s after %d refusals",
                    registration.path,
                    registration.dataset,
                    registration.failures,
                )
                del self._registrations[ident]
            return registration.failures

    def _registration(
        self,
        notes: dict[str, str],
        series: str,
        output: Path,
        kind: str,
        frame_shape: tuple[int, ...],
        dtype: Any,
        *,
        extra: dict[str, Any],
        **fields: Any,
    ) -> _Registration:
        """What to show of ``output``'s ``kind`` frames (denoised or refined): the array
        ``<data_key>_<kind>`` in its run's container, with the run's metadata and ours
        (plus ``extra``); ``fields`` set the registration's other fields."""
        container, metadata = run_identity(notes, series)
        data_key = notes.get("bluesky_data_key")
        metadata.update(
            {
                "data_key": data_key,
                "program": f"n2s-stream {__version__}",
                "output": str(output),
                **extra,
            }
        )
        return _Registration(
            container,
            array_key(data_key, kind),
            self._server_path(output),
            tuple(int(side) for side in frame_shape),
            np.dtype(dtype).str,
            metadata,
            **fields,
        )

    def _server_path(self, output: Path) -> str:
        """The output's path as the server sees it (``tiled_path_map`` LOCAL=SERVER)."""
        path = str(output.resolve())
        for entry in self.options.path_map:
            local, _, server = entry.partition("=")
            if path.startswith(local.rstrip("/") + "/"):
                return server.rstrip("/") + "/" + path[len(local.rstrip("/")) + 1 :]
        return path


class _Registrar(BackgroundWorker):
    """The thread that talks to the Tiled server."""

    def __init__(self, sink: TiledSink) -> None:
        super().__init__("tiled-registrar", join_timeout=15.0)
        self.sink = sink
        self._wake = threading.Event()
        self._client: Any = None
        self._round = 0
        self._down = False

    def wake(self) -> None:
        """Sync now instead of at the next period."""
        self._wake.set()

    def _run(self) -> None:
        while True:
            stopping = self._stopping.is_set()
            self._sync_all()
            if stopping:
                return
            self._wake.wait(self.sink.options.update_seconds)
            self._wake.clear()

    def _sync_all(self) -> None:
        """Bring each registration up to date; one the server refuses does not hold up the
        others, and one that keeps failing is tried only every few rounds."""
        uri = self.sink.options.uri
        assert uri is not None  # TiledSink refuses options without one; they are frozen
        self._round += 1
        for registration in self.sink.pending():
            if registration.failures and self._round % min(registration.failures, 8):
                continue
            try:
                self._sync(registration)
            except Exception as exc:  # server down, refused, a bad answer: retried
                self.sink.metrics.tiled_errors.inc()
                self._client = None
                if _unreachable(exc):  # the server is down: no use trying the others now
                    if not self._down:
                        log.warning(
                            "Tiled %s: cannot register %s (%s); retrying",
                            _shown(uri),
                            registration.path,
                            exc,
                        )
                    self._down = True
                    return
                if self.sink.failed(registration.ident) == 1:
                    log.warning(
                        "Tiled %s: cannot register %s %s as %s/%s (%s); retrying",
                        _shown(uri),
                        registration.path,
                        registration.dataset,
                        registration.container,
                        registration.key,
                        exc,
                    )
                continue
            if self._down:
                log.info("Tiled %s answers again", _shown(uri))
                self._down = False
            if registration.failures:
                log.info(
                    "Tiled %s: %s/%s registered after %d failed tries",
                    _shown(uri),
                    registration.container,
                    registration.key,
                    registration.failures,
                )

    def _connect(self) -> Any:
        from tiled.client import from_uri

        if self._client is None:
            self._client = from_uri(self.sink.options.uri, api_key=_api_key(self.sink.options))
        return self._client

    def _sync(self, registration: _Registration) -> None:
        from tiled.client.utils import handle_error
        from tiled.structures.core import StructureFamily
        from tiled.utils import safe_json_dump

        client = self._connect()
        if registration.container in client:
            container = client[registration.container]
        else:
            container = client.create_container(
                key=registration.container, metadata=_container_metadata(registration)
            )
        source = _data_source(registration)
        metadata = {k: v for k, v in registration.metadata.items() if v is not None}
        key = registration.key if registration.resolved else _free_key(container, registration)
        if key not in container:
            container.new(StructureFamily.array, [source], key=key, metadata=metadata)
            log.info(
                "registered %s in Tiled as %s/%s (%d frames)",
                registration.path,
                registration.container,
                key,
                registration.frames,
            )
        else:
            node = container[key]
            source.id = node.data_sources()[0].id
            # grow the registered shape: Tiled serves only what the structure says
            handle_error(
                node.context.http_client.put(
                    node.uri.replace("/metadata/", "/data_source/", 1),
                    content=safe_json_dump({"data_source": source}),
                )
            )
            node.update_metadata(metadata=metadata)
        self.sink.registered(registration.ident, key, registration.frames)


def _free_key(container: Any, registration: _Registration) -> str:
    """The array key of this output in its run's container: ``key``, unless another output
    (a second file of the run, a series seen again) holds it: then ``key_2``, ``key_3``..."""
    output = registration.metadata.get("output")
    for n in range(1, 1000):
        key = registration.key if n == 1 else f"{registration.key}_{n}"
        if key not in container or container[key].metadata.get("output") == output:
            return key
    raise RuntimeError(f"{registration.container}: no free key for {registration.key}")


def _container_metadata(registration: _Registration) -> dict[str, Any]:
    keep = ("parent_uid", "scan_id", "plan_name", "series")
    return {k: registration.metadata[k] for k in keep if registration.metadata.get(k) is not None}


def _data_source(registration: _Registration) -> Any:
    from tiled.structures.array import ArrayStructure, BuiltinDtype
    from tiled.structures.core import StructureFamily
    from tiled.structures.data_source import Asset, DataSource, Management

    n = registration.frames
    h, w = registration.frame_shape
    return DataSource(
        structure_family=StructureFamily.array,
        mimetype="application/x-hdf5",
        structure=ArrayStructure(
            data_type=BuiltinDtype.from_numpy_dtype(np.dtype(registration.dtype)),
            shape=(n, h, w),
            chunks=((1,) * n, (h,), (w,)),
        ),
        parameters={"dataset": registration.dataset, "swmr": True},
        assets=[
            Asset(
                data_uri=f"file://localhost{registration.path}",
                is_directory=False,
                parameter="data_uris",
                num=0,
            )
        ],
        management=Management.external,
    )


def _shown(uri: str) -> str:
    """``uri`` for the log: without its query (an ``api_key=`` must not reach a log)."""
    return uri.split("?", 1)[0]


def _unreachable(exc: BaseException) -> bool:
    """The server could not be reached at all (as opposed to refusing one request)."""
    import httpx

    return isinstance(exc, (httpx.TransportError, ConnectionError, TimeoutError))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _api_key(options: TiledOptions) -> str | None:
    """From ``tiled_api_key_file`` if given, else ``TILED_API_KEY`` (None: anonymous)."""
    if options.api_key_file is not None:
        try:
            return options.api_key_file.read_text().strip()
        except OSError as exc:
            raise UsageError(f"tiled_api_key_file: {exc}") from exc
    return os.environ.get("TILED_API_KEY")
