"""Binomial splitting of photon counts: two independent Poisson images of one frame, a
loss from one to the other in normalised units, and a network that learns to denoise
from it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from n2s_stream.models import build_model
from n2s_stream.n2s.binomial import binomial_split_loss, photon_split, split_counts
from n2s_stream.n2s.masking import Masker
from n2s_stream.n2s.normalize import fit_normalizer
from n2s_stream.n2s.quality import psnr
from n2s_stream.n2s.specs import MaskerConfig, ModelConfig
from n2s_stream.n2s.training import self_supervised_loss, train_step


def test_the_parts_sum_to_the_counts_and_are_independent_poisson_images():
    rate, keep = 12.0, 0.8
    counts = torch.poisson(torch.full((400, 400), rate), generator=torch.Generator().manual_seed(1))
    first, second = split_counts(counts, keep, torch.Generator().manual_seed(2))
    assert torch.equal(first + second, counts) and (first >= 0).all() and (second >= 0).all()
    for part, share in ((first, keep), (second, 1 - keep)):
        # Poisson: mean and variance both the part's share of the rate
        assert float(part.mean()) == pytest.approx(share * rate, rel=0.02)
        assert float(part.var()) == pytest.approx(share * rate, rel=0.04)
    correlation = np.corrcoef(first.flatten().numpy(), second.flatten().numpy())[0, 1]
    assert abs(correlation) < 0.01  # independent, though they sum to the counts


def test_the_loss_compares_the_kept_photons_with_the_rest_in_normalised_units():
    """With a network that returns its input, the loss is the mean square of the two
    rescaled parts' difference; the counts come back exactly from the normalised batch."""
    counts = np.random.default_rng(3).poisson(30, (2, 1, 32, 32)).astype(np.uint16)
    normalizer = fit_normalizer(
        counts[:, 0], mode="meanstd", scale_integers=True, source_dtype=counts.dtype
    )
    batch = torch.from_numpy(normalizer.forward(counts))
    keep = 0.75

    def loss(valid: torch.Tensor | None = None) -> float:
        """The loss of a network that returns its input, with the same photon draws."""
        return float(
            binomial_split_loss(
                lambda x: x,
                batch,
                shift=normalizer.shift,
                divisor=normalizer.divisor,
                keep=keep,
                generator=torch.Generator().manual_seed(4),
                valid=valid,
            )
        )

    kept, rest = split_counts(
        torch.from_numpy(counts.astype(np.float32)), keep, torch.Generator().manual_seed(4)
    )
    expected = ((kept / keep - rest / (1 - keep)) / normalizer.divisor) ** 2
    assert loss() == pytest.approx(float(expected.mean()), rel=1e-4)
    # unusable pixels leave the loss
    valid = torch.zeros(2, 1, 32, 32)
    valid[..., :16] = 1
    assert loss(valid) == pytest.approx(float(expected[..., :16].mean()), rel=1e-4)


@pytest.fixture
def one_thread():
    """Small tensors: threads cost more than they give."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_network_learns_to_denoise_photon_counts_from_the_splits(one_thread):
    """Trained from random weights on 16 frames of a smooth scene at 20 counts, by the
    split loss alone, a small UNet denoises held-out frames by more than 10 dB."""
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[:32, :32] / 32.0
    scene = 20 * (0.5 + 0.4 * np.sin(6 * xx) * np.cos(4 * yy))
    counts = rng.poisson(scene, (20, 1, 32, 32)).astype(np.uint16)
    normalizer = fit_normalizer(
        counts[:, 0], mode="meanstd", scale_integers=True, source_dtype=counts.dtype
    )
    frames = torch.from_numpy(normalizer.forward(counts))
    torch.manual_seed(0)
    masker = Masker(MaskerConfig())
    model = build_model(ModelConfig(width=8, depth=1))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        batch = frames[rng.integers(16, size=8)]
        train_step(
            model,
            optimizer,
            masker,
            batch,
            rng=rng,
            objective="binomial",
            split=photon_split(normalizer),
        )
    model.eval()
    with torch.no_grad():
        denoised = normalizer.inverse(model(frames[16:]).numpy())

    noisy = psnr(scene, counts[16:].astype(np.float32), scene.max())
    gained = psnr(scene, denoised, scene.max())
    assert gained > noisy + 10.0, (noisy, gained)  # 15.1 -> 27.9 dB here


def test_the_objective_needs_the_normaliser_of_counts():
    masker = Masker(MaskerConfig())
    model = build_model(ModelConfig(width=4, depth=1))
    with pytest.raises(ValueError, match="normaliser of photon counts"):
        self_supervised_loss(
            model,
            masker,
            torch.zeros(1, 1, 8, 8),
            rng=np.random.default_rng(0),
            objective="binomial",
        )
