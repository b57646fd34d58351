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


def run_demo(work_dir: Path, *, seconds: float = 60.0, context_frames: int = 1) -> None:
    """Run simulator and daemon for about ``seconds`` and print quality as it improves.

    With ``context_frames`` K > 1 a second daemon, seeing K frames at a time, follows the
    same acquisition, and its PSNR is printed beside the single-frame one: the margin
    temporal context gains online, measured in one run on the same frames.
    """
    work_dir = Path(work_dir).resolve()
    acq = work_dir / "acq"
    acq.mkdir(parents=True, exist_ok=True)
    name = f"demo_{time.strftime('%Y%m%d_%H%M%S')}"
    frames = int(seconds * DEMO_RATE)
    command = [sys.executable, "-m", "n2s_stream"]
    variants = [("n2s", "", [])]
    if context_frames > 1:
        variants.append((f"K={context_frames}", f"_k{context_frames}",
                         ["--context-frames", str(context_frames)]))
    daemons = [_start_daemon(command, work_dir, acq, suffix, extra)
               for _, suffix, extra in variants]
    detector = subprocess.Popen(
        [*command, "simulate", "--dir", str(acq), "--frames", str(frames), "--rate",
         str(DEMO_RATE), "--shape", DEMO_SHAPE, "--dose", str(DEMO_DOSE), "--name", name,
         "--log-level", "WARNING"], stdout=subprocess.DEVNULL)
    source = acq / f"{name}.h5"
    print(f"detector: {frames} frames {DEMO_SHAPE} at {DEMO_RATE:g}/s, Poisson dose "
          f"{DEMO_DOSE:g} counts -> {source}")
    for (label, _, extra), daemon in zip(variants, daemons, strict=True):
        print(f"daemon {label}: n2s-stream --watch {acq} --out {daemon.out} {' '.join(extra)}"
              f" (log: {daemon.log_path}; live preview: http://127.0.0.1:{daemon.port}/)")
    psnr_columns = " ".join(f"{'PSNR ' + label:>9}" for label, _, _ in variants)
    print(f"{'elapsed':>7} {'in':>5} {'out':>5} {'model':>5} {'PSNR noisy':>10} "
          f"{psnr_columns} {'self-sup val loss':>17} {'denoiser':>9}")
    started = time.monotonic()
    truth = None
    try:
        while True:
            time.sleep(5)
            if truth is None and truth_path(source).exists():
                with h5py.File(truth_path(source), "r") as handle:
                    truth = handle["clean"][()]
            scores = _print_row(daemons, name, source, truth, time.monotonic() - started)
            if detector.poll() is not None and all(n >= frames for _, _, n in scores):
                break
            if any(d.process.poll() is not None for d in daemons):
                print("a daemon stopped unexpectedly; see its log")
                break
    finally:
        detector.terminate()
        for daemon in daemons:
            daemon.stop()
        detector.wait(timeout=30)
    statuses = ", ".join(str(d.process.returncode) for d in daemons)
    print(f"denoised series: {daemons[0].out / f'{name}_n2s.h5'} (raw: {source}); the daemon "
          f"stopped with status {statuses}")


def _print_row(daemons: list[_DemoDaemon], name: str, source: Path, truth: np.ndarray | None,
               elapsed: float) -> list[tuple[float, float, int]]:
    """One line of the demo's table (PSNR of each daemon's newest frames against the
    truth, the first daemon's metrics); returns each daemon's (noisy dB, dB, written)."""
    metrics = scrape(daemons[0].port)
    scores = [_newest_quality(d.out / f"{name}_n2s.h5", source, truth)
              if truth is not None else (np.nan, np.nan, 0) for d in daemons]
    noisy_db, _, written = scores[0]
    received = metrics.get("n2s_frames_received_total", 0)
    version = metrics.get("n2s_model_version", 0)
    val_loss = metrics.get("n2s_selfsup_val_loss", float("nan"))
    denoiser = "classical" if metrics.get("n2s_cold_start_active") else "network"
    columns = " ".join(f"{db:7.2f}dB" for _, db, _ in scores)
    print(f"{elapsed:6.0f}s {received:5.0f} {written:5d} {version:5.0f} {noisy_db:8.2f}dB "
          f"{columns} {val_loss:17.4f} {denoiser:>9}", flush=True)
    return scores


class _DemoDaemon:
    """One daemon process of the demo, with its output folder, log and metrics port."""

    def __init__(self, process: subprocess.Popen, out: Path, log_path: Path, log, port: int):
        self.process, self.out, self.log_path, self._log, self.port = (process, out, log_path,
                                                                      log, port)

    def stop(self) -> None:
        """SIGTERM and wait for the drain."""
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=120)
        self._log.close()


def _start_daemon(command: list[str], work_dir: Path, acq: Path, suffix: str,
                  extra: list[str]) -> _DemoDaemon:
    out, state = work_dir / f"out{suffix}", work_dir / f"state{suffix}"
    port = _free_port()
    log_path = work_dir / f"daemon{suffix}.log"
    log = open(log_path, "w")  # noqa: SIM115 (closed by _DemoDaemon.stop)
    process = subprocess.Popen(
        [*command, "--watch", str(acq), "--out", str(out), "--state-dir", str(state),
         "--metrics-port", str(port), "--device", "cpu", "--publish-every", "25",
         "--settle-seconds", "3", *extra], stdout=log, stderr=subprocess.STDOUT)
    return _DemoDaemon(process, out, log_path, log, port)
