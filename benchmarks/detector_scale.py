"""The daemon at detector sizes: EIGER2 4M (2162 x 2068) and 16M (4362 x 4148) frames.

Frames are uint16 photon counts (a few per pixel: powder rings on a background, module gaps
as the dtype's maximum), bitshuffle-LZ4, one chunk per frame, as an Eiger writes them.
Everything below is measured in one run on this machine:

1. its own limits: a memory copy, bitshuffle-LZ4 decoding alone and the output codec alone
   (2 threads each);
2. the bare loop: the same work as the daemon with ``--engine passthrough`` (read whole
   chunks, decode, normalise, restore, encode, write whole chunks) in a plain loop with a
   pool of 2 threads, and its I/O-only form (decode, cast, encode);
3. the time of each stage for one frame on one thread (read, decode, prepare, forward of
   the near-free and the default network, registering 3-frame context's neighbours,
   restore, encode, write);
4. the daemon end to end (a subprocess, frames/s from its output's provenance ``t_written``,
   peak RSS): a pre-written file with ``--engine passthrough``, the near-free network
   (``--model dncnn --layers 2 --width 1``) and the default network (UNet 16, training on);
   frames arriving live in a growing SWMR file and over a Dectris stream2 feed;
5. every output format on a frame denoised by the shipped network: bytes per frame, write
   rate, and PSNR against the simulator's truth (read back by plain h5py + hdf5plugin).

Prints tables; writes ``benchmarks/results/detector_scale.json`` and ``.png``.

    python benchmarks/detector_scale.py                                   # 4M and 16M
    python benchmarks/detector_scale.py --sizes 1M --frames 40 --network-frames 0  # quick
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np
import torch
from common import (
    N2S,
    RESULTS,
    bare_forward_fps,
    free_port,
    peak_rss_mb,
    pyplot,
    save_figure,
    write_report,
)

from n2s_stream.config import DaemonConfig
from n2s_stream.formats import protocols
from n2s_stream.formats.codecs import bslz4_decode, bslz4_encode
from n2s_stream.formats.output_format import OutputFormat
from n2s_stream.formats.writer import FrameWriter
from n2s_stream.models import build_model, use_fast_layout
from n2s_stream.n2s.denoising import (
    check_usable,
    denoise_normalized,
    inference_autocast,
    restore_invalid,
)
from n2s_stream.n2s.masking import Masker
from n2s_stream.n2s.normalize import fit_normalizer, normalize_frame
from n2s_stream.n2s.registration import register_neighbours
from n2s_stream.n2s.specs import ModelConfig
from n2s_stream.pretrained import starting_model
from n2s_stream.runtime.allocator import keep_freed_memory
from n2s_stream.runtime.metrics import scrape

SIZES = {"1M": (1062, 1028), "4M": (2162, 2068), "16M": (4362, 4148)}
"""EIGER2 frame sizes, (height, width); ``HxW`` names any other."""


def frame_shape(size: str) -> tuple[int, int]:
    """``(height, width)`` of an EIGER2 size name or of ``HxW``."""
    if size in SIZES:
        return SIZES[size]
    height, _, width = size.partition("x")
    return int(height), int(width)


DISTINCT = 8  # distinct noisy frames, repeated to make a series
NEAR_FREE = ["--model", "dncnn", "--layers", "2", "--width", "1"]
QUIET = ["--no-cold-start", "--no-pretrained", "--no-refine", "--no-train"]
FORMATS = [
    OutputFormat("float32", "none"),
    OutputFormat("float32", "bslz4"),
    OutputFormat("float32", "zstd"),
    OutputFormat("float16", "none"),
    OutputFormat("float16", "bslz4"),
    OutputFormat("float16", "zstd"),
    OutputFormat("float32", "sz3", 0.05),
    OutputFormat("float32", "zfp", 0.05),
    OutputFormat("float32", "sz3", 0.1),
]
DEFAULT_OUTPUT = ["--output-dtype", "float16", "--output-compression", "bslz4"]


# ---- the data -----------------------------------------------------------------------------
def truth_frame(shape: tuple[int, int], mean_count: float) -> np.ndarray:
    """Expected counts: powder rings on a falling background, mean ``mean_count``."""
    height, width = shape
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    r = np.hypot(yy - 0.47 * height, xx - 0.52 * width)
    image = 0.6 + 0.4 * np.exp(-r / (0.5 * height))
    for radius in np.linspace(0.08, 0.45, 9) * height:
        image += 3.0 * np.exp(-((r - radius) ** 2) / 8.0)
    return (image * (mean_count / image.mean())).astype(np.float32)


def noisy_frames(truth: np.ndarray, n: int, seed: int = 1) -> list[np.ndarray]:
    """``n`` Poisson draws as uint16, module gaps (every 514 rows, the middle columns) set to
    the dtype's maximum as an Eiger marks them."""
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n):
        frame = np.minimum(rng.poisson(truth), 65534).astype(np.uint16)
        frame[514::550, :] = 65535
        frame[:, truth.shape[1] // 2 - 4 : truth.shape[1] // 2 + 4] = 65535
        frames.append(frame)
    return frames


def create_input(path: Path, shape: tuple[int, int], *, swmr: bool = False) -> h5py.File:
    """An empty areaDetector-style file: ``/entry/data/data`` uint16, bitshuffle-LZ4."""
    file = h5py.File(path, "w", libver="latest")
    file.create_dataset(
        "/entry/data/data",
        shape=(0, *shape),
        maxshape=(None, *shape),
        chunks=(1, *shape),
        dtype="u2",
        **hdf5plugin.Bitshuffle(cname="lz4"),
    )
    if swmr:
        file.swmr_mode = True
    return file


def write_prewritten(path: Path, chunks: list[bytes], shape: tuple[int, int], n: int) -> None:
    """A finished file of ``n`` frames, the chunks repeated."""
    with create_input(path, shape) as file:
        ds = file["/entry/data/data"]
        ds.resize(n, axis=0)
        for index in range(n):
            ds.id.write_direct_chunk((index, 0, 0), chunks[index % len(chunks)])


def write_live(path: Path, size: str, n: int, mean_count: float) -> None:
    """A detector writing ``n`` frames as fast as it can into a growing SWMR file (flushed
    every frame); run in its own process (``--write-live``)."""
    shape = frame_shape(size)
    chunks = [bslz4_encode(f) for f in noisy_frames(truth_frame(shape, mean_count), DISTINCT)]
    tmp = path.with_suffix(".part")
    with create_input(tmp, shape, swmr=True) as file:
        os.rename(tmp, path)
        ds = file["/entry/data/data"]
        for index in range(n):
            ds.resize(index + 1, axis=0)
            ds.id.write_direct_chunk((index, 0, 0), chunks[index % len(chunks)])
            ds.flush()


# ---- the machine and the bare loop --------------------------------------------------------
def rate(work, items: list, threads: int) -> float:
    """Items per second of ``work`` over ``items`` with a pool of ``threads``."""
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, items[:threads]))  # warm up
        started = time.perf_counter()
        list(pool.map(work, items))
        return len(items) / (time.perf_counter() - started)


