"""Temporal context: which frames a frame is seen with, J-invariance with neighbours,
series boundaries, and the context recorded in checkpoints and used by `denoise`."""

from __future__ import annotations

import queue
import time

import h5py
import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from n2s_stream.commands.offline import denoise, train
from n2s_stream.config import DenoiseConfig, TrainConfig
from n2s_stream.models import build_model
from n2s_stream.n2s.context import ContextWindow, context_indices
from n2s_stream.n2s.masking import Masker
from n2s_stream.n2s.quality import psnr
from n2s_stream.n2s.specs import MaskerConfig, ModelConfig, context_offsets
from n2s_stream.options import make
from n2s_stream.runtime.buffer import RollingBuffer
from n2s_stream.runtime.metrics import Metrics
from n2s_stream.runtime.snapshot import ModelStore, copy_state
from n2s_stream.stages import Frame, SeriesEnd
from tests.helpers.pipeline import make_loop


def test_offsets_and_mirroring_at_series_ends():
    assert context_offsets(1, False) == [] and context_offsets(3, False) == [-1, 1]
    assert context_offsets(5, False) == [-1, 1, -2, 2]
    assert context_offsets(3, True) == [-1, -2]
    with pytest.raises(ValueError, match="odd"):
        context_offsets(4, False)
    offsets = context_offsets(5, False)
    assert context_indices(0, 10, offsets, False) == [1, 1, 2, 2]  # frame -1 -> frame 1
    assert context_indices(9, 10, offsets, False) == [8, 8, 7, 7]
    assert context_indices(4, 10, offsets, False) == [3, 5, 2, 6]
    assert context_indices(0, 1, offsets, False) == [None] * 4  # nothing else: zeros
    assert context_indices(1, 10, [-1, -2], True) == [0, None]  # causal: never the future


def test_window_releases_each_frame_once_in_order_never_with_itself():
    frames = [np.full((2, 2), float(k + 1)) for k in range(7)]  # 0 = no frame (zero-fill)
    for k_frames, causal in ((1, False), (3, False), (5, False), (3, True)):
        window: ContextWindow[int] = ContextWindow(k_frames, causal)
        released = []
        for index, image in enumerate(frames):
            got = window.push(index, image)
            released += got
            if causal or k_frames == 1:
                assert [i for i, _ in got] == [index]  # no wait
        released += window.flush()
        assert [i for i, _ in released] == list(range(7))
        for index, stack in released:
            assert stack.shape == (k_frames, 2, 2) and stack[0, 0, 0] == index + 1
            neighbours = [n - 1 for n in stack[1:, 0, 0].tolist()]
            assert index not in neighbours
            if causal:
                assert all(n < index for n in neighbours if n >= 0)
                assert neighbours.count(-1) == max(k_frames - 1 - index, 0)
            else:
                assert all(0 < abs(n - index) <= k_frames // 2 for n in neighbours)
    # a centred window of 5 waits for two later frames
    window = ContextWindow(5, False)
    assert window.push(0, frames[0]) == [] and window.push(1, frames[1]) == []
    assert [i for i, _ in window.push(2, frames[2])] == [0]


@pytest.mark.parametrize("causal", [False, True])
def test_context_keeps_training_and_inference_j_invariant(causal):
    """d output[J] / d centre[J] == 0, while the neighbours' same pixels do reach it."""
    torch.manual_seed(0)
    masker = Masker(MaskerConfig(grid_size=4, context_frames=3, causal=causal))
    model = build_model(
        ModelConfig(in_channels=masker.config.in_channels, width=8, depth=2, residual=True)
    ).double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, requires_grad=True)
    net_input, mask = masker.mask(x, 5)
    assert net_input.shape == (2, 3, 16, 16)
    (model(net_input) * mask).sum().backward()
    assert (x.grad[:, :1] * mask).abs().max() == 0.0
    assert (x.grad[:, 1:] * mask).abs().max() > 1e-6  # the same pixel in other frames: seen
    out = masker.infer_full_image(x, model)
    (grad,) = torch.autograd.grad(out[0, 0, 6, 9], x)
    assert grad[0, 0, 6, 9] == 0.0 and grad[0, 1:, 6, 9].abs().sum() > 0


