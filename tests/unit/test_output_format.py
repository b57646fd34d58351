"""Detector-scale data path: output formats (dtype, codec), flushing by time, whole-chunk
reading of compressed input, one-pass normalisation, and the passthrough engine, each
checked on real files (and the daemon as a real subprocess)."""

from __future__ import annotations

import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import h5py
import hdf5plugin
import numpy as np
import pytest

from n2s_stream.config import DaemonConfig, DenoiseConfig
from n2s_stream.errors import InputError, UsageError
from n2s_stream.formats.codecs import bslz4_chunk, bslz4_decode, bslz4_encode
from n2s_stream.formats.output_format import OutputFormat, format_of
from n2s_stream.formats.stack import open_stack
from n2s_stream.formats.writer import FrameWriter, whole_frames
from n2s_stream.n2s.normalize import Normalizer, fill_invalid, normalize_frame
from n2s_stream.options import make
from tests.helpers.daemon import DaemonProcess, frames_in, read_output, write_stack

FILTERS = {"none": None, "bslz4": 32008, "zstd": 32015, "sz3": 32024, "zfp": 32013}


def _denoised_like(shape=(96, 80), mean=3.0, seed=0) -> np.ndarray:
    """A smooth float32 frame in counts, like the network's output."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    noise = np.random.default_rng(seed).normal(0, 0.05, shape)
    return (mean + np.sin(xx / 9.0) * np.cos(yy / 7.0) + noise).astype(np.float32)


def _write(path, frames, form, **kwargs) -> None:
    with FrameWriter(
        path, frame_shape=frames.shape[1:], output_format=form, mean_count=3.0, **kwargs
    ) as writer:
        writer.append(frames, source_frames=np.arange(len(frames)), model_version=2, t_received=0.0)


@pytest.mark.parametrize(
    "dtype,compression",
    [
        ("float32", "none"),
        ("float32", "bslz4"),
        ("float32", "zstd"),
        ("float16", "none"),
        ("float16", "bslz4"),
        ("float16", "zstd"),
    ],
)
def test_lossless_formats_read_back_exactly_in_a_plain_reader(tmp_path, dtype, compression):
    frames = np.stack([_denoised_like(seed=k) for k in range(3)])
    frames[0, 0, 0] = 70000.0  # beyond float16's range
    path = tmp_path / "out.h5"
    _write(path, frames, OutputFormat(dtype, compression))
    with h5py.File(path, "r") as file:  # plain h5py; hdf5plugin imported above
        ds = file["/entry/data/data"]
        plist = ds.id.get_create_plist()
        codes = [plist.get_filter(k)[0] for k in range(plist.get_nfilters())]
        assert codes == ([FILTERS[compression]] if FILTERS[compression] else [])
        assert ds.dtype == np.dtype(dtype) and ds.shape == frames.shape
        with np.errstate(over="ignore"):
            assert np.array_equal(ds[()], frames.astype(dtype))
        assert format_of(ds) == OutputFormat(dtype, compression)
        assert whole_frames(file) == 3
    if dtype == "float16":
        with h5py.File(path, "r") as file:
            assert np.isinf(file["/entry/data/data"][0, 0, 0])  # documented: inf


@pytest.mark.parametrize("compression", ["sz3", "zfp"])
def test_lossy_formats_stay_within_their_noise_bound(tmp_path, compression):
    frames = np.stack([_denoised_like(seed=k) for k in range(2)])
    form = OutputFormat("float32", compression, lossy_fraction=0.05)
    path = tmp_path / "out.h5"
    _write(path, frames, form)
    bound = form.error_bound(3.0)
    assert bound == pytest.approx(0.05 * np.sqrt(3.0))
    with h5py.File(path, "r") as file:
        back = file["/entry/data/data"][()]
        stored = sum(file["/entry/data/data"].id.get_chunk_info(k).size for k in range(2))
    error = np.abs(back - frames).max()
    assert 0 < error <= bound * 1.0001
    assert stored < frames.nbytes / 4  # smooth frames at this bound shrink a lot


def test_float16_bslz4_is_at_most_half_of_float32(tmp_path):
    frames = np.stack([_denoised_like(seed=k) for k in range(4)])
    sizes = {}
    for dtype in ("float32", "float16"):
        path = tmp_path / f"{dtype}.h5"
        _write(path, frames, OutputFormat(dtype, "bslz4"))
        with h5py.File(path, "r") as file:
            ds = file["/entry/data/data"]
            sizes[dtype] = sum(ds.id.get_chunk_info(k).size for k in range(4))
    assert sizes["float16"] <= frames.nbytes / 2
    assert sizes["float16"] < sizes["float32"]


def test_a_lossy_codec_is_refused_where_it_cannot_be_stored():
    with pytest.raises(UsageError, match="float32"):
        make(DaemonConfig, watch="/tmp", output_dtype="float16", output_compression="sz3")
    with pytest.raises(UsageError, match="lossless"):
        make(DenoiseConfig, require_reconstructable=True, output_compression="zfp")
    config = make(DaemonConfig, watch="/tmp", output_compression="zstd", flush_seconds=0.5)
    assert config.output.storage.output_format() == OutputFormat("float16", "zstd")
    assert config.output.flush_seconds == 0.5


_KILLED_WRITER = """
import os, signal, sys, numpy as np
from n2s_stream.formats.output_format import OutputFormat
from n2s_stream.formats.writer import FrameWriter
writer = FrameWriter(sys.argv[1], frame_shape=(16, 16), flush_seconds=3600,
                     output_format=OutputFormat("float16", "bslz4"))
