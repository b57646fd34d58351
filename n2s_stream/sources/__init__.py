"""Where frames come from. Each source turns new detector data into `Frame`s, hands them
to ``emit`` (which blocks when the daemon is busy: backpressure) and reports what it
cannot use to ``reject`` with a reason."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from n2s_stream.frames import Frame, SeriesEnd

Emit = Callable[[Frame | SeriesEnd], bool]
"""Hand an item downstream; blocks while the queue is full; False once stopping."""

Reject = Callable[[str, str], None]
"""Report ``(reason, one-line message)`` for something refused."""

StartPosition = Callable[[str, Path], "int | None"]
"""Next frame to read of ``(series, output)`` (resume there), or None if it is complete."""
