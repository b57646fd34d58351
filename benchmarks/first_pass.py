"""A scan seen once: what the daemon writes live, what it refines, and the references.

A 256x256 window drifts ``--drifts`` pixels per frame across a strip of real photographs
and fine textures (scikit-image's bundled images that the shipped pretrained model never
saw: astronaut, gravel, coffee, grass, camera, coins, moon; 256 columns of each),
``--frames`` frames with Poisson noise at each peak dose, arriving at ``--rate`` frames/s
in a growing SWMR areaDetector file. The daemon starts from scratch with its defaults
(shipped pretrained model, cold start, refinement on). In the same run: calibrated TV
(J-invariantly calibrated on the first frame over a fine grid) and offline N2S
(``n2s-stream train`` with its defaults on the whole scan, for as long as the scan
lasted, last weights, single pass), and the same from the shipped model
(``--pretrained``). Mean PSNR (dB) over the scan, first 10 s in brackets: noisy, TV,
offline, offline from the shipped model, live as written, refined
(``/entry/refined/data``), and the daemon's final weights re-applied without test-time
augmentation (the TTA lever's A/B); then the same over the frames of each strip image.
With the ``[bench]`` extra, the classical gold standard too: Anscombe + BM3D frame by
frame with the exact unbiased inverse (``classical.py``), with its CPU seconds per frame
(``--no-bm3d`` leaves it out: it costs about 5 CPU-seconds a 256x256 frame, 2.5 s on
2 cores).
Writes ``benchmarks/results/first_pass.json``.

    python benchmarks/first_pass.py                  # ~50 min on 2 cores
    python benchmarks/first_pass.py --frames 24 --size 64 --doses 20 --drifts 3 --rate 8  # smoke
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import classical
import h5py
import numpy as np
import torch
from common import N2S, RESULTS, free_port, write_report
from offline_quality import noisy_counts
from scipy.ndimage import map_coordinates, zoom
from skimage import data as skdata
from skimage.color import rgb2gray
from skimage.restoration import calibrate_denoiser, denoise_tv_chambolle

from n2s_stream.commands.offline import train
from n2s_stream.config import TrainConfig
from n2s_stream.formats.checkpoint import Checkpoint, load_checkpoint
from n2s_stream.n2s.denoising import denoise_counts
from n2s_stream.n2s.masking import Masker
from n2s_stream.n2s.quality import psnr
from n2s_stream.n2s.unblind import noise_model, unblind
from n2s_stream.options import make
from n2s_stream.pretrained import IMAGES, MORE_IMAGES
from n2s_stream.runtime.metrics import scrape
from n2s_stream.runtime.state import newest_checkpoint

STRIP = ("astronaut", "gravel", "coffee", "grass", "camera", "coins", "moon")
"""Photographs and fine textures the shipped pretrained model never saw, taking turns: a
1 px/frame scan crosses from astronaut into gravel, a 3 px/frame one reaches grass."""
PRETRAINING_IMAGES = IMAGES + MORE_IMAGES
assert not set(STRIP) & set(PRETRAINING_IMAGES), "scored images must be unseen in pretraining"


BUNDLED = (
    "astronaut",
    "brick",
    "camera",
    "cat",
    "cell",
    "checkerboard",
    "chelsea",
    "clock",
    "coffee",
    "coins",
    "colorwheel",
    "grass",
    "gravel",
    "horse",
    "hubble_deep_field",
    "immunohistochemistry",
    "logo",
    "microaneurysms",
    "moon",
    "page",
    "retina",
    "rocket",
    "shepp_logan_phantom",
    "text",
)
"""scikit-image's grey or RGB images that ship in its wheel (no download)."""


def bundled(name: str) -> np.ndarray:
    """scikit-image's bundled image ``name`` as it ships."""
    return getattr(skdata, name)()


def strip_problem(strip: tuple[str, ...]) -> str | None:
    """Why ``strip`` cannot be scored, or None: an image that is not bundled, one named
    twice, or one the shipped models were trained on (compared by pixels, so that an alias
    such as ``cat`` for ``chelsea`` is refused too)."""
    unknown = [name for name in strip if name not in BUNDLED]
    if unknown:
        return f"{unknown} are not scikit-image's bundled images"
    repeated = sorted({name for name in strip if strip.count(name) > 1})
    if repeated:
        return f"{repeated} named more than once"
    seen = [bundled(name) for name in PRETRAINING_IMAGES]
    trained = [
        name
        for name, image in zip(strip, map(bundled, strip), strict=True)
        if any(np.array_equal(image, other) for other in seen)
    ]
    if trained:
        return f"{trained} are in the shipped models' training set"
    return None


