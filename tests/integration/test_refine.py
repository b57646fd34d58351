"""Refined output: a finished series denoised again with the newest model into
``/entry/refined/data``, the live frames untouched, resumed after kill -9; and the pieces it
stands on (test-time augmentation, clearing a killed writer's HDF5 flags)."""

from __future__ import annotations

import queue
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import zmq
from prometheus_client import CollectorRegistry

from n2s_stream.commands.simulate import truth_path
from n2s_stream.config import RefineOptions
from n2s_stream.formats import protocols
from n2s_stream.formats.spool import READY_SUFFIX
from n2s_stream.formats.stack import open_stack
from n2s_stream.formats.superblock import clear_write_flags, lookup3, write_flags
from n2s_stream.formats.writer import FrameWriter, OutputAccess, RefinedWriter
from n2s_stream.n2s.augment import augmented, orient, unorient
from n2s_stream.n2s.denoising import Network
from n2s_stream.n2s.quality import psnr
from n2s_stream.runtime.metrics import Metrics
from n2s_stream.runtime.refine import Refiner, next_to_refine
from n2s_stream.runtime.scheduler import Scheduler, Services
from n2s_stream.runtime.state import StateDir
from n2s_stream.sinks.spool import RawSpool
from n2s_stream.stages import Frame, SeriesEnd
from tests.helpers.daemon import (
    N2S,
    STARTED,
    DaemonProcess,
    frames_in,
    free_port,
    read_output,
    start_writer,
)


def _killed_writer(script: str) -> None:
    """Run ``script`` in a fresh interpreter that ends with os._exit (no HDF5 close)."""
    code = "import os, h5py, numpy as np\n" + textwrap.dedent(script) + "\nos._exit(0)\n"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_lookup3_is_hdf5s_superblock_checksum(tmp_path):
    path = tmp_path / "clean.h5"
    with h5py.File(path, "w", libver="latest") as handle:
        handle["x"] = np.arange(5)
    head = path.read_bytes()[:48]
    assert head[8] in (2, 3) and write_flags(path) == 0
    assert lookup3(head[:44]) == int.from_bytes(head[44:48], "little")
    assert lookup3(b"") == 0xDEADBEEF  # Jenkins' reference value for no bytes


def test_a_killed_swmr_writer_leaves_a_file_that_opens_again_after_clearing(tmp_path):
    path = tmp_path / "killed.h5"
    _killed_writer(f"""
        f = h5py.File({str(path)!r}, "w", libver="latest")
        d = f.create_dataset("x", shape=(0, 4), maxshape=(None, 4), chunks=(1, 4), dtype="f4")
        f.swmr_mode = True
        d.resize(3, axis=0); d[:] = 7; f.flush()
    """)
    assert write_flags(path) != 0
    with pytest.raises(OSError, match="already open for write"):
        h5py.File(path, "a", libver="latest")
    assert clear_write_flags(path) is True and write_flags(path) == 0
    assert clear_write_flags(path) is False  # nothing left to clear
    with h5py.File(path, "a", libver="latest") as handle:
        assert np.array_equal(handle["x"][()], np.full((3, 4), 7.0))


def test_a_damaged_superblock_is_refused(tmp_path):
    path = tmp_path / "bad.h5"
    _killed_writer(f"""
        f = h5py.File({str(path)!r}, "w", libver="latest"); f.swmr_mode = True
    """)
    data = bytearray(path.read_bytes())
    data[20] ^= 0xFF  # inside the superblock: its checksum no longer matches
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        clear_write_flags(path)


def test_orientations_invert_and_augmentation_keeps_an_equivariant_map():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).reshape(2, 3, 5, 5)
    for k in range(8):
        assert torch.equal(unorient(orient(x, k), k), x)
    assert len({orient(x, k).flatten().tolist().__repr__() for k in range(8)}) == 8

    def blur(t):  # a 3x3 box filter commutes with every flip and rotation
        return torch.nn.functional.avg_pool2d(t, 3, stride=1, padding=1)

    assert torch.allclose(augmented(blur, 8)(x), blur(x), atol=1e-5)

    def shift(t):  # not equivariant: the average over the flips of W cancels the shift
        return torch.roll(t, 1, dims=-1)

    two = augmented(shift, 2)(x)
    assert torch.allclose(two, (torch.roll(x, 1, -1) + torch.roll(x, -1, -1)) / 2)
    wide = torch.zeros(1, 1, 4, 6)
    assert augmented(lambda t: t + t.shape[-1], 8)(wide).unique().tolist() == [6.0]


