"""ZeroMQ message formats: decoders for the daemon, encoders for the simulator.

- ``native``: our own two-part message, easy to send from any language (README):
  part 1 a JSON header ``{"htype": "n2s-frame-1", "series": "scan_0001", "frame": 17,
  "dtype": "<u2", "shape": [H, W], "encoding": "raw"|"bslz4"|"lz4"}``, part 2 the pixel
  bytes; a series ends with the one-part ``{"htype": "n2s-end-1", "series": "scan_0001"}``.
- ``dectris-stream1``: SIMPLON stream v1 (``dheader-1.0`` / ``dimage-1.0`` +
  ``dimage_d-1.0`` + blob + ``dconfig-1.0`` / ``dseries_end-1.0``; shapes are [x, y]).
- ``dectris-stream2``: CBOR ``start`` / ``image`` / ``end`` maps with multi-dimensional
  (tag 40) typed arrays (RFC 8746) and Dectris compression (tag 56500).

Decoders are small state machines (they remember each series' header). ``parse`` reads a
message's header and returns its `End` events and `Payload` images, whose pixels are
decoded later, off the receive thread, by `Payload.decode` (decompression is the costly
part of a detector-sized frame); ``decode`` does both at once. Anything malformed raises
`MessageError` with a reason.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, get_args

import cbor2
import lz4.block
import numpy as np

from n2s_stream.formats.codecs import (
    ENCODINGS,
    MessageError,
    bslz4_encode,
    decode_payload,
    lz4_hdf5_decode,
    lz4_hdf5_encode,
)
from n2s_stream.stages import MAX_FRAME_PIXELS

ZmqProtocol = Literal["native", "dectris-stream1", "dectris-stream2"]
"""The ``--zmq-protocol`` names: a new protocol is a name here, a `Decoder` and its branch
in `make_decoder`."""
PROTOCOLS: tuple[str, ...] = get_args(ZmqProtocol)
_SERIES_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class Image:
    """A decoded frame of ``series``."""

    series: str
    index: int
    data: np.ndarray
    pixel_mask: np.ndarray | None = None


@dataclass(frozen=True)
class End:
    """The end of ``series``; ``total`` frames were sent in it, where the feed says so."""

    series: str
    total: int | None = None


Event = Image | End


@dataclass(frozen=True)
class Payload:
    """An image message whose pixels are not decoded yet: ``blob`` in ``encoding``
    (``raw``, ``bslz4``, ``lz4``, or ``lz4-hdf5``: stream2's blocked LZ4) of ``shape`` and
    ``dtype``. Decoding is a pure function of these, safe in any thread."""

    series: str
    index: int
    blob: bytes
    encoding: str
    shape: tuple[int, int]
    dtype: np.dtype
    pixel_mask: np.ndarray | None = None

    def decode(self) -> Image:
        """The frame (raises `MessageError` for a payload that does not decode)."""
        if self.encoding == "lz4-hdf5":
            data = lz4_hdf5_decode(self.blob, self.shape, self.dtype)
        else:
            data = decode_payload(self.blob, self.encoding, self.shape, self.dtype)
        return Image(self.series, self.index, data, self.pixel_mask)


Parsed = Payload | End


class Decoder:
    """What every protocol's decoder does: ``parse`` a message (its own), and ``decode``
    it, payloads included."""

    def parse(self, parts: list[bytes]) -> list[Parsed]:
        """Events in one message, images not yet decoded."""
        raise NotImplementedError

    def decode(self, parts: list[bytes]) -> list[Event]:
        """Events in one message, every payload decoded, in order."""
        return [item.decode() if isinstance(item, Payload) else item for item in self.parse(parts)]


def check_series_name(name: Any) -> str:
    """A series name that is safe as a file name (no path, no traversal)."""
    if not isinstance(name, str) or not _SERIES_NAME.fullmatch(name):
        raise MessageError(
            f"series name {name!r} is not a plain file name", reason="bad_series_name"
        )
    return name


def _frame_shape(shape: Any, *, xy: bool = False) -> tuple[int, int]:
    if (
        not isinstance(shape, list | tuple)
        or len(shape) != 2
        or not all(isinstance(v, int) and v > 0 for v in shape)
    ):
        raise MessageError(f"shape {shape!r} is not two positive integers", reason="shape")
    height, width = (shape[1], shape[0]) if xy else (shape[0], shape[1])
    if height * width > MAX_FRAME_PIXELS:
        raise MessageError(
            f"declared shape {shape} exceeds {MAX_FRAME_PIXELS} pixels", reason="too_large"
        )
    return height, width


def _dtype(name: Any) -> np.dtype:
    try:
        dtype = np.dtype(name)
    except TypeError as exc:
        raise MessageError(f"dtype {name!r} is not understood", reason="dtype") from exc
    if dtype.kind not in "iuf":
        raise MessageError(f"dtype {dtype} is not numeric", reason="dtype")
    return dtype


def _json(part: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(bytes(part))
    except (ValueError, UnicodeDecodeError) as exc:
        raise MessageError(f"{what} is not JSON: {exc}", reason="bad_json") from exc
    if not isinstance(value, dict):
        raise MessageError(f"{what} is not a JSON object", reason="bad_json")
    return value


def _one_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _field(header: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = header.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise MessageError(
            f"header field {key!r} missing or of the wrong type ({value!r})", reason="bad_header"
        )
    return value


# ---- native ----------------------------------------------------------------------------
class NativeDecoder(Decoder):
    """Decoder of the ``native`` protocol."""

    def parse(self, parts: list[bytes]) -> list[Parsed]:
        """Events in one multipart message, images not yet decoded."""
        if not parts:
            raise MessageError("empty message", reason="truncated")
        header = _json(parts[0], "header")
        htype = header.get("htype")
        if htype == "n2s-end-1":
            total = header.get("frames")
            if total is not None and (
                not isinstance(total, int) or isinstance(total, bool) or total < 0
            ):
                raise MessageError(
                    f"end message frame count {total!r} is not a count", reason="bad_header"
                )
            return [End(check_series_name(header.get("series")), total)]
        if htype != "n2s-frame-1":
            raise MessageError(f"unknown htype {htype!r}", reason="unknown_htype")
        series = check_series_name(header.get("series"))
        index = _field(header, "frame", int)
        if index < 0:
            raise MessageError(f"frame number {index} < 0", reason="bad_header")
        if len(parts) != 2:
            raise MessageError(
                f"series {series} frame {index}: {len(parts)} parts, expected 2", reason="truncated"
            )
        shape = _frame_shape(header.get("shape"))
        encoding = str(header.get("encoding", "raw"))
        return [Payload(series, index, parts[1], encoding, shape, _dtype(header.get("dtype")))]


def native_frame(series: str, index: int, frame: np.ndarray, encoding: str = "raw") -> list[bytes]:
    """The two parts of a native frame message."""
    if encoding not in ENCODINGS:
        raise ValueError(encoding)
    if encoding == "bslz4":
        payload = bslz4_encode(frame)
    elif encoding == "lz4":
        payload = lz4.block.compress(frame.tobytes(), store_size=False)
    else:
        payload = frame.tobytes()
    header = {
        "htype": "n2s-frame-1",
        "series": series,
        "frame": index,
        "dtype": frame.dtype.str,
        "shape": list(frame.shape),
        "encoding": encoding,
    }
    return [json.dumps(header).encode(), payload]


def native_end(series: str, total: int | None = None) -> list[bytes]:
    """The end-of-series message; ``total`` (frames sent) lets the daemon count lost tails."""
    header: dict[str, Any] = {"htype": "n2s-end-1", "series": series}
    if total is not None:
        header["frames"] = total
    return [json.dumps(header).encode()]


# ---- Dectris stream v1 -----------------------------------------------------------------
_STREAM1_ENCODINGS = {
    "bs32-lz4<": "bslz4",
    "bs16-lz4<": "bslz4",
    "bs8-lz4<": "bslz4",
    "lz4<": "lz4",
    "<": "raw",
    "": "raw",
}


def stream1_series(series_id: Any) -> str:
    """File-safe name of a Dectris series id."""
    if not isinstance(series_id, int) or isinstance(series_id, bool) or series_id < 0:
        raise MessageError(
            f"series id {series_id!r} is not a non-negative integer", reason="bad_header"
        )
    return f"series_{series_id:06d}"


@dataclass
class Stream1Decoder(Decoder):
    """Decoder of SIMPLON stream v1; remembers each series' pixel mask (in ``masks``,
    which the daemon backs with its state dir so a restart keeps them) until the series
    ends: a detector's mask can be tens of MB, and a service sees thousands of series."""

    masks: MutableMapping[str, np.ndarray | None] = field(default_factory=dict)

    def parse(self, parts: list[bytes]) -> list[Parsed]:
        """Events in one multipart message, images not yet decoded."""
        if not parts:
            raise MessageError("empty message", reason="truncated")
        header = _json(parts[0], "part 1")
        htype = header.get("htype", "")
        if htype.startswith("dheader-"):
            self._header(header, parts)
            return []
        if htype.startswith("dimage-"):
            return [self._image(header, parts)]
        if htype.startswith("dseries_end-"):
            return [self._end(stream1_series(header.get("series")))]
        raise MessageError(f"unknown htype {htype!r}", reason="unknown_htype")

    def _header(self, header: dict[str, Any], parts: list[bytes]) -> None:
        series = stream1_series(header.get("series"))
        mask = None
        # header_detail "all": config, then (json, blob) pairs: flatfield, pixel mask, ...
        for k in range(2, len(parts) - 1, 2):
            info = _json(parts[k], f"header part {k + 1}")
            if str(info.get("htype", "")).startswith("dpixelmask-"):
                shape = _frame_shape(info.get("shape"), xy=True)
                mask = decode_payload(parts[k + 1], "raw", shape, _dtype(info.get("type"))) != 0
        self.masks[series] = mask if mask is not None and mask.any() else None

    def _end(self, series: str) -> End:
        self.masks.pop(series, None)  # a finished series' header is not needed again
        return End(series)

    def _image(self, header: dict[str, Any], parts: list[bytes]) -> Payload:
        series = stream1_series(header.get("series"))
        index = _field(header, "frame", int)
        if series not in self.masks:
            raise MessageError(
                f"{series} frame {index}: image before the series header",
                reason="image_before_header",
            )
        if len(parts) < 3:
            raise MessageError(
                f"{series} frame {index}: {len(parts)} parts, expected 4", reason="truncated"
            )
        info = _json(parts[1], "dimage_d part")
        shape = _frame_shape(info.get("shape"), xy=True)
        encoding = _STREAM1_ENCODINGS.get(info.get("encoding", ""))
        if encoding is None:
            raise MessageError(
                f"{series} frame {index}: unknown encoding {info.get('encoding')!r}",
                reason="unknown_encoding",
            )
        dtype = _dtype(info.get("type"))
        return Payload(series, index, parts[2], encoding, shape, dtype, self.masks[series])


