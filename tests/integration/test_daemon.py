"""The daemon as a real subprocess: a detector process writes SWMR files into the watched
directory, another process follows the output with ``swmr=True``, metrics are scraped over
HTTP, and the daemon is stopped with real signals."""

from __future__ import annotations

import math
import multiprocessing
import shutil
import socket
import subprocess
import time

import h5py
import numpy as np
import pytest

from n2s_stream import __version__
from n2s_stream.commands.simulate import truth_path
from n2s_stream.n2s.quality import psnr
from n2s_stream.pretrained import NONBLIND
from tests.helpers.daemon import DaemonProcess, frames_in, read_output, start_writer


def _follow_output(path: str, queue, seconds: float) -> None:
    """Reader process: open the growing output with SWMR, record the frame counts it saw."""
    deadline = time.monotonic() + seconds
    seen = []
    while time.monotonic() < deadline:
        try:
            with h5py.File(path, "r", swmr=True) as handle:
                ds = handle["/entry/data/data"]
                while time.monotonic() < deadline:
                    ds.refresh()
                    seen.append(int(ds.shape[0]))
                    if np.isnan(ds[seen[-1] - 1]).any() if seen[-1] else False:
                        seen.append(-1)
                    time.sleep(0.2)
        except (OSError, KeyError):
            time.sleep(0.2)
    queue.put(seen)


def test_live_series_is_denoised_exactly_once_and_improves(tmp_path):
    n_frames, dose = 80, 20.0
    # from random weights, without cold start: the first frames show the untrained network
    daemon = DaemonProcess(tmp_path, "--publish-every", "20", "--no-cold-start", "--no-pretrained")
    daemon.wait_ready()
    writer = start_writer(daemon.watch, frames=n_frames, rate=8, seed=1)
    output = daemon.out / "scan_0001_n2s.h5"
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    reader = ctx.Process(target=_follow_output, args=(str(output), queue, 8.0))
    daemon.wait_for_metric("n2s_frames_denoised_total", 1)
    reader.start()
    assert writer.wait(timeout=120) == 0
    daemon.wait_for_ended(1, timeout=120)
    assert frames_in(daemon.output("scan_0001_n2s.h5")) == 80
    seen = queue.get(timeout=60)
    reader.join(timeout=30)
    time.sleep(3)  # let the idle trainer publish a few more versions
    metrics = daemon.scrape()
    assert daemon.terminate() == 0, daemon.log()[-2000:]

    # the reader saw the file grow while the daemon wrote it, never a torn frame
    assert len(set(seen)) > 3 and -1 not in seen and seen == sorted(seen)
    frames, provenance = read_output(output)
    assert frames.shape == (n_frames, 48, 48) and frames.dtype == np.float16  # the default
    assert np.array_equal(provenance["source_frame"], np.arange(n_frames))
    assert (np.diff(provenance["model_version"]) >= 0).all()
    assert provenance["model_version"][-1] > provenance["model_version"][0]
    assert (provenance["t_written"] >= provenance["t_received"]).all()

    assert metrics["n2s_frames_received_total"] == n_frames
    assert metrics["n2s_frames_denoised_total"] == n_frames
    assert metrics["n2s_frame_latency_seconds_count"] == n_frames
    assert metrics["n2s_train_steps_total"] > 0
    assert metrics["n2s_model_version"] >= 1
    assert metrics["n2s_selfsup_val_loss"] > 0
    assert not any(k.startswith("n2s_frames_rejected_total") and v for k, v in metrics.items())
    build = (
        f'n2s_build_info{{following="{daemon.watch}",source="directory",version="{__version__}"}}'
    )
    assert metrics[build] == 1

    with h5py.File(truth_path(daemon.watch / "scan_0001.h5")) as handle:
        clean = handle["clean"][()] * dose
    with h5py.File(daemon.watch / "scan_0001.h5") as handle:
        noisy = handle["/entry/data/data"][()].astype(np.float32)
    first = psnr(clean[:10], frames[:10], dose)
    last = psnr(clean[-20:], frames[-20:], dose)
    noisy_last = psnr(clean[-20:], noisy[-20:], dose)
    assert last > first + 3.0, (first, last)
    assert last > noisy_last + 5.0, (noisy_last, last)
    # n2s_flux_ratio is one written frame's denoised total over its raw total
    ratios = frames.astype(np.float64).sum(axis=(1, 2)) / noisy.sum(axis=(1, 2))
    assert ratios.min() - 1e-3 <= metrics["n2s_flux_ratio"] <= ratios.max() + 1e-3
    assert 0.8 < metrics["n2s_flux_ratio"] < 1.2


