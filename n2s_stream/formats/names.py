"""Names the daemon derives from what others chose (series, PVs, run uids, data keys)."""

from __future__ import annotations

import re

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def file_safe(text: str, *, limit: int = 120, fallback: str = "series") -> str:
    """``text`` as one file-name component (also a Tiled key): runs of anything but
    letters, digits, ``.``, ``_`` and ``-`` become ``_``, and no leading or trailing dot,
    dash or underscore, so it is never a path, a hidden file, ``.`` or ``..``."""
    return (_UNSAFE.sub("_", text).strip("._-") or fallback)[:limit]
