"""The detector host's file paths in the daemon's view.

A StreamResource names the file as the detector host sees it. ``bluesky_path_map``
rewrites its prefix into the daemon's mount; without a map the path is taken as it is and
must lie under ``bluesky_root``. Either way the result, symlinks resolved, must stay
under the allowed folder: a document must never make the daemon read elsewhere.
"""

from __future__ import annotations

from pathlib import Path

from n2s_stream.errors import UsageError
from n2s_stream.formats.codecs import MessageError


class DetectorPaths:
    """Maps announced paths to local ones under the configured prefixes or root."""

    def __init__(self, path_map: tuple[str, ...], root: Path | None) -> None:
        if not path_map and root is None:
            raise UsageError(
                "the Bluesky source needs --bluesky-root FOLDER (announced files "
                "must lie under it) or --bluesky-path-map"
            )
        self._pairs = parse_path_map(path_map)
        self._root = root

    def local(self, path: str) -> Path:
        """The detector's path in the daemon's view; `MessageError` (``outside_root``) if
        it lies under no mapped prefix (or outside ``bluesky_root``)."""
        for remote, local in self._pairs:
            if path == remote or path.startswith(remote.rstrip("/") + "/"):
                mapped = Path(local) / Path(path[len(remote) :].lstrip("/"))
                return inside(mapped, Path(local), path)
        if self._pairs:
            raise MessageError(
                f"{path}: under no prefix of bluesky_path_map", reason="outside_root"
            )
        assert self._root is not None  # checked in __init__
        return inside(Path(path), self._root, path)


def parse_path_map(entries: tuple[str, ...]) -> list[tuple[str, str]]:
    """``DETECTOR_PREFIX=LOCAL_PREFIX`` entries, longest prefix first."""
    pairs = []
    for entry in entries:
        remote, sep, local = entry.partition("=")
        if not sep or not remote.startswith("/") or not local:
            raise UsageError(f"bluesky_path_map: {entry!r} is not /DETECTOR/PREFIX=/LOCAL/PREFIX")
        pairs.append((remote, local))
    return sorted(pairs, key=lambda pair: -len(pair[0]))


def inside(path: Path, root: Path, announced: str) -> Path:
    """``path`` resolved, if it stays under ``root`` (no ``..`` or symlink out of it)."""
    resolved, base = path.resolve(), root.resolve()
    if resolved != base and base not in resolved.parents:
        raise MessageError(
            f"{announced}: resolves to {resolved}, outside {base}", reason="outside_root"
        )
    return resolved
