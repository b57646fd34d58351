"""The live preview page, served from the metrics port at ``/``.

For each active series, the latest raw and denoised frame side by side (contrast-stretched
PNGs), plots of frames/s, latency and the self-supervised loss over the last minutes, the
model version and what the source is doing. Plain HTML and a few lines of inline
JavaScript from the daemon itself: no build step, no external assets, read-only (GET only),
bound where the metrics are (loopback unless configured).

Routes: ``/`` the page, ``/status.json`` what it shows, ``/preview/<series>/raw.png`` and
``/denoised.png`` the images, ``/metrics`` Prometheus.
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import unquote

import numpy as np
from PIL import Image

HISTORY_SECONDS = 600.0
PREVIEW_MAX_SIDE = 512  # images are shown at most this large (every k-th pixel)
MAX_SERIES_SHOWN = 4


def stretch_to_png(image: np.ndarray) -> bytes:
    """A 2-D frame as an 8-bit grey PNG, contrast stretched between its 1st and 99th
    percentiles (NaN/inf shown black), shrunk by striding to at most 512 pixels a side."""
    step = max(1, -(-max(image.shape) // PREVIEW_MAX_SIDE))
    image = np.asarray(image[::step, ::step], dtype=np.float32)
    finite = np.isfinite(image)
    if finite.any():
        low, high = np.percentile(image[finite], [1, 99])
    else:
        low, high = 0.0, 1.0
    scaled = (np.where(finite, image, low) - low) / max(float(high - low), 1e-12)
    grey = (np.clip(scaled, 0, 1) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(grey, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class _Latest:
    index: int
    raw: np.ndarray
    denoised: np.ndarray
    at: float


class Preview:
    """What the page shows: the newest frames per series (set by the inference thread)
    and a short history of rates and losses (sampled by the daemon's main loop)."""

    def __init__(self, history_seconds: float = HISTORY_SECONDS) -> None:
        self._lock = threading.Lock()
        self._latest: dict[str, _Latest] = {}
        self._history: deque[dict[str, float]] = deque()
        self._history_seconds = history_seconds
        self._state: dict[str, Any] = {}

    def show(self, series: str, index: int, raw: np.ndarray, denoised: np.ndarray) -> None:
        """Remember the newest frame of ``series`` (references only: no copy, no encode);
        the page keeps the few series that had frames most recently."""
        with self._lock:
            self._latest[series] = _Latest(index, raw, denoised, time.time())
            while len(self._latest) > MAX_SERIES_SHOWN:
                oldest = min(self._latest, key=lambda name: self._latest[name].at)
                del self._latest[oldest]

    def sample(self, values: dict[str, float], state: dict[str, Any]) -> None:
        """Add a point to the plots (``values``: time series) and replace the state text."""
        now = time.time()
        with self._lock:
            self._history.append({"t": now, **values})
            while self._history and now - self._history[0]["t"] > self._history_seconds:
                self._history.popleft()
            self._state = dict(state)

    def status(self) -> dict[str, Any]:
        """Everything the page shows except the images, as JSON-ready data."""
        with self._lock:
            series = {
                name: {"frame": latest.index, "age_s": time.time() - latest.at}
                for name, latest in sorted(self._latest.items())
            }
            return {"state": self._state, "series": series, "history": list(self._history)}

    def png(self, series: str, kind: str) -> bytes | None:
        """The newest ``raw`` or ``denoised`` frame of a series as PNG; None if unknown."""
        with self._lock:
            latest = self._latest.get(series)
        if latest is None or kind not in ("raw", "denoised"):
            return None
        return stretch_to_png(latest.raw if kind == "raw" else latest.denoised)


Start = Callable[[str, list[tuple[str, str]]], Any]


def preview_app(preview: Preview, metrics_app: Callable[..., Iterable[bytes]]):
    """The WSGI application of the metrics port: the page, its data and ``/metrics``."""

    def app(environ: dict[str, Any], start: Start) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if environ.get("REQUEST_METHOD", "GET") not in ("GET", "HEAD"):
            return _reply(
                start,
                "405 Method Not Allowed",
                "text/plain",
                b"read-only\n",
                [("Allow", "GET, HEAD")],
            )
        if path == "/metrics":
            return metrics_app(environ, start)
        if path in ("/", "/index.html"):
            return _reply(start, "200 OK", "text/html; charset=utf-8", page())
        if path == "/status.json":
            body = json.dumps(_finite(preview.status())).encode()
            return _reply(start, "200 OK", "application/json", body)
        parts = path.split("/")
        if len(parts) == 4 and parts[1] == "preview" and parts[3].endswith(".png"):
            # the series name is only ever a key into the daemon's own table
            image = preview.png(unquote(parts[2]), parts[3].removesuffix(".png"))
            if image is not None:
                return _reply(start, "200 OK", "image/png", image)
        return _reply(start, "404 Not Found", "text/plain", b"not found\n")

    return app


def _finite(value: Any) -> Any:
    """JSON has no NaN: a value not yet measured is sent as null."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, float | np.floating):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _reply(
    start: Start, status: str, kind: str, body: bytes, headers: list[tuple[str, str]] | None = None
) -> list[bytes]:
    start(
        status,
        [
            ("Content-Type", kind),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
            *(headers or []),
        ],
    )
    return [body]


def page() -> bytes:
    """The page itself (``preview.html``, package data: HTML and its few lines of script)."""
    return resources.files("n2s_stream.runtime").joinpath("preview.html").read_bytes()
