"""areaDetector's NTNDArray (EPICS PVAccess, ``epics:nt/NTNDArray:1.0``) as a detector frame.

Pure functions over a received value (a p4p ``Value``, or any mapping with the same fields),
no sockets: the mapping of ADCore's ``ntndArrayConverter``. ``dimension[0]`` is x, so the
numpy shape is the dimensions reversed; the frame number is ``uniqueId``; ``dataTimeStamp``
is when the detector took it; NDAttributes (numbers, strings) travel with it. Compressed frames
carry their bytes in ``value.ubyteValue``, the codec's name in ``codec.name``, the original
element type in ``codec.parameters`` (a pvData ScalarType code) and ``uncompressedSize``.
Sizes are checked before any decompressor runs. Every failure is a `MessageError`.
`encode` is the inverse, as NDPluginPva publishes a frame (the daemon's served PV, the
simulator).
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from n2s_stream.formats.codecs import (
    MessageError,
    bslz4_decode,
    bslz4_encode,
    lz4_decode,
    raw_decode,
)
from n2s_stream.stages import MAX_FRAME_PIXELS

SCALAR_TYPES = {
    1: "i1",
    2: "i2",
    3: "i4",
    4: "i8",
    5: "u1",
    6: "u2",
    7: "u4",
    8: "u8",
    9: "f4",
    10: "f8",
}
"""pvData ScalarType code -> numpy dtype (0 is pvBoolean, which areaDetector never sends)."""

SCALAR_CODES = {np.dtype(name): code for code, name in SCALAR_TYPES.items()}

CODECS = ("", "none", "lz4", "bslz4", "blosc", "zlib")
LOSSY_CODECS = ("jpeg",)


@dataclass(frozen=True)
class NDArrayFrame:
    """One decoded NTNDArray: ``data`` ``(H, W)`` in the detector's dtype, ``unique_id``,
    ``timestamp`` (unix seconds of ``dataTimeStamp``; 0 if unset) and the NDAttributes
    (numbers as float, strings) by name."""

    unique_id: int
    data: np.ndarray
    timestamp: float
    attributes: dict[str, float | str] = field(default_factory=dict)


def decode(value: Any) -> NDArrayFrame:
    """The frame an NTNDArray value holds; raises `MessageError` with a reason for what
    cannot be a denoisable frame (colour, lossy, too large, corrupt, unknown codec)."""
    shape = frame_shape([int(d["size"]) for d in value["dimension"]])
    attributes = scalar_attributes(value)
    if attributes.get("ColorMode", 0) != 0:  # NDColorMode: 0 mono, 1 Bayer, 2-4 RGB
        raise MessageError(
            f"ColorMode {attributes['ColorMode']:g}: only monochrome frames are denoised",
            reason="color",
        )
    codec = str(value["codec"]["name"] or "")
    if codec in LOSSY_CODECS:
        raise MessageError(
            f"codec {codec}: lossy compression changed the noise; refused", reason="lossy_codec"
        )
    if codec not in CODECS:
        raise MessageError(f"unknown codec {codec!r}", reason="unknown_encoding")
    array = np.asarray(value["value"])  # the union's selected member, typed by p4p
    if array.dtype.kind not in "iuf":
        raise MessageError(f"value of type {array.dtype}: expected numbers", reason="dtype")
    if codec in ("", "none"):
        data = raw_decode(np.ascontiguousarray(array).tobytes(), shape, array.dtype)
    else:
        if array.dtype != np.uint8:
            raise MessageError(
                f"codec {codec}: compressed bytes must be ubyteValue, not {array.dtype}",
                reason="corrupt",
            )
        data = _decompress(codec, value, array, shape)
    stamp = value["dataTimeStamp"]
    return NDArrayFrame(
        unique_id=int(value["uniqueId"]),
        data=data,
        timestamp=float(stamp["secondsPastEpoch"]) + 1e-9 * float(stamp["nanoseconds"]),
        attributes=attributes,
    )


def encode(
    frame: np.ndarray,
    unique_id: int,
    *,
    timestamp: float,
    codec: str = "none",
    attributes: Mapping[str, float | int | str] | None = None,
) -> Any:
    """``frame`` ``(H, W)`` as an NTNDArray p4p value, as NDPluginPva publishes it
    (``dimension[0]`` is x), with ``uniqueId``, ``dataTimeStamp`` and NDAttributes, its
    bytes compressed by ``codec`` (none, lz4, bslz4, zlib, blosc) as NDPluginCodec does."""
    from p4p.nt import NTNDArray

    frame = np.ascontiguousarray(frame)
    value = NTNDArray().wrap(frame, attrib={"ColorMode": 0, **(attributes or {})})
    value["uniqueId"] = unique_id
    value["dataTimeStamp.secondsPastEpoch"] = int(timestamp)
    value["dataTimeStamp.nanoseconds"] = int((timestamp % 1) * 1e9)
    now = time.time()  # when it was published, as NDPluginPva sets timeStamp
    value["timeStamp.secondsPastEpoch"] = int(now)
    value["timeStamp.nanoseconds"] = int((now % 1) * 1e9)
    value["codec.name"] = ""  # set even when unchanged: a posted update carries it then
    if codec not in ("", "none"):
        payload = compress(frame, codec)
        value["value"] = ("ubyteValue", np.frombuffer(payload, dtype=np.uint8))
        value["codec.name"] = codec
        value["codec.parameters"] = SCALAR_CODES[frame.dtype]
        value["compressedSize"] = len(payload)
        value["uncompressedSize"] = frame.nbytes
    return value


def compress(frame: np.ndarray, codec: str) -> bytes:
    """The bytes NDPluginCodec would send for ``frame`` under ``codec``."""
    raw = np.ascontiguousarray(frame).tobytes()
    if codec == "lz4":
        import lz4.block

        return lz4.block.compress(raw, store_size=False)
    if codec == "bslz4":
        return bslz4_encode(frame)
    if codec == "zlib":
        return zlib.compress(raw)
    if codec == "blosc":
        import blosc

        return blosc.compress(raw, typesize=frame.itemsize)
    raise ValueError(f"codec {codec!r}: expected none, lz4, bslz4, zlib or blosc")


def frame_shape(sizes: list[int]) -> tuple[int, int]:
    """``(H, W)`` from NTNDArray dimensions ``[x, y]``; colour (3 dimensions with one of
    size 3) and other ranks are refused, and so are frames over 8192x8192."""
    if len(sizes) == 3 and 3 in sizes:
        raise MessageError(
            f"colour frame {sizes}: only monochrome frames are denoised", reason="color"
        )
    if len(sizes) != 2:
        raise MessageError(f"{len(sizes)} dimensions {sizes}: expected 2 (x, y)", reason="rank")
    width, height = sizes
    if width < 1 or height < 1:
        raise MessageError(f"empty frame {sizes}", reason="empty")
    if width * height > MAX_FRAME_PIXELS:
        raise MessageError(f"frame {width}x{height} is larger than 8192x8192", reason="too_large")
    return height, width


MAX_ATTRIBUTES = 64
"""NDAttributes kept per frame (areaDetector sends a handful; a flood is cut off)."""


def scalar_attributes(value: Any) -> dict[str, float | str]:
    """The NDAttributes whose value is a number (as float) or a string, at most
    `MAX_ATTRIBUTES` of them (arrays and booleans are left out)."""
    found: dict[str, float | str] = {}
    for attribute in value["attribute"][: 4 * MAX_ATTRIBUTES]:
        if len(found) == MAX_ATTRIBUTES:
            break
        item = attribute["value"]
        if isinstance(item, (bool, np.bool_)):
            continue
        if isinstance(item, (int, float, np.integer, np.floating)):
            found[str(attribute["name"])] = float(item)
        elif isinstance(item, str):
            found[str(attribute["name"])] = item[:1024]
    return found


def _decompress(codec: str, value: Any, payload: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Decompress ``payload`` (the ubyte array) after checking the declared sizes."""
    code = _scalar_code(value["codec"]["parameters"])
    dtype = np.dtype(SCALAR_TYPES.get(code, "")) if code in SCALAR_TYPES else None
    if dtype is None:
        raise MessageError(f"codec {codec}: original type code {code!r} unknown", reason="dtype")
    expected = shape[0] * shape[1] * dtype.itemsize
    declared = int(value["uncompressedSize"])
    if declared != expected:
        raise MessageError(
            f"codec {codec}: uncompressedSize {declared} but {shape[1]}x"
            f"{shape[0]} {dtype} needs {expected}",
            reason="size_mismatch",
        )
    blob = payload.tobytes()
    if codec == "lz4":
        return lz4_decode(blob, shape, dtype)
    if codec == "bslz4":
        return _bslz4(blob, shape, dtype)
    if codec == "zlib":
        try:
            raw = zlib.decompressobj().decompress(blob, expected + 1)
        except zlib.error as exc:
            raise MessageError(
                f"zlib payload does not decompress: {exc}", reason="corrupt"
            ) from exc
        return raw_decode(raw, shape, dtype)
    return _blosc(blob, shape, dtype)