def test_binomial_training_splits_photons_where_the_first_frame_shows_photon_counts(tmp_path):
    """The simulator's frames are photon counts: the first frame's noise says one count
    per photon, exported and logged, and binomial training splits them (no fallback)."""
    daemon = DaemonProcess(tmp_path, "--objective", "binomial", "--no-cold-start")
    daemon.wait_ready()
    assert math.isnan(daemon.scrape()["n2s_counts_per_photon"])  # no frame yet
    writer = start_writer(daemon.watch, frames=12, rate=20, shape="64x64", seed=2)
    assert writer.wait(timeout=60) == 0
    metrics = daemon.wait_for_metric("n2s_train_steps_total", 10)
    assert daemon.terminate() == 0, daemon.log()[-2000:]
    assert 0.85 <= metrics["n2s_counts_per_photon"] <= 1.15
    log = daemon.log()
    assert "counts per photon, from the noise of frame 1 seen: " in log
    assert "uses neighbor2neighbor instead" not in log


def test_sd_notify_messages_arrive(tmp_path):
    notify = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    sock.settimeout(30)
    try:
        daemon = DaemonProcess(
            tmp_path, env={"NOTIFY_SOCKET": str(notify), "WATCHDOG_USEC": "1000000"}
        )
        messages = []
        while not any("WATCHDOG=1" in m for m in messages):
            messages.append(sock.recv(4096).decode())
        assert messages[0].startswith("READY=1") and "STATUS=following" in messages[0]
        assert daemon.terminate() == 0
        while "STOPPING=1" not in messages[-1]:
            messages.append(sock.recv(4096).decode())
    finally:
        sock.close()


def test_usage_errors(tmp_path):
    import sys

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "n2s_stream",
            "--watch",
            str(tmp_path / "no"),
            "--state-dir",
            str(tmp_path / "s"),
            "--metrics-port",
            "-1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # a config error (DESIGN: exit 2), in one line
    assert proc.returncode == 2 and "watch directory does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "n2s_stream", "--metrics-port", "-1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "--watch" in proc.stderr
    (tmp_path / "watch").mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "n2s_stream",
            "--watch",
            str(tmp_path / "watch"),
            "--state-dir",
            str(tmp_path / "s2"),
            "--metrics-port",
            "-1",
            "--width",
            "8",
            "--pretrained-model",
            str(NONBLIND),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )  # a starting model that does not fit the network options: said, not replaced
    assert proc.returncode == 2 and f"pretrained_model {NONBLIND}: " in proc.stderr
    assert "does not fit" in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture(autouse=True)
def _cleanup_outputs(tmp_path):
    yield
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_eiger_series_followed_by_polling_with_its_pixel_mask(tmp_path):
    """Master + bitshuffle-LZ4 data file growing; polling instead of inotify; the module gap
    flagged in pixel_mask keeps its raw value in the output."""
    daemon = DaemonProcess(tmp_path, "--poll", "0.3")
    daemon.wait_ready()
    assert "polling every 0.3s" in daemon.log()
    writer = start_writer(daemon.watch, frames=30, rate=15, layout="eiger", shape="32x40")
    assert writer.wait(timeout=60) == 0
    daemon.wait_for_ended(1, timeout=60)
    assert frames_in(daemon.output("scan_0001_n2s.h5")) == 30
    assert daemon.terminate() == 0
    frames, provenance = read_output(daemon.out / "scan_0001_n2s.h5")
    assert np.array_equal(provenance["source_frame"], np.arange(30))
    # the gap row keeps its raw value, 65535: beyond float16 (the default output), +inf
    assert frames.dtype == np.float16 and np.isposinf(frames[:, 16, :]).all()
    assert frames[:, :16].max() < 1000  # the rest is denoised counts


def test_preserve_flux_keeps_each_frames_total_and_leaves_the_gaps_alone(tmp_path):
    """--preserve-flux: every written frame holds its raw total on the measured pixels;
    the module gap flagged in pixel_mask keeps its raw value exactly (float32 output)."""
    from n2s_stream.formats.stack import open_stack

    daemon = DaemonProcess(
        tmp_path, "--preserve-flux", "--output-dtype", "float32", "--no-refine", "--poll", "0.3"
    )
    daemon.wait_ready()
    writer = start_writer(daemon.watch, frames=12, rate=15, layout="eiger", shape="32x40")
    assert writer.wait(timeout=60) == 0
    daemon.wait_for_ended(1, timeout=60)
    assert frames_in(daemon.output("scan_0001_n2s.h5")) == 12
    ratio = daemon.scrape()["n2s_flux_ratio"]
    assert daemon.terminate() == 0
    frames, _ = read_output(daemon.out / "scan_0001_n2s.h5")
    with open_stack(daemon.watch / "scan_0001_master.h5") as stack:
        raw, measured = stack.read(0, 12).astype(np.float64), ~stack.pixel_mask
    assert (frames[:, ~measured] == raw[:, ~measured]).all() and (raw[:, ~measured] > 0).all()
    totals = frames[:, measured].sum(axis=1, dtype=np.float64) / raw[:, measured].sum(axis=1)
    np.testing.assert_allclose(totals, 1.0, rtol=1e-5)
    assert 0.5 < ratio < 2.0  # the network's own ratio, before the scaling


