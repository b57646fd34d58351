"""Soak: hours of a beamline compressed into minutes, and whether the daemon stays flat.

A detector process PUSHes small frames over ZeroMQ at a high rate, series after series
(each series is one output file opened, written and closed); the daemon (training on)
follows. Every second its resident memory, open file descriptors and threads are read
from /proc. Printed: a table over time, the RSS slope over the second half (MiB per hour of
soak), the fd and thread ranges, and frames sent vs written (must be equal).
Writes ``benchmarks/results/soak.json`` and ``.png``.

    python benchmarks/soak.py                        # 5 minutes, 150 frames/s, 32x32
    python benchmarks/soak.py --minutes 0.3          # smoke
    python benchmarks/soak.py --trace                # also trace memory (traced_daemon.py)

With ``--trace`` the daemon runs under ``traced_daemon.py``, which samples what Python,
glibc's malloc and the garbage collector hold; the report then gives each one's slope over
the second half beside the RSS slope, to tell a leak from allocator fragmentation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import (
    N2S,
    RESULTS,
    STARTED,
    free_port,
    proc_status,
    pyplot,
    save_figure,
    with_provenance,
)

from n2s_stream.runtime.metrics import scrape


def process_sample(pid: int) -> tuple[float, int, int]:
    """(RSS MiB, open file descriptors, threads) of a running process."""
    status = proc_status(pid)
    return (
        status.get("VmRSS", float("nan")) / 1024,
        len(os.listdir(f"/proc/{pid}/fd")),
        status.get("Threads", 0),
    )


def main() -> None:
    """Soak, sample, report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--rate", type=float, default=150.0, help="detector frames/s")
    parser.add_argument("--shape", default="32x32")
    parser.add_argument("--series-frames", type=int, default=100, help="frames per series")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--trace", action="store_true", help="run the daemon under traced_daemon.py (slower Python)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "soak.json")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    trace_path = args.out.with_suffix(".trace.jsonl")
    if args.trace:  # the samples follow this first line (traced_daemon.py appends them)
        trace_path.write_text(json.dumps({"provenance": STARTED}) + "\n")
    else:
        trace_path.unlink(missing_ok=True)
    launcher = (
        [sys.executable, str(Path(__file__).with_name("traced_daemon.py"))] if args.trace else N2S
    )
    n_series = max(1, round(args.minutes * 60 * args.rate / args.series_frames))
    sent = n_series * args.series_frames
    port, endpoint = free_port(), f"tcp://127.0.0.1:{free_port()}"
    with tempfile.TemporaryDirectory() as tmp:
        daemon = subprocess.Popen(
            [
                *launcher,
                "--zmq",
                endpoint,
                "--out",
                f"{tmp}/out",
                "--state-dir",
                f"{tmp}/state",
                "--metrics-port",
                str(port),
                "--device",
                "cpu",
                "--threads",
                str(args.threads),
                "--checkpoint-every",
                "10",
                "--log-level",
                "WARNING",
            ],
            env=os.environ | {"TRACED_DAEMON_OUT": str(trace_path)},
        )
        while not scrape(port):
            if daemon.poll() is not None:
                raise SystemExit(f"the daemon exited with status {daemon.returncode}")
            time.sleep(0.2)
        detector = subprocess.Popen(
            [
                *N2S,
                "simulate",
                "--zmq-bind",
                endpoint,
                "--frames",
                str(args.series_frames),
                "--series",
                str(n_series),
                "--shape",
                args.shape,
                "--rate",
                str(args.rate),
                "--log-level",
                "WARNING",
            ]
        )
        samples = []  # (seconds, frames written, rss MiB, fds, threads)
        started = time.monotonic()
        written = 0.0
        deadline = started + args.minutes * 60 * 3 + 60
        while written < sent and time.monotonic() < deadline:
            written = scrape(port).get("n2s_frames_denoised_total", 0.0)
            samples.append((time.monotonic() - started, written, *process_sample(daemon.pid)))
            time.sleep(1.0)
        elapsed = time.monotonic() - started
        metrics = scrape(port)
        detector.wait(timeout=60)
        daemon.send_signal(signal.SIGTERM)
        status = daemon.wait(timeout=120)
        outputs = len(list(Path(f"{tmp}/out").glob("*_n2s.h5")))
    times, counts, rss, fds, threads = (np.array(c) for c in zip(*samples, strict=True))
    half = times >= times[-1] / 2
    slope_per_hour, slope_error = rss_slope(times[half], rss[half])
    print(f"{'seconds':>8} {'written':>8} {'RSS MiB':>8} {'fds':>5} {'threads':>8}")
    for k in np.linspace(0, len(times) - 1, min(11, len(times))).astype(int):
        print(f"{times[k]:8.0f} {counts[k]:8.0f} {rss[k]:8.1f} {fds[k]:5d} {threads[k]:8d}")
    rejected = sum(v for k, v in metrics.items() if k.startswith("n2s_frames_rejected_total"))
    print(
        f"{sent} frames in {n_series} series ({args.shape}) in {elapsed:.0f} s "
        f"({written / elapsed:.0f} frames/s); written {written:.0f}, rejected {rejected:.0f}, "
        f"missing {metrics.get('n2s_frames_missing_total', 0):.0f}; {outputs} output files; "
        f"daemon exit {status}"
    )
    print(
        f"second half: RSS {rss[half].min():.1f}-{rss[half].max():.1f} MiB, slope "
        f"{slope_per_hour:+.1f} ± {slope_error:.1f} MiB/hour (95 %); "
        f"fds {fds[half].min()}-{fds[half].max()}; "
        f"threads {threads[half].min()}-{threads[half].max()}; "
        f"train steps {metrics.get('n2s_train_steps_total', 0):.0f}"
    )
    report = {
        "benchmark": "soak",
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
        "settings": vars(args) | {"out": str(args.out)},
        "frames_sent": sent,
        "frames_written": written,
        "series": n_series,
        "output_files": outputs,
        "seconds": elapsed,
        "daemon_exit": status,
        "rss_slope_mib_per_hour": slope_per_hour,
        "rss_slope_95ci": slope_error,
        "second_half": {
            "rss_mib": [float(rss[half].min()), float(rss[half].max())],
            "fds": [int(fds[half].min()), int(fds[half].max())],
            "threads": [int(threads[half].min()), int(threads[half].max())],
        },
        "samples": [
            {
                "t": float(t),
                "written": float(c),
                "rss_mib": float(r),
                "fds": int(f),
                "threads": int(h),
            }
            for t, c, r, f, h in samples
        ],
    }
    if args.trace:
        report["trace"] = trace_report(trace_path)
    args.out.write_text(json.dumps(with_provenance(report), indent=2))
    _plot(args, times, rss, fds, threads)
    print(f"wrote {args.out}")


