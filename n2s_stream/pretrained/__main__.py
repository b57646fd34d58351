"""``python -m n2s_stream.pretrained``: train the shipped starting model, reproducibly.

Photographs, drawings and a phantom that scikit-image ships (those the benchmarks score on
are left out) and synthetic blobs are cut into 64x64 patches, varied in scale, colour mix,
gamma, contrast and orientation (``--no-augment``: the photographs of `IMAGES` in grey,
as they are), given Poisson noise at a dose drawn log-uniformly between
``--min-dose`` and ``--max-dose`` counts at the brightest pixel, and normalised as the
daemon does (mean and spread of the noisy image). The network learns with the online
masking (one hidden pixel per grid cell, in-filled), with the clean patch
as the target at the hidden pixels: it learns the blind-spot prediction that online
Noise2Self training then refines. With ``--objective neighbor2neighbor`` it sees the
whole noisy patch and learns the clean one at every pixel: the denoiser without a blind
spot that online Neighbor2Neighbor (and binomial) training refines. `RECIPES` holds each
objective's defaults. Same seed and steps, same weights (single thread).

    python -m n2s_stream.pretrained                                # 25 minutes on 1 core
    python -m n2s_stream.pretrained --objective neighbor2neighbor  # about as long
    python -m n2s_stream.pretrained --objective neighbor2neighbor --context-frames 3  # 27 min
    python -m n2s_stream.pretrained --steps 3 --out /tmp/t.pt   # smoke
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import gaussian_filter
from skimage import data as skdata
from skimage.color import rgb2gray

from n2s_stream.formats.checkpoint import load_checkpoint, save_checkpoint
from n2s_stream.models import build_model
from n2s_stream.n2s.loss import masked_mse
from n2s_stream.n2s.masking import Masker
from n2s_stream.n2s.normalize import Normalizer
from n2s_stream.n2s.specs import MaskerConfig, ModelConfig
from n2s_stream.pretrained import IMAGES, MORE_IMAGES, shipped_model

log = logging.getLogger("n2s_stream.pretrained")


def training_images(augmented: bool) -> list[np.ndarray]:
    """The images of `IMAGES` (and, ``augmented``, of `MORE_IMAGES` and `blobs`), values
    in [0, 1], float32: ``(H, W)`` in grey, or ``(H, W, C)`` colour for ``augmented``,
    whose patches mix the channels at random."""
    images = []
    for name in IMAGES + (MORE_IMAGES if augmented else ()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = getattr(skdata, name)()
        if image.ndim == 3:  # rgb2gray on the stored values: the non-blind file's recipe
            image = image[..., :3] if augmented else rgb2gray(image[..., :3])
        image = np.asarray(image, dtype=np.float32)
        images.append(image / max(float(image.max()), 1e-6))
    return images + (blobs() if augmented else [])


def blobs(count: int = 8, side: int = 384) -> list[np.ndarray]:
    """Synthetic scenes of blurred binary blobs (scikit-image's generator, fixed seeds):
    sharp-edged particles and pores of several sizes on a flat background, blurred by
    0-2 pixels, which the photographs have few of."""
    scenes = []
    for k in range(count):
        shape = skdata.binary_blobs(
            side, blob_size_fraction=0.02 + 0.03 * k, volume_fraction=0.2 + 0.05 * (k % 4), rng=k
        )
        scene = gaussian_filter(shape.astype(np.float32), sigma=0.5 * (k % 5))
        scenes.append((0.1 + 0.9 * scene / max(float(scene.max()), 1e-6)).astype(np.float32))
    return scenes


def varied_scene(
    image: np.ndarray, rng: np.random.Generator, patch: int, neighbours: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A ``patch`` square of ``image`` and the window around it (twice its side, for the
    frame statistics the daemon would fit), both varied alike: half the scale (2x2
    averages) a third of the time, a random mix of the colour channels, a random gamma
    (0.55-1.8), contrast inverted one time in five, a random rotation and flip. Values
    stay in [0, 1]. With ``neighbours``, the patch is ``(1 + neighbours, patch, patch)``:
    the centre square, then squares of the same window as registered neighbouring frames
    show it (up to a pixel off in each direction), or, one time in ten, another place of
    the window (a registration that failed, a scene that changed)."""
    scale = 2 if rng.random() < 0.35 and min(image.shape[:2]) >= 4 * patch else 1
    side = min(2 * patch * scale, *image.shape[:2]) // scale * scale
    top = rng.integers(image.shape[0] - side + 1)
    left = rng.integers(image.shape[1] - side + 1)
    window = image[top : top + side, left : left + side]
    if scale == 2:
        window = window.reshape(side // 2, 2, side // 2, 2, *window.shape[2:]).mean(axis=(1, 3))
    if window.ndim == 3:
        window = window @ rng.dirichlet(np.ones(window.shape[2])).astype(np.float32)
    window = np.clip(window, 0.0, 1.0) ** np.float32(np.exp(rng.uniform(-0.6, 0.6)))
    if rng.random() < 0.2:
        window = 1.0 - window
    window = np.rot90(window, int(rng.integers(4)))
    if rng.random() < 0.5:
        window = window[:, ::-1]
    row, col = (int(rng.integers(window.shape[k] - patch + 1)) for k in (0, 1))
    squares = [window[row : row + patch, col : col + patch]]
    for _ in range(neighbours):
        if rng.random() < 0.1:
            at_row, at_col = (int(rng.integers(window.shape[k] - patch + 1)) for k in (0, 1))
        else:
            at_row, at_col = (
                int(np.clip(start + rng.integers(-1, 2), 0, window.shape[k] - patch))
                for k, start in ((0, row), (1, col))
            )
        squares.append(window[at_row : at_row + patch, at_col : at_col + patch])
    crop = squares[0] if neighbours == 0 else np.stack(squares)
    return np.ascontiguousarray(crop), window


def batch(
    images: list[np.ndarray],
    rng: np.random.Generator,
    size: int,
    patch: int,
    doses: tuple[float, float],
    *,
    augmented: bool = False,
    context_frames: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(noisy, clean)`` patches, ``(size, context_frames, patch, patch)`` and ``(size, 1,
    patch, patch)`` (the centre frame's), both normalised by the statistics of the frame
    they came from at its dose (the whole image; ``augmented``: the varied window around
    the patch, see `varied_scene`, whose neighbouring frames have noise of their own)."""
    if context_frames > 1 and not augmented:
        raise ValueError("context frames come from the varied window: they need augmented")
    noisy, clean = [], []
    for _ in range(size):
        image = images[rng.integers(len(images))]
        if augmented:
            crop, frame = varied_scene(image, rng, patch, context_frames - 1)
        else:
            top = rng.integers(image.shape[0] - patch + 1)
            left = rng.integers(image.shape[1] - patch + 1)
            crop, frame = image[top : top + patch, left : left + patch], image
        dose = float(np.exp(rng.uniform(np.log(doses[0]), np.log(doses[1]))))
        crop = crop * dose
        counts = rng.poisson(crop).astype(np.float32)
        mean, spread = (
            float(frame.mean() * dose),
            float(np.sqrt(frame.var() * dose**2 + frame.mean() * dose)) or 1.0,
        )  # as for the whole frame
        noisy.append((counts - mean) / spread)
        clean.append((crop - mean) / spread)
    stacked = np.stack(noisy)
    targets = np.stack(clean).astype(np.float32)
    if context_frames == 1:
        return torch.from_numpy(stacked[:, None]), torch.from_numpy(targets[:, None])
    return torch.from_numpy(stacked), torch.from_numpy(np.ascontiguousarray(targets[:, :1]))


RECIPES: dict[str, dict[str, object]] = {
    "noise2self": {"steps": 8000, "min_dose": 1.0, "augment": True},
    "neighbor2neighbor": {"steps": 8000, "min_dose": 1.0, "augment": True},
}
"""Each objective's defaults, so that ``--objective X`` (and ``--context-frames K``) alone
remakes the file shipped for X (and K frames; its record says the same). All the shipped
files are made by one recipe."""


def file_sha256(path: Path) -> str:
    """The file's SHA-256: which weights ``--init`` continued from, whatever the path holds
    later."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def parse_args() -> argparse.Namespace:
    """The settings, with the defaults of the chosen objective's recipe (`RECIPES`)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--min-dose", type=float)
    parser.add_argument("--max-dose", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--width",
        type=int,
        default=ModelConfig.width,
        help="the network's width (the shipped files: the default network's)",
    )
    parser.add_argument(
        "--depth",
        type=int,
        default=ModelConfig.depth,
        help="the UNet's depth (the shipped files: the default network's)",
    )
    parser.add_argument(
        "--context-frames",
        type=int,
        default=1,
        help="frames the network sees (centred, registered context; needs --augment): "
        "the shipped files see one, or three (--objective neighbor2neighbor)",
    )
    parser.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        help="also the images of MORE_IMAGES and synthetic blobs, and patches varied in "
        "scale, colour mix, gamma, contrast and orientation",
    )
    parser.add_argument(
        "--init", type=Path, default=None, help="continue from this model file's weights"
    )
    parser.add_argument(
        "--objective",
        choices=tuple(RECIPES),  # binomial starts from the neighbor2neighbor file
        default="noise2self",
        help="the online objective the model starts: noise2self (blind spot) or "
        "neighbor2neighbor (no blind spot; binomial starts from its files too)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="default: the shipped file for the objective and --context-frames",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch's threads (the shipped files: 1, the only count whose weights repeat exactly)",
    )
    objective = parser.parse_known_args()[0].objective
    parser.set_defaults(**RECIPES[objective])
    args = parser.parse_args()
    if args.context_frames < 1 or args.context_frames % 2 == 0:
        parser.error("--context-frames must be odd: the centre frame and as many on each side")
    if args.context_frames > 1 and not args.augment:
        parser.error("--context-frames needs --augment (its neighbours come from the window)")
    shipped = shipped_model(args.objective, args.context_frames)
    default_network = (args.width, args.depth) == (ModelConfig.width, ModelConfig.depth)
    if args.out is None and (shipped is None or not default_network):
        parser.error("--width, --depth or --context-frames other than a shipped file's need --out")
    args.out = args.out or shipped
    return args


def main() -> None:
    """Train and write the starting model."""
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    masker_config = MaskerConfig(
        context_frames=args.context_frames, register=args.context_frames > 1
    )
    model_config = ModelConfig(
        width=args.width, depth=args.depth, in_channels=masker_config.in_channels
    )
    model = build_model(model_config)
    if args.init is not None:
        model.load_state_dict(load_checkpoint(args.init).state_dict)
    masker = Masker(masker_config)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.steps)
    images = training_images(args.augment)
    for step in range(1, args.steps + 1):
        noisy, clean = batch(
            images,
            rng,
            args.batch,
            args.patch,
            (args.min_dose, args.max_dose),
            augmented=args.augment,
            context_frames=args.context_frames,
        )
        if args.objective == "neighbor2neighbor":  # no blind spot: every pixel, unmasked
            loss = torch.mean((model(noisy) - clean) ** 2)
        else:
            phases = torch.from_numpy(rng.integers(masker.n_phases, size=args.batch))
            net_input, mask = masker.mask(noisy, phases)
            loss = masked_mse(model(net_input), clean, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 200 == 0 or step == args.steps:
            log.info("step %d/%d: loss against clean %.4f", step, args.steps, loss.item())
    save_checkpoint(
        args.out,
        model=model,
        model_config=model_config,
        masker_config=masker_config,
        normalizer=Normalizer(),
        version=0,
        step=args.steps,
        extra={
            "pretrained": {
                "script": "python -m n2s_stream.pretrained",
                **{
                    k: (str(v) if isinstance(v, Path) else v)
                    for k, v in vars(args).items()
                    if k != "out"
                },
                "images": [*IMAGES, *((*MORE_IMAGES, "blobs") if args.augment else ())],
                "init_sha256": file_sha256(args.init) if args.init else None,
                "torch": str(torch.__version__),
            }
        },
    )
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