@pytest.mark.parametrize(
    "engine",
    [
        pytest.param(["--compile"], marks=pytest.mark.slow),
        ["--engine", "onnxruntime", "--onnx-reload-seconds", "1"],
    ],
    ids=["torch.compile", "onnxruntime"],
)
def test_faster_engines_write_the_same_series(tmp_path, engine):
    """--compile (torch.compile) and --engine onnxruntime: the daemon compiles or exports
    on the first frame and writes every frame once; the weights it swaps in as training
    goes on reach the compiled model or the exported graph."""
    if "onnxruntime" in engine:
        pytest.importorskip("onnxruntime", reason="optional extra [onnx] not installed")
    daemon = DaemonProcess(tmp_path, *engine, "--no-cold-start", "--publish-every", "10")
    daemon.wait_ready()
    writer = start_writer(daemon.watch, frames=40, rate=10, shape="32x32")
    assert writer.wait(timeout=120) == 0
    daemon.wait_for_ended(1, timeout=240)
    assert frames_in(daemon.output("scan_0001_n2s.h5")) == 40
    # Training yields while frames queue (they do during the compile): new weights come
    # once the detector pauses; the next series must be denoised with them.
    daemon.wait_for_metric("n2s_train_steps_total", 20, timeout=120)
    second = start_writer(daemon.watch, frames=5, rate=10, shape="32x32", name="scan_0002")
    assert second.wait(timeout=120) == 0
    daemon.wait_for_ended(2, timeout=240)
    assert frames_in(daemon.output("scan_0002_n2s.h5")) == 5
    assert daemon.terminate() == 0
    frames, provenance = read_output(daemon.out / "scan_0001_n2s.h5")
    assert np.array_equal(provenance["source_frame"], np.arange(40))
    assert np.isfinite(frames).all()
    _, provenance = read_output(daemon.out / "scan_0002_n2s.h5")
    assert provenance["model_version"][-1] > 0


def test_masking_and_context_options_from_scratch_reach_model_and_checkpoint(tmp_path):
    """A daemon started from scratch training by noise2self with 3-frame context, a 3x3
    mask grid and the mask as input denoises every frame with the network those options
    describe, and its checkpoint records them and the objective."""
    from n2s_stream.runtime.state import newest_checkpoint

    daemon = DaemonProcess(
        tmp_path,
        "--context-frames",
        "3",
        "--grid-size",
        "3",
        "--objective",
        "noise2self",  # the mask options belong to the blind spot
        "--mask-as-input",
        "--no-cold-start",
        "--publish-every",
        "5",
    )
    daemon.wait_ready()
    writer = start_writer(daemon.watch, frames=20, rate=20, shape="32x32")
    assert writer.wait(timeout=60) == 0
    daemon.wait_for_ended(1, timeout=90)
    assert frames_in(daemon.output("scan_0001_n2s.h5")) == 20
    metrics = daemon.scrape()
    assert daemon.terminate() == 0, daemon.log()[-2000:]
    assert "internal_error" not in daemon.log()
    assert metrics["n2s_frames_denoised_total"] == 20
    assert metrics["n2s_train_steps_total"] > 0
    checkpoint = newest_checkpoint(daemon.state / "checkpoints")
    assert checkpoint is not None
    assert (
        checkpoint.masker_config.context_frames,
        checkpoint.masker_config.grid_size,
        checkpoint.masker_config.mask_as_input,
    ) == (3, 3, True)
    assert checkpoint.model_config.in_channels == 4
    assert checkpoint.extra["objective"] == "noise2self"


def test_without_training_a_model_from_scratch_never_writes(tmp_path):
    """--no-train with no checkpoint: the calibrated classical denoiser writes every frame
    (an untrained network would write noise)."""
    daemon = DaemonProcess(tmp_path, "--no-train", "--no-pretrained")
    daemon.wait_ready()
    writer = start_writer(daemon.watch, frames=8, rate=20, shape="32x32")
    assert writer.wait(timeout=60) == 0
    daemon.wait_for_ended(1, timeout=90)
    assert frames_in(daemon.output("scan_0001_n2s.h5")) == 8
    assert daemon.terminate() == 0, daemon.log()[-2000:]
    with h5py.File(daemon.out / "scan_0001_n2s.h5") as handle:
        assert handle["/entry/provenance/denoiser"][()].tolist() == [1] * 8
