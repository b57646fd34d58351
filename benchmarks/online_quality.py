"""Online vs offline quality: the daemon learning from a stream vs `train` on the whole stack.

The photograph tiles of ``offline_quality.py`` (scikit-image's bundled images, Poisson
noise) are sent to a daemon over ZeroMQ, ``--passes`` times in a row at ``--rate`` frames/s
(pass k is series ``pass<k>``), while it trains online from scratch with its defaults (cold
start on). Reported: PSNR of what the daemon wrote in each pass (what a user sees live), a
curve of PSNR against frames seen, the daemon's final weights re-applied to the whole
stack, and offline N2S (`n2s-stream train`, ``--offline-budget`` seconds) on the same
stack. Writes ``benchmarks/results/online_quality.json`` and ``.png``.

    python benchmarks/online_quality.py                          # ~5 minutes
    python benchmarks/online_quality.py --tiles 8 --rate 8 --passes 2 --offline-budget 3  # smoke
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
import torch
import zmq
from common import N2S, RESULTS, free_port, pyplot, save_figure, with_provenance
from offline_quality import n2s, noisy_counts, photo_tiles  # same data, offline reference

from n2s_stream.config import TrainConfig
from n2s_stream.formats import protocols
from n2s_stream.n2s.denoising import denoise_counts
from n2s_stream.n2s.masking import Masker
from n2s_stream.n2s.quality import psnr
from n2s_stream.runtime.metrics import scrape
from n2s_stream.runtime.state import newest_checkpoint


def stream_through_daemon(
    noisy: np.ndarray, args: argparse.Namespace, tmp: Path, extra: tuple[str, ...] = ()
) -> dict:
    """Send the stack ``passes`` times to a daemon (``extra`` arguments); return its
    outputs and final weights."""
    endpoint, port = f"tcp://127.0.0.1:{free_port()}", free_port()
    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 10_000)
    push.bind(endpoint)
    daemon = subprocess.Popen(
        [
            *N2S,
            "--zmq",
            endpoint,
            "--out",
            str(tmp / "out"),
            "--state-dir",
            str(tmp / "state"),
            "--metrics-port",
            str(port),
            "--device",
            "cpu",
            "--threads",
            str(args.threads),
            "--log-level",
            "WARNING",
            *extra,
        ]
    )
    try:
        while not scrape(port):
            time.sleep(0.2)
        frames = noisy.astype(np.uint16)
        started = time.monotonic()
        sent = 0
        for k in range(1, args.passes + 1):
            for index, frame in enumerate(frames):
                push.send_multipart(protocols.native_frame(f"pass{k}", index, frame))
                sent += 1
                time.sleep(max(0.0, started + sent / args.rate - time.monotonic()))
            push.send_multipart(protocols.native_end(f"pass{k}", len(frames)))
        while scrape(port).get("n2s_frames_denoised_total", 0) < sent:
            time.sleep(0.5)
        metrics = scrape(port)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=120)
        push.close()
        context.term()
    outputs = []
    for k in range(1, args.passes + 1):
        with h5py.File(tmp / "out" / f"pass{k}_n2s.h5", "r") as handle:
            outputs.append(
                {
                    "frames": handle["/entry/data/data"][()],
                    "denoiser": handle["/entry/provenance/denoiser"][()],
                }
            )
    return {
        "outputs": outputs,
        "checkpoint": newest_checkpoint(tmp / "state" / "checkpoints"),
        "train_steps": metrics.get("n2s_train_steps_total", 0.0),
        "seconds": time.monotonic() - started,
    }


def main() -> None:
    """Stream, compare, print, save."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dose", type=float, default=20.0)
    parser.add_argument("--tiles", type=int, default=48)
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--rate", type=float, default=1.0, help="frames/s sent to the daemon")
    parser.add_argument("--offline-budget", type=float, default=90.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "online_quality.json")
    args = parser.parse_args()
    defaults = TrainConfig()
    offline_args = argparse.Namespace(
        width=defaults.network.width,
        depth=defaults.network.depth,
        patch=defaults.patch,
        batch=defaults.batch,
        lr=defaults.lr,
        residual=False,
        budget=args.offline_budget,
    )
    clean = photo_tiles(args.tile, args.tiles)
    noisy = noisy_counts(clean, args.dose)
    truth = clean * args.dose
    with tempfile.TemporaryDirectory() as tmp:
        online = stream_through_daemon(noisy, args, Path(tmp))
    offline_frames: dict[str, np.ndarray] = {}
    offline = n2s(noisy, clean, args.dose, offline_args, offline_frames)
    passes = [psnr(truth, out["frames"], args.dose) for out in online["outputs"]]
    checkpoint = online["checkpoint"]
    model = checkpoint.build_model("cpu").eval()
    reapplied = psnr(
        truth,
        denoise_counts(
            model,
            Masker(checkpoint.masker_config),
            checkpoint.normalizer,
            noisy,
            jinv=False,
            device=torch.device("cpu"),
        ),
        args.dose,
    )
    # per frame, online minus offline on the same tile: the tiles' content cancels out
    reference = offline_frames["single_pass"]
    curve = [
        psnr(truth[i : i + 1], out["frames"][i : i + 1], args.dose)
        - psnr(truth[i : i + 1], reference[i : i + 1], args.dose)
        for out in online["outputs"]
        for i in range(len(noisy))
    ]
    offline_db = offline["single_pass"]["psnr"]
    noisy_db = psnr(truth, noisy, args.dose)
    print(
        f"{len(noisy)} tiles {args.tile}x{args.tile}, peak {args.dose:g} counts; daemon at "
        f"{args.rate:g} frames/s, {args.passes} passes ({online['seconds']:.0f} s, "
        f"{online['train_steps']:.0f} online training steps); offline "
        f"{args.offline_budget:g} s ({offline['steps']} steps); {args.threads} threads"
    )
    print(f"{'':>24} {'PSNR dB':>8} {'vs offline':>10}")
    print(f"{'noisy':>24} {noisy_db:8.2f}")
    print(f"{'offline N2S':>24} {offline_db:8.2f}")
    for k, value in enumerate(passes, 1):
        classical = online["outputs"][k - 1]["denoiser"].mean()
        note = f"  ({classical:.0%} classical cold start)" if classical else ""
        print(f"{f'online, pass {k} (live)':>24} {value:8.2f} {value - offline_db:+10.2f}{note}")
    print(f"{'online final, re-applied':>24} {reapplied:8.2f} {reapplied - offline_db:+10.2f}")
    report = {
        "benchmark": "online_quality",
        "machine": f"{platform.machine()}, {args.threads} threads",
        "settings": vars(args) | {"out": str(args.out)},
        "noisy_psnr": noisy_db,
        "offline_psnr": offline_db,
        "offline_steps": offline["steps"],
        "online_pass_psnr": passes,
        "online_reapplied_psnr": reapplied,
        "online_train_steps": online["train_steps"],
        "curve_psnr": curve,
        "cold_start_frames": int(sum(out["denoiser"].sum() for out in online["outputs"])),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(with_provenance(report), indent=2, default=float))
    _plot(args, curve, len(noisy))
    print(f"wrote {args.out}")


def _plot(args, curve: list[float], per_pass: int) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 3.5))
    seen = np.arange(1, len(curve) + 1)
    ax.plot(seen, curve, ".", ms=3, label="each frame as the daemon wrote it")
    window = max(per_pass // 6, 1)
    smooth = np.convolve(curve, np.ones(window) / window, mode="valid")
    ax.plot(seen[window - 1 :], smooth, label=f"mean of {window}")
    ax.axhline(0.0, color="k", ls="--", label=f"offline N2S ({args.offline_budget:g} s)")
    ax.axhline(-0.5, color="grey", ls=":", label="-0.5 dB")
    for k in range(1, args.passes):
        ax.axvline(k * per_pass + 0.5, color="grey", lw=0.5)
    ax.set_xlabel("frames seen by the daemon")
    ax.set_ylabel("PSNR online - offline (dB)")
    ax.legend(fontsize=8)
    save_figure(fig, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
