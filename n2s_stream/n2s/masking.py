"""J-invariant masking (Noise2Self, Batson & Royer 2019).

A grid of pixels, one in every ``grid_size x grid_size`` cell, is hidden from the network
and the loss is computed on those pixels only. Because the network never sees a pixel's
own noisy value when predicting it, and detector noise is independent between pixels, the
expected masked loss equals the loss against the clean image plus a constant: training on
noisy frames alone then learns to denoise.

Tensors are ``(B, C, H, W)`` throughout; masks are ``(B or 1, 1, H, W)`` of 0/1 floats.
Channel 0 is the frame being denoised; further channels, if any, are neighbouring frames of
the same series (temporal context, ``context.py``): they are shown to the network as they
are, since their noise is independent of the centre frame's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from n2s_stream.n2s.specs import MaskerConfig

# Neighbour weights for in-filling a hidden pixel; the centre (the pixel itself) is excluded.
_INTERP_KERNEL = torch.tensor([[0.5, 1.0, 0.5], [1.0, 0.0, 1.0], [0.5, 1.0, 0.5]]) / 6.0


def grid_mask(
    height: int,
    width: int,
    phase: int | torch.Tensor,
    grid_size: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Return the 0/1 mask of the pixels hidden at ``phase`` (one per grid cell).

    ``phase`` is an int (one mask, shape ``(1,1,H,W)``) or a 1-D tensor of phases, one per
    sample (shape ``(B,1,H,W)``), so a batch can mix phases.
    """
    rows = torch.arange(height, device=device).view(1, 1, height, 1) % grid_size
    cols = torch.arange(width, device=device).view(1, 1, 1, width) % grid_size
    phases = torch.as_tensor(phase, device=device).reshape(-1, 1, 1, 1) % (grid_size**2)
    hidden = (rows == phases // grid_size) & (cols == phases % grid_size)
    return hidden.to(dtype)


def interpolate_neighbours(x: torch.Tensor) -> torch.Tensor:
    """Weighted mean of each pixel's 8 neighbours, the pixel itself excluded.

    Borders are reflected, so an edge pixel is in-filled from real neighbours only.
    """
    channels = x.shape[1]
    kernel = _INTERP_KERNEL.to(device=x.device, dtype=x.dtype).expand(channels, 1, 3, 3)
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    return F.conv2d(padded, kernel, groups=channels)


class Masker:
    """Hides a grid of pixels from the network, and averages the network over all phases.

    ``mask(x, i)`` gives the network input and the mask for iteration ``i`` (the phase
    cycles through the ``grid_size**2`` offsets, as in the original Noise2Self code).
    ``infer_full_image`` is J-invariant inference: each pixel's output comes from the
    phase in which that pixel was hidden. ``infer_single_pass`` runs the network once on
    the unmasked input: faster, and fine for models without an input-to-output skip.
    """

    def __init__(self, config: MaskerConfig | None = None) -> None:
        self.config = config or MaskerConfig()

    @property
    def n_phases(self) -> int:
        """Number of distinct masks; J-invariant inference runs the model this many times."""
        return self.config.grid_size**2

    @property
    def extra_channels(self) -> int:
        """Input channels the model needs beyond the image (1 when the mask is an input)."""
        return 1 if self.config.mask_as_input else 0

    def mask(self, x: torch.Tensor, i: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(net_input, mask)`` for phase ``i`` (int, or one phase per sample).

        Only channel 0, the centre frame, is masked; context channels pass unchanged.
        """
        mask = grid_mask(
            x.shape[-2], x.shape[-1], i, self.config.grid_size, device=x.device, dtype=x.dtype
        )
        centre = x[:, :1]
        if self.config.mode == "interpolate":
            hidden = centre * (1 - mask) + interpolate_neighbours(centre) * mask
        else:
            hidden = centre * (1 - mask)
        parts = [hidden, x[:, 1:]]
        if self.config.mask_as_input:
            parts.append(mask.expand(x.shape[0], 1, -1, -1))
        net_input = hidden if len(parts) == 2 and x.shape[1] == 1 else torch.cat(parts, dim=1)
        return net_input, mask

    def infer_full_image(
        self, x: torch.Tensor, model: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """J-invariant denoising: no output pixel depends on its own input value.

        Costs ``n_phases`` forward passes.
        """
        output: torch.Tensor | None = None
        for phase in range(self.n_phases):
            net_input, mask = self.mask(x, phase)
            part = model(net_input) * mask
            output = part if output is None else output + part
        assert output is not None
        return output

    def infer_single_pass(
        self, x: torch.Tensor, model: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """Denoise with one forward pass on the unmasked input (mask channel all zero)."""
        if self.config.mask_as_input:
            x = torch.cat([x, torch.zeros_like(x[:, :1])], dim=1)
        return model(x)
