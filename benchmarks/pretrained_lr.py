"""Offline fine-tuning from the shipped model: which peak learning rate keeps what it learned.

first_pass's scan (a 256x256 window drifting over photographs and textures the shipped
model never saw, Poisson noise), ``n2s-stream train`` on the whole scan for ``--seconds``
(first_pass's scan length), last weights, single pass: from random weights at the default
``--lr``, and ``--pretrained`` at each of ``--lrs`` (`TrainConfig.pretrained_lr`). Mean PSNR
in dB; calibrated TV as the yardstick. Writes ``benchmarks/results/pretrained_lr.json``.

    python benchmarks/pretrained_lr.py              # ~20 min on 2 cores
    python benchmarks/pretrained_lr.py --frames 16 --size 64 --doses 20 --seconds 2  # smoke
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import RESULTS, write_report
from first_pass import calibrated_tv, drifting_scan, offline
from offline_quality import noisy_counts

from n2s_stream.config import TrainConfig
from n2s_stream.n2s.quality import psnr
from n2s_stream.options import make


def main() -> None:
    """Every dose: TV, offline from random weights, offline from the shipped model at each
    learning rate; print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=240)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--drift", type=float, default=3.0)
    parser.add_argument("--doses", type=float, nargs="+", default=[5.0, 20.0, 100.0])
    parser.add_argument("--seconds", type=float, default=80.0, help="training time per run")
    parser.add_argument(
        "--lrs",
        type=float,
        nargs="+",
        default=[3e-3, 1e-3, 3e-4],
        help="peak learning rates from the shipped model",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "pretrained_lr.json")
    args = parser.parse_args()
    scratch_lr = make(TrainConfig).lr
    clean = drifting_scan(args.frames, args.size, args.drift)
    columns = ["tv", f"scratch lr {scratch_lr:g}"] + [f"shipped lr {lr:g}" for lr in args.lrs]
    print(
        f"{args.frames} frames {args.size}x{args.size}, drift {args.drift:g} px/frame, "
        f"{args.seconds:g} s of training each; mean PSNR dB"
    )
    print(f"{'peak':>5} {'noisy':>7} " + " ".join(f"{c:>18}" for c in columns))
    rows = []
    for dose in args.doses:
        noisy = noisy_counts(clean, dose)
        truth = clean * dose
        stacks = {"noisy": noisy, "tv": calibrated_tv(noisy, dose)}
        with tempfile.TemporaryDirectory() as tmp:
            stacks[columns[1]] = offline(noisy, args.seconds, Path(tmp))
        for lr, column in zip(args.lrs, columns[2:], strict=True):
            with tempfile.TemporaryDirectory() as tmp:
                stacks[column] = offline(
                    noisy, args.seconds, Path(tmp), pretrained=True, pretrained_lr=lr
                )
        row = {"dose": dose} | {
            name: psnr(truth, stack, data_range=dose) for name, stack in stacks.items()
        }
        rows.append(row)
        print(
            f"{dose:5g} {row['noisy']:7.2f} " + " ".join(f"{row[c]:18.2f}" for c in columns),
            flush=True,
        )
    write_report(args.out, "pretrained_lr", args, rows)


if __name__ == "__main__":
    main()
