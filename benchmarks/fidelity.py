"""Science fidelity: does denoising bias what a beamline scientist measures?

Three scenes a beamline records, each ``--frames`` frames of Poisson counts at each dose
(``--doses``, counts per pixel at the brightest feature), written as a growing SWMR file:

- ``powder``: a calibrant's rings (pyFAI's CeO2 at 0.5 A, 120 mm) on a 512x512 crop of an
  EIGER2 4M with its module gaps (pyFAI's detector model; gap pixels hold the sentinel
  65535), on a background of a tenth of the ring peak; the pattern does not change.
- ``spots``: Bragg spots on a low background (a tenth of the dose), each frame new spots
  as in a rotation series: 60 per 256x256 frame, Gaussians of 0.6-1.2 px, integrated
  intensities log-uniform from 2 to 200 times the dose.
- ``radiograph``: the first-pass scan (a 256x256 window drifting 3 px/frame over
  photographs the shipped model never saw).

Each is denoised by: calibrated TV, Anscombe + BM3D (``classical.py``, the ``[bench]``
extra), the daemon live and refined (started from scratch with its defaults), and offline
N2S trained for as long as the scan lasted. Every ``--score-every``-th frame is scored, the
same frames for every method, as a scientist would:

- powder: each frame integrated azimuthally (pyFAI ``integrate1d``, gaps masked) against
  the truth's profile: the ring intensity bias (over the bins where the truth's rings
  stand, all frames), the worst single ring's bias, and the per-frame profile error (RMS
  over the profile, as a fraction of the mean ring intensity);
- spots: summation integration (a 5x5 box less the mean of the 9x9 box's border) of every
  spot, against the same on the truth: the bias over all spots and over the weakest third;
  and a standard peak search (local maxima above the noisy frame's background + 3 sigma):
  the share of the spots found in the truth that are still found, and the false spots;
- radiograph: the flux bias (total denoised over total truth).

PSNR is given beside them, over measured pixels. ``masked_kept`` says whether every gap
pixel of the daemon's and offline output still reads as not measured. The guards of
``n2s/guards.py`` are applied to what the daemon wrote (``live+flux``, ``refined+outliers``
...): with the daemon's default ``refine_preserve_flux``, refined frames already hold
their raw totals, so ``refined+flux`` equals ``refined``; ``--daemon-options
"--no-refine-preserve-flux"`` measures the refined guard against the unscaled frames.

    python benchmarks/fidelity.py      # ~40 min on 2 cores
    python benchmarks/fidelity.py --scenes spots --doses 5 --frames 8 --size 64  # smoke
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import tempfile
import time
from pathlib import Path

import classical
import numpy as np
from common import RESULTS, write_report
from first_pass import calibrated_tv, drifting_scan, live_and_refined, offline
from scipy.ndimage import find_objects, label, maximum_filter, uniform_filter

from n2s_stream.n2s.guards import keep_outliers, preserve_frame_flux, preserve_local_flux
from n2s_stream.n2s.quality import psnr

SENTINEL = 65535
"""What an EIGER writes in a gap pixel of a 16-bit frame: not a measurement."""
SCENES = ("powder", "spots", "radiograph")
METHODS = ("noisy", "tv", "bm3d", "live", "refined", "offline")


def _flux_preserved(denoised: np.ndarray, raw: np.ndarray, valid: np.ndarray) -> np.ndarray:
    out = denoised.astype(np.float32)  # a copy: the guard scales in place
    preserve_frame_flux(out, raw, valid)
    return out


GUARDS = {
    "flux": _flux_preserved,
    "outliers": keep_outliers,
    "local4": preserve_local_flux,
}
"""Guards (``n2s/guards.py``) applied to the live and refined output: their A/B on the same
frames at no extra training time."""


# ---- the scenes ---------------------------------------------------------------------------
def powder_scene(size: int) -> tuple[np.ndarray, np.ndarray, object]:
    """Ring pattern (peak 1, background 0.1) on a ``size`` crop of an EIGER2 4M that holds
    a horizontal and a vertical module gap, its gap mask, and pyFAI's integrator for the
    crop."""
    import pyFAI
    from pyFAI.calibrant import get_calibrant
    from pyFAI.detectors import Detector
    from pyFAI.integrator.azimuthal import AzimuthalIntegrator

    eiger = pyFAI.detector_factory("Eiger2_4M")
    pixel = eiger.pixel1
    beam = (1081, 1034)  # row, column of the direct beam: near the detector's centre
    top, left = 300, 780  # crosses the gap rows 512-549 and the gap columns 1028-1039
    top, left = top + (512 - size) // 2, left + (512 - size) // 2
    mask = eiger.mask[top : top + size, left : left + size].astype(bool)
    crop = Detector(pixel1=pixel, pixel2=pixel, max_shape=(size, size))
    integrator = AzimuthalIntegrator(
        dist=0.12,
        poni1=(beam[0] - top) * pixel,
        poni2=(beam[1] - left) * pixel,
        detector=crop,
        wavelength=0.5e-10,
    )
    calibrant = get_calibrant("CeO2")
    calibrant.wavelength = 0.5e-10
    rings = calibrant.fake_calibration_image(integrator, shape=(size, size), resolution=0.1)
    pattern = 0.1 + 0.9 * rings / rings.max()
    return pattern.astype(np.float32), mask, integrator


def spot_frames(
    n: int, size: int, rng: np.random.Generator, count: int = 60
) -> tuple[np.ndarray, list[np.ndarray]]:
    """``n`` frames of new Bragg spots on a background of 0.1 (in units of the dose), and
    each frame's spots as rows of (row, column, integrated intensity)."""
    frames, spots = [], []
    rows, cols = np.mgrid[0:9, 0:9]
    for _ in range(n):
        frame = np.full((size, size), 0.1)
        centres = rng.uniform(6, size - 6, (count, 2))
        intensity = np.exp(rng.uniform(np.log(2), np.log(200), count))
        widths = rng.uniform(0.6, 1.2, count)
        for (r, c), total, width in zip(centres, intensity, widths, strict=True):
            top, left = int(r) - 4, int(c) - 4
            blob = np.exp(-((rows + top - r) ** 2 + (cols + left - c) ** 2) / (2 * width**2))
            frame[top : top + 9, left : left + 9] += total * blob / blob.sum()
        frames.append(frame)
        spots.append(np.column_stack([centres, intensity]))
    return np.stack(frames).astype(np.float32), spots


