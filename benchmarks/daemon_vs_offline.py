"""Throughput as a user sees it: the daemon flat out on a pre-written file against offline
``denoise`` of the same frames with the daemon's own checkpoint.

In one run, on one machine:
1. a detector writes N frames (default 400 of 256x256) into a file before anything else
   runs, so no process competes for the cores;
2. for each daemon variant (default: training on, cold start off, as a beamline runs it;
   ``--variants`` adds ``no-train`` and batched inference), a fresh daemon denoises the
   file flat out: frames/s from the first to the last ``t_written`` of its output; its
   own forward passes (``n2s_forward_seconds``) give the share of the wall time spent in
   the model, and the rest is what the pipeline costs;
3. offline ``denoise`` (in this process, as ``n2s-stream denoise`` runs it) denoises the
   same file with the checkpoint the first daemon saved when it stopped: frames/s of the
   whole call (read, denoise, write), and the share spent in forward passes.
The offline run is repeated before and after the daemons and averaged, since this
machine's speed drifts (``machine_noise.py``).

Prints a table; writes ``benchmarks/results/daemon_vs_offline.json``.

    python benchmarks/daemon_vs_offline.py
    python benchmarks/daemon_vs_offline.py --frames 60 --shape 64x64   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from common import N2S, RESULTS, free_port, with_provenance

from n2s_stream.commands.offline import denoise
from n2s_stream.config import DenoiseConfig
from n2s_stream.n2s import denoising
from n2s_stream.options import make
from n2s_stream.runtime.metrics import scrape
from n2s_stream.runtime.state import newest_checkpoint

VARIANTS = {
    "daemon": [],
    "daemon no-train": ["--no-train"],
    "daemon max_batch 8": ["--max-batch", "8"],
}


def run_daemon(acq: Path, work: Path, n_frames: int, extra: list[str]) -> dict:
    """One daemon over the pre-written file until every frame is written; its rates."""
    port = free_port()
    log = open(work / "daemon.log", "w")  # noqa: SIM115 (closed below)
    daemon = subprocess.Popen(
        [
            *N2S,
            "--watch",
            str(acq),
            "--out",
            str(work / "out"),
            "--state-dir",
            str(work / "state"),
            "--device",
            "cpu",
            "--metrics-port",
            str(port),
            "--no-cold-start",
            "--settle-seconds",
            "1",
            "--log-level",
            "WARNING",
            *extra,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 1800
        metrics: dict = {}
        while metrics.get("n2s_frames_denoised_total", 0) < n_frames:
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"daemon stopped early: {(work / 'daemon.log').read_text()}")
            time.sleep(0.5)
            metrics = scrape(port)
        daemon.send_signal(signal.SIGTERM)
        if daemon.wait(timeout=300) != 0:
            raise SystemExit(f"daemon exit {daemon.returncode}")
    finally:
        if daemon.poll() is None:
            daemon.kill()
        log.close()
    with h5py.File(work / "out" / "scan_0001_n2s.h5") as handle:
        written = handle["/entry/provenance/t_written"][()]
        frames = handle["/entry/provenance/source_frame"][()]
    assert frames.tolist() == list(range(n_frames)), "every frame once, in order"
    seconds = float(written[-1] - written[0])
    forward = metrics["n2s_forward_seconds_sum"] * (n_frames - 1) / n_frames
    return {
        "fps": (n_frames - 1) / seconds,
        "seconds": seconds,
        "forward_share": forward / seconds,
        "train_steps": metrics.get("n2s_train_steps_total", 0.0),
    }


def run_offline(source: Path, checkpoint: Path, out: Path) -> dict:
    """Offline ``denoise`` in this process; its rate and its forward passes' share."""
    spent = [0.0]
    inner = denoising.denoise_normalized

    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - started

    denoising.denoise_normalized = timed  # count forward time the way the daemon does
    try:
        out.unlink(missing_ok=True)
        started = time.perf_counter()
        result = denoise(
            make(DenoiseConfig, h5=source, ckpt=checkpoint, out=out, device="cpu", progress=False)
        )
        seconds = time.perf_counter() - started
    finally:
        denoising.denoise_normalized = inner
    return {
        "fps": result.n_frames / seconds,
        "seconds": seconds,
        "forward_share": spent[0] / seconds,
    }


def main() -> None:
    """Measure, print, save."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=400)
    parser.add_argument("--shape", default="256x256")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=RESULTS / "daemon_vs_offline.json")
    args = parser.parse_args()
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        acq = tmp_path / "acq"
        subprocess.run(
            [
                *N2S,
                "simulate",
                "--dir",
                str(acq),
                "--frames",
                str(args.frames),
                "--shape",
                args.shape,
                "--log-level",
                "WARNING",
            ],
            check=True,
        )
        source = acq / "scan_0001.h5"
        first = None
        offline_runs = []
        for name in args.variants:
            work = tmp_path / name.replace(" ", "_")
            work.mkdir()
            rows[name] = run_daemon(acq, work, args.frames, VARIANTS[name])
            if first is None:
                first = newest_checkpoint(work / "state" / "checkpoints")
                assert first is not None, "the daemon saved no checkpoint"
                offline_runs.append(run_offline(source, first.path, tmp_path / "offline.h5"))
            print(f"{name}: {rows[name]['fps']:.2f} frames/s", flush=True)
        assert first is not None
        offline_runs.append(run_offline(source, first.path, tmp_path / "offline.h5"))
    offline = {key: float(np.mean([run[key] for run in offline_runs])) for key in offline_runs[0]}
    offline["runs_fps"] = [run["fps"] for run in offline_runs]
    print(
        f"\n{args.frames} frames {args.shape}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads\n"
    )
    print(f"{'run':<22} {'frames/s':>9} {'/ offline':>10} {'in forward':>11} {'train steps':>12}")
    print(
        f"{'offline denoise':<22} {offline['fps']:9.2f} {1.0:10.2f} "
        f"{offline['forward_share']:10.0%} {'':>12}"
    )
    for name, row in rows.items():
        row["ratio_to_offline"] = row["fps"] / offline["fps"]
        print(
            f"{name:<22} {row['fps']:9.2f} {row['ratio_to_offline']:10.2f} "
            f"{row['forward_share']:10.0%} {row['train_steps']:12.0f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            with_provenance(
                {
                    "frames": args.frames,
                    "shape": args.shape,
                    "offline": offline,
                    "daemons": rows,
                    "machine": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(),
                    "torch": torch.__version__,
                }
            ),
            indent=2,
        )
        + "\n"
    )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
