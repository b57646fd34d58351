"""A starting model shipped with the package, so that the daemon's network is useful from
its first frames instead of starting from random weights.

``unet_w16_d2_k1.pt`` (`BLIND`) is the default network (UNet, width 16, depth 2, one
frame) trained by ``python -m n2s_stream.pretrained`` (``__main__.py``; its settings are
recorded in the file) on the images of `IMAGES` and `MORE_IMAGES` that scikit-image ships
and on synthetic blobs, varied patch by patch, at Poisson doses of 1-300 counts, with the
same masking as online training and the clean image as the target at the hidden pixels.
It carries no normaliser: the daemon fits one on the live data's first frame, and the
cold-start comparison against a calibrated classical denoiser still decides when it writes.
It starts Noise2Self training. ``unet_w16_d2_k1_nonblind.pt`` (`NONBLIND`) is the same
network trained by the same recipe without a blind spot (``--objective
neighbor2neighbor``): the start of the daemon's default, binomial training, and of
Neighbor2Neighbor's. ``unet_w16_d2_k3_nonblind.pt`` (`NONBLIND_K3`) is that network for
three centred frames (``--context-frames 3``): it starts a daemon run with
``context_frames = 3`` (centred) and a non-blind objective.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from n2s_stream.errors import CheckpointError, UsageError
from n2s_stream.formats.checkpoint import Checkpoint, load_checkpoint
from n2s_stream.n2s.specs import MaskerConfig, ModelConfig, Objective, is_blind

BLIND = Path(__file__).with_name("unet_w16_d2_k1.pt")
NONBLIND = Path(__file__).with_name("unet_w16_d2_k1_nonblind.pt")
NONBLIND_K3 = Path(__file__).with_name("unet_w16_d2_k3_nonblind.pt")
SHIPPED: dict[tuple[str, int], Path] = {
    ("noise2self", 1): BLIND,
    ("neighbor2neighbor", 1): NONBLIND,
    ("binomial", 1): NONBLIND,  # trained by Neighbor2Neighbor: the same unmasked use
    ("neighbor2neighbor", 3): NONBLIND_K3,
    ("binomial", 3): NONBLIND_K3,
}
"""The shipped starting model for each training objective (``specs.OBJECTIVES``) and count
of frames the network sees; a pair not here starts from random weights."""


def shipped_model(objective: str, context_frames: int = 1) -> Path | None:
    """The file shipped for ``objective`` and ``context_frames``, or None where none is."""
    return SHIPPED.get((objective, context_frames))


IMAGES = (
    "text",
    "brick",
    "page",
    "chelsea",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
    "clock",
    "cell",
    "retina",
    "microaneurysms",
)
"""scikit-image's bundled images the shipped models are trained on (no download); the
benchmarks score on camera, astronaut, coins, moon, coffee and the fine textures gravel and
grass, which are left out."""
MORE_IMAGES = ("colorwheel", "horse", "logo", "checkerboard", "shepp_logan_phantom")
"""... and those added to them with ``--augment`` (with synthetic blobs): drawings,
silhouettes and a phantom, sharp edges on flat backgrounds."""


def starting_model(
    model: ModelConfig,
    masker: MaskerConfig,
    objective: Objective = "noise2self",
    path: Path | None = None,
) -> Checkpoint | None:
    """The shipped model for ``objective`` and the masker's frames when it fits ``model``
    and ``masker`` exactly, else None (the network starts from random weights). A model
    file ``path`` given by the user (trained by this package's script with ``--out``)
    must fit: one that is missing, unreadable or made for other options raises
    `UsageError` saying why."""
    if path is None:
        shipped = shipped_model(objective, masker.context_frames)
        if shipped is None or not shipped.exists():
            return None
        checkpoint = load_checkpoint(shipped)  # weights_only: never unpickles objects
        return checkpoint if misfit(checkpoint, model, masker, objective) is None else None
    if not path.is_file():
        raise UsageError(f"pretrained_model {path}: no such file")
    try:
        checkpoint = load_checkpoint(path)
    except CheckpointError as exc:
        raise UsageError(f"pretrained_model {path}: {exc}") from exc
    reason = misfit(checkpoint, model, masker, objective)
    if reason is not None:
        raise UsageError(f"pretrained_model {path}: {reason}")
    return checkpoint


def misfit(
    checkpoint: Checkpoint, model: ModelConfig, masker: MaskerConfig, objective: Objective
) -> str | None:
    """Why a starting model cannot start a network of ``model`` and ``masker`` trained by
    ``objective``, or None where it fits exactly."""
    extra = checkpoint.extra  # the script's record, or a daemon checkpoint's objective
    trained_for = extra.get("pretrained", {}).get("objective") or extra.get("objective", objective)
    if is_blind(trained_for) != is_blind(objective):
        return f"trained for objective {trained_for}, not {objective}"
    trained = checkpoint.masker_config
    if masker.context_frames != trained.context_frames:
        return (
            f"a model of {trained.context_frames} frames does not fit "
            f"context_frames {masker.context_frames}"
        )
    # registration only aligns the neighbours: a model made for registered context (as
    # the script makes them) loads without it too, the user's choice
    fitting = replace(masker, register=trained.register)
    if trained.context_frames == 1:
        fitting = replace(fitting, causal=False)  # no neighbours: no difference
    if not is_blind(objective):  # trained unmasked: the grid does not matter
        fitting = replace(fitting, grid_size=trained.grid_size, mode=trained.mode)
    if checkpoint.model_config != model:
        return f"made for {checkpoint.model_config}, does not fit {model}"
    if trained != fitting:
        return f"made for {trained}, does not fit {fitting}"
    return None
