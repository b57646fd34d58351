"""What online training learns from: each written frame's network input goes into the
rolling buffer, every ``val_every``-th into the small held-out set instead (every
``EARLY_VAL_EVERY``-th while the cold start lasts: the hand-over to the network is decided
on the held-out set, and one frame is a thin basis for it)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from n2s_stream.runtime.buffer import RollingBuffer
from n2s_stream.sinks import SinkContext
from n2s_stream.stages import Frame, FrameMeta, SeriesEnd, SeriesStart

VAL_EVERY = 10
EARLY_VAL_EVERY = 3


class TrainingTap:
    """Routes network inputs (normalised ``(K, H, W)``) to the training or held-out buffer."""

    name = "training_tap"
    required = False

    def __init__(
        self,
        buffer: RollingBuffer,
        val_buffer: RollingBuffer,
        val_every: int = VAL_EVERY,
        early: Callable[[], bool] = lambda: False,
    ) -> None:
        self.buffer, self.val_buffer, self.val_every = buffer, val_buffer, val_every
        self._early = early  # True while the held-out set should grow faster
        self._seen = 0

    @classmethod
    def from_context(cls, context: SinkContext) -> TrainingTap:
        """The daemon's buffers."""
        cold = context.cold_start
        return cls(
            context.buffer, context.val_buffer, early=lambda: cold is not None and cold.active
        )

    def open_series(self, start: SeriesStart) -> None:
        """Series do not matter to training: it learns from the newest frames."""

    def write(self, frame: Frame, denoised: np.ndarray, meta: FrameMeta) -> None:
        """Keep the frame's network input and its valid-pixel map (None when all valid)."""
        self._seen += 1
        valid = None if meta.valid.all() else meta.valid.astype(np.float32)
        every = EARLY_VAL_EVERY if self._early() else self.val_every
        target = self.val_buffer if self._seen % every == 0 else self.buffer
        target.add(meta.network_input, valid)

    def end_series(self, end: SeriesEnd) -> None:
        """Nothing to do."""

    def close(self) -> None:
        """The buffers belong to the daemon."""
