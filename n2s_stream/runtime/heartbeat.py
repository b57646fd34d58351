"""What the daemon's main thread does while the stages work: every quarter second, the
frames/s gauge, the systemd watchdog and status line, and the preview page's plots."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Protocol

from n2s_stream.runtime.metrics import LatencyWindow, Metrics
from n2s_stream.runtime.preview import Preview
from n2s_stream.runtime.service import Notifier

log = logging.getLogger(__name__)

RATE_SECONDS = 2.0  # frames/s and preview points are averaged over this long
STATUS_SECONDS = 5.0  # STATUS= lines to systemd


class Worker(Protocol):
    """A thread of the daemon, as the heartbeat sees it."""

    @property
    def alive(self) -> bool:
        """True while its thread runs."""


class Heartbeat:
    """Called by the daemon's loop; reads the stages through small callables. Each beat
    sets ``n2s_worker_up`` for every worker; the watchdog is fed only while every
    required worker is alive."""

    def __init__(
        self,
        *,
        metrics: Metrics,
        notifier: Notifier,
        preview: Preview,
        workers: Mapping[str, Worker],
        required: tuple[str, ...],
        written: Callable[[], int],
        status: Callable[[], dict[str, object]],
    ) -> None:
        self.metrics, self.notifier, self.preview = metrics, notifier, preview
        self.workers, self.required = dict(workers), required
        self._written, self._status = written, status
        self._reported: set[str] = set()
        self._latency = LatencyWindow(metrics.registry)
        now = time.monotonic()
        self._last_ping = self._last_status = self._last_rate = now
        self._last_written = 0

    def beat(self) -> str | None:
        """Update what is due now; returns the name of a required worker that died."""
        dead = self._check_workers()
        now = time.monotonic()
        written = self._written()
        if now - self._last_rate >= RATE_SECONDS:
            fps = (written - self._last_written) / (now - self._last_rate)
            self.metrics.frames_per_second.set(fps)
            self._last_written, self._last_rate = written, now
            self._sample_preview(fps)
        interval = self.notifier.watchdog_interval
        if interval is not None and now - self._last_ping >= interval and dead is None:
            self.notifier.notify("WATCHDOG=1")
            self._last_ping = now
        if now - self._last_status >= STATUS_SECONDS:
            status = self._status()
            self.notifier.notify(
                f"STATUS={written} frames written, model version "
                f"{status['model version']}, queue {status['queue']}, "
                f"training {status['training']}"
            )
            self._last_status = now
        return dead

    def _check_workers(self) -> str | None:
        """Set ``n2s_worker_up``; log each death once; the first dead required one."""
        dead = None
        for name, worker in self.workers.items():
            up = worker.alive
            self.metrics.worker_up.labels(worker=name).set(int(up))
            if up:
                continue
            if name not in self._reported:
                self._reported.add(name)
                log.error(
                    "worker %s is down%s",
                    name,
                    ""
                    if name in self.required
                    else " (not required: the daemon goes on without it)",
                )
            if name in self.required and dead is None:
                dead = name
        return dead

    def _sample_preview(self, fps: float) -> None:
        """A point for the preview page's plots, and its status lines."""
        value = self.metrics.registry.get_sample_value
        self.preview.sample(
            {
                "fps": fps,
                "latency_s": self._latency.mean_since_last(),
                "selfsup_val_loss": value("n2s_selfsup_val_loss") or float("nan"),
                "train_loss": value("n2s_train_loss") or float("nan"),
            },
            {
                **self._status(),
                "output": "paused: disk nearly full" if value("n2s_output_paused") else "writing",
            },
        )
