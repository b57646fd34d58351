"""A daemon from scratch vs from the shipped pretrained model, on a stream seen once.

Photograph tiles (scikit-image's camera, astronaut, coins and moon, which the pretrained
model never saw) with Poisson noise are sent once over ZeroMQ at ``--rate`` frames/s to a
daemon with its defaults (cold start on), started with ``--no-pretrained`` and then
``--pretrained``. Reported per dose: PSNR of what the daemon wrote in the first 10 s and
over the whole pass, and how many frames the classical cold start wrote. Writes
``benchmarks/results/pretrained_start.json``.

    python benchmarks/pretrained_start.py                       # ~4 minutes
    python benchmarks/pretrained_start.py --tiles 6 --rate 3 --doses 20   # smoke
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from common import RESULTS, write_report
from offline_quality import noisy_counts, photo_tiles
from online_quality import stream_through_daemon

from n2s_stream.n2s.quality import psnr

VARIANTS = (("from scratch", "--no-pretrained"), ("pretrained", "--pretrained"))


def main() -> None:
    """Each dose, both starts: print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--doses", type=float, nargs="+", default=[5.0, 20.0, 100.0])
    parser.add_argument("--tiles", type=int, default=40)
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--rate", type=float, default=2.0, help="frames/s sent")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "pretrained_start.json")
    args = parser.parse_args()
    args.passes = 1
    clean = photo_tiles(args.tile, args.tiles)
    first = max(1, int(10 * args.rate))
    print(
        f"{len(clean)} tiles {args.tile}x{args.tile} once at {args.rate:g} frames/s; PSNR dB "
        f"of what the daemon wrote (first 10 s = {first} frames)"
    )
    print(
        f"{'peak':>5} {'noisy':>6} "
        + " ".join(
            f"{name + ' first 10 s':>24} {name + ' all':>17} {'classical':>9}"
            for name, _ in VARIANTS
        )
    )
    rows = []
    for dose in args.doses:
        noisy = noisy_counts(clean, dose)
        row: dict = {"dose": dose, "noisy": psnr(clean * dose, noisy, data_range=dose)}
        for name, flag in VARIANTS:
            with tempfile.TemporaryDirectory() as tmp:
                output = stream_through_daemon(noisy, args, Path(tmp), (flag,))["outputs"][0]
            written = output["frames"]
            row[name] = {
                "first_10s": psnr(clean[:first] * dose, written[:first], data_range=dose),
                "all": psnr(clean * dose, written, data_range=dose),
                "classical_frames": int(np.sum(output["denoiser"] == 1)),
            }
        rows.append(row)
        print(
            f"{dose:5g} {row['noisy']:6.2f} "
            + " ".join(
                f"{row[name]['first_10s']:24.2f} {row[name]['all']:17.2f} "
                f"{row[name]['classical_frames']:9d}"
                for name, _ in VARIANTS
            ),
            flush=True,
        )
    write_report(args.out, "pretrained_start", args, rows)


if __name__ == "__main__":
    main()