def test_refined_writer_resumes_after_a_kill_without_rewriting_the_file(tmp_path):
    path = tmp_path / "scan_n2s.h5"
    live = np.random.default_rng(0).random((6, 8, 8), dtype=np.float32)
    with FrameWriter(path, frame_shape=(8, 8)) as writer:
        writer.append(live, source_frames=np.arange(6), model_version=3, t_received=0.0)
    inode = path.stat().st_ino
    _killed_writer(f"""
        from pathlib import Path
        from n2s_stream.formats.writer import RefinedWriter
        w = RefinedWriter(Path({str(path)!r}), description="test")
        w.append(np.full((4, 8, 8), 1.0, np.float32), 9)
    """)
    refined = RefinedWriter(path, description="test")  # flags cleared, not rewritten
    assert refined.n_done == 4 and refined.n_live == 6
    refined.append(np.full((2, 8, 8), 2.0, np.float32), np.array([10, 10]))
    refined.close()
    assert path.stat().st_ino == inode
    with h5py.File(path, "r") as handle:
        assert np.array_equal(handle["/entry/data/data"][()], live)
        assert handle["/entry/refined/model_version"][()].tolist() == [9] * 4 + [10] * 2
        assert handle["/entry/refined/data"][()][:, 0, 0].tolist() == [1.0] * 4 + [2.0] * 2


def test_refined_frames_wait_while_their_output_is_open_for_live_writing(tmp_path):
    """HDF5 shares one handle per file within a process: refined frames are appended only
    once the live writer has closed the output (a series that resumed after going idle)."""
    output, access = tmp_path / "scan_n2s.h5", OutputAccess()
    with access.opening_live(output):
        live = FrameWriter(output, frame_shape=(8, 8))
    live.append(
        np.ones((4, 8, 8), np.float32), source_frames=np.arange(4), model_version=1, t_received=0.0
    )
    spool = tmp_path / "refine" / "scan-0123456789.ready.h5"
    spool.parent.mkdir()
    with h5py.File(spool, "w") as handle:
        handle["refined"] = np.full((4, 8, 8), 2.0, np.float32)
        handle["refined_version"] = np.full(4, 5)
        handle.attrs.update({"refined_from": 0, "output": str(output)})
    metrics = Metrics(CollectorRegistry())
    refiner = Refiner(
        spool.parent,
        network=Network(None, None, torch.device("cpu")),  # type: ignore[arg-type]
        services=Services(
            None,  # type: ignore[arg-type]
            metrics,
            Scheduler(queue.Queue()),
            fail=lambda exc: None,
        ),
        calibration=None,  # type: ignore[arg-type]
        options=RefineOptions(),
        outputs=access,
    )
    refiner._stopping.set()  # its waits return at once
    assert not refiner._publish(spool, output)  # open for live writing: not touched
    live.append(np.ones((1, 8, 8), np.float32), source_frames=[4], model_version=1, t_received=0.0)
    live.close()
    access.closed_live(output)
    assert refiner._publish(spool, output)
    refined, versions = _refined(output)
    assert refined[:, 0, 0].tolist() == [2.0] * 4 and versions.tolist() == [5] * 4
    with h5py.File(output, "r") as handle:
        assert handle["/entry/data/data"].shape == (5, 8, 8)