def test_inference_worker_never_mixes_series(tmp_path):
    """Two series interleaved: every training input holds frames of one series only."""
    masker = Masker(MaskerConfig(context_frames=3))
    model = build_model(ModelConfig(in_channels=3, width=4, depth=1))
    frames: queue.Queue = queue.Queue()
    buffer = RollingBuffer(max_frames=64, max_bytes=2**24)
    values = {"a": 100, "b": 5000}  # constant frames: a series is known by its value
    for index in range(4):
        for series, value in values.items():
            data = np.full((16, 16), value + index, np.uint16)
            frames.put(Frame(series, index, data, time.time(), tmp_path / f"{series}_n2s.h5"))
    frames.put(SeriesEnd("a", 4, tmp_path / "a_n2s.h5"))
    frames.put(SeriesEnd("b", 4, tmp_path / "b_n2s.h5"))
    metrics = Metrics(CollectorRegistry())
    store = ModelStore(copy_state(model), 1)
    worker = make_loop(
        tmp_path / "st",
        frames,
        model=model,
        store=store,
        metrics=metrics,
        masker=masker,
        max_batch=3,
        buffer=buffer,
        val_buffer=buffer,
    )
    worker.start()
    worker.stop()
    stacks = buffer.snapshot()
    assert stacks.shape == (8, 3, 16, 16)
    normalizer = store.snapshot().normalizer
    raw = normalizer.inverse(stacks[:, :, 0, 0])  # back to counts
    for row in raw:
        series_values = {v for v in values.values() if abs(row[0] - v) < 10}
        assert len(series_values) == 1 and all(abs(n - row[0]) <= 2 for n in row[1:])
    for series in values:
        with h5py.File(tmp_path / f"{series}_n2s.h5") as handle:
            assert handle["/entry/provenance/source_frame"][()].tolist() == [0, 1, 2, 3]
    assert metrics.registry.get_sample_value("n2s_frames_denoised_total") == 8


def test_offline_context_is_recorded_and_used_by_denoise(tmp_path, noisy_series):
    path, clean, dose = noisy_series
    result = train(
        make(
            TrainConfig,
            h5=path,
            device="cpu",
            context_frames=3,
            epochs=2,
            steps_per_epoch=40,
            out_dir=tmp_path / "run",
            progress=False,
            max_samples=12,
        )
    )
    raw = torch.load(result.last, weights_only=True)
    assert raw["masker_config"]["context_frames"] == 3
    assert raw["model_config"]["in_channels"] == 3
    out = denoise(
        DenoiseConfig(
            h5=path, ckpt=result.last, out=tmp_path / "d.h5", device="cpu", batch=5, progress=False
        )
    )
    assert out.n_frames == 24
    with h5py.File(out.out) as handle:
        denoised = handle["/entry/data/data"][()]
        assert handle["/entry/provenance/source_frame"][()].tolist() == list(range(24))
    with h5py.File(path) as handle:
        noisy = handle["/data"][()].astype(np.float32)
    assert psnr(clean, denoised, dose) > psnr(clean, noisy, dose) + 3.0


def _drifting(n: int, step: tuple[float, float], size: int = 96) -> np.ndarray:
    """Smooth random scene seen through a window moving ``step`` pixels per frame."""
    from scipy import ndimage

    scene = ndimage.gaussian_filter(np.random.default_rng(3).random((size, size)), 3.0)
    scene = (scene - scene.mean()) / scene.std()
    return np.stack(
        [
            ndimage.shift(scene, (-k * step[0], -k * step[1]), order=3, mode="reflect")
            for k in range(n)
        ]
    ).astype(np.float32)


@pytest.mark.parametrize("causal", [False, True])
def test_registered_context_lays_neighbours_on_the_centre_frame(causal):
    from n2s_stream.n2s.context import context_stack

    frames = _drifting(5, (2.5, -1.5))
    noisy = frames + np.random.default_rng(0).normal(0, 0.5, frames.shape).astype(np.float32)
    offsets = context_offsets(3, causal)
    centre = 2
    plain = context_stack(noisy, centre, offsets, causal)
    registered = context_stack(noisy, centre, offsets, causal, register=True)
    inner = (slice(None), slice(16, -16), slice(16, -16))

    def error(stack: np.ndarray) -> float:
        return float(((stack[1:] - noisy[centre]) ** 2)[inner].mean())

    assert error(registered) < 0.5 * error(plain)  # 2.9 px/frame apart, now aligned
    np.testing.assert_array_equal(registered[0], plain[0])  # the centre frame untouched


