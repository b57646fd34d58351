"""How denoised frames are stored: their dtype and the codec of their HDF5 chunks.

Every codec is an HDF5 filter that hdf5plugin registers, so any h5py + hdf5plugin reader
opens every output. The lossless codecs are encoded here, outside HDF5 (and outside its
global lock, in the writer's thread pool), and stored as whole chunks with
``write_direct_chunk``:

- ``none``: the bytes as they are;
- ``bslz4``: bitshuffle + LZ4 (filter 32008), what Eiger detectors write;
- ``zstd``: Zstandard (filter 32015), a plain zstd frame per chunk.

The lossy codecs (``sz3``, filter 32024; ``zfp``, filter 32013) are error-bounded: every
pixel read back lies within an absolute bound of the value written. The bound is a
fraction (``lossy_fraction``) of the Poisson standard deviation at the series' mean count,
so the error added is far below the noise that denoising removed. They run inside HDF5's
filter pipeline (they take float32 only).

Pure functions and a frozen description: no files, no threads.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

import numpy as np

from n2s_stream.formats.codecs import bslz4_chunk

if TYPE_CHECKING:
    import h5py

OutputDtype = Literal["float32", "float16"]
Compression = Literal["none", "bslz4", "zstd", "sz3", "zfp"]
COMPRESSIONS: tuple[str, ...] = ("none", "bslz4", "zstd", "sz3", "zfp")
LOSSY = ("sz3", "zfp")
ZSTD_LEVEL = 1
"""Zstandard's fastest level: higher levels gain a few % on denoised frames at 2-4x the
time (benchmarks/detector_scale.py)."""

_zstd = threading.local()  # one compressor per thread: a ZstdCompressor is not thread-safe


@dataclass(frozen=True)
class OutputFormat:
    """The stored form of denoised frames: ``dtype`` (a numpy dtype name: float32 or
    float16, or the source's integer type for reconstructable output) and
    ``compression``; for the lossy codecs, ``lossy_fraction`` of the Poisson noise is the
    largest error allowed."""

    dtype: str = "float16"
    compression: Compression = "bslz4"
    lossy_fraction: float = 0.05

    def __post_init__(self) -> None:
        if self.compression not in COMPRESSIONS:
            raise ValueError(
                f"output compression must be one of {COMPRESSIONS}, not {self.compression!r}"
            )
        if self.compression in LOSSY and np.dtype(self.dtype) != np.float32:
            raise ValueError(
                f"output compression {self.compression} takes float32 frames, "
                f'not {self.dtype} (set output_dtype = "float32")'
            )
        if not 0 < self.lossy_fraction <= 1:
            raise ValueError(f"lossy_fraction must be in (0, 1], not {self.lossy_fraction}")

    @property
    def lossy(self) -> bool:
        """True for the error-bounded codecs, which run inside HDF5's filter pipeline."""
        return self.compression in LOSSY

    @property
    def direct(self) -> bool:
        """True when chunks are encoded here and stored whole (``write_direct_chunk``)."""
        return not self.lossy

    def for_source(self, source_dtype: np.dtype) -> OutputFormat:
        """This format for frames of ``source_dtype``: float16 only holds counts up to
        65504, so a detector whose counts can exceed that (32-bit integers, floats) is
        stored in float32. 16-bit counts fit, but for the last 31 below saturation and
        the sentinel 65535, which read back +inf: still "not a measurement"."""
        source = np.dtype(source_dtype)
        if self.dtype == "float16" and not (
            (source.kind in "iu" and source.itemsize <= 2) or source == np.float16
        ):
            return replace(self, dtype="float32")
        return self

    def error_bound(self, mean_count: float) -> float:
        """The absolute error the lossy codecs may add: a fraction of the Poisson standard
        deviation at ``mean_count`` (at least one count's)."""
        return self.lossy_fraction * math.sqrt(max(mean_count, 1.0))

    def dataset_options(self, mean_count: float = 1.0) -> dict:
        """Keyword arguments of ``h5py.Group.create_dataset`` for frames in this format."""
        import hdf5plugin  # the filters' settings; imported here, the config stays light

        options: dict = {"dtype": np.dtype(self.dtype)}
        if self.compression == "bslz4":
            options.update(hdf5plugin.Bitshuffle(nelems=0, cname="lz4"))
        elif self.compression == "zstd":
            options.update(hdf5plugin.Zstd(clevel=ZSTD_LEVEL))
        elif self.compression == "sz3":
            options.update(hdf5plugin.SZ3(absolute=self.error_bound(mean_count)))
        elif self.compression == "zfp":
            options.update(hdf5plugin.Zfp(accuracy=self.error_bound(mean_count)))
        return options

    def describe(self, mean_count: float = 1.0) -> str:
        """One line for logs: dtype, codec and (lossy) the bound."""
        text = f"{self.dtype}, {self.compression}"
        if self.lossy:
            text += f" (absolute error <= {self.error_bound(mean_count):.3g})"
        return text

    def encode(self, frame: np.ndarray) -> bytes | np.ndarray:
        """One ``(H, W)`` frame (float32, detector units) as its stored chunk (bytes, or
        the array itself for ``none``). Lossless codecs only (``direct``); releases the
        GIL for most of its time. In float16, values beyond its range (65504) are inf."""
        stored = _cast(frame, np.dtype(self.dtype))
        if self.compression == "bslz4":
            return bslz4_chunk(stored)
        if self.compression == "zstd":
            compressor = getattr(_zstd, "compressor", None)
            if compressor is None:
                import zstandard  # only where zstd is asked for

                compressor = _zstd.compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
            # zstandard's stub says ByteString; its C backend takes any buffer (an ndarray)
            return compressor.compress(stored)  # type: ignore[arg-type]
        if self.compression == "none":
            return stored
        raise ValueError(f"{self.compression} is encoded by HDF5, not here")


def _cast(frame: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``frame`` in ``dtype``, contiguous. float32 to float16 goes through torch, whose
    vectorised conversion is bit-identical to numpy's and ~20x faster at 4 Mpx."""
    if dtype == np.float16 and frame.dtype == np.float32:
        import torch  # imported here: the config imports this module and stays light

        return torch.from_numpy(np.ascontiguousarray(frame)).to(torch.float16).numpy()
    return np.ascontiguousarray(frame, dtype=dtype)


BITSHUFFLE_FILTER = 32008
FILTER_CODES: dict[int, Compression] = {
    BITSHUFFLE_FILTER: "bslz4",
    32015: "zstd",
    32024: "sz3",
    32013: "zfp",
}


def dataset_filters(dataset: h5py.Dataset) -> list[tuple[int, tuple[int, ...]]]:
    """The HDF5 filters of ``dataset`` in pipeline order: ``(code, options)`` each."""
    plist = dataset.id.get_create_plist()
    return [
        (code, tuple(values))
        for code, _, values, _ in (plist.get_filter(k) for k in range(plist.get_nfilters()))
    ]


def format_of(dataset: h5py.Dataset) -> OutputFormat:
    """The format of an existing frames dataset (an output resumed after a restart keeps
    the format it was begun with); raises ValueError for one this writer cannot continue."""
    codes = [code for code, _ in dataset_filters(dataset)]
    if len(codes) > 1 or (codes and codes[0] not in FILTER_CODES):
        raise ValueError(
            f"frames stored with HDF5 filters {codes}, which this writer does not write"
        )
    compression: Compression = FILTER_CODES[codes[0]] if codes else "none"
    return OutputFormat(dtype=dataset.dtype.name, compression=compression)


def filter_options(dataset: h5py.Dataset) -> dict:
    """``create_dataset`` keywords giving a new dataset exactly the filters of ``dataset``
    (its lossy bound included)."""
    filters = dataset_filters(dataset)
    if not filters:
        return {}
    code, values = filters[0]
    return {"compression": code, "compression_opts": values}