def _refined(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with h5py.File(path, "r") as handle:
        return handle["/entry/refined/data"][()], handle["/entry/refined/model_version"][()]


def test_a_finished_series_is_refined_with_the_newest_model(tmp_path):
    n_frames, dose = 40, 20.0
    daemon = DaemonProcess(tmp_path, "--publish-every", "20", "--refine-idle-seconds", "1")
    daemon.wait_ready()
    writer = start_writer(daemon.watch, frames=n_frames, rate=10, shape="64x64", seed=3)
    output = daemon.out / "scan_0001_n2s.h5"
    assert writer.wait(timeout=120) == 0
    daemon.wait_for_ended(1, timeout=120)
    assert frames_in(output) == 40
    live_then, provenance_then = read_output(output)  # before refining could have begun
    metrics = daemon.wait_until(  # the pending gauge is set on the refiner's next round
        lambda m: m.get("n2s_series_refined_total") == 1 and m["n2s_refine_pending_series"] == 0,
        "the series refined, none pending",
        timeout=120,
    )
    assert daemon.terminate() == 0, daemon.log()[-2000:]

    live, provenance = read_output(output)
    assert np.array_equal(live, live_then)  # the live frames are never touched
    for name, column in provenance_then.items():
        assert np.array_equal(provenance[name], column, equal_nan=True), name
    refined, versions = _refined(output)
    assert refined.shape == live.shape and refined.dtype == live.dtype
    assert (versions >= provenance["model_version"].max()).all()
    assert metrics["n2s_refined_frames_total"] == n_frames
    assert metrics["n2s_refine_pending_series"] == 0
    assert not list((daemon.state / "refine").iterdir())  # the spool is gone once done

    with open_stack(daemon.watch / "scan_0001.h5") as stack:
        raw = stack.read(0, n_frames).astype(np.float64)
    # refine_preserve_flux (default): each refined frame holds its raw total, up to the
    # rounding of float16 output (unscaled, these frames miss it by up to about 0.5 %)
    totals = refined.sum(axis=(1, 2), dtype=np.float64) / raw.sum(axis=(1, 2))
    np.testing.assert_allclose(totals, 1.0, rtol=2e-4)

    with h5py.File(truth_path(daemon.watch / "scan_0001.h5")) as handle:
        clean = handle["clean"][()] * dose
    live_psnr, refined_psnr = psnr(clean, live, dose), psnr(clean, refined, dose)
    # the early live frames came from a model that had seen little: refining lifts them
    assert refined_psnr > live_psnr + 0.3, (live_psnr, refined_psnr)
    assert psnr(clean[:10], refined[:10], dose) > psnr(clean[:10], live[:10], dose) + 0.3


def test_refining_resumes_after_kill_9(tmp_path):
    n_frames = 60
    # a fixed model (no training, no cold start): the refined frames are its own, averaged
    args = ("--refine-idle-seconds", "0", "--no-train", "--no-cold-start")
    daemon = DaemonProcess(tmp_path, *args)
    daemon.wait_ready()
    writer = start_writer(daemon.watch, frames=n_frames, rate=0, shape="128x128", seed=4)
    assert writer.wait(timeout=120) == 0
    daemon.wait_for_metric("n2s_refined_frames_total", 3, timeout=120)
    daemon.kill()
    output = daemon.out / "scan_0001_n2s.h5"
    live_before, _ = read_output(output)
    with h5py.File(output, "r") as handle:
        assert "/entry/refined" not in handle  # frames are refined into the spool first

    again = DaemonProcess(tmp_path, *args, name="again")
    again.wait_ready()
    metrics = again.wait_until(
        lambda m: m.get("n2s_series_refined_total") == 1, "the series refined", timeout=180
    )
    assert again.terminate() == 0, again.log()[-2000:]

    resumed = n_frames - metrics["n2s_refined_frames_total"]  # the frames refined before
    assert 3 <= resumed < n_frames
    live, _ = read_output(output)
    assert np.array_equal(live, live_before)
    refined, versions = _refined(output)
    assert refined.shape == live.shape and (versions == versions[0]).all()
    # without training the refined frames are the live model's, averaged over orientations:
    # close to the live frames, and the resumed part continues the first part seamlessly
    assert np.abs(refined - live).mean() < 0.2 * np.abs(live).mean()
    assert not list((again.state / "refine").iterdir())


def test_a_feed_is_refined_from_its_spooled_frames(tmp_path):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    detector = subprocess.Popen(
        [
            *N2S,
            "simulate",
            "--zmq-bind",
            endpoint,
            "--frames",
            "16",
            "--shape",
            "32x40",
            "--rate",
            "40",
            "--log-level",
            "WARNING",
        ]
    )
    STARTED.append(detector)
    daemon = DaemonProcess(
        tmp_path, "--zmq", endpoint, "--refine-idle-seconds", "0.5", "--refine-tta", "4"
    )
    daemon.wait_ready()
    daemon.wait_for_metric("n2s_series_refined_total", 1, timeout=120)
    assert detector.wait(timeout=60) == 0
    assert daemon.terminate() == 0
    live, _ = read_output(daemon.out / "scan_0001_n2s.h5")
    refined, _ = _refined(daemon.out / "scan_0001_n2s.h5")
    assert refined.shape == live.shape == (16, 32, 40)
    assert np.isfinite(refined).all() and not np.array_equal(refined, live)
    with h5py.File(daemon.out / "scan_0001_n2s.h5", "r") as handle:
        assert "4 orientations" in handle["/entry/refined"].attrs["description"]


def _series(spool: RawSpool, series: str, n: int, output: Path, *, end: bool = True) -> None:
    frame = np.zeros((16, 16), np.uint16)  # 512 bytes a frame
    for index in range(n):
        spool.write(Frame(series, index, frame + index, 0.0, output), frame.astype("f4"), None)  # type: ignore[arg-type]  (the spool reads no metadata)
    if end:
        spool.end_series(SeriesEnd(series, n, output))


def test_a_series_that_went_idle_is_refined_and_its_later_frames_after_it(tmp_path):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    detector = zmq.Context.instance().socket(zmq.PUSH)
    detector.setsockopt(zmq.LINGER, 0)
    detector.bind(endpoint)
    daemon = DaemonProcess(
        tmp_path,
        "--zmq",
        endpoint,
        "--series-idle-close",
        "1",
        "--refine-idle-seconds",
        "0.5",
        "--no-cold-start",
    )
    daemon.wait_ready()
    frames = np.random.default_rng(5).poisson(20, (20, 32, 40)).astype(np.uint16)
    for index in range(12):
        detector.send_multipart(protocols.native_frame("scan_0001", index, frames[index]))
    daemon.wait_for_metric("n2s_series_refined_total", 1, timeout=120)  # idle: refined as it is
    output = daemon.out / "scan_0001_n2s.h5"
    refined_then, _ = _refined(output)
    assert len(refined_then) == 12
    for index in range(12, 20):  # the detector goes on
        detector.send_multipart(protocols.native_frame("scan_0001", index, frames[index]))
    detector.send_multipart(protocols.native_end("scan_0001", 20))
    metrics = daemon.wait_until(
        lambda m: m.get("n2s_series_refined_total") == 2, "the series refined again", timeout=120
    )
    assert daemon.terminate() == 0, daemon.log()[-2000:]
    detector.close()

    live, provenance = read_output(output)
    refined, versions = _refined(output)
    assert refined.shape == live.shape == (20, 32, 40)
    assert np.array_equal(provenance["source_frame"], np.arange(20))
    assert np.array_equal(refined[:12], refined_then)  # appended to, never rewritten
    assert np.isfinite(refined).all() and len(versions) == 20
    assert metrics["n2s_refined_frames_total"] == 20
    assert not list((daemon.state / "refine").iterdir())  # both spools gone once done


def test_spools_stay_within_their_cap_dropping_unended_ones_first(tmp_path):
    state = StateDir(tmp_path / "state")
    root = tmp_path / "state" / "refine"
    for name in ("a", "b"):  # 20 frames each: 10 KB, 25 KB a spool with its overhead
        stopped = RawSpool(root, state=state, max_bytes=80 * 1024)
        _series(stopped, name, 20, tmp_path / f"{name}_n2s.h5", end=False)
        stopped.close()  # a daemon stopped before the series ended
        time.sleep(0.01)
    spool = RawSpool(root, state=state, max_bytes=80 * 1024)
    _series(spool, "c", 20, tmp_path / "c_n2s.h5")  # ready to be refined
    _series(spool, "d", 40, tmp_path / "d_n2s.h5")  # 35 KB: a (oldest) goes, then b
    names = sorted(p.name.split("-")[0] for p in spool.root.iterdir())
    assert names == ["c", "d"] and all(p.name.endswith(READY_SUFFIX) for p in spool.root.iterdir())
    assert sum(p.stat().st_size for p in spool.root.iterdir()) <= 80 * 1024
    # spools waiting to be refined are kept: a series that does not fit is not refined
    _series(spool, "e", 60, tmp_path / "e_n2s.h5")
    assert sorted(p.name.split("-")[0] for p in spool.root.iterdir()) == ["c", "d"]
    spool.close()


def test_a_series_that_resumes_after_going_idle_gets_a_spool_for_its_new_frames(tmp_path):
    spool = RawSpool(tmp_path / "refine", state=StateDir(tmp_path / "state"), max_bytes=2**30)
    output = tmp_path / "a_n2s.h5"
    _series(spool, "a", 5, output, end=False)
    spool.end_series(SeriesEnd("a", 5, output, complete=False))  # went idle: refined now
    frame = np.zeros((16, 16), np.uint16)
    for index in range(5, 8):  # it resumes
        spool.write(Frame("a", index, frame, 0.0, output), frame, None)  # type: ignore[arg-type]
    spool.end_series(SeriesEnd("a", 8, output))
    ready = sorted(spool.root.glob("*" + READY_SUFFIX), key=lambda p: len(p.name))
    assert len(ready) == 2 and ready[1].name == ready[0].name.replace(".ready", "-2.ready")
    for path, frames in zip(ready, ([0, 1, 2, 3, 4], [5, 6, 7]), strict=True):
        with h5py.File(path, "r") as handle:
            assert handle["source_frame"][()].tolist() == frames
    # the first part goes first, even when a retry made it the newer file
    assert next_to_refine([ready[1], ready[0]]) == ready[0]
    assert next_to_refine([ready[1]]) == ready[1]


def test_a_series_ended_after_a_restart_with_nothing_new_is_still_refined(tmp_path):
    state = StateDir(tmp_path / "state")
    output = tmp_path / "a_n2s.h5"
    first = RawSpool(tmp_path / "state" / "refine", state=state, max_bytes=2**30)
    _series(first, "a", 5, output, end=False)
    first.close()  # the daemon stopped before the series' end
    again = RawSpool(tmp_path / "state" / "refine", state=state, max_bytes=2**30)
    again.end_series(SeriesEnd("a", 5, output))  # the source ends it; nothing new came
    ready = list(again.root.glob("*" + READY_SUFFIX))
    assert len(ready) == 1
    with h5py.File(ready[0], "r") as handle:
        assert handle["raw"].shape == (5, 16, 16)