def test_registered_context_never_looks_at_the_centre_frame():
    """J-invariance: the neighbour channels do not change when every centre pixel does
    (the motion comes from the neighbours alone), so the masked loss and J-invariant
    inference stay blind to each pixel's own noise (the gradient test above)."""
    from n2s_stream.n2s.context import context_stack

    frames = _drifting(5, (3.0, 0.0))
    for causal in (False, True):
        offsets = context_offsets(3, causal)
        before = context_stack(frames, 2, offsets, causal, register=True)
        changed = frames.copy()
        changed[2] = np.random.default_rng(1).normal(0, 5, changed[2].shape)
        after = context_stack(changed, 2, offsets, causal, register=True)
        np.testing.assert_array_equal(before[1:], after[1:])
        assert not np.array_equal(before[0], after[0])


@pytest.mark.parametrize("causal", [False, True])
def test_registered_context_keeps_inference_j_invariant_end_to_end(causal):
    """The gradient test through the daemon's path: drifting frames, neighbours registered
    onto the centre frame by ``context_stack``, J-invariant inference. Output pixel J does
    not depend on centre pixel J, and does depend on the registered neighbours there. The
    shift estimate runs in numpy, outside autograd: that it never reads the centre frame
    is the test below (neighbour channels unchanged when every centre pixel changes)."""
    from n2s_stream.n2s.context import context_stack

    torch.manual_seed(0)
    frames = _drifting(5, (3.0, 0.0), size=32)
    centre = 2 if not causal else 4
    stack = context_stack(frames, centre, context_offsets(3, causal), causal, register=True)
    masker = Masker(MaskerConfig(grid_size=4, context_frames=3, causal=causal))
    model = build_model(
        ModelConfig(in_channels=masker.config.in_channels, width=8, depth=2, residual=True)
    ).double()
    centre_t = torch.tensor(stack[None, :1], dtype=torch.float64, requires_grad=True)
    neighbours_t = torch.tensor(stack[None, 1:], dtype=torch.float64, requires_grad=True)
    out = masker.infer_full_image(torch.cat([centre_t, neighbours_t], 1), model)
    for row, col in [(5, 7), (16, 16), (30, 2)]:
        grad_centre, grad_neighbours = torch.autograd.grad(
            out[0, 0, row, col], (centre_t, neighbours_t), retain_graph=True
        )
        assert grad_centre[0, 0, row, col] == 0.0
        assert grad_centre.abs().sum() > 0  # the centre frame's other pixels are seen
        assert grad_neighbours[0, :, row, col].abs().sum() > 0


def test_registration_falls_back_when_the_scene_jumps():
    """Neighbours from unrelated scenes (a jump) stay as they are: no shift fits them."""
    from n2s_stream.n2s.registration import register_neighbours

    rng = np.random.default_rng(5)
    a, b = (rng.normal(0, 1, (64, 64)).astype(np.float32) for _ in range(2))
    registered = register_neighbours({1: a, 3: b}, 2)
    np.testing.assert_array_equal(registered[1], a)
    np.testing.assert_array_equal(registered[3], b)


@pytest.mark.parametrize(
    "shift", [(0.6, 3.0), (-2.3, 0.0), (0.0, 0.0), (5.5, -7.25), (-400.0, 3.0)]
)
def test_registration_moves_frames_as_scipy_does(shift):
    """The neighbours' shift is ndimage's bilinear shift with the edges repeated, in whole
    and for the central crop where the agreement is judged (a faster route to the same
    numbers)."""
    from scipy import ndimage

    from n2s_stream.n2s.registration import _central, shift_image

    image = np.random.default_rng(0).random((300, 257)).astype(np.float32)
    expected = ndimage.shift(image, shift, order=1, mode="nearest")
    np.testing.assert_allclose(shift_image(image, np.array(shift)), expected, atol=1e-6)
    crop = _central(image.shape)
    cropped = shift_image(image, np.array(shift), crop)
    assert cropped.shape == (256, 256) and cropped.dtype == np.float32
    np.testing.assert_allclose(cropped, expected[crop], atol=1e-6)
