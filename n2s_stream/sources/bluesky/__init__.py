"""Follow a Bluesky experiment through its documents (a bluesky 0MQ proxy's output).

- ``source.py``: `BlueskySource`, the daemon's source: documents in, frames out.
- ``documents.py``: decoding documents (never pickle) and what they say, as pure functions.
- ``legacy.py``: the bookkeeping older ophyd area detectors need (resource, datum, event).
- ``records.py``: what a restart needs of each followed stream, kept in the state dir.
- ``paths.py``: the detector host's paths in the daemon's view, kept under allowed roots.
"""

from n2s_stream.sources.bluesky.source import BlueskySource

__all__ = ["BlueskySource"]