def machine_limits(
    frames: list[np.ndarray],
    chunks: list[bytes],
    denoised: np.ndarray,
    output: OutputFormat,
    repeat: int,
) -> dict:
    """Frames/s of a memory copy, of bitshuffle-LZ4 decoding and of the output codec
    alone, 2 threads each."""
    shape, dtype = frames[0].shape, frames[0].dtype
    target = np.empty_like(denoised)
    return {
        "memcpy_float32": rate(lambda _: np.copyto(target, denoised), range(repeat * 4), 1),
        "decode_bslz4": rate(lambda c: bslz4_decode(c, shape, dtype), chunks * repeat, 2),
        "encode_output": rate(lambda _: output.encode(denoised), range(repeat * 2), 2),
    }


def bare_loop(path: Path, out: Path, n: int, output: OutputFormat, *, full: bool) -> float:
    """Frames/s of a plain loop over a pre-written file: whole chunks read and written in
    order on this thread, the per-frame work in a pool of 2 (``full``: decode, normalise,
    restore, encode as the passthrough daemon does; else decode and encode only)."""
    with h5py.File(path, "r") as source:
        ds = source["/entry/data/data"]
        shape, dtype = ds.shape[1:], ds.dtype
        first = bslz4_decode(ds.id.read_direct_chunk((0, 0, 0))[1], shape, dtype)
        normalizer = fit_normalizer(
            first[np.newaxis],
            mode="meanstd",
            scale_integers=True,
            source_dtype=dtype,
            valid=(first != 65535)[np.newaxis],
        )

        def work(chunk: bytes) -> bytes | np.ndarray:
            frame = bslz4_decode(chunk, shape, dtype)
            if not full:
                return output.encode(frame.astype(np.float32))
            valid = check_usable(frame)
            image = normalizer.inverse(normalize_frame(frame, valid, normalizer))
            return output.encode(restore_invalid(image, frame, valid))

        with h5py.File(out, "w", libver="latest") as sink, ThreadPoolExecutor(2) as pool:
            frames = sink.create_dataset(
                "data", shape=(n, *shape), chunks=(1, *shape), **output.dataset_options()
            )
            started = time.perf_counter()
            pending = []
            for index in range(n):
                pending.append(pool.submit(work, ds.id.read_direct_chunk((index, 0, 0))[1]))
                if len(pending) > 4:
                    frames.id.write_direct_chunk((index - 4, 0, 0), pending.pop(0).result())
            for k, job in enumerate(pending):
                frames.id.write_direct_chunk((n - len(pending) + k, 0, 0), job.result())
            sink.flush()
            return n / (time.perf_counter() - started)


