"""``n2s-stream demo``: a simulated detector, the daemon learning from it, quality live.

Starts ``n2s-stream simulate`` (a growing SWMR file of a drifting scene with Poisson noise,
clean truth kept aside) and the daemon on it as two processes, then every few seconds
reads the daemon's output like a live viewer would (SWMR) and prints a row: frames in and
out, model version, PSNR of the newest frames against the truth (noisy vs denoised) and
the self-supervised validation loss the daemon exports (which needs no truth).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np

from n2s_stream.metrics import scrape
from n2s_stream.quality import psnr
from n2s_stream.simulate import truth_path

DEMO_SHAPE = "96x96"
DEMO_DOSE = 20.0
DEMO_RATE = 6.0  # frames per second
NEWEST = 12  # frames scored per row


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _newest_quality(output: Path, source: Path, truth: np.ndarray) -> tuple[float, float, int]:
    """PSNR of the newest denoised frames and of the same noisy frames, and the count."""
    try:
        with h5py.File(output, "r", swmr=True) as out:
            n = out["/entry/provenance/t_written"].shape[0]
            if n == 0:
                return float("nan"), float("nan"), 0
            index = out["/entry/provenance/source_frame"][max(0, n - NEWEST) : n]
            denoised = out["/entry/data/data"][max(0, n - NEWEST) : n]
        with h5py.File(source, "r", swmr=True) as src:
            noisy = src["/entry/data/data"][index[0] : index[-1] + 1].astype(np.float32)
    except (OSError, KeyError):
        return float("nan"), float("nan"), 0
    clean = truth[index] * DEMO_DOSE
    return psnr(clean, noisy, DEMO_DOSE), psnr(clean, denoised, DEMO_DOSE), n


def run_demo(work_dir: Path, *, seconds: float = 60.0) -> None:
    """Run simulator and daemon for about ``seconds`` and print quality as it improves."""
    work_dir = Path(work_dir).resolve()
    acq, out, state = work_dir / "acq", work_dir / "out", work_dir / "state"
    for folder in (acq, out, state):
        folder.mkdir(parents=True, exist_ok=True)
    name = f"demo_{time.strftime('%Y%m%d_%H%M%S')}"
    frames = int(seconds * DEMO_RATE)
    port = _free_port()
    command = [sys.executable, "-m", "n2s_stream"]
    log = open(work_dir / "daemon.log", "w")  # noqa: SIM115 (closed below)
    daemon = subprocess.Popen(
        [*command, "--watch", str(acq), "--out", str(out), "--state-dir", str(state),
         "--metrics-port", str(port), "--device", "cpu", "--publish-every", "25",
         "--settle-seconds", "3"], stdout=log, stderr=subprocess.STDOUT)
    detector = subprocess.Popen(
        [*command, "simulate", "--dir", str(acq), "--frames", str(frames), "--rate",
         str(DEMO_RATE), "--shape", DEMO_SHAPE, "--dose", str(DEMO_DOSE), "--name", name,
         "--log-level", "WARNING"], stdout=subprocess.DEVNULL)
    source, output = acq / f"{name}.h5", out / f"{name}_n2s.h5"
    print(f"detector: {frames} frames {DEMO_SHAPE} at {DEMO_RATE:g}/s, Poisson dose "
          f"{DEMO_DOSE:g} counts -> {source}")
    print(f"daemon:   n2s-stream --watch {acq} --out {out}  (log: {work_dir / 'daemon.log'},"
          f" metrics: http://127.0.0.1:{port}/metrics)")
    print(f"{'elapsed':>7} {'in':>5} {'out':>5} {'model':>5} {'PSNR noisy':>10} "
          f"{'PSNR n2s':>9} {'self-sup val loss':>17}")
    started = time.monotonic()
    truth = None
    try:
        while True:
            time.sleep(5)
            if truth is None and truth_path(source).exists():
                with h5py.File(truth_path(source), "r") as handle:
                    truth = handle["clean"][()]
            metrics = scrape(port)
            noisy_db, denoised_db, written = (_newest_quality(output, source, truth)
                                              if truth is not None else (np.nan, np.nan, 0))
            received = metrics.get("n2s_frames_received_total", 0)
            version = metrics.get("n2s_model_version", 0)
            val_loss = metrics.get("n2s_selfsup_val_loss", float("nan"))
            print(f"{time.monotonic() - started:6.0f}s {received:5.0f} {written:5d} "
                  f"{version:5.0f} {noisy_db:8.2f}dB {denoised_db:7.2f}dB {val_loss:17.4f}",
                  flush=True)
            if detector.poll() is not None and written >= frames:
                break
            if daemon.poll() is not None:
                print("the daemon stopped unexpectedly; see its log")
                break
    finally:
        detector.terminate()
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=120)
        detector.wait(timeout=30)
        log.close()
    print(f"denoised series: {output} (raw: {source}); the daemon stopped with status "
          f"{daemon.returncode}")
