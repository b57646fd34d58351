"""Daemon memory and throughput while streaming 10x its training buffer.

A detector process writes ``--frames`` frames as fast as it can into a watched directory;
the daemon (a separate process, training on) follows, denoises and writes them. Its
resident memory is sampled from /proc every 0.25 s. Printed: RSS after each tenth of the
stream, the peak, the slope over the second half (flat means bounded), and the end-to-end
frame rate next to the bare model's forward rate on the same frame size and threads.
Writes ``benchmarks/results/daemon_memory.json`` and ``.png``.

    python benchmarks/daemon_memory.py                       # 320 frames 256x256, buffer 32
    python benchmarks/daemon_memory.py --frames 40 --buffer-frames 4 --shape 64x64   # smoke
"""

from __future__ import annotations

import argparse
import json
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
    pyplot,
    rss_mb,
    save_figure,
    with_provenance,
)

from n2s_stream.runtime.metrics import scrape


def main() -> None:
    """Stream, sample, report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=320)
    parser.add_argument("--shape", default="256x256")
    parser.add_argument("--buffer-frames", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--rate", type=float, default=0.0, help="detector frames/s (0: as fast as the writer can)"
    )
    parser.add_argument(
        "--prewritten",
        action="store_true",
        help="write the whole file before the daemon starts, so no detector "
        "process competes for the cores while the daemon is timed",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="the daemon and the bare model run through torch.compile",
    )
    parser.add_argument(
        "--no-cold-start",
        action="store_true",
        help="the network writes from the first frame (no classical TV)",
    )
    parser.add_argument(
        "--idle-seconds",
        type=float,
        default=20.0,
        help="keep sampling this long after the stream, while training runs",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "daemon_memory.json")
    args = parser.parse_args()
    shape = tuple(int(v) for v in args.shape.split("x"))
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        acq = Path(tmp) / "acq"
        acq.mkdir()
        simulate = [
            *N2S,
            "simulate",
            "--dir",
            str(acq),
            "--frames",
            str(args.frames),
            "--shape",
            args.shape,
            "--rate",
            str(args.rate),
            "--log-level",
            "WARNING",
        ]
        if args.prewritten:
            subprocess.run(simulate, check=True, stdout=subprocess.DEVNULL)
        daemon = subprocess.Popen(
            [
                *N2S,
                "--watch",
                str(acq),
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
                "--buffer-frames",
                str(args.buffer_frames),
                "--settle-seconds",
                "2",
                *(["--no-cold-start"] if args.no_cold_start else []),
                *(["--compile"] if args.compile else []),
                "--log-level",
                "WARNING",
            ]
        )
        while not scrape(port):
            time.sleep(0.2)
        writer = subprocess.Popen(
            ["true"] if args.prewritten else simulate, stdout=subprocess.DEVNULL
        )
        samples = []  # (seconds, frames written, rss MiB)
        started = time.monotonic()
        written = 0.0
        while written < args.frames:
            written = scrape(port).get("n2s_frames_denoised_total", 0.0)
            samples.append((time.monotonic() - started, written, rss_mb(daemon.pid)))
            time.sleep(0.25)
        elapsed = time.monotonic() - started
        streaming = len(samples)
        idle_until = time.monotonic() + args.idle_seconds  # the idle detector: training runs
        while time.monotonic() < idle_until:
            samples.append((time.monotonic() - started, written, rss_mb(daemon.pid)))
            time.sleep(0.25)
        metrics = scrape(port)
        writer.wait(timeout=60)
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=120)
        with h5py.File(f"{tmp}/out/scan_0001_n2s.h5", "r") as output:
            written_at = output["/entry/provenance/t_written"][()]
            latency = written_at - output["/entry/provenance/t_received"][()]
    p50, p99 = (float(v) for v in np.percentile(latency, [50, 99]))
    fps = args.frames / elapsed
    # first frame written to last: start-up and the first file discovery left out
    steady_fps = (len(written_at) - 1) / max(float(written_at[-1] - written_at[0]), 1e-9)
    bare = bare_forward_fps(shape, args.threads, compile=args.compile)
    bare_batched = bare_forward_fps(shape, args.threads, batch=8, compile=args.compile)
    times, counts, rss = (np.array(column) for column in zip(*samples, strict=True))
    stream_rss, idle_rss = rss[:streaming], rss[streaming:]
    # Startup (model, first allocations) and the hand-over to training are left out.
    middle = np.zeros(len(counts), bool)
    middle[:streaming] = (counts[:streaming] >= 0.2 * args.frames) & (
        counts[:streaming] <= 0.9 * args.frames
    )
    slope = float(np.polyfit(counts[middle], rss[middle], 1)[0]) if middle.sum() > 2 else 0.0
    print(f"{'frames written':>15} {'RSS MiB':>8}")
    for tenth in range(1, 11):
        k = min(int(np.searchsorted(counts[:streaming], args.frames * tenth / 10)), streaming - 1)
        print(f"{counts[k]:15.0f} {rss[k]:8.1f}")
    if len(idle_rss):
        print(f"{'idle, training':>15} {idle_rss.max():8.1f}")
    buffer_mib = args.buffer_frames * shape[0] * shape[1] * 4 / 2**20
    print(
        f"RSS while streaming {stream_rss.min():.1f}-{stream_rss.max():.1f} MiB, slope from "
        f"20 % to 90 % of the stream {slope * 1000:+.1f} MiB per 1000 frames; "
        f"peak RSS {rss.max():.1f} MiB (idle, training); training buffer {buffer_mib:.1f} MiB "
        f"({args.buffer_frames} frames, stream = {args.frames / args.buffer_frames:.0f}x)"
    )
    print(
        f"latency arrival -> written: p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms "
        f"(detector rate {'as fast as possible' if not args.rate else f'{args.rate:g}/s'})"
    )
    print(
        f"end to end {fps:.1f} frames/s with training on ({steady_fps:.1f} from first to last "
        f"frame written); bare forward {bare:.1f} frames/s one at a time, {bare_batched:.1f} "
        f"in batches of 8 (the daemon's max_batch); ratio {steady_fps / bare:.2f} and "
        f"{steady_fps / bare_batched:.2f}; "
        f"train steps {metrics.get('n2s_train_steps_total', 0):.0f}"
        f"{'; file written before the daemon started' if args.prewritten else ''}"
    )
    report = {
        "benchmark": "daemon_memory",
        "machine": f"{platform.machine()}, {args.threads} threads",
        "settings": vars(args) | {"out": str(args.out)},
        "peak_rss_mib": float(rss.max()),
        "streaming_rss_mib": [float(stream_rss.min()), float(stream_rss.max())],
        "rss_slope_mib_per_1000_frames": slope * 1000,
        "end_to_end_fps": fps,
        "steady_fps": steady_fps,
        "bare_forward_fps": bare,
        "ratio": steady_fps / bare,
        "bare_forward_batch8_fps": bare_batched,
        "ratio_batch8": steady_fps / bare_batched,
        "latency_p50_s": p50,
        "latency_p99_s": p99,
        "samples": [{"t": t, "written": c, "rss_mib": r} for t, c, r in samples],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(with_provenance(report), indent=2))
    plt = pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(times[:streaming], rss[:streaming], label="streaming")
        ax.plot(times[streaming - 1 :], rss[streaming - 1 :], label="idle: training")
        ax.legend()
        ax.set_xlabel("seconds")
        ax.set_ylabel("daemon RSS (MiB)")
        ax.set_title(f"{args.frames} frames {args.shape}, buffer {args.buffer_frames} frames")
        ax.set_ylim(0, rss.max() * 1.15)
        save_figure(fig, args.out.with_suffix(".png"))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
