"""n2s-stream: self-supervised denoising of detector frames (binomial splitting of photon
counts, Neighbor2Neighbor, Noise2Self), offline and live."""

from __future__ import annotations

__version__ = "0.1.0"
