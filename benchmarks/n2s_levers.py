"""Two levers of Noise2Self quality, A/B in one run on the same noisy photographs.

1. Denser supervision: the grid masker hides one pixel per ``grid_size``-square, so each
   step learns from 1/16 of the pixels (grid 4); grid 3 and 2 learn from 1/9 and 1/4 per
   step, at the price of more hidden (interpolated) neighbours in the input. Same training
   time each (``--budget``), single-pass inference.
2. The posterior-mean un-blind step (``n2s/unblind.py``): J-invariant inference gives a
   prediction that never saw its pixel; combining it with the pixel through the Poisson
   likelihood (noise model and prior spread fitted from the data) is reported to recover
   what the blind spot loses. Compared with plain J-invariant and with single-pass
   inference of the same grid-4 model.

3. Neighbor2Neighbor (Huang et al. 2021; ``--n2n``), the other road to denser supervision:
   no blind spot; two sub-images sampled from neighbouring pixels of each 2x2 cell, the
   network maps one to the other (every pixel of the target supervises), plus the
   paper's regulariser (gamma 2) tying it to the full-resolution output
   (``n2s/neighbor2neighbor.py``, the daemon's ``--objective neighbor2neighbor``). Same UNet, same
   normalisation, same time budget, single-pass inference on the full image.

The tiles, noise and scoring are ``offline_quality.py``'s (48 photograph tiles 128x128,
Poisson noise at each peak count). Writes ``benchmarks/results/n2s_levers.json``.

    python benchmarks/n2s_levers.py                   # 3 doses, 3 grids, 45 s each
    python benchmarks/n2s_levers.py --budget 3 --doses 20 --tiles 8 --grids 4 2  # smoke
    python benchmarks/n2s_levers.py --grids 4 --n2n --out benchmarks/results/n2s_levers_n2n.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch
from common import RESULTS, with_provenance
from offline_quality import n2s, noisy_counts, photo_tiles

from n2s_stream.config import NetworkOptions, TrainConfig
from n2s_stream.models import build_model
from n2s_stream.n2s.masking import Masker
from n2s_stream.n2s.optim import make_optimizer
from n2s_stream.n2s.quality import mean_ssim, psnr
from n2s_stream.n2s.specs import ModelConfig
from n2s_stream.n2s.training import train_step
from n2s_stream.n2s.unblind import noise_model, unblind


def score(clean: np.ndarray, estimate: np.ndarray, dose: float) -> dict[str, float]:
    """PSNR and SSIM of an estimate of ``clean * dose``."""
    return {
        "psnr": psnr(clean * dose, estimate, data_range=dose),
        "ssim": mean_ssim(clean * dose, estimate, data_range=dose),
    }


def unblinded(
    jinv: np.ndarray, noisy: np.ndarray, clean: np.ndarray, dose: float
) -> dict[str, dict]:
    """The un-blind step on a J-invariant stack: per-frame and local (15 px) prior."""
    gain, offset = noise_model(jinv, noisy)
    out = {"noise_model": {"gain": gain, "offset": offset}}
    for name, window in (("unblind_frame", None), ("unblind_local15", 15)):
        out[name] = score(clean, unblind(jinv, noisy, gain=gain, window=window), dose)
    return out


def neighbor2neighbor(
    noisy: np.ndarray, clean: np.ndarray, dose: float, args: argparse.Namespace
) -> dict:
    """Train the default UNet (no mask channel) the Neighbor2Neighbor way on the noisy stack
    for ``budget`` seconds, normalised as the daemon does; score single-pass inference."""
    normalizer = NetworkOptions().fit_normalizer(
        noisy.astype(np.uint16), source_dtype=np.dtype(np.uint16)
    )
    frames = normalizer.forward(noisy.astype(np.uint16).astype(np.float32))
    torch.manual_seed(0)
    model = build_model(ModelConfig(width=args.width, depth=args.depth))
    optimizer = make_optimizer(model, args.lr)
    masker = Masker()  # this objective reads only its mask_as_input (off)
    rng = np.random.default_rng(0)
    n, height, width = frames.shape
    started, steps = time.perf_counter(), 0
    while time.perf_counter() - started < args.budget:
        k, top, left = (
            rng.integers(n, size=args.batch),
            rng.integers(height - args.patch + 1, size=args.batch),
            rng.integers(width - args.patch + 1, size=args.batch),
        )
        batch = torch.from_numpy(
            np.stack(
                [
                    frames[i, y : y + args.patch, x : x + args.patch]
                    for i, y, x in zip(k, top, left, strict=True)
                ]
            )
        )[:, None]
        train_step(model, optimizer, masker, batch, rng=rng, objective="neighbor2neighbor")
        steps += 1
    seconds = time.perf_counter() - started
    model.eval()
    with torch.inference_mode():
        out = np.concatenate(
            [
                model(torch.from_numpy(frames[k : k + 16])[:, None])[:, 0].numpy()
                for k in range(0, n, 16)
            ]
        )
    return {
        "train_seconds": seconds,
        "steps": steps,
        "single_pass": score(clean, normalizer.inverse(out), dose),
    }


def main() -> None:
    """Run both A/Bs at every dose; print the table, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--doses", type=float, nargs="+", default=[5.0, 20.0, 100.0])
    parser.add_argument("--budget", type=float, default=45.0, help="training seconds per run")
    parser.add_argument("--grids", type=int, nargs="+", default=[4, 3, 2])
    parser.add_argument("--tiles", type=int, default=48)
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--n2n", action="store_true", help="also train Neighbor2Neighbor")
    parser.add_argument("--out", type=str, default=str(RESULTS / "n2s_levers.json"))
    args = parser.parse_args()
    defaults = TrainConfig()
    train_args = argparse.Namespace(
        budget=args.budget,
        width=defaults.network.width,
        depth=defaults.network.depth,
        patch=defaults.patch,
        batch=defaults.batch,
        lr=defaults.lr,
        residual=False,
    )
    clean = photo_tiles(args.tile, args.tiles)
    rows = []
    for dose in args.doses:
        noisy = noisy_counts(clean, dose)
        row: dict = {"dose": dose, "noisy": score(clean, noisy, dose), "grids": {}}
        for grid in args.grids:
            stacks: dict[str, np.ndarray] = {}
            result = n2s(noisy, clean, dose, train_args, denoised_out=stacks, grid_size=grid)
            row["grids"][grid] = result
            if grid == args.grids[0]:
                row |= unblinded(stacks["jinv"], noisy, clean, dose)
        if args.n2n:
            row["n2n"] = neighbor2neighbor(noisy, clean, dose, train_args)
        rows.append(row)
        print(
            f"peak {dose:g}: "
            + ", ".join(
                f"grid {g}: {r['single_pass']['psnr']:.2f}" for g, r in row["grids"].items()
            )
            + f"; grid {args.grids[0]} jinv {row['grids'][args.grids[0]]['jinv']['psnr']:.2f}"
            f", un-blind {row['unblind_frame']['psnr']:.2f} / {row['unblind_local15']['psnr']:.2f}"
            + (
                f"; Neighbor2Neighbor {row['n2n']['single_pass']['psnr']:.2f} "
                f"({row['n2n']['steps']} steps against grid {args.grids[0]}'s "
                f"{row['grids'][args.grids[0]]['steps']})"
                if args.n2n
                else ""
            ),
            flush=True,
        )
    first = args.grids[0]
    print(
        f"\n{'peak':>5} | {'noisy':>6} | "
        + " | ".join(f"grid {g} single-pass" for g in args.grids)
        + f" | grid {first} J-inv | + un-blind (frame) | + un-blind (15 px) | gain fitted"
    )
    for row in rows:
        grids = row["grids"]
        print(
            f"{row['dose']:5g} | {row['noisy']['psnr']:6.2f} | "
            + " | ".join(f"{grids[g]['single_pass']['psnr']:18.2f}" for g in args.grids)
            + f" | {grids[first]['jinv']['psnr']:11.2f} | {row['unblind_frame']['psnr']:18.2f}"
            f" | {row['unblind_local15']['psnr']:18.2f} | {row['noise_model']['gain']:.2f}"
        )
    report = {
        "benchmark": "n2s_levers",
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "frames": f"{len(clean)} tiles {args.tile}x{args.tile} (offline_quality)",
        "settings": vars(args),
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(with_provenance(report), handle, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