def photo_strip(height: int, width: int, strip: tuple[str, ...] = STRIP) -> np.ndarray:
    """The bundled images named in ``strip`` side by side, each scaled to ``height`` rows
    and cut to its central ``width`` columns (so that a window drifting 1 px/frame for 240
    frames already crosses into a second one), grey values in [0, 1]."""
    parts = []
    for name in strip:
        image = bundled(name)
        image = rgb2gray(image) if image.ndim == 3 else image / 255.0
        image = zoom(image.astype(np.float64), height / image.shape[0], order=1)
        left = max((image.shape[1] - width) // 2, 0)
        parts.append(image[:, left : left + width])
    return np.concatenate(parts, axis=1)


def drifting_scan(n: int, size: int, drift: float, strip: tuple[str, ...] = STRIP) -> np.ndarray:
    """``(n, size, size)`` crops of the strip from a window moving ``drift`` pixels per frame
    to the right (a little down too), from the start of the strip, reflected at its end;
    values in [0, 1]."""
    image = photo_strip(2 * size, size, strip)
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float64)
    frames = [
        map_coordinates(
            image, [rows + size / 2 + 0.2 * drift * k, cols + drift * k], order=1, mode="reflect"
        )
        for k in range(n)
    ]
    return np.clip(np.stack(frames), 0, 1).astype(np.float32)


def write_growing(path: Path, frames: np.ndarray, rate: float) -> None:
    """Write ``frames`` as an areaDetector file does: SWMR, one frame at a time, flushed."""
    with h5py.File(path, "w", libver="latest") as handle:
        data = handle.create_dataset(
            "/entry/data/data",
            shape=(0, *frames.shape[1:]),
            maxshape=(None, *frames.shape[1:]),
            chunks=(1, *frames.shape[1:]),
            dtype=np.uint16,
        )
        handle.swmr_mode = True
        started = time.monotonic()
        for k, frame in enumerate(frames):
            data.resize(k + 1, axis=0)
            data[k] = frame
            data.flush()
            time.sleep(max(0.0, started + (k + 1) / rate - time.monotonic()))


def live_and_refined(
    noisy: np.ndarray, args: argparse.Namespace, tmp: Path, extra: tuple[str, ...] = ()
) -> dict:
    """Run the daemon (with ``extra`` options) on the scan as it is written; return what
    it wrote live and refined, and its final weights."""
    acq, out, state, port = tmp / "acq", tmp / "out", tmp / "state", free_port()
    acq.mkdir()
    daemon = subprocess.Popen(
        [
            *N2S,
            "--watch",
            str(acq),
            "--out",
            str(out),
            "--state-dir",
            str(state),
            "--metrics-port",
            str(port),
            "--device",
            "cpu",
            "--log-level",
            "WARNING",
            "--settle-seconds",
            "2",
            *extra,
        ]
    )
    try:
        while not scrape(port):
            time.sleep(0.2)
        started = time.monotonic()
        writer = threading.Thread(
            target=write_growing, args=(acq / "scan_0001.h5", noisy, args.rate)
        )
        writer.start()
        writer.join()
        scan_seconds = time.monotonic() - started
        output = out / "scan_0001_n2s.h5"
        while scrape(port).get("n2s_frames_denoised_total", 0) < len(noisy):
            time.sleep(0.5)  # the last frames written live
        deadline = time.monotonic() + (0 if "--no-refine" in extra else args.refine_timeout)
        refined = None
        while refined is None and time.monotonic() < deadline:
            time.sleep(2.0)
            if scrape(port).get("n2s_refined_frames_total", 0) < len(noisy):
                continue
            try:
                with h5py.File(output, "r", swmr=True) as handle:
                    ready = "/entry/refined/data" in handle and handle["/entry/refined/data"].shape[
                        0
                    ] == len(noisy)
                    if ready:
                        refined = handle["/entry/refined/data"][()]
            except OSError:
                pass  # being written: try again
        refine_seconds = time.monotonic() - started - scan_seconds
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=180)
    with h5py.File(output, "r") as handle:
        live = handle["/entry/data/data"][()]
        denoiser = handle["/entry/provenance/denoiser"][()]
    return {
        "live": live,
        "refined": refined,
        "denoiser": denoiser,
        "checkpoint": newest_checkpoint(state / "checkpoints"),
        "scan_seconds": scan_seconds,
        "refine_seconds": refine_seconds,
    }


