"""The rolling training buffer keeps the newest frames within its frame and byte bounds."""

from __future__ import annotations

import numpy as np

from n2s_stream.runtime.buffer import RollingBuffer


def test_eviction_by_bytes_keeps_the_newest_frames():
    frame_bytes = 32 * 32 * 4
    buffer = RollingBuffer(max_frames=100, max_bytes=5 * frame_bytes)
    for k in range(12):
        buffer.add(np.full((32, 32), k, np.float32))
        assert buffer.nbytes <= 5 * frame_bytes
    assert len(buffer) == 5 and buffer.nbytes == 5 * frame_bytes
    assert buffer.snapshot()[:, 0, 0, 0].tolist() == [7, 8, 9, 10, 11]  # oldest went first


def test_valid_maps_count_towards_the_bytes_and_go_with_their_frame():
    frame_bytes = 16 * 16 * 4
    buffer = RollingBuffer(max_frames=100, max_bytes=4 * frame_bytes)
    valid = np.ones((16, 16), np.float32)
    for k in range(3):
        buffer.add(np.full((16, 16), k, np.float32), valid)  # 2 * frame_bytes each
    assert len(buffer) == 2 and buffer.nbytes == 4 * frame_bytes
    buffer.add(np.full((16, 16), 3, np.float32))  # no map: frame_bytes
    assert len(buffer) == 2 and buffer.nbytes == 3 * frame_bytes
    assert buffer.snapshot()[:, 0, 0, 0].tolist() == [2, 3]


def test_a_frame_larger_than_the_byte_bound_does_not_stay():
    buffer = RollingBuffer(max_frames=10, max_bytes=1000)
    buffer.add(np.zeros((64, 64), np.float32))  # 16 KiB
    assert len(buffer) == 0 and buffer.nbytes == 0


def test_eviction_by_count():
    buffer = RollingBuffer(max_frames=3, max_bytes=2**30)
    for k in range(7):
        buffer.add(np.full((1, 8, 8), k, np.float32))
    assert buffer.snapshot()[:, 0, 0, 0].tolist() == [4, 5, 6]
