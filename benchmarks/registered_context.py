"""Temporal context that follows motion: single frame vs K = 3 vs K = 3 registered.

The astronaut photograph (bundled with scikit-image) seen through a 128x128 window that
drifts ``--drifts`` pixels per frame, Poisson noise at ``--dose``; and a series whose scene
jumps half-way (the second half mirrored), where registration must fall back. Each variant
is trained on the noisy series alone for the same CPU budget (``n2s-stream train``,
``--context-frames 3`` with and without ``--register-context``) and denoises it in one
pass; PSNR against the clean frames. Writes ``benchmarks/results/registered_context.json``.

    python benchmarks/registered_context.py                 # ~12 min on 2 cores
    python benchmarks/registered_context.py --budget 3 --frames 8 --size 48 --drifts 3  # smoke
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from common import write_report
from context_quality import drifting_series, train_and_denoise

from n2s_stream.n2s.quality import psnr

RESULTS = Path(__file__).parent / "results"
VARIANTS = (("K=1", 1, False), ("K=3", 3, False), ("K=3 registered", 3, True))


def scenes(args: argparse.Namespace) -> list[tuple[str, np.ndarray]]:
    """``(name, clean frames)``: each drift speed, then a scene that jumps half-way."""
    out = [
        (f"drift {d:g} px/frame", drifting_series(args.frames, args.size, d)) for d in args.drifts
    ]
    half = drifting_series(args.frames, args.size, args.drifts[-1])
    jump = np.concatenate([half[: args.frames // 2], half[args.frames // 2 :, ::-1, ::-1]])
    return [*out, (f"drift {args.drifts[-1]:g}, jump half-way", jump)]


def main() -> None:
    """Every scene and variant: print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=60.0, help="training seconds each")
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--dose", type=float, default=20.0, help="peak counts")
    parser.add_argument("--drifts", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "registered_context.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"dose {args.dose:g}, {args.frames} frames {args.size}x{args.size}, {args.budget:g} s "
        f"CPU training each ({args.threads} threads), single-pass PSNR (dB)"
    )
    print(
        f"{'scene':>28} {'noisy':>6} "
        + " ".join(f"{name:>15}" for name, _, _ in VARIANTS)
        + f" {'registered - K=1':>17}"
    )
    rows = []
    for name, clean in scenes(args):
        noisy = np.random.default_rng(args.seed + 1).poisson(clean * args.dose).astype(np.float32)
        row = {"scene": name, "noisy": psnr(clean * args.dose, noisy, data_range=args.dose)}
        for label, context, register in VARIANTS:
            result = train_and_denoise(
                noisy,
                clean,
                args.dose,
                context=context,
                residual=False,
                budget=args.budget,
                args=args,
                register=register,
            )
            row[label] = result["single_pass"]["psnr"]
        rows.append(row)
        print(
            f"{name:>28} {row['noisy']:6.2f} "
            + " ".join(f"{row[label]:15.2f}" for label, _, _ in VARIANTS)
            + f" {row['K=3 registered'] - row['K=1']:+17.2f}",
            flush=True,
        )
    write_report(args.out, "registered_context", args, rows)


if __name__ == "__main__":
    main()
