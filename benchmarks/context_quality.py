"""Temporal context on a drifting stream: single-frame N2S vs K = 3 and 5 frames.

A 128x128 window drifts slowly over a photograph bundled with scikit-image (no download),
making a series in which consecutive frames show nearly the same scene with independent
Poisson noise. At the same CPU training budget each variant is trained on the noisy series
alone (``n2s-stream train``, optionally ``--context-frames K``) and denoises it, single-pass
and J-invariant; PSNR against the clean frames and inference frames/s are reported, next to
the calibrated classical denoisers (J-invariant calibration, no ground truth). Two sweeps
follow: quality vs dose and quality vs drift speed, single frame vs K = 3.
Writes ``benchmarks/results/context_quality.json`` and ``.png``.

    python benchmarks/context_quality.py                            # ~12 min on 2 cores
    python benchmarks/context_quality.py --budget 150 --sweep-budget 45   # the record's settings
    python benchmarks/context_quality.py --budget 3 --sweep-budget 2 --frames 8 --size 48 \
        --contexts 1 3 --doses 20 --drifts 1          # smoke
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from common import pyplot, save_figure, with_provenance
from offline_quality import classical  # the same calibrated baselines
from scipy.ndimage import map_coordinates
from skimage import data as skdata
from skimage.color import rgb2gray

from n2s_stream.commands.offline import train
from n2s_stream.config import TrainConfig
from n2s_stream.formats.checkpoint import load_checkpoint
from n2s_stream.n2s.denoising import denoise_counts
from n2s_stream.n2s.masking import Masker
from n2s_stream.n2s.quality import psnr
from n2s_stream.options import make

RESULTS = Path(__file__).parent / "results"


def drifting_series(n: int, size: int, drift: float, seed: int = 0) -> np.ndarray:
    """``(n, size, size)`` crops of the astronaut photograph, values in [0, 1], from a
    window moving ``drift`` pixels per frame (sub-pixel: bilinear)."""
    image = rgb2gray(skdata.astronaut()).astype(np.float64)
    rng = np.random.default_rng(seed)
    angle = rng.uniform(0, 2 * np.pi)
    step = drift * np.array([np.sin(angle), np.cos(angle)])
    span = step * (n - 1)
    start = np.array([image.shape[0] / 2, image.shape[1] / 2]) - size / 2 - span / 2
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float64)
    frames = [
        map_coordinates(
            image,
            [rows + start[0] + k * step[0], cols + start[1] + k * step[1]],
            order=1,
            mode="reflect",
        )
        for k in range(n)
    ]
    return np.stack(frames).astype(np.float32)


def train_and_denoise(
    noisy: np.ndarray,
    clean: np.ndarray,
    dose: float,
    *,
    context: int,
    residual: bool,
    budget: float,
    args: argparse.Namespace,
    register: bool = False,
) -> dict:
    """Train on the noisy series for ``budget`` s; PSNR and frames/s of both inferences
    (``register``: neighbours shifted onto the centre frame, ``--register-context``)."""
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "series.h5"
        with h5py.File(source, "w") as handle:
            handle["/data"] = noisy.astype(np.uint16)
        config = make(
            TrainConfig,
            h5=source,
            device="cpu",
            context_frames=context,
            residual=residual,
            register_context=register,
            patch=args.patch,
            batch=args.batch,
            epochs=100_000,
            steps_per_epoch=50,
            max_seconds=budget,
            lr=args.lr,
            out_dir=Path(tmp) / "runs",
            progress=False,
            seed=args.seed,
        )
        result = train(config)
        checkpoint = load_checkpoint(result.last)
    model = checkpoint.build_model("cpu").eval()
    masker = Masker(checkpoint.masker_config)
    row = {"context": context, "residual": residual, "register": register, "steps": checkpoint.step}
    for mode, jinv in (("single_pass", False), ("jinv", True)):
        started = time.perf_counter()
        denoised = denoise_counts(
            model, masker, checkpoint.normalizer, noisy, jinv=jinv, device=torch.device("cpu")
        )
        seconds = time.perf_counter() - started
        row[mode] = {
            "psnr": psnr(clean * dose, denoised, data_range=dose),
            "fps": len(noisy) / seconds,
        }
    return row


def main() -> None:
    """Run the variants and sweeps; print tables; write JSON and a plot."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=60.0, help="training seconds, main table")
    parser.add_argument("--sweep-budget", type=float, default=30.0, help="training s, sweeps")
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--dose", type=float, default=20.0, help="peak counts, main table")
    parser.add_argument("--drift", type=float, default=1.0, help="pixels/frame, main table")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1, 3, 5])
    parser.add_argument("--doses", type=float, nargs="+", default=[5.0, 20.0, 100.0])
    parser.add_argument("--drifts", type=float, nargs="+", default=[0.25, 1.0, 4.0, 16.0])
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "context_quality.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    def series(dose: float, drift: float) -> tuple[np.ndarray, np.ndarray]:
        clean = drifting_series(args.frames, args.size, drift)
        noisy = np.random.default_rng(args.seed + 1).poisson(clean * dose).astype(np.float32)
        return clean, noisy

    clean, noisy = series(args.dose, args.drift)
    baselines = classical(noisy, clean, args.dose)
    noisy_psnr = psnr(clean * args.dose, noisy, data_range=args.dose)
    rows = [
        train_and_denoise(
            noisy, clean, args.dose, context=k, residual=residual, budget=args.budget, args=args
        )
        for k in args.contexts
        for residual in (False, True)
    ]
    print(
        f"dose {args.dose:g}, drift {args.drift:g} px/frame, {args.frames} frames "
        f"{args.size}x{args.size}, {args.budget:g} s CPU training each ({args.threads} threads)"
    )
    print(
        f"noisy {noisy_psnr:.2f} dB; calibrated classical: "
        + ", ".join(
            f"{name} {baselines[name]['psnr']:.2f}" for name in ("wavelet", "tv", "nl_means")
        )
    )
    print(
        f"{'K':>2} {'residual':>8} {'steps':>6} {'single-pass dB':>15} {'fps':>6} "
        f"{'J-inv dB':>9} {'fps':>6}"
    )
    for r in rows:
        print(
            f"{r['context']:>2} {r['residual']!s:>8} {r['steps']:>6} "
            f"{r['single_pass']['psnr']:>15.2f} {r['single_pass']['fps']:>6.0f} "
            f"{r['jinv']['psnr']:>9.2f} {r['jinv']['fps']:>6.0f}"
        )
    best = max(rows, key=lambda r: max(r["single_pass"]["psnr"], r["jinv"]["psnr"]))
    best_mode = "jinv" if best["jinv"]["psnr"] >= best["single_pass"]["psnr"] else "single_pass"
    print(
        f"best: K={best['context']} residual={best['residual']} {best_mode} "
        f"{best[best_mode]['psnr']:.2f} dB"
    )

    sweep_contexts = [1, max(args.contexts)] if max(args.contexts) > 1 else [1]
    if 3 in args.contexts:
        sweep_contexts = [1, 3]

    def sweep(points: list[float], make) -> list[dict]:
        out = []
        for value in points:
            sweep_clean, sweep_noisy, dose = make(value)
            for k in sweep_contexts:
                r = train_and_denoise(
                    sweep_noisy,
                    sweep_clean,
                    dose,
                    context=k,
                    residual=best["residual"],
                    budget=args.sweep_budget,
                    args=args,
                )
                out.append(
                    {
                        "value": value,
                        "context": k,
                        "psnr": r[best_mode]["psnr"],
                        "noisy": psnr(sweep_clean * dose, sweep_noisy, data_range=dose),
                    }
                )
        return out

    by_dose = sweep(args.doses, lambda d: (*series(d, args.drift), d))
    by_drift = sweep(args.drifts, lambda v: (*series(args.dose, v), args.dose))
    for title, table, unit in (("dose", by_dose, "peak counts"), ("drift", by_drift, "px/frame")):
        print(
            f"{title} ({unit}), {best_mode}, residual={best['residual']}, "
            f"{args.sweep_budget:g} s each: "
            + "; ".join(f"{t['value']:g}: K={t['context']} {t['psnr']:.2f}" for t in table)
        )
    report = {
        "benchmark": "context_quality",
        "machine": f"{platform.machine()}, {args.threads} threads",
        "settings": vars(args) | {"out": str(args.out)},
        "noisy_psnr": noisy_psnr,
        "classical": {k: v for k, v in baselines.items()},
        "rows": rows,
        "best": {"context": best["context"], "residual": best["residual"], "mode": best_mode},
        "by_dose": by_dose,
        "by_drift": by_drift,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(with_provenance(report), indent=2, default=float))
    _plot(args, by_dose, by_drift, sweep_contexts)
    print(f"wrote {args.out}")


def _plot(args, by_dose: list[dict], by_drift: list[dict], contexts: list[int]) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, table, label, log in (
        (axes[0], by_dose, "dose (peak counts)", True),
        (axes[1], by_drift, "drift (pixels/frame)", True),
    ):
        for k in contexts:
            points = [(t["value"], t["psnr"]) for t in table if t["context"] == k]
            ax.plot(*zip(*points, strict=True), marker="o", label=f"K={k}")
        ax.set_xlabel(label)
        ax.set_ylabel("PSNR (dB)")
        if log:
            ax.set_xscale("log")
        ax.legend()
    fig.suptitle(f"temporal context, {args.sweep_budget:g} s CPU training per point")
    save_figure(fig, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
