"""The HDF5 superblock's "open for write" flags, which a killed writer leaves set.

A file written with ``libver="latest"`` (superblock version 2 or 3) records in its
superblock that a writer has it open; HDF5 refuses to open it again until the flags are
cleared (the ``h5clear -s`` tool). For a file that was in SWMR mode when its writer died,
everything flushed is consistent by SWMR's design, so clearing the flags is all that
recovery needs: the file is appended to afterwards, never rewritten. Pure byte
arithmetic: no HDF5 library call can clear them.
"""

from __future__ import annotations

from pathlib import Path

SIGNATURE = b"\x89HDF\r\n\x1a\n"
_FLAGS_AT = 11  # signature (8), version, size of offsets, size of lengths, then flags
_MASK = 0xFFFFFFFF


def _rot(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _MASK


def _mix(a: int, b: int, c: int) -> tuple[int, int, int]:
    a = (a - c) & _MASK
    a ^= _rot(c, 4)
    c = (c + b) & _MASK
    b = (b - a) & _MASK
    b ^= _rot(a, 6)
    a = (a + c) & _MASK
    c = (c - b) & _MASK
    c ^= _rot(b, 8)
    b = (b + a) & _MASK
    a = (a - c) & _MASK
    a ^= _rot(c, 16)
    c = (c + b) & _MASK
    b = (b - a) & _MASK
    b ^= _rot(a, 19)
    a = (a + c) & _MASK
    c = (c - b) & _MASK
    c ^= _rot(b, 4)
    b = (b + a) & _MASK
    return a, b, c


def _final(a: int, b: int, c: int) -> int:
    c ^= b
    c = (c - _rot(b, 14)) & _MASK
    a ^= c
    a = (a - _rot(c, 11)) & _MASK
    b ^= a
    b = (b - _rot(a, 25)) & _MASK
    c ^= b
    c = (c - _rot(b, 16)) & _MASK
    a ^= c
    a = (a - _rot(c, 4)) & _MASK
    b ^= a
    b = (b - _rot(a, 14)) & _MASK
    c ^= b
    c = (c - _rot(b, 24)) & _MASK
    return c


def lookup3(data: bytes, initval: int = 0) -> int:
    """Bob Jenkins' lookup3 ``hashlittle``: HDF5's checksum of its metadata."""
    length = len(data)
    a = b = c = (0xDEADBEEF + length + initval) & _MASK
    offset = 0
    while length - offset > 12:
        a = (a + int.from_bytes(data[offset : offset + 4], "little")) & _MASK
        b = (b + int.from_bytes(data[offset + 4 : offset + 8], "little")) & _MASK
        c = (c + int.from_bytes(data[offset + 8 : offset + 12], "little")) & _MASK
        a, b, c = _mix(a, b, c)
        offset += 12
    tail = data[offset:]
    if not tail:
        return c
    tail = tail + bytes(12 - len(tail))
    a = (a + int.from_bytes(tail[0:4], "little")) & _MASK
    b = (b + int.from_bytes(tail[4:8], "little")) & _MASK
    c = (c + int.from_bytes(tail[8:12], "little")) & _MASK
    return _final(a, b, c)


def _superblock_size(head: bytes) -> int:
    """Bytes of a version 2/3 superblock before its checksum."""
    size_of_offsets = head[9]
    return _FLAGS_AT + 1 + 4 * size_of_offsets


def write_flags(path: Path) -> int:
    """The superblock's consistency flags (0: closed cleanly; bit 0 open for write, bit 2
    SWMR write); 0 for a file whose superblock has none (version 0 or 1)."""
    with open(path, "rb") as f:
        head = f.read(_FLAGS_AT + 1)
    if len(head) <= _FLAGS_AT or head[:8] != SIGNATURE or head[8] < 2:
        return 0
    return head[_FLAGS_AT]


def clear_write_flags(path: Path) -> bool:
    """Clear the flags a killed writer left (as ``h5clear -s``); True if there were any.
    Only for a file no process has open for writing. Raises ValueError for a superblock
    that is not what it should be (its checksum does not match)."""
    with open(path, "r+b") as f:
        head = f.read(64)
        if len(head) <= _FLAGS_AT or head[:8] != SIGNATURE:
            raise ValueError(f"{path}: no HDF5 superblock at the start of the file")
        if head[8] < 2 or head[_FLAGS_AT] == 0:
            return False
        size = _superblock_size(head)
        stored = int.from_bytes(head[size : size + 4], "little")
        if lookup3(head[:size]) != stored:
            raise ValueError(f"{path}: superblock checksum does not match")
        cleared = head[:_FLAGS_AT] + b"\x00" + head[_FLAGS_AT + 1 : size]
        f.seek(0)
        f.write(cleared + lookup3(cleared).to_bytes(4, "little"))
        f.flush()
    return True
