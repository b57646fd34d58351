"""The daemon end to end against the bare model, frame size by frame size.

For each size, in one run:
1. the bare forward pass of the default model is timed (same torch threads, channels_last,
   ``torch.inference_mode``, one frame at a time, as the daemon on CPU);
2. a file of frames is written before the daemon starts, so no detector process competes
   for the cores, and the daemon (training on) denoises it flat out: frames/s from the
   first to the last frame written, from the output's provenance (``t_written``);
3. a detector then writes a second file at half that rate, and the latency from the
   daemon reading a frame to its write in the output (``t_written - t_received``) gives
   p50 / p99 while the trainer runs between frames;
4. the daemon's peak resident memory (VmHWM) is read, the daemon is stopped with SIGTERM,
   and the bare forward pass is timed again: the ratio divides by the mean of the two.

With several ``--threads`` (e.g. ``--threads 1 2``) each size is measured with each torch
thread count in turn, to choose between intra-op threads for the model and cores left to
the pipeline's other threads (reader, writer, trainer).

This machine's speed drifts between processes and minutes (the same bare forward has
measured 36 to 67 frames/s at 256x256), so a second ratio is measured inside the daemon at
the same moments: its written frames/s over the speed of its own forward passes during the
flat-out run (``n2s_forward_seconds``), i.e. the share of the time spent in the model.

Prints a table; writes ``benchmarks/results/daemon_throughput.json`` and ``.png``.

    python benchmarks/daemon_throughput.py                             # 256, 512, 1024, 2048
    python benchmarks/daemon_throughput.py --engine onnxruntime --out \
        benchmarks/results/daemon_throughput_onnxruntime.json
    python benchmarks/daemon_throughput.py --sizes 256 1024 --threads 1 2 --out \
        benchmarks/results/daemon_throughput_threads.json
    python benchmarks/daemon_throughput.py --sizes 64 --flat-seconds 2 --paced-seconds 2  # smoke
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
from common import (
    N2S,
    RESULTS,
    bare_forward_fps,
    free_port,
    peak_rss_mb,
    pyplot,
    save_figure,
    with_provenance,
)

from n2s_stream.runtime.metrics import scrape


def wait_for_written(port: int, count: int, daemon: subprocess.Popen, timeout: float) -> dict:
    """Poll the metrics until the daemon has written ``count`` frames; its metrics then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = scrape(port)
        if metrics.get("n2s_frames_denoised_total", 0.0) >= count:
            return metrics
        if daemon.poll() is not None:
            raise RuntimeError(f"daemon exited with {daemon.returncode}")
        time.sleep(0.2)
    raise TimeoutError(f"daemon wrote fewer than {count} frames in {timeout:.0f} s")


def provenance(
    out_dir: Path, series: str, rows: int = 0, timeout: float = 30.0
) -> tuple[np.ndarray, np.ndarray]:
    """``t_received`` and ``t_written`` of every frame of a series' output (read as an
    SWMR reader: the daemon may still hold it open), once it shows ``rows`` frames (they
    are flushed within ``flush_seconds`` of being written)."""
    (path,) = out_dir.glob(f"{series}*.h5")
    deadline = time.monotonic() + timeout
    while True:
        with h5py.File(path, "r", swmr=True) as output:
            received = output["/entry/provenance/t_received"][()]
            written = output["/entry/provenance/t_written"][()]
        if len(written) >= rows or time.monotonic() > deadline:
            return received, written
        time.sleep(0.2)