def stream1_header(series_id: int, pixel_mask: np.ndarray | None = None) -> list[bytes]:
    """A ``dheader-1.0`` message (detail "all" when a mask is given, else "basic")."""
    detail = "all" if pixel_mask is not None else "basic"
    parts = [
        json.dumps({"htype": "dheader-1.0", "series": series_id, "header_detail": detail}).encode(),
        json.dumps({"description": "n2s-stream simulated Eiger"}).encode(),
    ]
    if pixel_mask is not None:
        mask = np.ascontiguousarray(pixel_mask, dtype="<u4")
        parts += [
            json.dumps(
                {"htype": "dpixelmask-1.0", "shape": list(mask.shape[::-1]), "type": "uint32"}
            ).encode(),
            mask.tobytes(),
        ]
    return parts


def stream1_image(series_id: int, index: int, frame: np.ndarray) -> list[bytes]:
    """A ``dimage-1.0`` message, payload bitshuffle-LZ4 as an Eiger sends it."""
    bits = frame.dtype.itemsize * 8
    payload = bslz4_encode(frame)
    return [
        json.dumps(
            {"htype": "dimage-1.0", "series": series_id, "frame": index, "hash": ""}
        ).encode(),
        json.dumps(
            {
                "htype": "dimage_d-1.0",
                "shape": list(frame.shape[::-1]),
                "type": frame.dtype.name,
                "encoding": f"bs{bits}-lz4<",
                "size": len(payload),
            }
        ).encode(),
        payload,
        json.dumps(
            {"htype": "dconfig-1.0", "start_time": 0, "stop_time": 0, "real_time": 0}
        ).encode(),
    ]


