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
            return _reply(start, "200 OK", "text/html; charset=utf-8", PAGE.encode())
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


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>n2s-stream live preview</title>
<style>
body { font-family: sans-serif; margin: 1em; background: #111; color: #ddd; }
h1 { font-size: 1.2em; } h2 { font-size: 1em; margin: 0.8em 0 0.3em; }
.pair { display: flex; gap: 1em; flex-wrap: wrap; }
figure { margin: 0; } figcaption { font-size: 0.8em; color: #aaa; }
img { image-rendering: pixelated; width: 320px; background: #000; }
canvas { background: #1b1b1b; margin-right: 1em; }
#state { font-family: monospace; white-space: pre; color: #9c9; }
a { color: #8af; }
</style></head><body>
<h1>n2s-stream live preview</h1>
<div id="state">loading...</div>
<div id="plots">
<canvas id="fps" width="300" height="120"></canvas>
<canvas id="latency" width="300" height="120"></canvas>
<canvas id="loss" width="300" height="120"></canvas>
</div>
<div id="series"></div>
<p><a href="/metrics">/metrics</a> (Prometheus) &middot; <a href="/status.json">/status.json</a></p>
<script>
"use strict";
let loads = 0;
function plot(id, history, key, label) {
  const c = document.getElementById(id), g = c.getContext("2d");
  g.clearRect(0, 0, c.width, c.height);
  const pts = history.filter(p => typeof p[key] === "number" && Number.isFinite(p[key]));
  g.fillStyle = "#aaa"; g.font = "11px sans-serif";
  const last = pts.length ? pts[pts.length - 1][key] : NaN;
  g.fillText(label + ": " + (Number.isFinite(last) ? last.toPrecision(3) : "-"), 4, 12);
  if (pts.length < 2) return;
  const t0 = pts[0].t, t1 = pts[pts.length - 1].t;
  let lo = Math.min(...pts.map(p => p[key])), hi = Math.max(...pts.map(p => p[key]));
  if (hi - lo < 1e-12) { hi += 1; lo -= 1; }
  g.strokeStyle = "#6cf"; g.beginPath();
  pts.forEach((p, i) => {
    const x = (p.t - t0) / Math.max(t1 - t0, 1e-9) * (c.width - 8) + 4;
    const y = c.height - 4 - (p[key] - lo) / (hi - lo) * (c.height - 22);
    if (i) g.lineTo(x, y); else g.moveTo(x, y);
  });
  g.stroke();
}
function figure(series, kind) {
  const f = document.createElement("figure"), img = document.createElement("img");
  img.id = "img-" + kind + "-" + series; img.alt = kind + " " + series;
  img.addEventListener("load", () => { loads += 1; img.dataset.loads =
    String(Number(img.dataset.loads || 0) + 1); document.body.dataset.loads = String(loads); });
  const cap = document.createElement("figcaption"); cap.textContent = kind;
  f.append(img, cap); return f;
}
async function refresh() {
  try {
    const status = await (await fetch("/status.json", {cache: "no-store"})).json();
    const s = status.state;
    document.getElementById("state").textContent = Object.entries(s)
      .map(([k, v]) => k + ": " + v).join("\\n");
    plot("fps", status.history, "fps", "frames/s");
    plot("latency", status.history, "latency_s", "latency (s)");
    plot("loss", status.history, "selfsup_val_loss", "held-out masked loss");
    const box = document.getElementById("series");
    for (const [name, info] of Object.entries(status.series)) {
      let div = document.getElementById("series-" + name);
      if (!div) {
        div = document.createElement("div"); div.id = "series-" + name;
        const h = document.createElement("h2"), pair = document.createElement("div");
        pair.className = "pair"; pair.append(figure(name, "raw"), figure(name, "denoised"));
        div.append(h, pair); box.append(div);
      }
      div.querySelector("h2").textContent = name + ": frame " + info.frame;
      if (div.dataset.frame !== String(info.frame)) {
        div.dataset.frame = String(info.frame);
        for (const kind of ["raw", "denoised"]) {
          document.getElementById("img-" + kind + "-" + name).src =
            "/preview/" + encodeURIComponent(name) + "/" + kind + ".png?f=" + info.frame;
        }
      }
    }
    for (const div of [...box.children]) {
      if (!(div.id.slice(7) in status.series)) div.remove();
    }
  } catch (e) {
    document.getElementById("state").textContent = "daemon not answering: " + e;
  }
}
refresh(); setInterval(refresh, 1000);
</script></body></html>
"""
