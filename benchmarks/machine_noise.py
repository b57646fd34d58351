"""How steady this machine's speed is: the same forward pass timed in short slices, one
torch thread and two taking turns, in one process. On this project's 2-vCPU machine the
two-thread speed jumps between two levels (about 42 and 66 frames/s at 256x256) on a
scale of seconds, with no change in the code, so two timings taken apart can differ
1.6x; the single-thread speed varies less. Compare numbers measured together (the
daemon's own forward against its frames/s), not runs taken minutes apart.

    python benchmarks/machine_noise.py                    # 60 s, 256x256
    python benchmarks/machine_noise.py --seconds 4 --size 32    # smoke
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from common import RESULTS, daemon_model, pyplot, save_figure, with_provenance


def cpu_seconds() -> tuple[float, float]:
    """``(user, system)`` CPU seconds of the whole machine so far (/proc/stat)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(f) for f in fields]
    return (ticks[0] + ticks[1]) / 100, ticks[2] / 100


def timed_slices(size: int, seconds: float, slice_seconds: float) -> list[dict]:
    """Forward frames/s in consecutive slices, alternating 1 and 2 torch threads, with
    the machine's system-time share in each slice (waiting threads spin into the kernel)."""
    model = daemon_model()
    x = torch.randn(1, 1, size, size)
    slices = []
    with torch.inference_mode():
        model(x)
        ends = time.perf_counter() + seconds
        while time.perf_counter() < ends:
            threads = 2 if len(slices) % 2 == 0 else 1
            torch.set_num_threads(threads)
            model(x)
            (user0, sys0), count, started = cpu_seconds(), 0, time.perf_counter()
            while time.perf_counter() - started < slice_seconds:
                model(x)
                count += 1
            elapsed = time.perf_counter() - started
            user1, sys1 = cpu_seconds()
            busy = (user1 - user0) + (sys1 - sys0)
            slices.append(
                {
                    "threads": threads,
                    "t": round(started, 3),
                    "fps": count / elapsed,
                    "system_share": (sys1 - sys0) / busy if busy else 0.0,
                }
            )
    return slices


def summary(slices: list[dict], threads: int) -> dict:
    """Percentiles of frames/s over the slices run with ``threads`` threads."""
    fps = np.array([s["fps"] for s in slices if s["threads"] == threads])
    p10, p50, p90 = np.percentile(fps, [10, 50, 90])
    return {
        "threads": threads,
        "slices": int(fps.size),
        "min": float(fps.min()),
        "p10": float(p10),
        "p50": float(p50),
        "p90": float(p90),
        "max": float(fps.max()),
        "max_over_min": float(fps.max() / fps.min()),
    }


def plot(slices: list[dict], path: Path) -> None:
    """Frames/s of each slice against time, one line per thread count."""
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(8, 3.5))
    t0 = slices[0]["t"]
    for threads in (1, 2):
        chosen = [s for s in slices if s["threads"] == threads]
        ax.plot(
            [s["t"] - t0 for s in chosen],
            [s["fps"] for s in chosen],
            ".-",
            label=f"{threads} thread{'s' * (threads > 1)}",
        )
    ax.set_xlabel("seconds")
    ax.set_ylabel("forward frames/s")
    ax.legend()
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--slice-seconds", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=RESULTS / "machine_noise.json")
    args = parser.parse_args()
    slices = timed_slices(args.size, args.seconds, args.slice_seconds)
    rows = [summary(slices, threads) for threads in (1, 2)]
    print(
        f"forward frames/s of the default UNet, {args.size}x{args.size}, "
        f"{args.slice_seconds:g} s slices over {args.seconds:g} s, one process"
    )
    print("| threads | slices | min | p10 | p50 | p90 | max | max / min |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['threads']} | {r['slices']} | {r['min']:.1f} | {r['p10']:.1f} | "
            f"{r['p50']:.1f} | {r['p90']:.1f} | {r['max']:.1f} | {r['max_over_min']:.2f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            with_provenance(
                {
                    "benchmark": "machine_noise",
                    "machine": platform.machine(),
                    "settings": {k: str(v) for k, v in vars(args).items()},
                    "rows": rows,
                    "slices": slices,
                }
            ),
            indent=2,
        )
    )
    plot(slices, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