def stream1_end(series_id: int) -> list[bytes]:
    """A ``dseries_end-1.0`` message."""
    return [json.dumps({"htype": "dseries_end-1.0", "series": series_id}).encode()]


# ---- Dectris stream2 (CBOR) ------------------------------------------------------------
_TYPED_ARRAY_TAGS = {
    64: "|u1",
    65: ">u2",
    66: ">u4",
    67: ">u8",
    68: "|u1",
    69: "<u2",
    70: "<u4",
    71: "<u8",
    72: "|i1",
    73: ">i2",
    74: ">i4",
    75: ">i8",
    77: "<i2",
    78: "<i4",
    79: "<i8",
    80: ">f2",
    81: ">f4",
    82: ">f8",
    84: "<f2",
    85: "<f4",
    86: "<f8",
}
_TAG_FOR_DTYPE = {np.dtype(v).str: k for k, v in _TYPED_ARRAY_TAGS.items() if k != 68}
MULTI_DIM_TAG, COMPRESSION_TAG = 40, 56500


@dataclass(frozen=True)
class _Compressed:
    algorithm: str
    elem_size: int
    data: bytes


@dataclass(frozen=True)
class _Typed:
    dtype: np.dtype
    content: bytes | _Compressed


@dataclass(frozen=True)
class _MultiDim:
    shape: tuple[int, ...]
    array: _Typed


