"""Temporal context: a frame seen together with its neighbours in the same series.

Consecutive frames of a series show the same sample with independent detector noise, so
the network may look at them while it predicts the hidden pixels of the centre frame: the
loss stays J-invariant, because no input channel carries the centre frame's own noise.
For the same reason a neighbour is never the centre frame itself.

The network input is ``(K, H, W)``: channel 0 the centre frame, then the neighbours in the
order of :func:`context_offsets`. Centred context uses ``(K-1)/2`` frames on each side,
causal context the ``K-1`` previous frames (nothing to wait for).

With ``register`` the neighbours are first shifted onto the centre frame by the motion
estimated from the neighbours alone (``registration.py``), so that context still helps
when the sample drifts by more than a pixel or two per frame.

At the ends of a series, centred context mirrors: frame ``i-d`` that does not exist is
replaced by frame ``i+d`` (and the other way round), which is another real frame of the
same sample. A channel with no frame to use at all (causal context at the start of a
series, or a series shorter than the context) is filled with zeros, the normalised mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Generic, Protocol, TypeVar

import numpy as np

from n2s_stream.n2s.registration import register_neighbours
from n2s_stream.n2s.specs import context_offsets

Item = TypeVar("Item")


class IndexedFrames(Protocol):
    """Frames of a series looked up by their index in it: a list or an array of them, or
    any other object with ``len`` and integer indexing."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int, /) -> np.ndarray: ...


def context_indices(
    centre: int, n_frames: int, offsets: Sequence[int], causal: bool
) -> list[int | None]:
    """Frame index used for each neighbour channel of frame ``centre`` in a series of
    ``n_frames`` frames (None: no frame, the channel is zero-filled)."""
    chosen: list[int | None] = []
    for offset in offsets:
        index = centre + offset
        if not 0 <= index < n_frames and not causal:
            index = centre - offset  # mirror at the series' ends
        chosen.append(index if 0 <= index < n_frames and index != centre else None)
    return chosen


def context_stack(
    frames: IndexedFrames,
    centre: int,
    offsets: Sequence[int],
    causal: bool,
    register: bool = False,
) -> np.ndarray:
    """``(1 + len(offsets), H, W)`` network input of frame ``centre`` of ``frames``
    (``register``: neighbours shifted onto the centre frame's view)."""
    image = frames[centre]
    if not offsets and image.dtype == np.float32:
        return image[np.newaxis]  # a single frame: no copy (at 4 Mpx a copy costs ~5 ms)
    stack = np.zeros((1 + len(offsets), *image.shape), np.float32)
    stack[0] = image
    indices = context_indices(centre, len(frames), offsets, causal)
    neighbours = {index: frames[index] for index in indices if index is not None}
    if register:
        neighbours = register_neighbours(neighbours, centre)
    for channel, index in enumerate(indices, 1):
        if index is not None:
            stack[channel] = neighbours[index]
    return stack


class ContextWindow(Generic[Item]):
    """Frames of one series arriving in order, released with their context.

    ``push`` takes a frame (and an item that travels with it) and returns the frames whose
    context is now complete: with centred context a frame waits for ``(K-1)/2`` later
    frames, which is the latency this costs; causal context releases every frame at once.
    ``flush`` releases the rest at the end of the series (mirrored context). Holds only
    the frames still needed.
    """

    def __init__(self, frames: int, causal: bool, register: bool = False) -> None:
        self.offsets = context_offsets(frames, causal)
        self.causal, self.register = causal, register
        self.before = max([0, *(-o for o in self.offsets)])  # earlier frames kept
        self.after = max([0, *self.offsets])  # later frames waited for
        self._items: list[Item] = []
        self._images: list[np.ndarray] = []
        self._next = 0  # first held frame not yet released

    def __len__(self) -> int:
        """Frames pushed but not yet released."""
        return len(self._items) - self._next

    def push(self, item: Item, image: np.ndarray) -> list[tuple[Item, np.ndarray]]:
        """Add the next frame of the series; return ``(item, stack)`` of the frames ready."""
        self._items.append(item)
        self._images.append(image)
        released = []
        while self._next + self.after < len(self._items):
            released.append(self._release(self._next))
        self._forget_old()
        return released

    def flush(self) -> list[tuple[Item, np.ndarray]]:
        """The series ended: release every held frame, then start afresh."""
        released = [self._release(self._next) for _ in range(len(self))]
        self._items, self._images, self._next = [], [], 0
        return released

    def _release(self, index: int) -> tuple[Item, np.ndarray]:
        # Frames before the first one held were released and forgotten, not missing: the
        # window keeps `before` of them, so index - before >= 0 whenever they existed.
        stack = context_stack(self._images, index, self.offsets, self.causal, self.register)
        self._next = index + 1
        return self._items[index], stack

    def _forget_old(self) -> None:
        drop = max(self._next - self.before, 0)
        if drop:
            del self._items[:drop], self._images[:drop]
            self._next -= drop
