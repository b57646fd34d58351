"""Who may use the CPU now, and what every stage of the daemon shares.

Inference comes first: while frames wait in the queue or a batch is being denoised,
refinement and training hold back, or both would share the cores with it and every frame
would take longer. Refinement comes next, training last. The `Scheduler` is the one place
that decides; the stages ask it.
"""

from __future__ import annotations

import queue
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from n2s_stream.runtime.metrics import Metrics
from n2s_stream.runtime.snapshot import ModelStore


class Worker(Protocol):
    """A stage that can say it is working right now."""

    @property
    def busy(self) -> bool:
        """True while it works."""
        ...


class Scheduler:
    """The CPU priorities: inference, then refinement, then training."""

    def __init__(self, frames: queue.Queue) -> None:
        self._frames = frames
        self._inference: Worker | None = None
        self._refiner: Worker | None = None

    def attach(self, *, inference: Worker | None = None, refiner: Worker | None = None) -> None:
        """Tell it the stages whose work comes first (built after it, so given later)."""
        self._inference = inference or self._inference
        self._refiner = refiner or self._refiner

    def inference_busy(self) -> bool:
        """Frames wait in the queue, or a batch is being denoised."""
        working = self._inference is not None and self._inference.busy
        return working or not self._frames.empty()

    def refiner_may_run(self) -> bool:
        """Refinement runs only while inference has nothing to do."""
        return not self.inference_busy()

    def trainer_may_run(self) -> bool:
        """Training runs only while neither inference nor refinement works."""
        refining = self._refiner is not None and self._refiner.busy
        return not self.inference_busy() and not refining


@dataclass(frozen=True)
class Services:
    """What the daemon's stages share: the model store (inference reads the newest
    weights, training publishes them), the metrics, the scheduler, and ``fail``, which
    stops the daemon with a failure (exit status 1)."""

    store: ModelStore
    metrics: Metrics
    scheduler: Scheduler
    fail: Callable[[BaseException], None]