def stage_times(
    frame: np.ndarray, chunk: bytes, output: OutputFormat, path: Path, default_network: bool
) -> dict:
    """Milliseconds of each stage for one frame on one thread (median of a few)."""
    normalizer = fit_normalizer(
        frame[np.newaxis],
        mode="meanstd",
        scale_integers=True,
        source_dtype=frame.dtype,
        valid=(frame != 65535)[np.newaxis],
    )
    valid = check_usable(frame)
    prepared = normalize_frame(frame, valid, normalizer)
    near_free = use_fast_layout(
        build_model(ModelConfig("dncnn", width=1, layers=2)).eval(), torch.device("cpu")
    )
    x = torch.from_numpy(prepared)[None, None]
    drifted = {side: np.roll(prepared, 3 * side, axis=1) for side in (-1, 1)}
    encoded = output.encode(frame.astype(np.float32))
    with h5py.File(path, "w", libver="latest") as file:
        ds = file.create_dataset(
            "data", shape=(64, *frame.shape), chunks=(1, *frame.shape), **output.dataset_options()
        )
        slots = iter(range(64))
        stages = {
            "read": lambda: file.id,  # replaced below: reading needs a stored chunk
            "decode": lambda: bslz4_decode(chunk, frame.shape, frame.dtype),
            "prepare": lambda: normalize_frame(frame, check_usable(frame), normalizer),
            "forward_near_free": lambda: near_free(x),
            # what 3-frame context adds a frame: its neighbours, drifted 3 px, registered
            "register_context": lambda: register_neighbours(drifted, 0),
            "restore": lambda: restore_invalid(normalizer.inverse(prepared), frame, valid),
            "encode": lambda: output.encode(prepared),
            "write": lambda: ds.id.write_direct_chunk((next(slots), 0, 0), encoded),
        }
        ds.id.write_direct_chunk((0, 0, 0), encoded)
        stages["read"] = lambda: ds.id.read_direct_chunk((0, 0, 0))
        times = {}
        with torch.inference_mode():
            for name, work in stages.items():
                runs = []
                for _ in range(5):
                    started = time.perf_counter()
                    work()
                    runs.append(time.perf_counter() - started)
                times[name] = 1e3 * float(np.median(runs))
            if default_network:
                default = use_fast_layout(
                    build_model(DaemonConfig().network.model_config()).eval(), torch.device("cpu")
                )
                default(x)
                started = time.perf_counter()
                default(x)
                times["forward_default"] = 1e3 * (time.perf_counter() - started)
    return times


# ---- output formats -----------------------------------------------------------------------
def shipped_network(device: torch.device) -> tuple[torch.nn.Module, Masker]:
    """The shipped starting network (what the daemon writes its first frames with)."""
    network = DaemonConfig().network
    model_config, masker_config = network.model_config(), network.masker_config()
    checkpoint = starting_model(model_config, masker_config)
    assert checkpoint is not None, "the shipped model is part of the package"
    model = build_model(model_config)
    model.load_state_dict(checkpoint.state_dict)
    return use_fast_layout(model.eval().to(device), device), Masker(masker_config)


def shipped_denoise(
    frame: np.ndarray, device: torch.device, precision: str = "float32", tile: int = 0
) -> np.ndarray:
    """``frame`` denoised in one pass by the shipped starting network, as the daemon's
    first frames are (float32 counts)."""
    model, masker = shipped_network(device)
    valid = check_usable(frame)
    normalizer = fit_normalizer(
        frame[np.newaxis],
        mode="meanstd",
        scale_integers=True,
        source_dtype=frame.dtype,
        valid=valid[np.newaxis],
    )
    prepared = normalize_frame(frame, valid, normalizer)[np.newaxis]
    out = denoise_normalized(
        model, masker, prepared, jinv=False, device=device, precision=precision, tile=tile
    )
    return restore_invalid(normalizer.inverse(out[0]), frame, valid)


