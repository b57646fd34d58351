"""Detector payload encodings: raw, bitshuffle-LZ4 (HDF5/Dectris framing) and LZ4.

Pure functions over bytes and numpy arrays; the compression itself is the maintained
``bitshuffle`` and ``lz4`` libraries. Every failure is a `MessageError` with a reason.
"""

from __future__ import annotations

import struct

import bitshuffle
import lz4.block
import numpy as np

from n2s_stream.errors import InputError

# Bitshuffle-LZ4 framing used by the HDF5 filter 32008 and by Dectris streams: uint64 BE
# uncompressed bytes, uint32 BE block size in bytes, then the compressed blocks.
_BSLZ4_HEADER = struct.Struct(">QI")
BLOCK_ELEMENTS = 2048
ENCODINGS = ("raw", "bslz4", "lz4")


class MessageError(InputError):
    """A message that cannot be decoded; ``reason`` labels the rejection metric."""


def bslz4_encode(array: np.ndarray) -> bytes:
    """Bitshuffle-LZ4 with the 12-byte header, as an Eiger sends ``bs16-lz4<``/``bs32-lz4<``."""
    return bslz4_chunk(array).tobytes()


def bslz4_chunk(array: np.ndarray) -> np.ndarray:
    """`bslz4_encode` as a uint8 array, copied once (what HDF5's chunk writer takes: at
    detector sizes a second copy of the bytes costs a millisecond a frame)."""
    array = np.ascontiguousarray(array)
    blocks = bitshuffle.compress_lz4(array, BLOCK_ELEMENTS)
    chunk = np.empty(_BSLZ4_HEADER.size + blocks.size, np.uint8)
    header = _BSLZ4_HEADER.pack(array.nbytes, BLOCK_ELEMENTS * array.itemsize)
    chunk[: _BSLZ4_HEADER.size] = np.frombuffer(header, np.uint8)
    chunk[_BSLZ4_HEADER.size :] = blocks
    return chunk


def bslz4_decode(blob: bytes, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Inverse of `bslz4_encode`; checks the declared size against ``shape`` and ``dtype``."""
    dtype = np.dtype(dtype)
    if len(blob) < _BSLZ4_HEADER.size:
        raise MessageError("bslz4 payload shorter than its header", reason="truncated")
    nbytes, block_bytes = _BSLZ4_HEADER.unpack_from(blob)
    expected = int(np.prod(shape)) * dtype.itemsize
    if nbytes != expected:
        raise MessageError(
            f"bslz4 payload holds {nbytes} bytes, shape {shape} {dtype} needs {expected}",
            reason="size_mismatch",
        )
    if block_bytes % dtype.itemsize:
        raise MessageError(
            f"bslz4 block size {block_bytes} is not a multiple of the element"
            f" size {dtype.itemsize}",
            reason="corrupt",
        )
    data = np.frombuffer(blob, dtype=np.uint8, offset=_BSLZ4_HEADER.size)
    try:
        return bitshuffle.decompress_lz4(data, tuple(shape), dtype, block_bytes // dtype.itemsize)
    except (RuntimeError, ValueError) as exc:
        raise MessageError(f"bslz4 payload does not decompress: {exc}", reason="corrupt") from exc


def lz4_hdf5_decode(blob: bytes, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """LZ4 with HDF5-filter framing (Dectris stream2 ``lz4``): uint64 BE total bytes,
    uint32 BE block bytes, then blocks each prefixed by its uint32 BE compressed size."""
    dtype = np.dtype(dtype)
    if len(blob) < _BSLZ4_HEADER.size:
        raise MessageError("lz4 payload shorter than its header", reason="truncated")
    total, block = _BSLZ4_HEADER.unpack_from(blob)
    expected = int(np.prod(shape)) * dtype.itemsize
    if total != expected or block <= 0:
        raise MessageError(
            f"lz4 payload holds {total} bytes (blocks of {block}), shape "
            f"{tuple(shape)} {dtype} needs {expected}",
            reason="size_mismatch",
        )
    out, offset = bytearray(), _BSLZ4_HEADER.size
    try:
        while len(out) < total:
            (size,) = struct.unpack_from(">I", blob, offset)
            chunk = blob[offset + 4 : offset + 4 + size]
            wanted = min(block, total - len(out))
            out += (
                chunk if size == wanted else lz4.block.decompress(chunk, uncompressed_size=wanted)
            )
            offset += 4 + size
    except (struct.error, lz4.block.LZ4BlockError) as exc:
        raise MessageError(f"lz4 payload does not decompress: {exc}", reason="corrupt") from exc
    return raw_decode(bytes(out), shape, dtype)


def lz4_hdf5_encode(array: np.ndarray, block: int = 1 << 16) -> bytes:
    """Inverse of `lz4_hdf5_decode`."""
    raw = np.ascontiguousarray(array).tobytes()
    parts = [_BSLZ4_HEADER.pack(len(raw), block)]
    for start in range(0, len(raw), block):
        compressed = lz4.block.compress(raw[start : start + block], store_size=False)
        parts += [struct.pack(">I", len(compressed)), compressed]
    return b"".join(parts)


def lz4_decode(blob: bytes, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Plain LZ4 block of the whole image (Dectris ``lz4<``)."""
    dtype = np.dtype(dtype)
    expected = int(np.prod(shape)) * dtype.itemsize
    try:
        raw = lz4.block.decompress(blob, uncompressed_size=expected)
    except lz4.block.LZ4BlockError as exc:
        raise MessageError(f"lz4 payload does not decompress: {exc}", reason="corrupt") from exc
    return raw_decode(raw, shape, dtype)


def raw_decode(blob: bytes, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Uncompressed little/big-endian bytes as declared."""
    dtype = np.dtype(dtype)
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(blob) != expected:
        raise MessageError(
            f"{len(blob)} bytes for shape {tuple(shape)} {dtype} (needs {expected})",
            reason="size_mismatch",
        )
    return np.frombuffer(blob, dtype=dtype).reshape(shape)


def decode_payload(
    blob: bytes, encoding: str, shape: tuple[int, ...], dtype: np.dtype
) -> np.ndarray:
    """Decode ``blob`` given one of `ENCODINGS`."""
    if encoding == "raw":
        return raw_decode(blob, shape, dtype)
    if encoding == "bslz4":
        return bslz4_decode(blob, shape, dtype)
    if encoding == "lz4":
        return lz4_decode(blob, shape, dtype)
    raise MessageError(f"unknown encoding {encoding!r}", reason="unknown_encoding")