def _compressed(value: Any, *_: Any) -> _Compressed:
    algorithm, elem_size, data = value
    return _Compressed(str(algorithm), int(elem_size), bytes(data))


def _typed(tag: int) -> Any:
    def decode(value: Any, *_: Any) -> _Typed:
        return _Typed(np.dtype(_TYPED_ARRAY_TAGS[tag]), value)

    return decode


def _multi_dim(value: Any, *_: Any) -> _MultiDim:
    dims, array = value
    return _MultiDim(tuple(int(d) for d in dims), array)


# cbor2 decodes typed arrays itself, but not when compressed: take these tags over.
_SEMANTIC_DECODERS = {
    COMPRESSION_TAG: _compressed,
    MULTI_DIM_TAG: _multi_dim,
    **{tag: _typed(tag) for tag in _TYPED_ARRAY_TAGS},
}


def _stream2_payload(value: Any, series: str, index: int, what: str) -> Payload:
    """A stream2 multi-dimensional typed array, not yet decoded."""
    if not isinstance(value, _MultiDim) or not isinstance(value.array, _Typed):
        raise MessageError(f"{what} is not a multi-dimensional typed array", reason="bad_cbor")
    if len(value.shape) != 2:
        raise MessageError(f"{what} has shape {value.shape}, expected 2-D", reason="shape")
    shape = _frame_shape(list(value.shape))
    content, dtype = value.array.content, value.array.dtype
    if isinstance(content, _Compressed):
        if content.algorithm not in ("lz4", "bslz4"):
            raise MessageError(
                f"{what}: compression {content.algorithm!r} not supported",
                reason="unknown_encoding",
            )
        encoding = "lz4-hdf5" if content.algorithm == "lz4" else "bslz4"
        return Payload(series, index, content.data, encoding, shape, dtype)
    if not isinstance(content, bytes):
        raise MessageError(f"{what}: typed array content is not bytes", reason="bad_cbor")
    return Payload(series, index, content, "raw", shape, dtype)


