"""Counts per photon read from a frame's own noise: 1 for photon counts on photographs and
the simulator's scenes at every dose, 2 where a detector gives two counts a photon."""

from __future__ import annotations

import numpy as np
import pytest
from skimage import data
from skimage.transform import resize

from n2s_stream.commands.simulate import clean_frames
from n2s_stream.n2s.photons import are_photon_counts, counts_per_photon


def _scene(name: str) -> np.ndarray:
    """A bundled photograph at 256 x 256, values in [0, 1]."""
    image = getattr(data, name)().astype(np.float64)
    return resize(image / image.max(), (256, 256), anti_aliasing=True)


SCENES = {
    "camera": lambda: _scene("camera"),
    "moon": lambda: _scene("moon"),
    "simulator": lambda: clean_frames(1, (256, 256), seed=3)[0],
}


@pytest.mark.parametrize("scene", sorted(SCENES))
@pytest.mark.parametrize("photons", [1.0, 5.0, 20.0])
def test_photon_counts_show_one_count_per_photon_and_doubled_counts_two(scene, photons):
    rng = np.random.default_rng(0)
    expected = SCENES[scene]() * photons
    counts = rng.poisson(expected).astype(np.uint16)
    one = counts_per_photon(counts)
    two = counts_per_photon((2 * rng.poisson(expected)).astype(np.uint16))
    assert one is not None and 0.9 <= one <= 1.12, one
    assert two is not None and 1.8 <= two <= 2.25, two
    assert are_photon_counts(one) and not are_photon_counts(two)


def test_unmeasured_pixels_take_no_part():
    """Gaps at the 16-bit sentinel, here a grid that touches most blocks, would dominate
    the noise; the valid map leaves every block that touches one out."""
    rng = np.random.default_rng(1)
    counts = rng.poisson(SCENES["simulator"]() * 10).astype(np.uint16)
    counts[::40, :] = 65535
    counts[:, ::40] = 65535
    valid = counts != 65535
    estimate = counts_per_photon(counts, valid)
    assert estimate is not None and 0.9 <= estimate <= 1.12, estimate
    polluted = counts_per_photon(counts)
    assert polluted is not None and polluted > 100


def test_a_frame_too_small_to_tell_gives_none():
    counts = np.random.default_rng(2).poisson(5.0, size=(40, 40))
    assert counts_per_photon(counts) is None
    assert not are_photon_counts(None)
    assert counts_per_photon(np.random.default_rng(2).poisson(5.0, size=(64, 64))) is not None
