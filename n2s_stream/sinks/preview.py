"""The live preview page's table of newest frames (``runtime/preview.py`` serves it)."""

from __future__ import annotations

import numpy as np

from n2s_stream.runtime.preview import Preview
from n2s_stream.sinks import SinkContext
from n2s_stream.stages import Frame, FrameMeta, SeriesEnd, SeriesStart


class PreviewSink:
    """Keeps a reference to the newest raw and denoised frame of each series."""

    name = "preview"
    required = False

    def __init__(self, preview: Preview) -> None:
        self.preview = preview

    @classmethod
    def from_context(cls, context: SinkContext) -> PreviewSink:
        """The daemon's preview table."""
        return cls(context.preview)

    def open_series(self, start: SeriesStart) -> None:
        """Nothing to do: the first frame shows the series."""

    def write(self, frame: Frame, denoised: np.ndarray, meta: FrameMeta) -> None:
        """Show the frame (no copy, no encoding here: the page encodes on request)."""
        self.preview.show(frame.series, frame.index, frame.data, denoised)

    def end_series(self, end: SeriesEnd) -> None:
        """The page keeps showing a finished series until newer ones replace it."""

    def close(self) -> None:
        """Nothing held."""