def trace_report(path: Path) -> dict:
    """Print and return each traced memory figure's range and slope over the second half,
    and the source lines that grew most by the end (see traced_daemon.py)."""
    lines = path.read_text().splitlines() if path.exists() else []
    samples = [sample for sample in map(json.loads, lines) if "t" in sample]  # not provenance
    if not samples:
        print("memory trace: no sample (a run shorter than TRACED_DAEMON_EVERY)")
        return {"samples": 0}
    times = np.array([s["t"] for s in samples])
    half = times >= times[-1] / 2
    figures = {}
    for name in ("python_mib", "malloc_in_use_mib", "malloc_free_mib", "mmap_mib"):
        values = np.array([s.get(name, float("nan")) for s in samples])
        slope, error = rss_slope(times[half], values[half])
        figures[name] = {
            "first": float(values[0]),
            "last": float(values[-1]),
            "slope_mib_per_hour": slope,
            "slope_95ci": error,
        }
        print(
            f"{name:>18}: {values[0]:8.1f} -> {values[-1]:8.1f} MiB, second-half slope "
            f"{slope:+.2f} ± {error:.2f} MiB/hour"
        )
    first, last = samples[0]["objects"], samples[-1]["objects"]
    objects = {name: [first.get(name, 0), count] for name, count in last.items()}
    print(
        "live objects, first -> last sample: "
        + ", ".join(f"{name} {a} -> {b}" for name, (a, b) in objects.items())
    )
    print("grew most since the first sample:")
    for stat in samples[-1]["growth"]:
        print(f"  {stat['kib']:+9.1f} KiB {stat['count']:+7d} blocks  {stat['where']}")
    return {
        "samples": len(samples),
        "figures": figures,
        "objects": objects,
        "growth": samples[-1]["growth"],
    }


def rss_slope(times: np.ndarray, rss: np.ndarray) -> tuple[float, float]:
    """Least-squares RSS slope in MiB/hour and its 95 % half-width (0, 0 if too few)."""
    if len(times) < 4:
        return 0.0, 0.0
    coefficients, covariance = np.polyfit(times, rss, 1, cov=True)
    return float(coefficients[0]) * 3600, 1.96 * float(np.sqrt(covariance[0, 0])) * 3600


def _plot(args, times, rss, fds, threads) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(3, 1, figsize=(6, 6), sharex=True)
    for ax, values, label in zip(
        axes, (rss, fds, threads), ("RSS (MiB)", "open fds", "threads"), strict=True
    ):
        ax.plot(times, values)
        ax.set_ylabel(label)
        ax.set_ylim(0, max(values.max() * 1.2, 1))
    axes[-1].set_xlabel("seconds")
    axes[0].set_title(
        f"soak: {args.rate:g} frames/s of {args.shape}, {args.series_frames} frames per series"
    )
    save_figure(fig, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