def precision_check(
    frame: np.ndarray, truth: np.ndarray, device: torch.device, crop: int
) -> list[dict]:
    """PSNR on the truth of the shipped network's output in each inference precision (and
    tiled), against float32; on a CPU a ``crop`` of the frame (bfloat16 autocast is slow
    there), on a GPU the whole frame."""
    if device.type == "cpu" and crop:
        frame, truth = frame[:crop, :crop], truth[:crop, :crop]
    valid = check_usable(frame)
    reference = None
    rows = []
    variants = [("float32", 0), ("float32", 512), ("bfloat16", 0)]
    if device.type == "cuda":
        variants.append(("float16", 0))
    for precision, tile in variants:
        started = time.perf_counter()
        image = shipped_denoise(frame, device, precision, tile)
        seconds = time.perf_counter() - started
        score = psnr(image, truth, valid)
        reference = score if reference is None else reference
        rows.append(
            {
                "precision": precision,
                "tile": tile,
                "psnr": score,
                "loss_db": reference - score,
                "seconds": seconds,
                "shape": list(frame.shape),
            }
        )
    return rows


def device_forward_fps(
    shape: tuple[int, int], device: torch.device, seconds: float, precision: str = "float32"
) -> float:
    """Frames/s of the default network's forward pass alone on ``device`` (one frame a
    pass), synchronised, after a warm-up."""
    if device.type == "cpu" and precision == "float32":
        return bare_forward_fps(shape, torch.get_num_threads(), seconds=seconds, min_passes=2)
    model, _ = shipped_network(device)
    x = torch.randn(1, 1, *shape, device=device)
    with torch.inference_mode(), inference_autocast(device, precision):
        model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds or count < 2:
            model(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            count += 1
    return count / (time.perf_counter() - started)


def psnr(image: np.ndarray, truth: np.ndarray, valid: np.ndarray) -> float:
    """PSNR over measured pixels, peak = the truth's maximum."""
    error = (image[valid].astype(np.float64) - truth[valid]) ** 2
    return float(10 * np.log10(truth.max() ** 2 / error.mean()))


def output_formats(
    denoised: np.ndarray, truth: np.ndarray, valid: np.ndarray, mean_count: float, tmp: Path, n: int
) -> list[dict]:
    """Bytes per frame, write rate and PSNR on the truth of each output format."""
    reference = psnr(denoised, truth, valid)
    rows = []
    for form in FORMATS:
        path = tmp / f"format-{form.dtype}-{form.compression}-{form.lossy_fraction}.h5"
        frames = np.repeat(denoised[np.newaxis], n, axis=0)
        started = time.perf_counter()
        with FrameWriter(
            path, frame_shape=denoised.shape, output_format=form, mean_count=mean_count
        ) as writer:
            for k in range(n):
                writer.append(frames[k : k + 1], source_frames=[k], model_version=0, t_received=0.0)
        seconds = (time.perf_counter() - started) / n
        with h5py.File(path, "r") as file:  # a plain h5py + hdf5plugin reader
            ds = file["/entry/data/data"]
            stored = sum(ds.id.get_chunk_info(k).size for k in range(n)) / n
            back = ds[0].astype(np.float32)
        measured = valid & np.isfinite(back)
        rows.append(
            {
                "dtype": form.dtype,
                "compression": form.compression,
                "lossy_fraction": form.lossy_fraction if form.lossy else None,
                "error_bound": form.error_bound(mean_count) if form.lossy else 0.0,
                "bytes_per_frame": stored,
                "of_float32": stored / (denoised.size * 4),
                "write_mpx_s": denoised.size / seconds / 1e6,
                "max_error": float(np.abs(back[measured] - denoised[measured]).max()),
                "psnr": psnr(back, truth, measured),
                "psnr_loss_db": reference - psnr(back, truth, measured),
            }
        )
    return rows


def float16_by_count(
    shape: tuple[int, int], counts: list[float], device: torch.device
) -> list[dict]:
    """What storing in float16 costs against float32, in PSNR on the truth, as the counts
    per pixel grow (float16's steps grow with the value: 1 count at 1024-2048, 16 at
    16384-32768)."""
    rows = []
    for mean_count in counts:
        truth = truth_frame(shape, mean_count)
        frame = np.random.default_rng(7).poisson(truth).astype(np.float32)
        frame = np.minimum(frame, 65534).astype(np.uint16)
        denoised = shipped_denoise(frame, device)
        valid = np.ones(shape, bool)
        half = denoised.astype(np.float16).astype(np.float32)
        rows.append(
            {
                "mean_count": mean_count,
                "max_count": float(truth.max()),
                "psnr_float32": psnr(denoised, truth, valid),
                "psnr_float16": psnr(half, truth, valid),
                "loss_db": psnr(denoised, truth, valid) - psnr(half, truth, valid),
            }
        )
    return rows


# ---- the daemon ---------------------------------------------------------------------------
def run_daemon(
    args_in: list[str],
    flags: list[str],
    n: int,
    tmp: Path,
    name: str,
    feed=None,
    timeout: float = 900,
) -> dict:
    """Run the daemon until ``n`` frames are written; frames/s from its output's
    provenance, peak RSS, forward passes. ``feed``: started once the daemon is ready."""
    out, state, port = tmp / f"out-{name}", tmp / f"state-{name}", free_port()
    log = (tmp / f"{name}.log").open("w")
    daemon = subprocess.Popen(
        [
            *N2S,
            *args_in,
            "--out",
            str(out),
            "--state-dir",
            str(state),
            "--metrics-port",
            str(port),
            *flags,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + timeout
        metrics: dict = {}
        while time.monotonic() < deadline:
            if daemon.poll() is not None:
                raise RuntimeError(f"{name}: daemon exited with {daemon.returncode}")
            try:
                metrics = scrape(port)
            except OSError:
                time.sleep(0.5)
                continue
            if feed is not None:
                feed()
                feed = None
            if metrics.get("n2s_frames_denoised_total", 0) >= n:
                break
            time.sleep(0.5)
        else:
            raise TimeoutError(f"{name}: fewer than {n} frames written in {timeout} s")
        rss = peak_rss_mb(daemon.pid)
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=300)
        except subprocess.TimeoutExpired:
            # keep what the daemon said, its threads' stacks included: the temporary
            # folder (and its log) goes with us
            daemon.send_signal(signal.SIGUSR1)
            time.sleep(2)
            daemon.kill()
            log.flush()
            tail = (tmp / f"{name}.log").read_text()[-30000:]  # the stacks, and before
            print(
                f"{name}: daemon still running 300 s after SIGTERM; its log ends:\n{tail}",
                file=sys.stderr,
            )
            raise
        finally:
            log.close()
    (path,) = out.rglob("*_n2s.h5")
    # as a SWMR reader: a stop bound reached in a long forward pass (16M, default network)
    # leaves the output flagged open, its whole frames readable
    with h5py.File(path, "r", swmr=True) as output:
        written = output["/entry/provenance/t_written"][()]
        received = output["/entry/provenance/t_received"][()]
        dtype = str(output["/entry/data/data"].dtype)
    # what a row wrote is dropped, so that the next rows reuse its memory in the page cache
    # rather than touch fresh memory (on a virtual machine, costly and noisy)
    shutil.rmtree(out)
    shutil.rmtree(state)
    fps = (len(written) - 1) / (written[-1] - written[0])
    forward = metrics.get("n2s_forward_seconds_sum", 0.0)
    forwards = metrics.get("n2s_forward_seconds_count", 0.0)
    return {
        "frames": len(written),
        "fps": fps,
        "peak_rss_mb": rss,
        "output_dtype": dtype,
        "latency_p50_s": float(np.median(written - received)),
        "forward_fps_inside": forwards / forward if forward else None,
    }


def stream2_feed(endpoint: str, frames: list[np.ndarray], n: int) -> threading.Thread:
    """A Dectris stream2 detector PUSHing ``n`` bitshuffle-LZ4 images (encoded before the
    clock starts) from a thread, then the end message."""
    import zmq

    messages = [protocols.stream2_image(1, k, frames[k % len(frames)]) for k in range(n)]
    ready = threading.Event()

    def send() -> None:
        context = zmq.Context()
        sock = context.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 60_000)
        sock.bind(endpoint)
        ready.set()
        sock.send_multipart(protocols.stream2_start(1, frames[0].shape))
        for message in messages:
            sock.send_multipart(message)
        sock.send_multipart(protocols.stream2_end(1))
        sock.close()
        context.term()

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    ready.wait()
    return thread


def measure_size(size: str, args: argparse.Namespace, tmp: Path) -> dict:
    """Everything for one frame size."""
    shape = frame_shape(size)
    mpx = shape[0] * shape[1] / 1e6
    tmp = tmp / size
    tmp.mkdir()
    truth = truth_frame(shape, args.mean_count)
    frames = noisy_frames(truth, DISTINCT)
    chunks = [bslz4_encode(f) for f in frames]
    acq = tmp / "acq"
    acq.mkdir()
    write_prewritten(acq / "scan_0001.h5", chunks, shape, args.frames)
    output = OutputFormat("float16", "bslz4")
    valid = check_usable(frames[0])
    device = torch.device(args.device)
    denoised = shipped_denoise(frames[0], device) if args.formats else frames[0].astype(np.float32)
    print(
        f"{size}: {shape[0]}x{shape[1]}, raw {frames[0].nbytes / 1e6:.1f} MB, bitshuffle-LZ4 "
        f"{np.mean([len(c) for c in chunks]) / 1e6:.2f} MB",
        flush=True,
    )
    result: dict = {
        "size": size,
        "shape": shape,
        "megapixels": mpx,
        "raw_mb": frames[0].nbytes / 1e6,
        "input_mb": float(np.mean([len(c) for c in chunks]) / 1e6),
    }
    result["machine_fps"] = machine_limits(frames, chunks, denoised, output, args.repeat)
    result["bare_fps"] = {
        "full": bare_loop(acq / "scan_0001.h5", tmp / "bare.h5", args.frames, output, full=True),
        "io_only": bare_loop(
            acq / "scan_0001.h5", tmp / "bare.h5", args.frames, output, full=False
        ),
    }
    result["stage_ms"] = stage_times(
        frames[0], chunks[0], output, tmp / "stages.h5", default_network=args.network_frames > 0
    )
    daemon_rows = {}
    watch = ["--watch", str(acq)]
    daemon_rows["passthrough"] = run_daemon(
        watch, ["--engine", "passthrough", *DEFAULT_OUTPUT, *QUIET], args.frames, tmp, "passthrough"
    )
    daemon_rows["passthrough_float32"] = run_daemon(
        watch,
        [
            "--engine",
            "passthrough",
            "--output-dtype",
            "float32",
            "--output-compression",
            "none",
            *QUIET,
        ],
        args.frames,
        tmp,
        "passthrough_f32",
    )
    daemon_rows["near_free"] = run_daemon(
        watch, [*NEAR_FREE, *DEFAULT_OUTPUT, *QUIET], args.frames, tmp, "near_free"
    )
    live = tmp / "live"
    live.mkdir()
    daemon_rows["passthrough_live_swmr"] = run_daemon(
        ["--watch", str(live)],
        ["--engine", "passthrough", *DEFAULT_OUTPUT, *QUIET],
        args.frames,
        tmp,
        "live",
        feed=lambda: subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--write-live",
                str(live / "scan_0001.h5"),
                "--sizes",
                size,
                "--frames",
                str(args.frames),
                "--mean-count",
                str(args.mean_count),
            ]
        ),
    )
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    feeds: list[threading.Thread] = []
    daemon_rows["passthrough_stream2"] = run_daemon(
        ["--zmq", endpoint, "--zmq-protocol", "dectris-stream2"],
        ["--engine", "passthrough", *DEFAULT_OUTPUT, *QUIET],
        args.frames,
        tmp,
        "stream2",
        feed=lambda: feeds.append(stream2_feed(endpoint, frames, args.frames)),
    )
    if args.network_frames > 0:
        result["bare_forward_default_fps"] = device_forward_fps(shape, device, args.forward_seconds)
        daemon_rows["default_network"] = run_daemon(
            watch,
            [
                "--no-cold-start",
                "--no-refine",
                "--device",
                args.device,
                *DEFAULT_OUTPUT,
                *args.network_flags.split(),
            ],
            args.network_frames,
            tmp,
            "default",
        )
        daemon_rows["default_network"]["of_bare_forward"] = (
            daemon_rows["default_network"]["fps"] / result["bare_forward_default_fps"]
        )
    for row in daemon_rows.values():
        row["mpx_s"] = row["fps"] * mpx
    daemon_rows["passthrough"]["of_bare_full"] = (
        daemon_rows["passthrough"]["fps"] / result["bare_fps"]["full"]
    )
    daemon_rows["passthrough"]["of_bare_io_only"] = (
        daemon_rows["passthrough"]["fps"] / result["bare_fps"]["io_only"]
    )
    result["daemon"] = daemon_rows
    if args.precision_crop >= 0:
        result["precision"] = precision_check(frames[0], truth, device, args.precision_crop)
    if args.formats:
        result["float16_by_count"] = float16_by_count(
            (min(shape[0], 512), min(shape[1], 512)), [2, 20, 200, 2000, 10000], device
        )
        result["formats"] = output_formats(
            denoised, truth, valid, float(np.mean(frames[0], where=valid)), tmp, 4
        )
    return result