# ---- the scores ---------------------------------------------------------------------------
def ring_scores(
    integrator, truth: np.ndarray, stack: np.ndarray, mask: np.ndarray, bins: int = 300
) -> dict:
    """Azimuthal profiles of each frame against the truth's: ring intensity bias (%), the
    worst ring's bias (%), and the per-frame profile error (% of the mean ring intensity)."""

    def profile(frame: np.ndarray) -> np.ndarray:
        unmeasured = mask | ~np.isfinite(frame)
        result = integrator.integrate1d(
            np.where(unmeasured, 0, frame),
            bins,
            mask=unmeasured,
            unit="2th_deg",
            correctSolidAngle=False,
        )
        return result.intensity

    reference = profile(truth)
    floor = np.median(reference)
    on_ring = reference > floor + 0.2 * (reference.max() - floor)
    ring_id = np.cumsum(np.diff(np.concatenate([[0], on_ring.astype(int)])) == 1) * on_ring
    profiles = np.stack([profile(frame) for frame in stack])
    ring_total = reference[on_ring].sum()
    bias = (profiles[:, on_ring].sum(axis=1) / ring_total - 1).mean()
    per_ring = [
        (profiles[:, ring_id == k].sum(axis=1) / reference[ring_id == k].sum() - 1).mean()
        for k in range(1, ring_id.max() + 1)
    ]
    error = np.sqrt(np.mean((profiles - reference) ** 2, axis=1)) / reference[on_ring].mean()
    return {
        "ring_bias_pct": 100 * float(bias),
        "worst_ring_bias_pct": 100 * float(max(per_ring, key=abs)),
        "profile_error_pct": 100 * float(error.mean()),
        "rings": int(ring_id.max()),
    }


def box_intensities(frame: np.ndarray, spots: np.ndarray) -> np.ndarray:
    """Summation integration of each spot: the 5x5 box around it less 25 times the mean of
    the 9x9 box's border (the local background)."""
    values = []
    for r, c, _ in spots:
        row, col = round(r), round(c)
        outer = frame[row - 4 : row + 5, col - 4 : col + 5].astype(np.float64)
        inner = outer[2:7, 2:7]
        border = (outer.sum() - outer[1:8, 1:8].sum()) / (81 - 49)
        values.append(inner.sum() - 25 * border)
    return np.array(values)