def calibrated_tv(noisy: np.ndarray, dose: float) -> np.ndarray:
    """TV with its weight calibrated J-invariantly on the first frame (30 weights)."""
    scaled = noisy / dose
    grid = {"weight": list(np.geomspace(0.005, 2.0, 30))}
    calibrated = calibrate_denoiser(scaled[0], denoise_tv_chambolle, grid, stride=4)
    return np.stack([calibrated(frame) for frame in scaled]) * dose


def offline(
    noisy: np.ndarray, seconds: float, tmp: Path, *, pretrained: bool = False, **options: object
) -> np.ndarray:
    """``n2s-stream train`` with its defaults (``--pretrained``: from the shipped model; other
    ``options`` of `TrainConfig` by name) on the whole scan for ``seconds``; the last weights
    denoise the scan (single pass)."""
    source = tmp / "scan.h5"
    with h5py.File(source, "w") as handle:
        handle["/data"] = noisy.astype(np.uint16)
    config = make(
        TrainConfig,
        h5=source,
        device="cpu",
        epochs=100_000,
        max_seconds=seconds,
        out_dir=tmp / f"runs{int(pretrained)}",
        pretrained=pretrained,
        progress=False,
        **options,
    )
    checkpoint = load_checkpoint(train(config).last)
    return final_weights(checkpoint, noisy)


def final_weights(checkpoint: Checkpoint, noisy: np.ndarray) -> np.ndarray:
    """The checkpoint's weights over the whole scan, single pass, no augmentation."""
    model = checkpoint.build_model("cpu")
    masker = Masker(checkpoint.masker_config)
    return np.concatenate(
        [
            denoise_counts(
                model,
                masker,
                checkpoint.normalizer,
                noisy[k : k + 16],
                jinv=False,
                device=torch.device("cpu"),
            )
            for k in range(0, len(noisy), 16)
        ]
    )


def final_unblinded(checkpoint: Checkpoint, noisy: np.ndarray) -> dict[str, np.ndarray]:
    """The un-blind lever on the final weights: J-invariant inference over the scan, and
    its posterior mean with the pixel (``n2s/unblind.py``; noise model fitted on the scan;
    prior spread per frame, and from the 15x15 neighbours)."""
    model = checkpoint.build_model("cpu")
    masker = Masker(checkpoint.masker_config)
    jinv = np.concatenate(
        [
            denoise_counts(
                model,
                masker,
                checkpoint.normalizer,
                noisy[k : k + 16],
                jinv=True,
                device=torch.device("cpu"),
            )
            for k in range(0, len(noisy), 16)
        ]
    )
    gain, offset = noise_model(jinv, noisy)
    return {
        "final_jinv": jinv,
        "final_unblind": unblind(jinv, noisy, gain=gain, offset=offset),
        "final_unblind15": unblind(jinv, noisy, gain=gain, offset=offset, window=15),
    }


def scores(truth: np.ndarray, stack: np.ndarray | None, first: int, dose: float) -> dict | None:
    """PSNR of ``stack`` over the scan and over its ``first`` frames (None: no stack)."""
    if stack is None:
        return None
    return {
        "mean": psnr(truth, stack, data_range=dose),
        "first_10s": psnr(truth[:first], stack[:first], data_range=dose),
    }


SECTION_COLUMNS = ("tv", "bm3d", "offline", "offline_shipped", "live", "refined")
"""What the per-image lines print."""


