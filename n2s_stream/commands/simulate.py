"""A test detector: a slowly drifting textured scene with Poisson noise.

`clean_frames` and `poisson_frames` are pure functions (numpy in, numpy out). `simulate`
writes the noisy frames the way real detectors do (areaDetector SWMR file, Eiger master +
data files with bitshuffle-LZ4, or the seed's plain ``/data``), one frame at a time at a
given rate, and keeps the clean truth in a side file ``.truth/<name>_truth.h5`` for tests,
benchmarks and the demo.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import hdf5plugin
import numpy as np

from n2s_stream.config import SimulateConfig
from n2s_stream.errors import UsageError

log = logging.getLogger(__name__)


def scene_canvas(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A textured field in [0, 1]: blobs, rings and fine stripes, like a sample under a beam."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    canvas = 0.15 + 0.1 * np.sin(xx / 23.0) * np.cos(yy / 31.0)
    for _ in range(max(8, height * width // 1500)):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        sigma = rng.uniform(1.5, 8.0)
        canvas += rng.uniform(0.2, 0.8) * np.exp(
            -((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2)
        )
    for _ in range(max(2, height * width // 20000)):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        radius, thickness = rng.uniform(6, 30), rng.uniform(1.0, 2.5)
        r = np.hypot(yy - cy, xx - cx)
        canvas += 0.4 * np.exp(-((r - radius) ** 2) / (2 * thickness**2))
    stripes = (np.sin((xx + 0.6 * yy) / 2.5) > 0.6) & (np.sin(yy / 40.0) > 0)
    canvas += 0.08 * stripes
    return (canvas / canvas.max()).astype(np.float32)


def clean_frames(
    n_frames: int, shape: tuple[int, int], *, seed: int = 0, drift: float = 0.5
) -> np.ndarray:
    """``(n_frames, H, W)`` views of one scene drifting ``drift`` pixels per frame, in [0, 1]."""
    height, width = shape
    margin = int(np.ceil(drift * n_frames)) + 1
    canvas = scene_canvas(height + margin, width + margin, seed)
    frames = np.empty((n_frames, height, width), dtype=np.float32)
    for k in range(n_frames):
        offset = round(k * drift)
        frames[k] = canvas[offset // 2 : offset // 2 + height, offset : offset + width]
    return frames


def poisson_frames(clean: np.ndarray, dose: float, rng: np.random.Generator) -> np.ndarray:
    """Photon-counting frames: Poisson counts with mean ``dose * clean`` (uint16)."""
    counts = rng.poisson(np.clip(clean, 0, None) * dose)
    return np.minimum(counts, np.iinfo(np.uint16).max - 1).astype(np.uint16)


def truth_path(data_path: Path) -> Path:
    """The side file that keeps the clean frames for ``data_path``: in a hidden folder
    beside it, so that a daemon watching the directory never takes it for data."""
    return data_path.parent / ".truth" / (data_path.stem + "_truth.h5")


def write_truth(path: Path, clean: np.ndarray, dose: float) -> None:
    """Keep the clean frames at ``path``, atomically: a reader (the demo) never opens it
    half written (HDF5 would refuse it as locked)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with h5py.File(tmp, "w") as handle:
        handle["clean"] = clean
        handle["clean"].attrs["dose"] = dose
    tmp.replace(path)