def _scalar_code(parameters: Any) -> int | None:
    try:
        return int(parameters)
    except (TypeError, ValueError):
        return None


def _bslz4(blob: bytes, shape: tuple[int, int], dtype: np.dtype) -> np.ndarray:
    """Bitshuffle-LZ4 with the 12-byte HDF5-filter header, or without it (areaDetector's
    default block of 0 = automatic, as the HDF5 filter would choose)."""
    expected = shape[0] * shape[1] * dtype.itemsize
    if len(blob) >= 12 and int.from_bytes(blob[:8], "big") == expected:
        return bslz4_decode(blob, shape, dtype)
    import bitshuffle

    data = np.frombuffer(blob, dtype=np.uint8)
    try:
        return bitshuffle.decompress_lz4(data, shape, dtype, 0)
    except (RuntimeError, ValueError) as exc:
        raise MessageError(f"bslz4 payload does not decompress: {exc}", reason="corrupt") from exc


def _blosc(blob: bytes, shape: tuple[int, int], dtype: np.dtype) -> np.ndarray:
    """Blosc (c-blosc 1 frames, as NDPluginCodec writes them); the frame's own header
    states its size, checked before decompressing."""
    try:
        import blosc
    except ImportError as exc:
        raise MessageError(
            "codec blosc needs the blosc package (pip install 'n2s-stream[pva]')",
            reason="unknown_encoding",
        ) from exc
    expected = shape[0] * shape[1] * dtype.itemsize
    if len(blob) < 16 or int.from_bytes(blob[4:8], "little") != expected:
        raise MessageError(
            "blosc frame does not hold the declared frame size", reason="size_mismatch"
        )
    try:
        raw = blosc.decompress(blob)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise MessageError(f"blosc payload does not decompress: {exc}", reason="corrupt") from exc
    return raw_decode(raw, shape, dtype)