def image_sections(
    n: int, size: int, drift: float, strip: tuple[str, ...] = STRIP
) -> dict[str, np.ndarray]:
    """The frame indices of each strip image that holds the window's centre column (the
    scan reflects at the strip's end, as `drifting_scan` does), in order of first visit:
    scores per photograph or texture, not only over the whole scan."""
    width = len(strip) * size
    centre = (drift * np.arange(n) + size / 2) % (2 * width)
    centre = np.where(centre < width, centre, 2 * width - 1 - centre)
    owner = np.clip(centre // size, 0, len(strip) - 1).astype(int)  # fractional centres
    order = dict.fromkeys(owner.tolist())
    return {strip[i]: np.flatnonzero(owner == i) for i in order}


def section_scores(
    truth: np.ndarray,
    stacks: dict[str, np.ndarray | None],
    sections: dict[str, np.ndarray],
    dose: float,
) -> dict[str, dict[str, float]]:
    """Mean PSNR of each stack over each image's frames (None stacks left out)."""
    return {
        image: {
            name: psnr(truth[frames], stack[frames], data_range=dose)
            for name, stack in stacks.items()
            if stack is not None
        }
        for image, frames in sections.items()
    }


def frame_margins(
    truth: np.ndarray, stack: np.ndarray, reference: np.ndarray, first: int, dose: float
) -> list[float]:
    """Per-frame PSNR of ``stack`` minus ``reference`` over the ``first`` frames: "never
    below the classical denoiser" is a claim about every frame, not the mean."""
    return [
        psnr(truth[k], stack[k], data_range=dose) - psnr(truth[k], reference[k], data_range=dose)
        for k in range(min(first, len(stack)))
    ]


def parse_args() -> argparse.Namespace:
    """The benchmark's options (a strip with a pretraining image is refused)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=240)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rate", type=float, default=3.0, help="frames/s written")
    parser.add_argument("--doses", type=float, nargs="+", default=[5.0, 20.0, 100.0])
    parser.add_argument("--drifts", type=float, nargs="+", default=[3.0, 1.0])
    parser.add_argument("--refine-timeout", type=float, default=600.0)
    parser.add_argument("--out", type=Path, default=RESULTS / "first_pass.json")
    parser.add_argument(
        "--strip",
        nargs="+",
        default=list(STRIP),
        metavar="IMAGE",
        help="scikit-image images side by side that the window drifts over "
        "(reflected at the end), e.g. --strip gravel grass; never one "
        "the shipped models were trained on",
    )
    parser.add_argument(
        "--unblind",
        action="store_true",
        help="also score the un-blind lever on the final weights (J-invariant "
        "inference, then the posterior mean with the pixel); it needs a blind network, "
        "so the daemon's main run then trains by --objective noise2self",
    )
    parser.add_argument(
        "--variants",
        nargs="*",
        default=[],
        metavar="LABEL=OPTIONS",
        help="also run the daemon with these options (A/B in the same run), "
        "e.g. 'recent32=--recent-frames 32'",
    )
    parser.add_argument(
        "--no-bm3d",
        dest="bm3d",
        action="store_false",
        help="leave out the Anscombe + BM3D anchor (without the [bench] extra it is left "
        "out anyway)",
    )
    args = parser.parse_args()
    if args.bm3d and classical.available():
        print(f"no BM3D row: {classical.available()}", flush=True)
        args.bm3d = False
    args.strip = tuple(args.strip)
    problem = strip_problem(args.strip)
    if problem:
        parser.error(f"--strip: {problem}")
    args.variants = {
        label: tuple(options.split())
        for label, _, options in (v.partition("=") for v in args.variants)
    }
    return args


def score_row(
    args: argparse.Namespace, clean: np.ndarray, dose: float, drift: float, first: int
) -> dict:
    """One dose and drift: the daemon (and each variant) on the noisy scan, the references,
    and the scores of each over the scan, its first frames and each strip image."""
    noisy = noisy_counts(clean, dose)
    truth = clean * dose
    lever = {}
    row_extra: dict = {}
    for label, extra in args.variants.items():
        with tempfile.TemporaryDirectory() as tmp:
            other = live_and_refined(noisy, args, Path(tmp), extra)
        lever[label] = {
            name: scores(truth, other[name], first, dose) for name in ("live", "refined")
        }
        lever[label]["classical_frames"] = int(np.sum(other["denoiser"] == 1))
    blind = ("--objective", "noise2self") if args.unblind else ()
    with tempfile.TemporaryDirectory() as tmp:
        run = live_and_refined(noisy, args, Path(tmp), blind)
        stacks = {
            "noisy": noisy,
            "tv": calibrated_tv(noisy, dose),
            "offline": offline(noisy, run["scan_seconds"], Path(tmp)),
            "offline_shipped": offline(noisy, run["scan_seconds"], Path(tmp), pretrained=True),
            "live": run["live"],
            "refined": run["refined"],
            "final_no_tta": None,
        }
        if args.bm3d:
            stacks["bm3d"], row_extra["bm3d_cpu_seconds_per_frame"] = classical.framewise(
                classical.anscombe_bm3d, noisy
            )
        if run["checkpoint"] is None:  # the daemon published no trained weights
            print("no checkpoint: the daemon trained too little to publish", flush=True)
        else:
            stacks["final_no_tta"] = final_weights(run["checkpoint"], noisy)
            if args.unblind:
                stacks |= final_unblinded(run["checkpoint"], noisy)
    row: dict = {
        "dose": dose,
        "drift": drift,
        "scan_seconds": run["scan_seconds"],
        "refine_seconds": run["refine_seconds"],
        "classical_frames": int(np.sum(run["denoiser"] == 1)),
    } | row_extra
    row |= {name: scores(truth, stack, first, dose) for name, stack in stacks.items()}
    row["live_tv_frames_10s"] = frame_margins(truth, stacks["live"], stacks["tv"], first, dose)
    row["variants"] = lever
    sections = image_sections(args.frames, args.size, drift, args.strip)
    row["sections"] = {image: [int(frames[0]), len(frames)] for image, frames in sections.items()}
    row["by_image"] = section_scores(truth, stacks, sections, dose)
    return row


def print_row(row: dict, columns: tuple[str, ...]) -> None:
    """One table line, then a line per strip image and per variant."""
    cells = " ".join(
        f"{'-':>15}"
        if row.get(c) is None
        else f"{row[c]['mean']:7.2f} ({row[c]['first_10s']:5.2f})"
        for c in columns
    )
    refined = row["refined"]["mean"] - row["offline"]["mean"] if row["refined"] else np.nan
    print(
        f"{row['dose']:5g} {row['drift']:5g} {cells} "
        f"{row['live']['mean'] - row['offline']['mean']:8.2f} {refined:8.2f} "
        f"{row['live']['first_10s'] - row['tv']['first_10s']:7.2f} "
        f"{min(row['live_tv_frames_10s'], default=np.nan):6.2f}",
        flush=True,
    )
    for image, (start, length) in row["sections"].items():
        by = row["by_image"][image]
        print(
            f"{'':11} {image:>15} ({length} frames from {start}): "
            + ", ".join(f"{c} {by[c]:.2f}" for c in SECTION_COLUMNS if c in by),
            flush=True,
        )
    if row.get("bm3d"):
        live, bm3d = row["live"], row["bm3d"]
        refined_margin = f"{row['refined']['mean'] - bm3d['mean']:+.2f}" if row["refined"] else "-"
        print(
            f"{'':11} {'vs BM3D':>15}: live {live['mean'] - bm3d['mean']:+.2f}, "
            f"first 10 s {live['first_10s'] - bm3d['first_10s']:+.2f}, "
            f"refined {refined_margin} dB; BM3D "
            f"{row['bm3d_cpu_seconds_per_frame']:.2f} CPU-s/frame",
            flush=True,
        )
    for label, result in row["variants"].items():
        print(
            f"{'':11} {label:>15}: live {result['live']['mean']:.2f} "
            f"({result['live']['first_10s']:.2f}), "
            f"{result['live']['mean'] - row['offline']['mean']:+.2f} vs offline, "
            f"{result['live']['mean'] - row['live']['mean']:+.2f} vs default"
            + ("" if result["refined"] is None else f"; refined {result['refined']['mean']:.2f}")
            + f"; {result['classical_frames']} classical frames",
            flush=True,
        )


def main() -> None:
    """Every dose and drift: print the table, write the JSON."""
    args = parse_args()
    first = max(1, int(10 * args.rate))
    print(
        f"{args.frames} frames {args.size}x{args.size} at {args.rate:g} frames/s, seen once; "
        f"mean PSNR dB (first 10 s = {first} frames)"
    )
    anchor = ("bm3d",) if args.bm3d else ()
    unblind = ("final_jinv", "final_unblind", "final_unblind15") if args.unblind else ()
    trained = ("offline", "offline_shipped", "live", "refined", "final_no_tta")
    columns = ("noisy", "tv", *anchor, *trained, *unblind)
    print(
        f"{'peak':>5} {'drift':>5} "
        + " ".join(f"{c:>15}" for c in columns)
        + f" {'live-off':>8} {'ref-off':>8} {'10s-tv':>7} {'worst':>6}"
    )
    rows = []
    for drift in args.drifts:
        clean = drifting_scan(args.frames, args.size, drift, args.strip)
        for dose in args.doses:
            rows.append(score_row(args, clean, dose, drift, first))
            print_row(rows[-1], columns)
    write_report(args.out, "first_pass", args, rows)


if __name__ == "__main__":
    main()
