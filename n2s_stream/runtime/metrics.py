"""Every Prometheus metric of the daemon, declared once against an injected registry.

Names are a contract (DESIGN.md): dashboards and alerts depend on them.
"""

from __future__ import annotations

import logging
import math
import socket
import threading
import urllib.request
from collections.abc import Callable, Iterable
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    make_wsgi_app,
)
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.parser import text_string_to_metric_families

from n2s_stream import __version__
from n2s_stream.n2s import photons

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
FORWARD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """The daemon's metrics; tests pass a fresh registry and read values back."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.registry = registry
        self._declare_flow(registry)
        self._declare_training(registry)
        self._declare_operations(registry)
        self.build = Info("n2s_build", "n2s-stream build", registry=registry)
        self.build.info({"version": __version__})

    def _declare_flow(self, registry: CollectorRegistry) -> None:
        """Frames in and out, and how long they take."""
        self.frames_received = Counter(
            "n2s_frames_received", "Frames read from sources", registry=registry
        )
        self.frames_denoised = Counter(
            "n2s_frames_denoised", "Denoised frames written to output files", registry=registry
        )
        self.frames_rejected = Counter(
            "n2s_frames_rejected",
            "Frames or files refused, by reason",
            ["reason"],
            registry=registry,
        )
        self.frames_missing = Counter(
            "n2s_frames_missing", "Gaps in a series' frame numbers", registry=registry
        )
        self.series_ended = Counter(
            "n2s_series_ended",
            "Series ended, each of their frames written or refused and their outputs "
            "closed: complete (the source said the series ended) or not (closed for "
            "idleness, resumed if frames come)",
            ["complete"],
            registry=registry,
        )
        for complete in ("true", "false"):
            self.series_ended.labels(complete)  # both label values exported from the start
        self.frame_latency = Histogram(
            "n2s_frame_latency_seconds",
            "Time from a frame's arrival to its being written",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.forward_seconds = Histogram(
            "n2s_forward_seconds",
            "Time of one forward pass of the network (one batch of "
            "frames, host to host): the model's share of each frame's time",
            buckets=FORWARD_BUCKETS,
            registry=registry,
        )
        self.queue_depth = Gauge(
            "n2s_queue_depth", "Frames waiting for inference", registry=registry
        )
        self.frames_refined = Counter(
            "n2s_refined_frames",
            "Frames of finished series denoised again with the newest "
            "model into /entry/refined/data",
            registry=registry,
        )
        self.series_refined = Counter(
            "n2s_series_refined",
            "Series whose refined frames were appended to their output (a series "
            "that grows after it was refined counts again)",
            registry=registry,
        )
        self.tiled_errors = Counter(
            "n2s_tiled_errors",
            "Registrations in Tiled that failed (server down or refusing); retried",
            registry=registry,
        )
        self.refine_errors = Counter(
            "n2s_refine_errors",
            "Series whose refinement failed (spool set aside, see log)",
            registry=registry,
        )
        self.refine_pending = Gauge(
            "n2s_refine_pending_series", "Finished series waiting to be refined", registry=registry
        )
        self.frames_per_second = Gauge(
            "n2s_frames_per_second", "Frames written per second (recent average)", registry=registry
        )

    def _declare_training(self, registry: CollectorRegistry) -> None:
        """Online training and the model it publishes."""
        self.train_steps = Counter("n2s_train_steps", "Online training steps", registry=registry)
        self.train_rollbacks = Counter(
            "n2s_train_rollbacks",
            "Training steps undone (NaN/inf or diverging loss)",
            registry=registry,
        )
        self.train_loss = Gauge(
            "n2s_train_loss",
            "Self-supervised training loss (mean since last publish)",
            registry=registry,
        )
        self.selfsup_val_loss = Gauge(
            "n2s_selfsup_val_loss",
            "Loss on held-out frames (no ground truth needed): binomial-split under "
            "binomial training on photon counts, else masked",
            registry=registry,
        )
        self.cold_start_active = Gauge(
            "n2s_cold_start_active",
            "1 while the calibrated classical denoiser writes frames "
            "(the network has not yet beaten its held-out loss)",
            registry=registry,
        )
        self.classical_selfsup_loss = Gauge(
            "n2s_classical_selfsup_loss",
            "Held-out loss of the cold-start classical denoiser, "
            "on the frames and masks (or splits) of n2s_selfsup_val_loss",
            registry=registry,
        )
        self.model_version = Gauge(
            "n2s_model_version", "Version of the weights used for inference", registry=registry
        )
        self.flux_ratio = Gauge(
            "n2s_flux_ratio",
            "Denoised total over raw total on the measured pixels of a recent frame (one "
            "a second; every frame, before its scaling, with preserve_flux): 1 when "
            "denoising adds and removes no intensity; a lasting departure is a bias "
            "that integration would measure",
            registry=registry,
        )

        self.counts_per_photon = Gauge(
            "n2s_counts_per_photon",
            "Counts per photon that the first frame's noise shows (its variance over its "
            "mean): 1 for photon counts; binomial training falls back to "
            "neighbor2neighbor far from 1. NaN until measured, or where none of the first "
            f"{photons.TRIES} frames could tell (too small, masked or dark)",
            registry=registry,
        )
        self.counts_per_photon.set(math.nan)

    def _declare_operations(self, registry: CollectorRegistry) -> None:
        """What operators and alert rules watch: disk, state dir, workers, outputs."""
        self.state_write_errors = Counter(
            "n2s_state_write_errors",
            "Checkpoint or ledger writes to the state dir that failed",
            registry=registry,
        )
        self.source_blocked = Counter(
            "n2s_source_blocked_seconds",
            "Time sources waited on a full queue (backpressure)",
            registry=registry,
        )
        self.output_paused = Gauge(
            "n2s_output_paused",
            "1 while writing is held back because the output disk is (nearly) full",
            registry=registry,
        )
        self.sink_errors = Counter(
            "n2s_sink_errors",
            "Failures of sinks that are not required (viewers, "
            "republishing, the training tap) or of closing any sink, by sink",
            ["sink"],
            registry=registry,
        )
        self.frames_unwritten_at_stop = Counter(
            "n2s_frames_unwritten_at_stop",
            "Accepted frames not written because the stop "
            "bound passed (or the daemon stopped during a disk-full pause); a directory "
            "source reads them again at the next start",
            registry=registry,
        )
        self.unwritten_at_last_stop = Gauge(
            "n2s_frames_unwritten_at_last_stop",
            "Accepted frames the previous stop left unwritten (read from the state dir at start)",
            registry=registry,
        )
        self.worker_up = Gauge(
            "n2s_worker_up",
            "1 while the worker thread runs: source, inference, trainer, refiner, follower, http",
            ["worker"],
            registry=registry,
        )
        self.output_dropped = Counter(
            "n2s_output_dropped",
            "Messages an output could not send without blocking the "
            "pipeline (nobody reading, or reading too slowly), by output",
            ["output"],
            registry=registry,
        )

    def sink_error(self, sink: str) -> None:
        """Count one failure of the named sink (not required, or closing)."""
        self.sink_errors.labels(sink=sink).inc()

    def reject(self, reason: str, count: int = 1) -> None:
        """Count ``count`` rejected frames or files under ``reason``."""
        self.frames_rejected.labels(reason=reason).inc(count)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """Scrapes every few seconds are not events worth a log line."""


class MetricsServer:
    """The daemon's HTTP endpoint: Prometheus ``/metrics`` and, when given, the preview
    ``app`` around it; loopback unless an address is configured. Built, then `start`ed:
    only starting binds the port and starts the thread that serves it."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        port: int,
        addr: str = "127.0.0.1",
        app: Callable[..., Iterable[bytes]] | None = None,
    ) -> None:
        self._addr, self._app = addr, app or make_wsgi_app(registry)
        self._preview = app is not None
        self.port = port  # the port asked for; once started, the one bound (0: any free)
        self._server: ThreadingWSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind the port (OSError where it is taken) and serve it from a thread."""
        family = socket.getaddrinfo(
            self._addr, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0][0]

        class Server(ThreadingWSGIServer):
            address_family = family

        self._server = make_server(
            self._addr, self.port, self._app, server_class=Server, handler_class=_QuietHandler
        )
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)
        self._thread.start()
        log.info(
            "metrics on http://%s:%d/metrics%s",
            self._addr,
            self.port,
            f", live preview on http://{self._addr}:{self.port}/" if self._preview else "",
        )

    @property
    def alive(self) -> bool:
        """True while the HTTP thread serves."""
        return self._thread is not None and self._thread.is_alive()

    def close(self) -> None:
        """Stop serving and release the port (nothing to do if never started)."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)


class LatencyWindow:
    """Mean frame latency between two readings of the latency histogram."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self._sum = self._count = 0.0

    def mean_since_last(self) -> float:
        """Mean latency (s) of the frames written since the last call; NaN if none."""
        value = self._registry.get_sample_value
        total = value("n2s_frame_latency_seconds_sum") or 0.0
        count = value("n2s_frame_latency_seconds_count") or 0.0
        frames = count - self._count
        mean = (total - self._sum) / frames if frames else float("nan")
        self._sum, self._count = total, count
        return mean


def scrape(port: int, host: str = "127.0.0.1", timeout: float = 5.0) -> dict[str, float]:
    """Read a metrics endpoint as ``{'name{label="value"}': value}``; empty if unreachable.

    For the demo, benchmarks and tests: what Prometheus would see.
    """
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout) as reply:
            text = reply.read().decode()
    except OSError:
        return {}
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            values[sample.name + (f"{{{labels}}}" if labels else "")] = float(sample.value)
    return values