def simulate(config: SimulateConfig) -> Path:
    """Write a noisy series to ``config.dir``; returns the file a reader should open."""
    if config.dir is None:
        raise UsageError("simulate: give --dir DIR or --zmq-bind ENDPOINT")
    shape = config.frame_shape()
    rng = np.random.default_rng(config.seed + 1)
    clean = clean_frames(config.frames, shape, seed=config.seed, drift=config.drift)
    out_dir = Path(config.dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    main = out_dir / (config.name + ("_master.h5" if config.layout == "eiger" else ".h5"))
    write_truth(truth_path(main), clean, config.dose)
    data_file = out_dir / f"{config.name}_data_000001.h5" if config.layout == "eiger" else main
    dataset_path = {
        "areadetector": "/entry/data/data",
        "eiger": "/entry/data/data",
        "plain": "/data",
    }[config.layout]
    if config.layout == "eiger":
        _write_eiger_master(main, data_file.name, shape)
    compression: Mapping[str, Any] = (
        hdf5plugin.Bitshuffle(nelems=0, cname="lz4") if config.layout == "eiger" else {}
    )
    with h5py.File(data_file, "w", libver="latest") as handle:
        ds = handle.create_dataset(
            dataset_path,
            shape=(0, *shape),
            maxshape=(None, *shape),
            chunks=(1, *shape),
            dtype=np.uint16,
            **compression,
        )
        handle.swmr_mode = True
        period = 1.0 / config.rate if config.rate > 0 else 0.0
        started = time.monotonic()
        gap = eiger_gap_rows(shape) if config.layout == "eiger" else []
        for k in range(config.frames):
            ds.resize(k + 1, axis=0)
            frame = poisson_frames(clean[k], config.dose, rng)
            frame[gap] = np.iinfo(np.uint16).max  # Eiger marks module gaps with 2**n - 1
            ds[k] = frame
            ds.flush()
            if period:
                time.sleep(max(0.0, started + (k + 1) * period - time.monotonic()))
    log.info(
        "simulated %d frames %dx%d (dose %g) into %s", config.frames, *shape, config.dose, main
    )
    return main


class _ServedRecord:
    """With ``--dir``: what the PV served for series ``k``, as a growing SWMR file
    ``<name>_<k>.h5`` (``/entry/data/data``) with its clean truth beside it, so the demo and
    benchmarks can score the daemon's output. Without ``--dir``, nothing."""

    def __init__(self, config: SimulateConfig, k: int, clean: np.ndarray) -> None:
        self.path = None if config.dir is None else Path(config.dir) / f"{config.name}_{k}.h5"
        self._clean, self._dose = clean, config.dose

    def __enter__(self) -> _ServedRecord:
        if self.path is not None:
            write_truth(truth_path(self.path), self._clean, self._dose)
            self._file = h5py.File(self.path, "w", libver="latest")
            shape = self._clean.shape[1:]
            self._data = self._file.create_dataset(
                "/entry/data/data",
                shape=(0, *shape),
                maxshape=(None, *shape),
                chunks=(1, *shape),
                dtype=np.uint16,
            )
            self._file.swmr_mode = True
        return self

    def append(self, frame: np.ndarray) -> None:
        """Keep one served frame."""
        if self.path is not None:
            self._data.resize(self._data.shape[0] + 1, axis=0)
            self._data[-1] = frame
            self._data.flush()

    def __exit__(self, *exc: object) -> None:
        if self.path is not None:
            self._file.close()


def eiger_gap_rows(shape: tuple[int, int]) -> list[int]:
    """Rows the simulated Eiger loses to the gap between its two modules."""
    return [shape[0] // 2]


def _write_eiger_master(master: Path, data_name: str, shape: tuple[int, int]) -> None:
    """An Eiger-style master file: external link to the data file, and a pixel mask that
    flags the module gap (bit 0, as the Eiger does)."""
    with h5py.File(master, "w") as handle:
        handle["/entry/data/data_000001"] = h5py.ExternalLink(data_name, "/entry/data/data")
        detector = handle.create_group("/entry/instrument/detector/detectorSpecific")
        mask = np.zeros(shape, dtype=np.uint32)
        mask[eiger_gap_rows(shape)] = 1
        detector["pixel_mask"] = mask


def simulate_zmq(config: SimulateConfig) -> int:
    """Bind a PUSH socket and send ``series`` series of ``frames`` frames, each followed
    by its end message, as a detector would; returns the number of frames sent."""
    import zmq

    from n2s_stream.formats import protocols as p

    if config.zmq_bind is None:
        raise UsageError("simulate: give --dir DIR or --zmq-bind ENDPOINT")
    endpoint, shape = config.zmq_bind, config.frame_shape()
    rng = np.random.default_rng(config.seed + 1)
    context = zmq.Context()
    sock = context.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 60_000)  # deliver what is queued before exiting
    sock.bind(endpoint)
    period = 1.0 / config.rate if config.rate > 0 else 0.0
    sent = 0
    started = time.monotonic()
    try:
        for k in range(config.first_series, config.first_series + config.series):
            clean = clean_frames(config.frames, shape, seed=config.seed + k)
            mask = np.zeros(shape, np.uint32)
            mask[eiger_gap_rows(shape)] = 1
            name = f"scan_{k:04d}"
            if config.protocol == "dectris-stream1":
                sock.send_multipart(p.stream1_header(k, mask))
            elif config.protocol == "dectris-stream2":
                sock.send_multipart(p.stream2_start(k, shape, mask))
            for index in range(config.frames):
                frame = poisson_frames(clean[index], config.dose, rng)
                if config.protocol != "native":  # an Eiger: module gap marked in the data
                    frame[eiger_gap_rows(shape)] = np.iinfo(np.uint16).max
                if config.protocol == "native":
                    message = p.native_frame(name, index, frame, config.encoding)
                elif config.protocol == "dectris-stream1":
                    message = p.stream1_image(k, index, frame)
                else:
                    message = p.stream2_image(k, index, frame)
                sock.send_multipart(message)
                sent += 1
                if period:
                    time.sleep(max(0.0, started + sent * period - time.monotonic()))
            if config.protocol == "native":
                sock.send_multipart(p.native_end(name, config.frames))
            elif config.protocol == "dectris-stream1":
                sock.send_multipart(p.stream1_end(k))
            else:
                sock.send_multipart(p.stream2_end(k))
    finally:
        sock.close()
        context.term()
    log.info(
        "sent %d frames in %d series over %s (%s)", sent, config.series, endpoint, config.protocol
    )
    return sent


def simulate_pva(config: SimulateConfig, *, linger: float = 3.0) -> int:
    """Serve ``series`` acquisitions of ``frames`` frames on the NTNDArray PV
    ``pva_serve``, as NDPluginPva would: a stale value (the previous acquisition's last
    frame) first, then, after ``config.start_delay`` s for clients to connect, each acquisition
    with ``uniqueId`` from 1 (or counting on, ``keep_counter``), every ``gap_every``-th
    number skipped as if PVA had dropped it; with ``acquire_pv`` that PV is 1 during each
    acquisition and 0 for 2 s between them; with ``dir`` what was served is kept there
    (`_ServedRecord`). The PVs stay up ``linger`` s after the last frame. Ports and
    interfaces from the ``EPICS_PVAS_*`` variables. Returns the frames served."""
    from p4p.nt import NTScalar
    from p4p.server import Server
    from p4p.server.thread import SharedPV

    from n2s_stream.formats.ntndarray import encode
    from n2s_stream.sinks.pva import server_conf

    if config.pva_serve is None:
        raise UsageError("simulate: give --dir, --zmq-bind or --pva-serve")
    shape = config.frame_shape()
    rng = np.random.default_rng(config.seed + 1)
    stale = poisson_frames(clean_frames(1, shape, seed=config.seed + 99)[0], config.dose, rng)
    pv = SharedPV(initial=encode(stale, 4242, timestamp=time.time(), codec=config.codec))
    acquire = SharedPV(nt=NTScalar("i"), initial=0)
    providers = {config.pva_serve: pv}
    if config.acquire_pv:
        providers[config.acquire_pv] = acquire
    period = 1.0 / config.rate if config.rate > 0 else 0.0
    served, unique_id = 0, 0
    conf = server_conf(dict(os.environ))
    with Server(providers=[providers], conf=conf or None, useenv=True):
        log.info(
            "serving %s over PVAccess (%s)",
            config.pva_serve,
            "loopback" if conf else "interfaces from EPICS_PVAS_INTF_ADDR_LIST",
        )
        time.sleep(config.start_delay)
        for k in range(config.first_series, config.first_series + config.series):
            if k > config.first_series and config.acquire_pv:
                time.sleep(2.0)
            acquire.post(1)
            clean = clean_frames(config.frames, shape, seed=config.seed + k, drift=config.drift)
            unique_id = unique_id if config.keep_counter else 0
            started, sent = time.monotonic(), 0
            with _ServedRecord(config, k, clean) as record:
                for index in range(config.frames):
                    unique_id += 1
                    if config.gap_every and (index + 1) % config.gap_every == 0:
                        unique_id += 1  # this number is never sent: a gap
                    frame = poisson_frames(clean[index], config.dose, rng)
                    pv.post(encode(frame, unique_id, timestamp=time.time(), codec=config.codec))
                    record.append(frame)
                    served, sent = served + 1, sent + 1
                    if period:
                        time.sleep(max(0.0, started + sent * period - time.monotonic()))
            acquire.post(0)
        time.sleep(linger)
    log.info("served %d frames in %d series on %s", served, config.series, config.pva_serve)
    return served
