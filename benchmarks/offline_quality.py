"""Offline denoising quality on real photographs with Poisson noise.

Images bundled with scikit-image (no download) are cut into 128x128 tiles to make a
stack; each tile is scaled so its brightest possible value gives ``dose`` mean counts, and
Poisson noise is drawn, plus Gaussian read noise of ``--read-noise`` counts (standard
deviation) where asked. For each dose the table gives PSNR/SSIM against the clean tiles of:
the noisy input; wavelet, TV and non-local means each calibrated the J-invariant way
(``skimage.restoration.calibrate_denoiser``: parameters chosen by self-supervised loss,
no ground truth), plus the best of them; and n2s-stream's UNet trained on the noisy stack
alone, single-pass and J-invariant; with the ``[bench]`` extra and no read noise, the
classical gold standard Anscombe + BM3D (``classical.py``) with its CPU seconds per frame.
Writes JSON to ``benchmarks/results/``.

    python benchmarks/offline_quality.py                 # full run (a few minutes per dose)
    python benchmarks/offline_quality.py --doses 5 20 --read-noise 2 --out \
        benchmarks/results/offline_quality_read_noise.json    # Poisson + Gaussian read noise
    python benchmarks/offline_quality.py --budget 5 --doses 20 --tiles 4   # smoke test
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from functools import partial
from pathlib import Path

import classical as gold
import h5py
import numpy as np
import torch
from common import with_provenance
from skimage import data as skdata
from skimage.color import rgb2gray
from skimage.restoration import (
    calibrate_denoiser,
    denoise_nl_means,
    denoise_tv_chambolle,
    denoise_wavelet,
)

from n2s_stream.commands.offline import train
from n2s_stream.config import TrainConfig
from n2s_stream.formats.checkpoint import load_checkpoint
from n2s_stream.n2s.denoising import denoise_counts
from n2s_stream.n2s.masking import Masker
from n2s_stream.n2s.quality import mean_ssim, psnr
from n2s_stream.options import make

RESULTS = Path(__file__).parent / "results"
IMAGES = ("camera", "astronaut", "coins", "moon")


def photo_tiles(tile: int, max_tiles: int) -> np.ndarray:
    """``(N, tile, tile)`` crops of scikit-image's bundled photographs, values in [0, 1]."""
    tiles = []
    for name in IMAGES:
        image = getattr(skdata, name)()
        image = rgb2gray(image) if image.ndim == 3 else image / 255.0
        for top in range(0, image.shape[0] - tile + 1, tile):
            for left in range(0, image.shape[1] - tile + 1, tile):
                tiles.append(image[top : top + tile, left : left + tile])
    order = np.random.default_rng(0).permutation(len(tiles))[:max_tiles]
    return np.stack([tiles[k] for k in sorted(order)]).astype(np.float32)


def noisy_counts(clean: np.ndarray, dose: float, read_noise: float = 0.0) -> np.ndarray:
    """Poisson counts of ``clean * dose`` (seeded by the dose, so every benchmark draws the
    same noise), plus Gaussian read noise of standard deviation ``read_noise`` counts."""
    rng = np.random.default_rng(int(dose))
    noisy = rng.poisson(clean * dose).astype(np.float32)
    if read_noise > 0:
        noisy += rng.normal(0.0, read_noise, noisy.shape).astype(np.float32)
    return noisy


def classical(noisy: np.ndarray, clean: np.ndarray, dose: float) -> dict[str, dict]:
    """Calibrate each classical denoiser J-invariantly on a mosaic, apply to every frame."""
    scaled = noisy / dose  # [0, 1]-ish, the range the skimage parameter grids assume
    mosaic = np.block([[scaled[0], scaled[1]], [scaled[2], scaled[3]]])
    grids = {
        "wavelet": (
            partial(denoise_wavelet, rescale_sigma=True),
            {"sigma": list(np.linspace(0.02, 0.6, 12))},
        ),
        "tv": (denoise_tv_chambolle, {"weight": list(np.geomspace(0.01, 1.0, 14))}),
        "nl_means": (
            partial(denoise_nl_means, patch_size=5, patch_distance=6, fast_mode=True),
            {"h": list(np.geomspace(0.02, 1.0, 10))},
        ),
    }
    results = {}
    for name, (function, grid) in grids.items():
        started = time.perf_counter()
        calibrated, (params, losses) = calibrate_denoiser(
            mosaic, function, grid, stride=4, extra_output=True
        )
        best = int(np.argmin(losses))
        denoised = np.stack([calibrated(frame) for frame in scaled]) * dose
        results[name] = {
            "psnr": psnr(clean * dose, denoised, data_range=dose),
            "ssim": mean_ssim(clean * dose, denoised, data_range=dose),
            "selfsup_loss": float(losses[best]),
            "params": {k: float(v) for k, v in params[best].items()},
            "seconds": time.perf_counter() - started,
        }
    chosen = min(results, key=lambda k: results[k]["selfsup_loss"])
    results["best_by_selfsup_loss"] = dict(results[chosen], method=chosen)
    return results


def anscombe_bm3d(noisy: np.ndarray, clean: np.ndarray, dose: float) -> dict | None:
    """The gold standard for pure Poisson counts, frame by frame (None without the
    ``[bench]`` extra)."""
    if gold.available():
        return None
    denoised, seconds = gold.framewise(gold.anscombe_bm3d, noisy)
    return {
        "psnr": psnr(clean * dose, denoised, data_range=dose),
        "ssim": mean_ssim(clean * dose, denoised, data_range=dose),
        "cpu_seconds_per_frame": seconds,
    }