def measure_size(size: int, threads: int, args: argparse.Namespace, tmp: Path) -> dict:
    """Bare forward, daemon flat out, daemon at half rate, peak memory: one frame size
    with ``threads`` torch threads."""
    shape = (size, size)
    tmp = tmp / f"{size}-{threads}threads"
    tmp.mkdir()
    bare_before = bare_forward_fps(
        shape,
        threads,
        seconds=args.bare_seconds,
        compile=args.compile,
        min_passes=3,
        engine=args.engine,
    )
    flat_frames = max(12, int(bare_before * args.flat_seconds))
    acq, out = tmp / f"acq{size}", tmp / f"out{size}"
    acq.mkdir()
    simulate = [
        *N2S,
        "simulate",
        "--dir",
        str(acq),
        "--shape",
        f"{size}x{size}",
        "--log-level",
        "WARNING",
    ]
    subprocess.run(
        [*simulate, "--name", "flat", "--frames", str(flat_frames)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    port = free_port()
    daemon_log = (tmp / f"daemon{size}.log").open("w")
    daemon = subprocess.Popen(
        [
            *N2S,
            "--watch",
            str(acq),
            "--out",
            str(out),
            "--state-dir",
            str(tmp / f"state{size}"),
            "--metrics-port",
            str(port),
            "--device",
            "cpu",
            "--threads",
            str(threads),
            "--buffer-frames",
            str(args.buffer_frames),
            # At half rate big frames come seconds apart: a series must not end in between.
            "--settle-seconds",
            "60",
            "--no-cold-start",
            *(["--compile"] if args.compile else []),
            "--engine",
            args.engine,
            "--log-level",
            "INFO",
        ],
        stderr=daemon_log,
    )
    try:
        flat_metrics = wait_for_written(port, flat_frames, daemon, timeout=600)
        _, flat_written = provenance(out, "flat", flat_frames)
        flat_fps = (len(flat_written) - 1) / max(float(flat_written[-1] - flat_written[0]), 1e-9)
        own_forward_fps = flat_frames / flat_metrics["n2s_forward_seconds_sum"]
        rate = flat_fps / 2
        paced_frames = max(10, int(rate * args.paced_seconds))
        detector = subprocess.Popen(
            [
                *simulate,
                "--name",
                "paced",
                "--frames",
                str(paced_frames),
                "--rate",
                f"{rate:.4f}",
                "--seed",
                "1",
            ],
            stdout=subprocess.DEVNULL,
        )
        paced_metrics = wait_for_written(
            port, flat_frames + paced_frames, daemon, timeout=60 + 3 * paced_frames / rate
        )
        detector.wait(timeout=60)
        peak_rss = peak_rss_mb(daemon.pid)
    except (RuntimeError, TimeoutError):
        print((tmp / f"daemon{size}.log").read_text()[-3000:])
        raise
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=300)
        daemon_log.close()
    received, written = provenance(out, "paced")
    latency = written - received
    bare_after = bare_forward_fps(
        shape,
        threads,
        seconds=args.bare_seconds,
        compile=args.compile,
        min_passes=3,
        engine=args.engine,
    )
    bare = (bare_before + bare_after) / 2
    steps_flat = flat_metrics.get("n2s_train_steps_total", 0.0)
    return {
        "size": size,
        "threads": threads,
        "bare_fps_before": bare_before,
        "bare_fps_after": bare_after,
        "daemon_fps": flat_fps,
        "ratio": flat_fps / bare,
        "flat_frames": flat_frames,
        "own_forward_fps": own_forward_fps,
        "ratio_to_own_forward": flat_fps / own_forward_fps,
        "train_steps_flat": steps_flat,
        "paced_rate": rate,
        "paced_frames": paced_frames,
        "train_steps_paced": paced_metrics.get("n2s_train_steps_total", 0.0) - steps_flat,
        "latency_p50_s": float(np.percentile(latency, 50)),
        "latency_p99_s": float(np.percentile(latency, 99)),
        "peak_rss_mib": peak_rss,
        "exit_code": daemon.returncode,
    }


def print_row(r: dict, header: bool) -> None:
    """One table line per frame size."""
    if header:
        print(
            f"{'frame':>9} | {'threads':>7} | {'bare fwd/s before, after':>24} | "
            f"{'daemon/s':>8} | {'ratio':>5} | "
            f"{'own fwd/s':>9} | {'ratio':>5} | "
            f"{'paced at/s':>10} | {'p50 ms':>8} | {'p99 ms':>8} | {'train steps':>11} | "
            f"{'peak RSS MiB':>12}"
        )
    print(
        f"{r['size']:>4}x{r['size']:<4} | {r['threads']:7d} | "
        f"{r['bare_fps_before']:11.2f}, {r['bare_fps_after']:10.2f} | {r['daemon_fps']:8.2f} | "
        f"{r['ratio']:5.2f} | {r['own_forward_fps']:9.2f} | {r['ratio_to_own_forward']:5.2f} | "
        f"{r['paced_rate']:10.2f} | {r['latency_p50_s'] * 1000:8.0f} | "
        f"{r['latency_p99_s'] * 1000:8.0f} | "
        f"{r['train_steps_flat']:4.0f} /{r['train_steps_paced']:5.0f} | "
        f"{r['peak_rss_mib']:12.0f}",
        flush=True,
    )


def plot(rows: list[dict], path: Path) -> None:
    """Bare forward and daemon frames/s against frame size, log-log."""
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    thread_counts = sorted({r["threads"] for r in rows})
    for threads in thread_counts:
        mine = [r for r in rows if r["threads"] == threads]
        sizes = [r["size"] for r in mine]
        suffix = f", {threads} threads" if len(thread_counts) > 1 else ""
        ax.loglog(
            sizes,
            [(r["bare_fps_before"] + r["bare_fps_after"]) / 2 for r in mine],
            "o-",
            label="bare forward" + suffix,
        )
        ax.loglog(
            sizes,
            [r["daemon_fps"] for r in mine],
            "s-",
            label="daemon, file to SWMR output" + suffix,
        )
    sizes = sorted({r["size"] for r in rows})
    ax.set_xticks(sizes, [f"{s}²" for s in sizes])
    ax.set_xlabel("frame size")
    ax.set_ylabel("frames/s")
    ax.legend()
    save_figure(fig, path)


def main() -> None:
    """Measure every size, print the table, write JSON and the plot."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[2],
        help="torch thread counts, each measured at every size",
    )
    parser.add_argument("--buffer-frames", type=int, default=32)
    parser.add_argument("--bare-seconds", type=float, default=5.0)
    parser.add_argument(
        "--flat-seconds",
        type=float,
        default=20.0,
        help="about how long the flat-out file takes (frames chosen from the bare speed)",
    )
    parser.add_argument("--paced-seconds", type=float, default=20.0)
    parser.add_argument("--compile", action="store_true", help="daemon and bare model compiled")
    parser.add_argument(
        "--engine",
        default="torch",
        choices=("torch", "onnxruntime"),
        help="what runs the forward passes, in the daemon and the bare loop",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "daemon_throughput.json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            for threads in args.threads:
                rows.append(measure_size(size, threads, args, Path(tmp)))
                print_row(rows[-1], header=len(rows) == 1)
    report = {
        "benchmark": "daemon_throughput",
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
        "settings": vars(args) | {"out": str(args.out)},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(with_provenance(report), indent=2))
    plot(rows, args.out.with_suffix(".png"))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
