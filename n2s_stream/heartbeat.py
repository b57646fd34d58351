"""What the daemon's main thread does while the stages work: every quarter second, the
frames/s gauge, the systemd watchdog and status line, and the preview page's plots."""

from __future__ import annotations

import time
from collections.abc import Callable

from n2s_stream.metrics import LatencyWindow, Metrics
from n2s_stream.preview import Preview
from n2s_stream.service import Notifier

RATE_SECONDS = 2.0  # frames/s and preview points are averaged over this long
STATUS_SECONDS = 5.0  # STATUS= lines to systemd


class Heartbeat:
    """Called by the daemon's loop; reads the stages through small callables."""

    def __init__(self, *, metrics: Metrics, notifier: Notifier, preview: Preview,
                 written: Callable[[], int], healthy: Callable[[], bool],
                 status: Callable[[], dict[str, object]]) -> None:
        self.metrics, self.notifier, self.preview = metrics, notifier, preview
        self._written, self._healthy, self._status = written, healthy, status
        self._latency = LatencyWindow(metrics.registry)
        now = time.monotonic()
        self._last_ping = self._last_status = self._last_rate = now
        self._last_written = 0

    def beat(self) -> None:
        """Update what is due now."""
        now = time.monotonic()
        written = self._written()
        if now - self._last_rate >= RATE_SECONDS:
            fps = (written - self._last_written) / (now - self._last_rate)
            self.metrics.frames_per_second.set(fps)
            self._last_written, self._last_rate = written, now
            self._sample_preview(fps)
        interval = self.notifier.watchdog_interval
        if interval is not None and now - self._last_ping >= interval and self._healthy():
            self.notifier.notify("WATCHDOG=1")
            self._last_ping = now
        if now - self._last_status >= STATUS_SECONDS:
            status = self._status()
            self.notifier.notify(f"STATUS={written} frames written, model version "
                                 f"{status['model version']}, queue {status['queue']}")
            self._last_status = now

    def _sample_preview(self, fps: float) -> None:
        """A point for the preview page's plots, and its status lines."""
        value = self.metrics.registry.get_sample_value
        self.preview.sample(
            {"fps": fps, "latency_s": self._latency.mean_since_last(),
             "selfsup_val_loss": value("n2s_selfsup_val_loss") or float("nan"),
             "train_loss": value("n2s_train_loss") or float("nan")},
            {**self._status(),
             "output": "paused: disk nearly full" if value("n2s_output_paused") else "writing"})