def peaks(frame: np.ndarray, threshold: float) -> np.ndarray:
    """A standard peak search: (row, column) of the 3x3 local maxima above ``threshold``,
    a plateau of equal values (integer counts) counted once, at its first pixel."""
    frame = np.nan_to_num(frame.astype(np.float64))
    maxima, count = label((frame == maximum_filter(frame, size=3)) & (frame > threshold))
    if count == 0:
        return np.empty((0, 2), int)
    firsts = find_objects(maxima)
    return np.array([(rows.start, cols.start) for rows, cols in firsts])


def spot_scores(
    truth: np.ndarray, stack: np.ndarray, noisy: np.ndarray, spots: list[np.ndarray]
) -> dict:
    """Spot intensities (bias %, all and the weakest third) and the peak search: share of
    the truth's findable spots found (%), and false spots per frame."""
    ratios, weak, found, findable, false = [], [], 0, 0, 0
    for true_frame, frame, raw, frame_spots in zip(truth, stack, noisy, spots, strict=True):
        measured = box_intensities(true_frame, frame_spots)
        estimated = box_intensities(frame, frame_spots)
        ratios.append(estimated.sum() / measured.sum())
        third = measured <= np.quantile(measured, 1 / 3)
        weak.append(estimated[third].sum() / measured[third].sum())
        on_spot = (true_frame > true_frame.min() + 1e-3).astype(float)
        far = uniform_filter(on_spot, 9) < 1e-6  # 4 px or more from every spot
        threshold = raw[far].mean() + 3 * raw[far].std()
        centres, true_peaks = frame_spots[:, :2], peaks(true_frame, threshold)
        in_truth = [p for p in centres if np.any(np.hypot(*(true_peaks - p).T) <= 1.5)]
        detected = peaks(frame, threshold)
        findable += len(in_truth)
        found += sum(np.any(np.hypot(*(detected - p).T) <= 2) for p in in_truth)
        false += sum(np.all(np.hypot(*(centres - d).T) > 3) for d in detected)
    return {
        "spot_bias_pct": 100 * (float(np.mean(ratios)) - 1),
        "weak_spot_bias_pct": 100 * (float(np.mean(weak)) - 1),
        "spots_found_pct": 100 * found / max(findable, 1),
        "false_spots_per_frame": false / len(stack),
    }


def flux_scores(truth: np.ndarray, stack: np.ndarray) -> dict:
    """Total denoised counts over total true counts, less one (%)."""
    return {"flux_bias_pct": 100 * (float(stack.sum(dtype=np.float64) / truth.sum()) - 1)}