for k in range(5):                # frame 0 is flushed at once, 1-4 wait
    writer.append(np.full((1, 16, 16), k, np.float32), source_frames=[k], model_version=0,
                  t_received=0.0)
assert writer.n_flushed == 1
writer.flush()                    # frames 0-4 are whole
for k in range(5, 9):             # frames 5-8 wait for the next flush
    writer.append(np.full((1, 16, 16), k, np.float32), source_frames=[k], model_version=0,
                  t_received=0.0)
print(writer.n_written, writer.n_flushed, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_frames_flushed_by_time_and_a_kill_keeps_whole_frames_only(tmp_path):
    path = tmp_path / "out.h5"
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_WRITER, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -9, proc.stderr
    assert proc.stdout.split() == ["9", "5"]
    # the restart's writer: cut back to the whole frames, continued after them
    with FrameWriter(
        path, frame_shape=(16, 16), resume=True, output_format=OutputFormat("float32", "none")
    ) as writer:
        assert writer.n_written == 5 and writer.last_source_frame == 4
        assert writer.format == OutputFormat("float16", "bslz4")  # as it was begun
        writer.append(
            np.full((1, 16, 16), 5, np.float32), source_frames=[5], model_version=1, t_received=0.0
        )
    frames, provenance = read_output(path)
    assert np.array_equal(provenance["source_frame"], np.arange(6))
    assert np.array_equal(frames[:, 0, 0], np.arange(6))


def test_a_swmr_reader_sees_frames_once_flushed(tmp_path):
    path = tmp_path / "out.h5"
    reader = (
        "import h5py, sys\n"
        "with h5py.File(sys.argv[1], 'r', swmr=True) as f:\n"
        "    print(f['/entry/provenance/source_frame'].shape[0])\n"
    )

    def visible() -> int:
        out = subprocess.run(
            [sys.executable, "-c", reader, str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return int(out.stdout)

    writer = FrameWriter(path, frame_shape=(8, 8), flush_seconds=3600)
    try:
        writer.append(
            np.ones((1, 8, 8), np.float32), source_frames=[0], model_version=0, t_received=0.0
        )
        assert visible() == 1  # the first frame after a quiet spell: flushed at once
        writer.append(
            np.ones((2, 8, 8), np.float32), source_frames=[1, 2], model_version=0, t_received=0.0
        )
        assert writer.n_written == 3 and writer.n_flushed == 1 and visible() == 1
        writer.flush_seconds = 0.0
        writer.flush_if_due()
        assert visible() == 3 and writer.n_flushed == 3
    finally:
        writer.close()


def _bslz4_file(path, frames, **options):
    with h5py.File(path, "w") as file:
        ds = file.create_dataset(
            "/entry/data/data",
            shape=frames.shape,
            chunks=(1, *frames.shape[1:]),
            dtype=frames.dtype,
            **options,
        )
        for k, frame in enumerate(frames):
            if options:
                ds[k] = frame
            else:
                ds.id.write_direct_chunk((k, 0, 0), frame.tobytes())


@pytest.mark.parametrize(
    "options", [{}, dict(hdf5plugin.Bitshuffle(cname="lz4")), {"compression": "gzip"}]
)
def test_whole_chunks_decoded_in_a_pool_equal_what_h5py_reads(tmp_path, options):
    rng = np.random.default_rng(3)
    frames = rng.poisson(2.0, (7, 40, 36)).astype(np.uint16)
    frames[:, 5, :] = 65535
    _bslz4_file(tmp_path / "in.h5", frames, **options)
    with open_stack(tmp_path / "in.h5") as stack, ThreadPoolExecutor(2) as pool:
        direct = stack.read_list(2, 7, pool)
        assert np.array_equal(np.stack(direct), frames[2:7])
        assert np.array_equal(np.stack(stack.read_list(0, 3)), frames[:3])
        assert np.array_equal(stack.read(0, 7), frames)


def test_a_chunk_that_does_not_decode_is_a_read_error_naming_the_file(tmp_path):
    frames = np.ones((2, 32, 32), np.uint16)
    path = tmp_path / "in.h5"
    with h5py.File(path, "w") as file:
        ds = file.create_dataset(
            "/entry/data/data",
            shape=frames.shape,
            chunks=(1, 32, 32),
            dtype="u2",
            **hdf5plugin.Bitshuffle(cname="lz4"),
        )
        ds.id.write_direct_chunk((0, 0, 0), bslz4_encode(frames[0]))
        ds.id.write_direct_chunk((1, 0, 0), bslz4_encode(frames[1])[:20])  # cut short
    with open_stack(path) as stack:
        assert np.array_equal(stack.read_list(0, 1)[0], frames[0])
        with pytest.raises(InputError, match=f"{path}.*does not decode") as caught:
            stack.read_list(1, 2)
        assert caught.value.reason == "read_error"


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32, np.int32, np.float32, ">u2"])
def test_one_pass_normalisation_equals_fill_then_forward(dtype):
    data = np.random.default_rng(0).poisson(2.0, (50, 40)).astype(dtype)
    before = data.copy()
    valid = np.ones(data.shape, bool)
    valid[7:9] = False
    normalizer = Normalizer("meanstd", 2.0, 1.4, 65535.0, "uint16")
    expected = normalizer.forward(fill_invalid(data[np.newaxis], valid[np.newaxis]))[0]
    assert np.array_equal(normalize_frame(data, valid, normalizer), expected)
    assert np.array_equal(data, before)  # the source frame is left as it came
    image = expected.copy()
    assert np.array_equal(normalizer.inverse(image), expected * np.float32(1.4) + np.float32(2.0))
    assert np.array_equal(image, expected)


def test_one_pass_normalisation_fills_nan_and_inf_with_the_mean_of_the_measured_pixels():
    # offline denoise takes float frames with NaN/inf and in-fills them; they must not
    # leak into the fill value
    data = np.full((6, 5), 3.0, np.float32)
    data[0, 0], data[2, 3], data[4, 1] = np.nan, np.inf, 5.0
    valid = np.isfinite(data)
    normalizer = Normalizer("meanstd", 1.0, 2.0, 1.0, "float32")
    out = normalize_frame(data, valid, normalizer)
    fill = (3.0 * 27 + 5.0) / 28
    assert np.allclose(out[~valid], (fill - 1.0) / 2.0)
    assert np.array_equal(out[valid], (data[valid] - np.float32(1.0)) / np.float32(2.0))


def test_passthrough_daemon_writes_the_frames_as_they_came_in_float16_bslz4(tmp_path):
    rng = np.random.default_rng(5)
    frames = rng.poisson(3.0, (12, 40, 48)).astype(np.uint16)
    frames[:, :, 20] = 65535  # a module gap, as an Eiger marks it
    daemon = DaemonProcess(
        tmp_path,
        "--engine",
        "passthrough",
        "--output-dtype",
        "float16",
        "--output-compression",
        "bslz4",
        "--flush-seconds",
        "0.5",
    )
    daemon.wait_ready()
    write_stack(
        daemon.watch / "scan_0001.h5",
        frames,
        dataset="/entry/data/data",
        chunks=(1, 40, 48),
        **hdf5plugin.Bitshuffle(cname="lz4"),
    )
    daemon.wait_for_ended(1, timeout=120)
    assert frames_in(daemon.output("scan_0001_n2s.h5")) == 12
    metrics = daemon.scrape()
    assert daemon.terminate() == 0, daemon.log()[-2000:]
    assert "engine passthrough" in daemon.log()
    assert metrics["n2s_frames_denoised_total"] == 12
    assert metrics.get("n2s_train_steps_total", 0) == 0
    out, provenance = read_output(daemon.out / "scan_0001_n2s.h5")
    with h5py.File(daemon.out / "scan_0001_n2s.h5", "r") as file:
        ds = file["/entry/data/data"]
        assert ds.dtype == np.float16 and ds.id.get_create_plist().get_filter(0)[0] == 32008
    assert np.array_equal(provenance["source_frame"], np.arange(12))
    measured = frames != 65535
    assert np.array_equal(out[measured], frames[measured].astype(np.float16))
    assert np.isinf(out[~measured]).all()  # 65535 is beyond float16: unmeasured reads inf


def test_the_queue_is_full_at_its_byte_bound_and_always_takes_one_frame():
    import queue
    from pathlib import Path

    from n2s_stream.runtime.intake import FrameQueue
    from n2s_stream.stages import Frame, SeriesEnd

    def frame(k: int) -> Frame:
        return Frame("s", k, np.zeros((100, 100), np.uint16), 0.0, Path("o.h5"))  # 20 kB

    frames = FrameQueue(maxsize=64, max_bytes=50_000)
    big = Frame("s", 9, np.zeros((1000, 1000), np.uint16), 0.0, Path("o.h5"))  # 2 MB
    frames.put_nowait(big)  # an empty queue takes any frame
    assert frames.full()
    assert frames.get_nowait() is big and frames.bytes == 0
    frames.put_nowait(frame(0))
    frames.put_nowait(frame(1))
    frames.put_nowait(frame(2))  # 60 kB: now over the bound
    with pytest.raises(queue.Full):
        frames.put_nowait(frame(3))
    assert [frames.get_nowait().index for _ in range(3)] == [0, 1, 2]
    frames.put_nowait(SeriesEnd("s", 3, Path("o.h5")))
    assert frames.bytes == 0 and frames.qsize() == 1
    frames.get_nowait()
    for k in range(3):
        frames.put_nowait(frame(k))
    assert frames.full() and frames.qsize() == 3  # full by bytes; the metric says 3


def test_a_frame_that_cannot_be_encoded_stops_storing_and_leaves_the_frames_before_it(
    tmp_path, monkeypatch
):
    import threading
    from pathlib import Path

    from n2s_stream.config import OutputOptions
    from n2s_stream.runtime.metrics import Metrics
    from n2s_stream.runtime.state import StateDir
    from n2s_stream.sinks.hdf5 import Hdf5Sink, StoreError
    from n2s_stream.stages import Frame, FrameMeta, SeriesStart

    real_encode = OutputFormat.encode

    def encode(self, frame):
        if frame[0, 0] == 3:
            raise MemoryError("no room for frame 3")
        return real_encode(self, frame)

    monkeypatch.setattr(OutputFormat, "encode", encode)
    from prometheus_client import CollectorRegistry

    sink = Hdf5Sink(
        OutputOptions(out=tmp_path / "out"),
        state=StateDir(tmp_path / "state"),
        metrics=Metrics(CollectorRegistry()),
        stopping=threading.Event(),
        config_text="",
    )
    output = tmp_path / "out" / "s_n2s.h5"
    sink.open_series(SeriesStart("s", output, (8, 8), np.dtype("u2")))
    valid = np.ones((8, 8), bool)
    with pytest.raises(StoreError, match="frame 3 could not be encoded"):
        for k in range(8):
            frame = Frame("s", k, np.full((8, 8), k, np.uint16), 0.0, Path("s_n2s.h5"))
            sink.write(frame, np.full((8, 8), k, np.float32), FrameMeta(0, 0, valid, valid))
        sink.close()
    sink.close()  # as the inference loop does on its way out
    frames, provenance = read_output(output)
    assert np.array_equal(provenance["source_frame"], np.arange(3))
    assert np.array_equal(frames[:, 0, 0], np.arange(3))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_hdf5s_own_h5dump_reads_uncompressed_outputs(tmp_path, dtype):
    """The readers table in docs/guides/detector-scale.md: HDF5's own tools (Debian's
    hdf5-tools) open an output stored without a codec, in either dtype."""
    import shutil

    if shutil.which("h5dump") is None:
        pytest.skip("no h5dump (Debian: apt install hdf5-tools)")
    frames = np.arange(40, dtype=np.float32).reshape(2, 4, 5) / 4
    path = tmp_path / "out.h5"
    _write(path, frames, OutputFormat(dtype, "none"))
    dump = subprocess.run(
        ["h5dump", "-d", "/entry/data/data", "-w", "0", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert dump.returncode == 0, dump.stderr
    block = dump.stdout.split("DATA {", 1)[1].split("}", 1)[0]
    values = [float(v) for v in re.sub(r"\(\d+,\d+,\d+\):", "", block).split(",")]
    assert np.array_equal(np.array(values, np.float32), frames.ravel())


def test_a_bslz4_chunk_is_the_encoded_bytes_and_decodes_back():
    frame = np.random.default_rng(2).poisson(3.0, (37, 53)).astype(np.float16)
    chunk = bslz4_chunk(frame)
    assert chunk.dtype == np.uint8 and chunk.tobytes() == bslz4_encode(frame)
    assert np.array_equal(bslz4_decode(chunk.tobytes(), frame.shape, frame.dtype), frame)


def test_one_pass_normalisation_of_a_fortran_ordered_frame_fills_its_gaps():
    data = np.asfortranarray(np.random.default_rng(3).poisson(4.0, (12, 9)).astype(np.uint16))
    data[:, 4] = 65535
    valid = data != 65535
    normalizer = Normalizer("meanstd", 4.0, 2.0, 65535.0, "uint16")
    expected = normalizer.forward(fill_invalid(data[np.newaxis], valid[np.newaxis]))[0]
    assert np.array_equal(normalize_frame(data, valid, normalizer), expected)
