"""The rolling buffer of recent frames that online training learns from."""

from __future__ import annotations

import threading
from collections import deque

import numpy as np

from n2s_stream.n2s.patches import random_crop


class RollingBuffer:
    """The newest frames (normalised float32 ``(C, H, W)``: a frame and its temporal
    context, C = 1 without), bounded in count and bytes.

    Thread-safe: the inference side adds, the trainer samples. When full, the oldest
    frame goes: the model should follow what the detector sees now.
    """

    def __init__(self, *, max_frames: int, max_bytes: int) -> None:
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self._frames: deque[tuple[np.ndarray, np.ndarray | None]] = deque()
        self._bytes = 0
        self._lock = threading.Lock()

    def add(self, frame: np.ndarray, valid: np.ndarray | None = None) -> None:
        """Keep ``frame`` (``(H, W)`` or ``(C, H, W)``) and its centre's valid-pixel map
        (None if all valid); evict the oldest."""
        if frame.ndim == 2:
            frame = frame[np.newaxis]
        size = frame.nbytes + (0 if valid is None else valid.nbytes)
        with self._lock:
            self._frames.append((frame, valid))
            self._bytes += size
            while self._frames and (
                len(self._frames) > self.max_frames or self._bytes > self.max_bytes
            ):
                old, old_valid = self._frames.popleft()
                self._bytes -= old.nbytes + (0 if old_valid is None else old_valid.nbytes)

    def __len__(self) -> int:
        with self._lock:
            return len(self._frames)

    @property
    def nbytes(self) -> int:
        """Bytes held now."""
        with self._lock:
            return self._bytes

    def snapshot(self) -> np.ndarray | None:
        """The held frames stacked ``(N, C, H, W)`` if they share a shape (else the newest
        shape's frames); None when empty. Used to score the model on held-out frames."""
        with self._lock:
            frames = [f for f, _ in self._frames]
        if not frames:
            return None
        shape = frames[-1].shape
        return np.stack([f for f in frames if f.shape == shape])

    def sample(
        self, *, batch: int, patch: int, rng: np.random.Generator, recent: int = 0
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """``(batch, C, p, p)`` random crops (random flips/turns) of random frames; with
        ``recent``, half of them from the newest ``recent`` frames (a scene that changes is
        learned sooner).

        ``p`` is ``patch`` or the smallest frame side if smaller. The valid-pixel crops are
        None when every sampled pixel is valid.
        """
        with self._lock:
            n = len(self._frames)
            indices = rng.integers(n, size=batch)
            if 0 < recent < n:  # (a buffer that holds only the recent ones: all uniform)
                half = batch // 2
                indices[:half] = n - 1 - rng.integers(recent, size=half)
            picks = [self._frames[i] for i in indices]
        size = min(patch, *(min(f.shape[-2:]) for f, _ in picks))
        crops = np.empty((batch, picks[0][0].shape[0], size, size), np.float32)
        valid_crops = np.ones((batch, 1, size, size), np.float32)
        for b, (frame, valid) in enumerate(picks):
            crop, valid_crop = random_crop(frame, valid, (size, size), rng)
            crops[b] = crop
            if valid_crop is not None:
                valid_crops[b, 0] = valid_crop
        all_valid = all(v is None for _, v in picks)
        return crops, None if all_valid else valid_crops
