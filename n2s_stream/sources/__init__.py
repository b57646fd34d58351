"""Where frames come from. Each source implements `Source`: it turns new detector data
into `Frame` and `SeriesEnd` items, hands them to ``context.emit`` (which blocks when the
daemon is busy: backpressure) and reports what it cannot use to ``context.reject`` with a
reason. It knows nothing of denoising.

The daemon picks the source by config (`make_source`): each is registered in ``SOURCES``
under the name of the option that selects it (``DaemonConfig.source``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from n2s_stream.stages import Frame, SeriesEnd

if TYPE_CHECKING:
    from n2s_stream.config import DaemonConfig

Emit = Callable[[Frame | SeriesEnd], bool]
"""Hand an item downstream; blocks while the queue is full; False once stopping."""

Reject = Callable[[str, str], None]
"""Report ``(reason, one-line message)`` for something refused."""

StartPosition = Callable[[str, Path], "int | None"]
"""Next frame to read of ``(series, output)`` (resume there), or None if it is complete."""


def _not_counted(output: str) -> None:
    """Default of ``SourceContext.dropped``."""


def _not_noted(series: str, index: int) -> None:
    """Default of ``SourceContext.refused``."""


@dataclass(frozen=True)
class SourceContext:
    """What the daemon gives a source: where items go, where refusals go, where a series
    resumes, the state dir's per-series header store, paths never to read, and where to
    count a message an output of the source (the ZeroMQ tee) could not send, and where to
    note a frame of a known series that was rejected (its gap is then not also counted as
    missing)."""

    emit: Emit
    reject: Reject
    start_position: StartPosition
    headers: MutableMapping[str, np.ndarray | None]
    ignore: tuple[Path, ...] = ()
    dropped: Callable[[str], None] = _not_counted
    refused: Callable[[str, int], None] = _not_noted


class Source(Protocol):
    """A stage that produces frames in a thread of its own."""

    def start(self) -> None:
        """Connect or start watching, then produce in the background; a source that
        cannot start (a missing directory) raises `UsageError` here."""

    def stop(self) -> None:
        """Stop producing; what was not emitted is the detector's (or the file's) to keep."""

    @property
    def alive(self) -> bool:
        """True while the source produces (the systemd watchdog is fed only then)."""


SOURCES = {
    "directory": "n2s_stream.sources.directory:DirectorySource",
    "zmq": "n2s_stream.sources.zmq:ZmqSource",
    "pva": "n2s_stream.sources.pva:PvaSource",
    "bluesky": "n2s_stream.sources.bluesky:BlueskySource",
}
"""Each source's class (``from_config(config, context)``), by ``DaemonConfig.source``."""


def make_source(config: DaemonConfig, context: SourceContext) -> Source:
    """The source that ``config`` selects."""
    module_name, _, class_name = SOURCES[config.source or ""].partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls.from_config(config, context)
