"""How good is a starting model before any online training: the first frames' quality.

The daemon's first frames come from its starting model (the shipped one for its
objective, or the file ``[training] pretrained_model`` names), before online training has
changed it. This scores starting-model files on first_pass's scan (a 256x256 window
drifting 3 px/frame across photographs and textures that no shipped model was trained
on), every ``--every``-th frame of ``--frames``, with Poisson noise at each ``--doses``
peak: single pass, normalised as the daemon normalises (fitted on the first frame), mean
PSNR (dB) per dose and per strip image. "shipped" is the blind file; ``--models
nonblind=n2s_stream/pretrained/unet_w16_d2_k1_nonblind.pt`` adds the file the default
objective starts from. The calibrated TV of first_pass is the floor beside them; each
file's own record of its training (``extra.pretrained``) goes into the result. Cheap
(seconds per model): the screen before a first_pass A/B of a new prior. Writes
``benchmarks/results/prior_quality.json``.

    python benchmarks/prior_quality.py                 # the shipped blind model (noise2self)
    python benchmarks/prior_quality.py --models new=/tmp/prior.pt --out /tmp/p.json
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np
from common import RESULTS, write_report
from first_pass import calibrated_tv, drifting_scan, final_weights, image_sections, section_scores
from offline_quality import noisy_counts

from n2s_stream.config import NetworkOptions
from n2s_stream.formats.checkpoint import Checkpoint, load_checkpoint
from n2s_stream.n2s.quality import psnr
from n2s_stream.pretrained import BLIND


def starting_output(checkpoint: Checkpoint, noisy: np.ndarray) -> np.ndarray:
    """The starting model's single-pass output on ``noisy`` (counts), normalised with what
    the daemon would fit on the first frame."""
    normalizer = NetworkOptions().fit_normalizer(noisy[:1], source_dtype=np.dtype(np.uint16))
    return final_weights(replace(checkpoint, normalizer=normalizer), noisy)


def parse_args() -> argparse.Namespace:
    """The settings; ``--models`` as ``{label: path}``, the shipped file first."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        nargs="*",
        default=[],
        metavar="LABEL=PATH",
        help="starting-model files scored beside the shipped one",
    )
    parser.add_argument("--doses", type=float, nargs="+", default=[1.0, 5.0, 20.0, 100.0])
    parser.add_argument("--frames", type=int, default=240)
    parser.add_argument("--every", type=int, default=4, help="score every n-th frame")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--drift", type=float, default=3.0)
    parser.add_argument("--out", type=Path, default=RESULTS / "prior_quality.json")
    args = parser.parse_args()
    given = [m.partition("=") for m in args.models]
    if any(not label or not path or label == "shipped" for label, _, path in given):
        parser.error("--models: give LABEL=PATH, a label other than 'shipped'")
    args.models = {"shipped": str(BLIND)} | {label: path for label, _, path in given}
    return args


def main() -> None:
    """Score every model at every dose, print a line per dose, write the record."""
    args = parse_args()
    clean_scan = drifting_scan(args.frames, args.size, args.drift)
    picked = np.arange(0, args.frames, args.every)
    sections = {
        name: np.flatnonzero(np.isin(picked, frames))
        for name, frames in image_sections(args.frames, args.size, args.drift).items()
    }
    models = {label: load_checkpoint(Path(path)) for label, path in args.models.items()}
    rows = []
    for dose in args.doses:
        clean = clean_scan[picked] * dose
        noisy = noisy_counts(clean_scan, dose)[picked]
        outputs = {"noisy": noisy, "tv": calibrated_tv(noisy, dose)}
        outputs |= {label: starting_output(model, noisy) for label, model in models.items()}
        row: dict = {"dose": dose, "frames": len(picked)}
        row |= {
            label: {"mean": psnr(clean, stack, data_range=dose)} for label, stack in outputs.items()
        }
        row["by_image"] = section_scores(clean, dict(outputs), sections, dose)
        rows.append(row)
        print(
            f"peak {dose:g}: "
            + "  ".join(f"{label} {row[label]['mean']:.2f}" for label in outputs),
            flush=True,
        )
    # how each file was made, as it records it, goes in as the report's model_files
    write_report(args.out, "prior_quality", args, rows)


if __name__ == "__main__":
    main()