@dataclass
class Stream2Decoder(Decoder):
    """Decoder of Dectris stream2 (CBOR); uses the first channel of each image."""

    masks: MutableMapping[str, np.ndarray | None] = field(default_factory=dict)

    def parse(self, parts: list[bytes]) -> list[Parsed]:
        """Events in one message, images not yet decoded."""
        events: list[Parsed] = []
        for part in parts:
            try:
                message = cbor2.loads(bytes(part), semantic_decoders=_SEMANTIC_DECODERS)
            except (cbor2.CBORDecodeError, ValueError, TypeError, EOFError) as exc:
                raise MessageError(
                    f"not a CBOR message: {_one_line(exc)}", reason="bad_cbor"
                ) from exc
            if not isinstance(message, Mapping):
                raise MessageError("CBOR message is not a map", reason="bad_cbor")
            event = self._message(message)
            if event is not None:
                events.append(event)
        return events

    def _message(self, message: Mapping[str, Any]) -> Parsed | None:
        kind = message.get("type")
        series = stream1_series(message.get("series_id"))
        if kind == "start":
            masks = message.get("pixel_mask") or {}
            first = next(iter(masks.values()), None) if isinstance(masks, Mapping) else None
            mask = (
                _stream2_payload(first, series, -1, f"{series} pixel mask").decode().data != 0
                if first
                else None
            )
            self.masks[series] = mask if mask is not None and mask.any() else None
            return None
        if kind == "image":
            index = _field(message, "image_id", int)
            if series not in self.masks:
                raise MessageError(
                    f"{series} image {index}: image before the start message",
                    reason="image_before_header",
                )
            channels = message.get("data")
            if not isinstance(channels, Mapping) or not channels:
                raise MessageError(f"{series} image {index}: no data channels", reason="bad_cbor")
            what = f"{series} image {index}"
            payload = _stream2_payload(next(iter(channels.values())), series, index, what)
            return replace(payload, pixel_mask=self.masks[series])
        if kind == "end":
            self.masks.pop(series, None)  # a finished series' header is not needed again
            return End(series)
        raise MessageError(f"unknown stream2 message type {kind!r}", reason="unknown_htype")


def _stream2_typed(array: np.ndarray, compress: str | None) -> cbor2.CBORTag:
    array = np.ascontiguousarray(array)
    tag = _TAG_FOR_DTYPE[array.dtype.str]
    content: Any = array.tobytes()
    if compress == "bslz4":
        content = cbor2.CBORTag(COMPRESSION_TAG, ["bslz4", array.itemsize, bslz4_encode(array)])
    elif compress == "lz4":
        content = cbor2.CBORTag(COMPRESSION_TAG, ["lz4", array.itemsize, lz4_hdf5_encode(array)])
    return cbor2.CBORTag(MULTI_DIM_TAG, [list(array.shape), cbor2.CBORTag(tag, content)])


def stream2_start(
    series_id: int, shape: tuple[int, int], pixel_mask: np.ndarray | None = None
) -> list[bytes]:
    """A stream2 ``start`` message."""
    message: dict[str, Any] = {
        "type": "start",
        "series_id": series_id,
        "series_unique_id": f"sim-{series_id}",
        "image_size_x": shape[1],
        "image_size_y": shape[0],
    }
    if pixel_mask is not None:
        mask = np.asarray(pixel_mask, dtype="<u4")
        message["pixel_mask"] = {"threshold_1": _stream2_typed(mask, compress=None)}
    return [cbor2.dumps(cbor2.CBORTag(55799, message))]


def stream2_image(
    series_id: int, index: int, frame: np.ndarray, compression: str = "bslz4"
) -> list[bytes]:
    """A stream2 ``image`` message, payload ``bslz4``, ``lz4`` or uncompressed (None)."""
    message = {
        "type": "image",
        "series_id": series_id,
        "image_id": index,
        "data": {"threshold_1": _stream2_typed(frame, compress=compression)},
    }
    return [cbor2.dumps(cbor2.CBORTag(55799, message))]


def stream2_end(series_id: int) -> list[bytes]:
    """A stream2 ``end`` message."""
    return [cbor2.dumps(cbor2.CBORTag(55799, {"type": "end", "series_id": series_id}))]


def make_decoder(
    protocol: str, headers: MutableMapping[str, np.ndarray | None] | None = None
) -> Decoder:
    """The decoder for a ``--zmq-protocol`` name; ``headers`` keeps series headers."""
    if protocol == "native":
        return NativeDecoder()
    if protocol == "dectris-stream1":
        return Stream1Decoder({} if headers is None else headers)
    if protocol == "dectris-stream2":
        return Stream2Decoder({} if headers is None else headers)
    raise ValueError(f"zmq protocol must be one of {PROTOCOLS}, got {protocol!r}")
