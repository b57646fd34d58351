"""n2s-stream against a peer self-supervised library, same data, same machine, one run.

The peer is CAREamics' Noise2Void and its recommended N2V2 variant, which pin an older
torch than ours and so live in their own virtual environment (``make bench-peers`` makes
``.venv-peers`` and runs this script). For each dose the photograph tiles of
``offline_quality.py`` get the same Poisson noise (same seed); n2s-stream's ``train``,
CAREamics N2V and N2V2 (``peer_n2v.py``, in the peer's Python) each train on the noisy
stack alone for the same wall-clock budget with the same torch threads, one after the
other, then denoise it. PSNR/SSIM against the clean tiles are
computed here, by the same code for both. Writes ``benchmarks/results/peer_quality.json``.

    make bench-peers                                          # 3 doses, 90 s each per method
    python benchmarks/peer_quality.py --budget 5 --doses 20 --tiles 8   # quicker look
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch
from common import RESULTS, with_provenance
from offline_quality import n2s, noisy_counts, photo_tiles

from n2s_stream.config import TrainConfig
from n2s_stream.n2s.quality import mean_ssim, psnr

PEER_SCRIPT = Path(__file__).with_name("peer_n2v.py")
VARIANTS = ("n2v", "n2v2")


def score(clean: np.ndarray, estimate: np.ndarray, dose: float) -> dict[str, float]:
    """PSNR and SSIM of an estimate of ``clean * dose``."""
    return {
        "psnr": psnr(clean * dose, estimate, data_range=dose),
        "ssim": mean_ssim(clean * dose, estimate, data_range=dose),
    }


def run_peer(
    python: Path, noisy: dict[str, np.ndarray], budget: float, threads: int, tmp: Path
) -> tuple[dict[str, np.ndarray], dict]:
    """Denoise each stack with CAREamics N2V and N2V2 in the peer's interpreter; keys
    ``<variant>__<stack>``."""
    data, out = tmp / "noisy.npz", tmp / "peer.npz"
    np.savez(data, **noisy)
    subprocess.run(
        [
            str(python),
            str(PEER_SCRIPT),
            "--data",
            str(data),
            "--out",
            str(out),
            "--budget",
            str(budget),
            "--threads",
            str(threads),
            "--variants",
            *VARIANTS,
        ],
        check=True,
    )
    denoised = dict(np.load(out))
    return denoised, json.loads(out.with_suffix(".json").read_text())


def main() -> None:
    """Train both on every dose, score, print the table, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--doses", type=float, nargs="+", default=[5.0, 20.0, 100.0])
    parser.add_argument(
        "--budget", type=float, default=90.0, help="training seconds per dose, for each method"
    )
    parser.add_argument(
        "--peer-budget",
        type=float,
        help="the peer's training seconds per dose, if not --budget (to see "
        "what more time gives it)",
    )
    parser.add_argument("--tiles", type=int, default=48)
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--peer-python", type=Path, default=Path(".venv-peers/bin/python"))
    parser.add_argument("--out", type=Path, default=RESULTS / "peer_quality.json")
    args = parser.parse_args()
    if not args.peer_python.exists():
        parser.error(f"{args.peer_python} not found: `make bench-peers` makes the peer's venv")
    defaults = TrainConfig()
    ours_args = argparse.Namespace(
        budget=args.budget,
        width=defaults.network.width,
        depth=defaults.network.depth,
        patch=defaults.patch,
        batch=defaults.batch,
        lr=defaults.lr,
        residual=False,
    )
    threads = torch.get_num_threads()
    clean = photo_tiles(args.tile, args.tiles)
    noisy = {f"dose_{dose:g}": noisy_counts(clean, dose) for dose in args.doses}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ours = {
            name: n2s(stack, clean, dose, ours_args)
            for (name, stack), dose in zip(noisy.items(), args.doses, strict=True)
        }
        peer_budget = args.budget if args.peer_budget is None else args.peer_budget
        peer, peer_facts = run_peer(args.peer_python, noisy, peer_budget, threads, Path(tmp))
    for (name, stack), dose in zip(noisy.items(), args.doses, strict=True):
        rows.append(
            {"dose": dose, "noisy": score(clean, stack, dose), "n2s_stream": ours[name]}
            | {
                f"careamics_{variant}": score(clean, peer[f"{variant}__{name}"], dose)
                | peer_facts["stacks"][f"{variant}__{name}"]
                for variant in VARIANTS
            }
        )
    print(
        f"{'dose':>5} | {'noisy':>12} | {'n2s-stream':>12} | {'CAREamics N2V':>13} | "
        f"{'N2V2':>12} | {'ours - best peer':>16} | training steps ours / N2V / N2V2 in "
        f"{args.budget:g} / {peer_budget:g} s"
    )
    for row in rows:
        ours_row = row["n2s_stream"]["single_pass"]
        n2v, n2v2 = row["careamics_n2v"], row["careamics_n2v2"]
        best = max(n2v["psnr"], n2v2["psnr"])
        print(
            f"{row['dose']:5g} | {row['noisy']['psnr']:5.2f}/{row['noisy']['ssim']:.3f} | "
            f"{ours_row['psnr']:5.2f}/{ours_row['ssim']:.3f} | "
            f"{n2v['psnr']:6.2f}/{n2v['ssim']:.3f} | {n2v2['psnr']:5.2f}/{n2v2['ssim']:.3f} | "
            f"{ours_row['psnr'] - best:+13.2f} dB | "
            f"{row['n2s_stream']['steps']} / {n2v['steps']} / {n2v2['steps']}"
        )
    report = {
        "benchmark": "peer_quality",
        "machine": f"{platform.machine()}, {threads} torch threads",
        "ours": f"n2s-stream train, torch {torch.__version__}",
        "peer": f"CAREamics {peer_facts['careamics']} Noise2Void and N2V2, "
        f"torch {peer_facts['torch']}",
        "frames": f"{len(clean)} tiles {args.tile}x{args.tile} (offline_quality.photo_tiles)",
        "settings": vars(args) | {"out": str(args.out), "peer_python": str(args.peer_python)},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(with_provenance(report), indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