def print_size(result: dict) -> None:
    """The tables of one size."""
    mpx = result["megapixels"]
    print(f"\n{result['size']} ({result['shape'][0]}x{result['shape'][1]}, {mpx:.2f} Mpx)")
    print(f"{'':34s} {'frames/s':>9s} {'Mpx/s':>8s}")
    for name, fps in result["machine_fps"].items():
        print(f"machine: {name:25s} {fps:9.1f} {fps * mpx:8.0f}")
    for name, fps in result["bare_fps"].items():
        print(f"bare loop: {name:23s} {fps:9.1f} {fps * mpx:8.0f}")
    if "bare_forward_default_fps" in result:
        fps = result["bare_forward_default_fps"]
        print(f"bare forward: default network    {fps:9.2f} {fps * mpx:8.1f}")
    for name, row in result["daemon"].items():
        print(
            f"daemon: {name:26s} {row['fps']:9.2f} {row['mpx_s']:8.1f}   peak RSS "
            f"{row['peak_rss_mb']:6.0f} MB, output {row['output_dtype']}"
        )
    row = result["daemon"]["passthrough"]
    print(
        f"passthrough / bare loop: {row['of_bare_full']:.2f} (full), "
        f"{row['of_bare_io_only']:.2f} (I/O only)"
    )
    if "default_network" in result["daemon"]:
        print(
            f"default network / bare forward: "
            f"{result['daemon']['default_network']['of_bare_forward']:.2f}"
        )
    print(
        "stage ms/frame (one thread): "
        + ", ".join(f"{k} {v:.1f}" for k, v in result["stage_ms"].items())
    )
    for row in result.get("float16_by_count", []):
        print(
            f"float16 storage at mean {row['mean_count']:7.0f} counts (max "
            f"{row['max_count']:7.0f}): PSNR {row['psnr_float16']:.2f} dB, "
            f"{-row['loss_db']:+.3f} dB against float32"
        )
    for row in result.get("precision", []):
        print(
            f"inference {row['precision']:8s} tile {row['tile']:4d} on "
            f"{row['shape'][0]}x{row['shape'][1]}: PSNR {row['psnr']:.2f} dB "
            f"({-row['loss_db']:+.3f} dB against float32), {row['seconds']:.1f} s"
        )
    if "formats" in result:
        print(
            f"\n{'dtype':8s} {'codec':6s} {'bound':>6s} {'MB/frame':>9s} {'of f32':>7s} "
            f"{'write Mpx/s':>11s} {'PSNR':>7s} {'loss dB':>8s}"
        )
        for f in result["formats"]:
            print(
                f"{f['dtype']:8s} {f['compression']:6s} {f['error_bound']:6.3f} "
                f"{f['bytes_per_frame'] / 1e6:9.2f} {f['of_float32']:7.3f} "
                f"{f['write_mpx_s']:11.0f} {f['psnr']:7.2f} {f['psnr_loss_db']:8.3f}"
            )