def n2s(
    noisy: np.ndarray,
    clean: np.ndarray,
    dose: float,
    args: argparse.Namespace,
    denoised_out: dict[str, np.ndarray] | None = None,
    grid_size: int = 4,
) -> dict:
    """Train our UNet on the noisy stack for ``budget`` seconds, then denoise it both ways
    (the denoised stacks go into ``denoised_out`` by mode, when given)."""
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "stack.h5"
        with h5py.File(source, "w") as handle:  # counts as a detector writes them
            integral = np.array_equal(noisy, np.round(noisy)) and noisy.min() >= 0
            handle["/data"] = noisy.astype(np.uint16 if integral else np.float32)
        config = make(
            TrainConfig,
            h5=source,
            device="cpu",
            width=args.width,
            depth=args.depth,
            patch=args.patch,
            batch=args.batch,
            epochs=1000,
            steps_per_epoch=50,
            max_seconds=args.budget,
            lr=args.lr,
            out_dir=Path(tmp) / "runs",
            progress=False,
            residual=args.residual,
            grid_size=grid_size,
        )
        started = time.perf_counter()
        result = train(config)
        seconds = time.perf_counter() - started
        checkpoint = load_checkpoint(result.last)
    model = checkpoint.build_model("cpu")
    masker = Masker(checkpoint.masker_config)
    out = {"train_seconds": seconds, "steps": checkpoint.step}
    for mode, jinv in (("single_pass", False), ("jinv", True)):
        started = time.perf_counter()
        denoised = np.concatenate(
            [
                denoise_counts(
                    model,
                    masker,
                    checkpoint.normalizer,
                    noisy[k : k + 16],
                    jinv=jinv,
                    device=torch.device("cpu"),
                )
                for k in range(0, len(noisy), 16)
            ]
        )
        if denoised_out is not None:
            denoised_out[mode] = denoised
        out[mode] = {
            "psnr": psnr(clean * dose, denoised, data_range=dose),
            "ssim": mean_ssim(clean * dose, denoised, data_range=dose),
            "seconds": time.perf_counter() - started,
        }
    return out


def main() -> None:
    """Run every dose and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--doses", type=float, nargs="+", default=[5.0, 20.0, 100.0])
    parser.add_argument("--budget", type=float, default=90.0, help="N2S training seconds/dose")
    parser.add_argument(
        "--read-noise",
        type=float,
        default=0.0,
        help="Gaussian read noise added to the Poisson counts (std, counts)",
    )
    parser.add_argument("--tiles", type=int, default=48)
    parser.add_argument("--tile", type=int, default=128)
    defaults = TrainConfig()
    parser.add_argument("--width", type=int, default=defaults.network.width)
    parser.add_argument("--depth", type=int, default=defaults.network.depth)
    parser.add_argument("--patch", type=int, default=defaults.patch)
    parser.add_argument("--batch", type=int, default=defaults.batch)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--residual", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "offline_quality.json")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    clean = photo_tiles(args.tile, args.tiles)
    rows = []
    for dose in args.doses:
        noisy = noisy_counts(clean, dose, args.read_noise)
        row = {
            "dose": dose,
            "read_noise": args.read_noise,
            "noisy": {
                "psnr": psnr(clean * dose, noisy, data_range=dose),
                "ssim": mean_ssim(clean * dose, noisy, data_range=dose),
            },
            "classical": classical(noisy, clean, dose),
            "bm3d": anscombe_bm3d(noisy, clean, dose) if args.read_noise == 0 else None,
            "n2s": n2s(noisy, clean, dose, args),
        }
        rows.append(row)
        print_row(row, header=len(rows) == 1)
    report = {
        "benchmark": "offline_quality",
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} "
        f"torch threads, torch {torch.__version__}",
        "frames": f"{len(clean)} tiles {args.tile}x{args.tile} from skimage.data {IMAGES}",
        "settings": vars(args) | {"out": str(args.out)},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(with_provenance(report), indent=2))
    print(f"wrote {args.out}")


def print_row(row: dict, header: bool) -> None:
    """One table line per dose: PSNR (dB) / SSIM of each method."""
    if header:
        print(
            f"{'dose':>5} {'read':>4} | {'noisy':>12} | {'wavelet':>12} | {'TV':>12} | "
            f"{'NL-means':>12} | {'BM3D':>12} | "
            f"{'N2S single':>12} | {'N2S J-inv':>12} | {'N2S - best classical':>20} | train"
        )
    c, n = row["classical"], row["n2s"]
    best_classical = max(c[k]["psnr"] for k in ("wavelet", "tv", "nl_means"))
    best_n2s = max(n["single_pass"]["psnr"], n["jinv"]["psnr"])

    def cell(result: dict) -> str:
        return f"{result['psnr']:5.2f}/{result['ssim']:.3f}"

    print(
        f"{row['dose']:5g} {row['read_noise']:4g} | {cell(row['noisy']):>12} | "
        f"{cell(c['wavelet']):>12} | "
        f"{cell(c['tv']):>12} | {cell(c['nl_means']):>12} | "
        f"{cell(row['bm3d']) if row['bm3d'] else '-':>12} | {cell(n['single_pass']):>12} | "
        f"{cell(n['jinv']):>12} | {best_n2s - best_classical:+19.2f}dB | "
        f"{n['train_seconds']:.0f}s/{n['steps']} steps",
        flush=True,
    )


if __name__ == "__main__":
    main()
