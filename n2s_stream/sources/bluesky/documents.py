"""Bluesky documents as they travel through a bluesky 0MQ proxy, decoded without pickle.

A ``bluesky.callbacks.zmq.Publisher`` sends each ``(name, document)`` as one ZeroMQ frame,
``prefix + b" " + name + b" " + payload``, the payload serialised by the Publisher's
``serializer``: ``pickle.dumps`` unless the facility sets JSON or msgpack. The first byte
tells them apart (``{`` JSON; a msgpack map 0x81-0x8f, 0xde, 0xdf; ``0x80`` a pickle
protocol header). Pickles are refused unread: unpickling network data runs arbitrary code.

The documents used (event-model >= 1.21): ``start`` (uid, scan_id, metadata),
``descriptor`` (data_keys: shape, the first axis of a rank-3 shape being frames per event),
``stream_resource`` (data_key, mimetype ``application/x-hdf5``, uri ``file://host/path``,
parameters.dataset), ``stream_datum`` (stream_resource, indices {start, stop} in events,
seq_nums) and ``stop`` (run_start, exit_status). Older ophyd area detectors announce
frames differently: a ``resource`` (spec ``AD_HDF5``, ``root`` + ``resource_path``,
resource_kwargs.frame_per_point), one ``datum`` per event (datum_kwargs.point_number) and
``event`` documents whose data, for the detector's key (``external: FILESTORE:`` in the
descriptor), is that datum's id; ``event_page`` and ``datum_page`` are their columnar forms.
Pure functions: no I/O.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlparse

import msgpack

from n2s_stream.formats.codecs import MessageError
from n2s_stream.formats.names import file_safe

DOCUMENT_NAMES = (
    "start",
    "descriptor",
    "stream_resource",
    "stream_datum",
    "event",
    "stop",
    "resource",
    "datum",
    "event_page",
    "datum_page",
)
HDF5_MIMETYPES = ("application/x-hdf5",)
LEGACY_HDF5_SPECS = {"AD_HDF5": "/entry/data/data", "AD_HDF5_SWMR": "/entry/data/data"}
"""Resource specs of areaDetector HDF5 files (area-detector-handlers) and their dataset."""
_MSGPACK_MAP = set(range(0x81, 0x90)) | {0xDE, 0xDF}
_REQUIRED = {
    "start": ("uid",),
    "descriptor": ("uid", "run_start", "data_keys"),
    "stream_resource": ("uid", "data_key", "mimetype", "uri", "parameters"),
    "stream_datum": ("stream_resource", "indices"),
    "stop": ("run_start",),
    "resource": ("uid", "spec", "resource_path"),
    "datum": ("datum_id", "resource", "datum_kwargs"),
    "datum_page": ("datum_id", "resource", "datum_kwargs"),
    "event": ("descriptor", "data", "seq_num"),
    "event_page": ("descriptor", "data", "seq_num"),
}


def decode_message(message: bytes) -> tuple[str, dict[str, Any]]:
    """``(name, document)`` of one proxy message; raises `MessageError` (reason ``pickle``,
    ``undecodable`` or ``bad_document``) for anything else."""
    parts = message.split(b" ", 2)
    if len(parts) != 3:
        raise MessageError("not 'prefix name payload'", reason="undecodable")
    _, raw_name, payload = parts
    name = raw_name.decode("ascii", errors="replace")
    if name not in DOCUMENT_NAMES:
        raise MessageError(f"unknown document name {name[:40]!r}", reason="undecodable")
    if payload[:1] == b"\x80":
        raise MessageError(
            f"{name} document is a pickle: refused unread (set the "
            "Publisher's serializer to JSON or msgpack)",
            reason="pickle",
        )
    try:
        if payload[:1] == b"{":
            document = json.loads(payload)
        elif payload and payload[0] in _MSGPACK_MAP:
            document = msgpack.unpackb(payload, raw=False, strict_map_key=False)
        else:
            raise MessageError(f"{name} document is neither JSON nor msgpack", reason="undecodable")
    except (ValueError, msgpack.UnpackException) as exc:
        raise MessageError(f"{name} document does not decode: {exc}", reason="undecodable") from exc
    if not isinstance(document, dict):
        raise MessageError(f"{name} document is not a mapping", reason="bad_document")
    missing = [key for key in _REQUIRED.get(name, ()) if key not in document]
    if missing:
        raise MessageError(f"{name} document lacks {', '.join(missing)}", reason="bad_document")
    return name, document


@dataclass(frozen=True)
class FrameStream:
    """A detector's frames in one HDF5 dataset, announced by a StreamResource: its
    ``path`` as the detector's host names it, the ``dataset``, frames per event
    (``multiplier``) and the run it belongs to."""

    uid: str
    run_start: str
    data_key: str
    path: str
    dataset: str
    multiplier: int


def frames_per_event(
    shape: list[int] | tuple[int, ...] | None, chunk_shape: list[int] | tuple[int, ...] = ()
) -> int | None:
    """Frames per event of a data key's ``shape``: ``[n, H, W]`` gives n, ``[H, W]`` 1;
    None for data that is not images (scalars, waveforms). Without a shape (the
    descriptor came before we listened), a rank-3 ``chunk_shape`` of its resource means
    images, one per event."""
    if shape is None:
        return 1 if len(chunk_shape) == 3 else None
    if len(shape) == 3:
        return max(int(shape[0]), 1)
    if len(shape) == 2:
        return 1
    return None


def frame_stream(resource: dict[str, Any], run_start: str, multiplier: int) -> FrameStream:
    """The frame stream a StreamResource announces; `MessageError` (``unsupported``) for
    a mimetype other than HDF5 or a uri that is not a file."""
    if resource["mimetype"] not in HDF5_MIMETYPES:
        raise MessageError(
            f"stream_resource {resource['uid']}: mimetype {resource['mimetype']!r} is not HDF5",
            reason="unsupported",
        )
    uri = urlparse(str(resource["uri"]))
    if uri.scheme not in ("file", ""):
        raise MessageError(
            f"stream_resource {resource['uid']}: uri {resource['uri']!r} is not a file",
            reason="unsupported",
        )
    dataset = resource["parameters"].get("dataset")
    if not isinstance(dataset, str) or not dataset:
        raise MessageError(
            f"stream_resource {resource['uid']}: no dataset parameter", reason="bad_document"
        )
    return FrameStream(
        str(resource["uid"]),
        run_start,
        str(resource["data_key"]),
        unquote(uri.path),
        dataset,
        multiplier,
    )


def legacy_stream(resource: dict[str, Any], run_start: str, data_key: str) -> FrameStream:
    """The frame stream of an older ``resource`` document, for the data key whose events
    name its datums; `MessageError` (``unsupported``) for a spec that is not an
    areaDetector HDF5 file."""
    dataset = LEGACY_HDF5_SPECS.get(str(resource["spec"]))
    if dataset is None:
        raise MessageError(
            f"resource {resource['uid']}: spec {resource['spec']!r} is not "
            f"one of {', '.join(LEGACY_HDF5_SPECS)}",
            reason="unsupported",
        )
    root = str(resource.get("root") or "")
    path = str(resource["resource_path"])
    if root:
        path = root.rstrip("/") + "/" + path.lstrip("/")
    kwargs = resource.get("resource_kwargs") or {}
    per_point = kwargs.get("frame_per_point", 1)
    if not isinstance(per_point, int) or per_point < 1:
        raise MessageError(
            f"resource {resource['uid']}: frame_per_point {per_point!r} is not a positive integer",
            reason="bad_document",
        )
    return FrameStream(str(resource["uid"]), run_start, data_key, path, dataset, per_point)


def datums(document: dict[str, Any], name: str) -> list[tuple[str, int]]:
    """``(datum_id, point_number)`` of a ``datum`` or ``datum_page`` document."""
    if name == "datum":
        point = document["datum_kwargs"].get("point_number")
        return [(str(document["datum_id"]), int(point))] if isinstance(point, int) else []
    points = document["datum_kwargs"].get("point_number") or []
    return [
        (str(datum_id), int(point))
        for datum_id, point in zip(document["datum_id"], points, strict=False)
        if isinstance(point, int)
    ]


def events(document: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """The events of an ``event`` or ``event_page`` document (descriptor, seq_num, data)."""
    if name == "event":
        return [document]
    columns = document["data"]
    return [
        {
            "descriptor": document["descriptor"],
            "seq_num": seq,
            "data": {key: values[i] for key, values in columns.items() if i < len(values)},
        }
        for i, seq in enumerate(document["seq_num"])
    ]


def series_name(start: dict[str, Any] | None, run_start: str, data_key: str) -> str:
    """The output's series name: the scan number and the run uid's first 8 characters (as
    users find runs), then the detector's data key; file-name safe."""
    scan = start.get("scan_id") if start else None
    stem = f"scan{scan}_{run_start[:8]}" if isinstance(scan, int) else run_start[:8]
    return file_safe(f"{stem}_{data_key}")


def start_notes(start: dict[str, Any] | None, data_key: str) -> dict[str, str]:
    """What the output records of the run: the RunStart document, as JSON, and the
    detector's data key."""
    notes = {"bluesky_data_key": data_key}
    if start:
        notes["bluesky_start"] = json.dumps(start, default=str, sort_keys=True)
    return notes
