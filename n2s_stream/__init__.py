"""n2s-stream: self-supervised (Noise2Self) denoising of detector frames, offline and live."""

from __future__ import annotations

__version__ = "0.1.0"