DETECTOR_RATES = {
    "4M": [("EIGER2 4M at 100 frames/s", 100), ("EIGER2 4M at 560 frames/s", 560)],
    "16M": [("EIGER2 16M at 133 frames/s", 133)],
}
"""What the detectors deliver (frames/s), for the docs' table."""


def markdown(report: dict) -> str:
    """The detector-scale guide's tables from a report: what detectors deliver against
    what one process sustains here, then each size's measurements."""
    rows = report["rows"]
    lines = [
        "| detector | delivers | one process here, passthrough / near-free network / "
        "default network | processes at the passthrough rate |",
        "|---|---|---|---|",
    ]
    for result in rows:
        daemon = result["daemon"]
        for name, fps in DETECTOR_RATES.get(result["size"], []):
            need = fps * result["megapixels"]
            sustained = [
                daemon[k]["mpx_s"]
                for k in ("passthrough", "near_free", "default_network")
                if k in daemon
            ]
            lines.append(
                f"| {name} | {need:.0f} Mpx/s | "
                + " / ".join(f"{v:.1f}" for v in sustained)
                + " Mpx/s | "
                f"{int(np.ceil(need / daemon['passthrough']['mpx_s']))} |"
            )
    for result in rows:
        mpx = result["megapixels"]
        lines += [
            "",
            f"{result['size']} ({result['shape'][0]} x {result['shape'][1]}):",
            "",
            "| | frames/s | Mpx/s | peak RSS |",
            "|---|---|---|---|",
        ]
        for name, fps in result["machine_fps"].items():
            threads = 1 if name.startswith("memcpy") else 2
            lines.append(
                f"| machine: {name} ({threads} thread{'s' if threads > 1 else ''}) "
                f"| {fps:.1f} | {fps * mpx:.0f} | |"
            )
        for name, fps in result["bare_fps"].items():
            lines.append(f"| bare loop: {name} | {fps:.1f} | {fps * mpx:.0f} | |")
        if "bare_forward_default_fps" in result:
            fps = result["bare_forward_default_fps"]
            lines.append(f"| bare forward pass, default network | {fps:.3f} | {fps * mpx:.2f} | |")
        for name, row in result["daemon"].items():
            lines.append(
                f"| daemon: {name} | {row['fps']:.2f} | {row['mpx_s']:.1f} | "
                f"{row['peak_rss_mb']:.0f} MB |"
            )
        passthrough = result["daemon"]["passthrough"]
        ratio = (
            f"; default network / bare forward "
            f"{result['daemon']['default_network']['of_bare_forward']:.2f}"
            if "default_network" in result["daemon"]
            else ""
        )
        lines += [
            "",
            f"Passthrough / bare loop: {passthrough['of_bare_full']:.2f} (same "
            f"work), {passthrough['of_bare_io_only']:.2f} (I/O only){ratio}. "
            "Stage times, one frame on one thread (ms): "
            + ", ".join(f"{k} {v:.1f}" for k, v in result["stage_ms"].items())
            + ".",
        ]
    formats = next((r for r in rows if "formats" in r), None)
    if formats is not None:
        lines += [
            "",
            f"Output formats at {formats['size']} (a frame denoised by the shipped "
            "network; PSNR on the simulator's truth, read back by h5py + "
            "hdf5plugin):",
            "",
            "| dtype | codec | error bound (counts) | MB/frame | of float32 | "
            "write Mpx/s (1 thread) | PSNR | change against float32 |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for f in formats["formats"]:
            lines.append(
                f"| {f['dtype']} | {f['compression']} | {f['error_bound']:.3g} | "
                f"{f['bytes_per_frame'] / 1e6:.2f} | {f['of_float32']:.3f} | "
                f"{f['write_mpx_s']:.0f} | {f['psnr']:.2f} | "
                f"{-f['psnr_loss_db']:+.3f} dB |"
            )
        lines += [
            "",
            "float16 storage as the counts grow (512 x 512, shipped network): "
            + "; ".join(
                f"mean {r['mean_count']:.0f} counts (max {r['max_count']:.0f}) "
                f"{-r['loss_db']:+.4f} dB"
                for r in formats["float16_by_count"]
            )
            + ". Inference precision ("
            + ", ".join(
                f"{r['precision']}{' tiles of ' + str(r['tile']) if r['tile'] else ''}"
                f" {-r['loss_db']:+.3f} dB"
                for r in formats["precision"]
            )
            + f", on a {formats['precision'][0]['shape'][0]} crop, CPU).",
        ]
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    """Mpx/s of the machine, the bare loops and the daemon rows, per size."""
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(results), figsize=(7 * len(results), 4.5), squeeze=False)
    for ax, result in zip(axes[0], results, strict=True):
        mpx = result["megapixels"]
        bars = {
            **{f"machine {k}": v for k, v in result["machine_fps"].items()},
            **{f"bare {k}": v for k, v in result["bare_fps"].items()},
            **{f"daemon {k}": v["fps"] for k, v in result["daemon"].items()},
        }
        ax.barh(list(bars), [v * mpx for v in bars.values()])
        ax.set_xscale("log")
        ax.set_xlabel("megapixels / s")
        ax.set_title(f"{result['size']} frames, this machine")
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", nargs="+", default=["4M", "16M"], help=f"{', '.join(SIZES)} (EIGER2) or HxW"
    )
    parser.add_argument("--frames", type=int, default=200, help="frames per daemon row")
    parser.add_argument(
        "--network-frames",
        type=int,
        default=6,
        help="frames of the default-network row (0: no such row)",
    )
    parser.add_argument("--forward-seconds", type=float, default=8.0)
    parser.add_argument(
        "--network-flags",
        default="",
        help='more daemon options for the default-network row, e.g. "--tile 1088"',
    )
    parser.add_argument("--mean-count", type=float, default=2.0, help="photons per pixel")
    parser.add_argument("--repeat", type=int, default=4, help="rounds of the machine limits")
    parser.add_argument(
        "--no-formats", dest="formats", action="store_false", help="skip the output-format table"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the GPU check)")
    parser.add_argument(
        "--precision-crop",
        type=int,
        default=1024,
        help="side of the crop the precision check scores on a CPU (-1: no precision check)",
    )
    parser.add_argument("--write-live", type=Path, help=argparse.SUPPRESS)
    parser.add_argument(
        "--markdown",
        type=Path,
        help="print the detector-scale guide's tables from this report and exit",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "detector_scale.json")
    args = parser.parse_args()
    if args.write_live:
        write_live(args.write_live, args.sizes[0], args.frames, args.mean_count)
        return
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return
    keep_freed_memory()  # as the daemon does
    with tempfile.TemporaryDirectory(prefix="n2s-scale-") as tmp:
        results = []
        for size in args.sizes:
            results.append(measure_size(size, args, Path(tmp)))
            print_size(results[-1])
    write_report(args.out, "detector_scale", args, results)
    plot(results, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
