"""The live preview page on the metrics port: HTML, status, images that follow the stream,
read-only; and (marked `browser`) rendered by a real headless Chromium."""

from __future__ import annotations

import io
import re
import shutil
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from n2s_stream.runtime.preview import stretch_to_png
from tests.helpers.daemon import DaemonProcess, chromium_dom, start_writer


def _get(port: int, path: str, method: str = "GET") -> tuple[int, str, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, reply.headers["Content-Type"], reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


def test_png_is_contrast_stretched_and_bounded():
    image = np.linspace(100, 200, 1100 * 700, dtype=np.float32).reshape(1100, 700)
    image[0, 0] = np.nan
    png = Image.open(io.BytesIO(stretch_to_png(image)))
    pixels = np.asarray(png)
    assert png.mode == "L" and max(png.size) <= 512
    assert pixels.min() == 0 and pixels.max() == 255


def test_page_status_and_images_follow_the_stream(tmp_path):
    daemon = DaemonProcess(tmp_path)
    daemon.wait_ready()
    writer = start_writer(daemon.watch, frames=200, rate=10)
    daemon.wait_for_metric("n2s_frames_denoised_total", 1)
    time.sleep(2.5)  # the page's history is sampled every 2 s
    status, kind, body = _get(daemon.port, "/")
    assert status == 200 and kind.startswith("text/html")
    assert b"n2s-stream live preview" in body and b"<script" in body
    assert b"http://" not in body.replace(b'href="/metrics"', b"")  # no external assets

    def status_json():
        import json

        return json.loads(_get(daemon.port, "/status.json")[2])

    first = status_json()
    assert first["series"]["scan_0001"]["frame"] >= 0, (first, daemon.log()[-2000:])
    assert first["state"]["source"].endswith("(following)")
    assert first["history"] and "fps" in first["history"][-1]
    images = {}
    for kind_ in ("raw", "denoised"):
        status, kind, png = _get(daemon.port, f"/preview/scan_0001/{kind_}.png")
        assert status == 200 and kind == "image/png"
        assert Image.open(io.BytesIO(png)).size == (48, 48)
        images[kind_] = png
    assert images["raw"] != images["denoised"]
    time.sleep(1.5)
    later = status_json()
    assert later["series"]["scan_0001"]["frame"] > first["series"]["scan_0001"]["frame"]
    assert _get(daemon.port, "/preview/scan_0001/raw.png")[2] != images["raw"]
    # read-only, and no path leads anywhere but the daemon's own table
    assert _get(daemon.port, "/", method="POST")[0] == 405
    assert _get(daemon.port, "/preview/..%2F..%2Fetc%2Fpasswd/raw.png")[0] == 404
    assert _get(daemon.port, "/preview/scan_0001/../../state.png")[0] == 404
    assert daemon.scrape()["n2s_frames_denoised_total"] > 0  # /metrics as before
    writer.kill()
    writer.wait(timeout=30)
    assert daemon.terminate() == 0


@pytest.mark.browser
def test_page_renders_and_updates_in_headless_chromium(tmp_path):
    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        pytest.skip("no chromium (Debian: apt install chromium)")
    daemon = DaemonProcess(tmp_path)
    daemon.wait_ready()
    writer = start_writer(daemon.watch, frames=400, rate=20)
    daemon.wait_for_metric("n2s_frames_denoised_total", 1)
    time.sleep(2.5)
    # no background networking: this machine's network is closed, and the page needs none
    proc = chromium_dom(f"http://127.0.0.1:{daemon.port}/", tmp_path / "ud")
    writer.kill()
    writer.wait(timeout=30)
    assert daemon.terminate() == 0
    dom = proc.stdout
    assert "n2s-stream live preview" in dom, proc.stderr[-2000:]
    loads = {
        kind: int(m)
        for kind, m in re.findall(r'id="img-(raw|denoised)-scan_0001"[^>]*data-loads="(\d+)"', dom)
    }
    # both images decoded (a broken image never fires "load") and were replaced by newer ones
    assert loads.get("raw", 0) >= 2 and loads.get("denoised", 0) >= 2, dom[-3000:]
    assert re.search(r"frames written: [1-9]", dom)