# ---- one scene at one dose ----------------------------------------------------------------
def filled(noisy: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The frames with gap pixels set to the mean of the measured ones: what the classical
    denoisers get (they know no mask)."""
    out = noisy.astype(np.float32).copy()
    out[:, mask] = out[:, ~mask].mean()
    return out


def denoised_stacks(
    noisy: np.ndarray,
    mask: np.ndarray,
    scored: np.ndarray,
    dose: float,
    args: argparse.Namespace,
) -> tuple[dict[str, np.ndarray | None], dict]:
    """Each method's output on the scored frames, and what it cost."""
    classical_input = filled(noisy[scored], mask)
    stacks: dict[str, np.ndarray | None] = {
        "noisy": noisy[scored],
        "tv": calibrated_tv(classical_input, dose),
    }
    costs: dict = {}
    if args.bm3d:
        stacks["bm3d"], costs["bm3d_cpu_seconds_per_frame"] = classical.framewise(
            classical.anscombe_bm3d, classical_input
        )
    with tempfile.TemporaryDirectory() as tmp:
        run = live_and_refined(noisy, args, Path(tmp), tuple(shlex.split(args.daemon_options)))
        stacks["live"] = run["live"][scored].astype(np.float32)
        refined = run["refined"]
        stacks["refined"] = None if refined is None else refined[scored].astype(np.float32)
        stacks["offline"] = offline(noisy, run["scan_seconds"], Path(tmp))[scored]
    for name in ("live", "refined"):
        output = stacks[name]
        if output is None:
            continue
        raw = noisy[scored].astype(np.float32)
        for guard_name, guard in GUARDS.items():
            stacks[f"{name}+{guard_name}"] = np.stack(
                [guard(frame, counts, ~mask) for frame, counts in zip(output, raw, strict=True)]
            )
    costs["live_classical_frames"] = int(np.sum(run["denoiser"][scored] == 1))
    costs["scan_seconds"] = run["scan_seconds"]
    costs["refine_seconds"] = run["refine_seconds"]
    return stacks, costs


def score_scene(scene: str, dose: float, args: argparse.Namespace, rng) -> dict:
    """One scene at one dose: every method's scores on the same frames."""
    size = args.size if scene != "powder" else args.powder_size
    mask = np.zeros((size, size), bool)
    spots: list[np.ndarray] = []
    if scene == "powder":
        pattern, mask, integrator = powder_scene(size)
        truth = np.repeat(pattern[None] * dose, args.frames, axis=0)
    elif scene == "spots":
        truth, spots = spot_frames(args.frames, size, rng)
        truth *= dose
    else:
        truth = drifting_scan(args.frames, size, 3.0) * dose
    noisy = rng.poisson(truth).astype(np.uint16)  # as the detector writes them
    noisy[:, mask] = SENTINEL
    scored = np.arange(0, args.frames, args.score_every)
    started = time.monotonic()
    stacks, costs = denoised_stacks(noisy, mask, scored, dose, args)
    truth = truth[scored]
    spots = [spots[k] for k in scored] if spots else spots
    measured = np.broadcast_to(~mask, truth.shape)
    true_counts = truth[measured]
    row: dict = {"scene": scene, "dose": dose, "frames": args.frames, "scored": len(scored)}
    row |= costs | {"seconds": time.monotonic() - started, "methods": {}}
    for name, stack in stacks.items():
        if stack is None:
            continue
        counts = stack[measured]
        result = {"psnr": psnr(true_counts, counts, data_range=truth.max())}
        if scene == "powder":
            result |= ring_scores(integrator, truth[0], stack, mask)
        elif scene == "spots":
            result |= spot_scores(truth, stack, stacks["noisy"], spots)
        result |= flux_scores(true_counts, counts)
        if name.partition("+")[0] in ("live", "refined", "offline") and mask.any():
            gap = stack[:, mask]
            # float16 output holds the sentinel as inf, float32 as itself
            result["masked_kept"] = bool(np.all(~np.isfinite(gap) | (gap == SENTINEL)))
        row["methods"][name] = result
    return row


# ---- the report ---------------------------------------------------------------------------
COLUMNS = {
    "powder": ("psnr", "ring_bias_pct", "worst_ring_bias_pct", "profile_error_pct"),
    "spots": (
        "psnr",
        "spot_bias_pct",
        "weak_spot_bias_pct",
        "spots_found_pct",
        "false_spots_per_frame",
    ),
    "radiograph": ("psnr", "flux_bias_pct"),
}


def print_row(row: dict) -> None:
    """One table per scene and dose: a line per method."""
    columns = COLUMNS[row["scene"]]
    print(
        f"\n{row['scene']} at {row['dose']:g} counts ({row['scored']} of {row['frames']} "
        f"frames scored)\n{'method':>16} " + " ".join(f"{c:>22}" for c in columns),
        flush=True,
    )
    for name, result in row["methods"].items():
        kept = "" if "masked_kept" not in result else f"  gaps kept: {result['masked_kept']}"
        print(f"{name:>16} " + " ".join(f"{result[c]:22.2f}" for c in columns) + kept, flush=True)


TABLE_METHODS = {
    "noisy": "noisy",
    "TV": "tv",
    "BM3D": "bm3d",
    "live": "live",
    "refined": "refined+flux",
    "offline": "offline",
}
"""The Quantitative use page's columns and the report's methods they show: refined frames
at their raw totals, as ``refine_preserve_flux`` (the daemon's default) writes them."""


def markdown(report: dict, bm3d_report: dict | None = None) -> str:
    """The Quantitative use page's tables (powder rings, Bragg spots, radiographs) from a
    report, so the page's figures are the record's; the BM3D column from ``bm3d_report``
    (a run of the same frames, which its noisy scores must show) where the report has
    none."""

    def methods_of(scene: str, dose: float) -> dict | None:
        chosen = [r for r in report["rows"] if (r["scene"], r["dose"]) == (scene, dose)]
        if not chosen:
            return None
        methods = dict(chosen[0]["methods"])
        if "bm3d" not in methods and bm3d_report is not None:
            other = [r for r in bm3d_report["rows"] if (r["scene"], r["dose"]) == (scene, dose)]
            if other and other[0]["methods"].get("noisy") != methods.get("noisy"):
                raise SystemExit(
                    f"--bm3d-from: {scene} at dose {dose:g}: its noisy frames score "
                    "otherwise than this report's, so they are not the same frames"
                )
            methods["bm3d"] = other[0]["methods"]["bm3d"] if other else {}
        return methods

    doses = sorted({row["dose"] for row in report["rows"]})
    names = " | ".join(TABLE_METHODS)

    def value(methods: dict, column: str, key: str, fmt: str, unit: str = "") -> str:
        result = methods.get(TABLE_METHODS[column], {})
        return format(result[key], fmt).replace("-0.00", "0.00") + unit if key in result else "-"

    def cells(methods: dict, key: str, fmt: str, unit: str = " %") -> str:
        return " | ".join(value(methods, c, key, fmt, unit) for c in TABLE_METHODS)

    def header(first: str) -> list[str]:
        return [f"| {first} | | {names} |", "|---" * (len(TABLE_METHODS) + 2) + "|"]

    out = header("peak counts")
    for dose in doses:
        if powder := methods_of("powder", dose):
            out.append(f"| {dose:g} | ring bias | {cells(powder, 'ring_bias_pct', '.2f')} |")
            out.append(f"| | worst ring | {cells(powder, 'worst_ring_bias_pct', '.1f')} |")
            out.append(f"| | profile error | {cells(powder, 'profile_error_pct', '.2f')} |")
            out.append(f"| | PSNR (dB) | {cells(powder, 'psnr', '.2f', '')} |")
    out += ["", *header("dose")]
    for dose in doses:
        if spots := methods_of("spots", dose):
            found = " | ".join(
                value(spots, c, "spots_found_pct", ".1f", " % / ")
                + value(spots, c, "false_spots_per_frame", "g")
                for c in TABLE_METHODS
            )
            out.append(f"| {dose:g} | spot bias | {cells(spots, 'spot_bias_pct', '.1f')} |")
            out.append(f"| | weakest third | {cells(spots, 'weak_spot_bias_pct', '.1f')} |")
            out.append(f"| | found / false per frame | {found} |")
            out.append(f"| | PSNR (dB) | {cells(spots, 'psnr', '.2f', '')} |")
    out += ["", *header("peak counts")]
    for dose in doses:
        if radiograph := methods_of("radiograph", dose):
            out.append(f"| {dose:g} | total | {cells(radiograph, 'flux_bias_pct', '.2f')} |")
            out.append(f"| | PSNR (dB) | {cells(radiograph, 'psnr', '.2f', '')} |")
    return "\n".join(out)


def parse_args() -> argparse.Namespace:
    """The benchmark's options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", nargs="+", choices=SCENES, default=list(SCENES))
    parser.add_argument("--doses", type=float, nargs="+", default=[1.0, 5.0, 20.0])
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--size", type=int, default=256, help="spots and radiograph frames")
    parser.add_argument("--powder-size", type=int, default=512, help="the EIGER2 4M crop")
    parser.add_argument("--score-every", type=int, default=4)
    parser.add_argument("--rate", type=float, default=2.0, help="frames/s written")
    parser.add_argument("--refine-timeout", type=float, default=300.0)
    parser.add_argument("--no-bm3d", dest="bm3d", action="store_false")
    parser.add_argument(
        "--daemon-options",
        default="",
        help="more options for the daemon's live and refined rows, e.g. '--objective noise2self'",
    )
    parser.add_argument(
        "--markdown",
        type=Path,
        help="print the Quantitative use page's tables from this report and exit",
    )
    parser.add_argument(
        "--bm3d-from",
        type=Path,
        help="with --markdown: the BM3D column from this report (a run of the same frames)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "fidelity.json")
    args = parser.parse_args()
    if args.markdown:
        return args
    if "powder" in args.scenes and importlib.util.find_spec("pyFAI") is None:
        parser.error("the powder scene needs pyFAI: pip install -e '.[bench]'")
    if args.bm3d and classical.available():
        print(f"no BM3D row: {classical.available()}", flush=True)
        args.bm3d = False
    return args


def main() -> None:
    """Every scene at every dose: print the tables, write the JSON."""
    args = parse_args()
    if args.markdown:
        bm3d = json.loads(args.bm3d_from.read_text()) if args.bm3d_from else None
        print(markdown(json.loads(args.markdown.read_text()), bm3d))
        return
    rng = np.random.default_rng(0)
    rows = []
    for scene in args.scenes:
        for dose in args.doses:
            rows.append(score_scene(scene, dose, args, rng))
            print_row(rows[-1])
    write_report(args.out, "fidelity", args, rows)


if __name__ == "__main__":
    main()
