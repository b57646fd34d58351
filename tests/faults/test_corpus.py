"""The bad-input corpus: HDF5 files and ZeroMQ messages that are wrong in every way we know
of. Each must be refused with its own reason, counted under it, and leave the daemon
serving: good data sent after the corpus is denoised whole.

Every case is made here, from code, so the corpus documents itself.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import zmq

from n2s_stream.formats import protocols as p
from tests.helpers.daemon import DaemonProcess, free_port, read_output, without_root_file_access
from tests.helpers.fault_report import FaultFigure

pytestmark = pytest.mark.faults

GOOD = np.random.default_rng(0).poisson(10, (6, 32, 32)).astype(np.uint16)


# ---- HDF5 files ------------------------------------------------------------------------
def _stack(path: Path, data, dataset: str = "/entry/data/data", **kwargs) -> None:
    with h5py.File(path, "w") as handle:
        handle.create_dataset(dataset, data=data, **kwargs)


def _truncated(path: Path) -> None:
    _stack(path, GOOD)
    os.truncate(path, 1000)


def _group_not_dataset(path: Path) -> None:
    with h5py.File(path, "w") as handle:
        handle.create_group("/data/frames")


def _huge_declared_shape(path: Path) -> None:  # 20 GB declared, a few kB on disk
    with h5py.File(path, "w") as handle:
        handle.create_dataset(
            "/data", shape=(2, 100_000, 100_000), dtype="u2", chunks=(1, 256, 256)
        )


def _nan_and_inf(path: Path) -> None:
    frames = GOOD.astype(np.float32)
    frames[1, 3, 3] = np.nan
    frames[4] = np.inf
    _stack(path, frames)


def _corrupt_chunk(path: Path) -> None:
    """gzip chunks, one frame per chunk; the bytes of frame 3's chunk overwritten."""
    _stack(path, GOOD, chunks=(1, 32, 32), compression="gzip")
    with h5py.File(path, "r") as handle:
        info = handle["/entry/data/data"].id.get_chunk_info(3)
    with open(path, "r+b") as handle:
        handle.seek(info.byte_offset)
        handle.write(b"\x00garbage" * (info.size // 8))


def _eiger_master(path: Path, shapes: list[tuple[int, int]], *, dangling: bool = False) -> None:
    stem = path.stem.removesuffix("_master")
    with h5py.File(path, "w") as handle:
        for k, shape in enumerate(shapes, start=1):
            name = f"{stem}_data_{k:06d}.h5"
            if not dangling:
                _stack(path.parent / name, np.zeros((2, *shape), np.uint16))
            handle[f"/entry/data/data_{k:06d}"] = h5py.ExternalLink(name, "/entry/data/data")


def _escaping_link(path: Path) -> None:
    outside = path.parent.parent / "outside.h5"
    _stack(outside, GOOD)
    path.symlink_to(outside)


FILE_CASES: list[tuple[str, Callable[[Path], None], str, int]] = [
    # (file name, how it is made, reason, frames or files refused)
    ("not_hdf5.h5", lambda f: f.write_bytes(b"definitely not HDF5 " * 100), "not_hdf5", 1),
    ("zero_size.h5", lambda f: f.write_bytes(b""), "not_hdf5", 1),
    ("truncated.h5", _truncated, "unreadable", 1),
    ("no_dataset.h5", lambda f: _stack(f, GOOD, "/entry/other"), "no_dataset", 1),
    ("group_not_dataset.h5", _group_not_dataset, "no_dataset", 1),
    ("rank5.h5", lambda f: _stack(f, np.zeros((2, 2, 2, 4, 4), np.uint16)), "rank", 1),
    ("rank1.h5", lambda f: _stack(f, np.zeros(16, np.uint16)), "rank", 1),
    ("strings.h5", lambda f: _stack(f, np.full((3, 4, 4), b"abc")), "dtype", 1),
    ("booleans.h5", lambda f: _stack(f, np.zeros((3, 4, 4), bool)), "dtype", 1),
    ("compound.h5", lambda f: _stack(f, np.zeros((3, 4, 4), "u2,f4")), "dtype", 1),
    ("empty_frames.h5", lambda f: _stack(f, np.zeros((3, 0, 16), np.uint16)), "empty", 1),
    ("huge_shape.h5", _huge_declared_shape, "too_large", 1),
    ("nan_frames.h5", _nan_and_inf, "nan", 2),
    (
        "sentinel_only.h5",
        lambda f: _stack(f, np.full((3, 16, 16), 65535, np.uint16)),
        "no_valid_pixels",
        3,
    ),
    ("corrupt_chunk.h5", _corrupt_chunk, "read_error", 1),
    ("mixed_master.h5", lambda f: _eiger_master(f, [(32, 32), (16, 16)]), "shape", 1),
    ("dangling_master.h5", lambda f: _eiger_master(f, [(32, 32)], dangling=True), "missing", 1),
    ("escape.h5", _escaping_link, "path_escape", 1),
    (os.fsdecode(b"latin1_\xe9t\xe9.h5"), lambda f: _stack(f, GOOD), "bad_name", 1),
]


def _no_permission(path: Path) -> None:
    _stack(path, GOOD)
    path.chmod(0)


def test_bad_files_each_refused_with_its_reason(tmp_path, fault_figures):
    # As root, the daemon runs without the capabilities that let root read any file.
    prefix = without_root_file_access()
    cases = list(FILE_CASES)
    if prefix is not None or os.geteuid() != 0:
        cases.append(("no_permission.h5", _no_permission, "unreadable", 1))
    daemon = DaemonProcess(tmp_path, prefix=prefix)
    daemon.wait_ready()
    for name, make, _, _ in cases:
        make(daemon.watch / name)
    _stack(daemon.watch / "good.h5", GOOD)
    daemon.wait_for(r"closed output .*good_n2s.h5 \(6 frames\)", timeout=60)
    expected = Counter()
    for _, _, reason, count in cases:
        expected[reason] += count
    rejected = _wait_for_rejections(daemon, dict(expected), timeout=60)
    log = daemon.log()
    assert daemon.terminate() == 0
    for name, _, reason, _ in cases:
        stem = Path(name).stem
        said = [
            line
            for line in log.splitlines()
            if f"rejected ({reason}): " in line and (ascii(stem)[1:-1] in line or stem in line)
        ]
        assert said, f"{name}: no one-line refusal with reason {reason}"
    good = read_output(daemon.out / "good_n2s.h5")[1]["source_frame"]
    assert good.tolist() == list(range(6))
    # what was good in a bad file was still denoised: nan_frames minus its 2 bad frames
    assert read_output(daemon.out / "nan_frames_n2s.h5")[1]["source_frame"].tolist() == [0, 2, 3, 5]
    assert "Traceback" not in log
    fault_figures.append(
        FaultFigure(
            f"bad-input corpus: {len(cases)} HDF5 files",
            len(cases),
            _refused_as_expected(cases, rejected),
        )
    )


# ---- ZeroMQ messages (native protocol) -------------------------------------------------
FRAME = np.arange(24 * 24, dtype=np.uint16).reshape(24, 24)


def _native(payload: bytes | None = None, **header) -> list[bytes]:
    """A native frame message of series "bad", with header fields overridden."""
    fields = {
        "htype": "n2s-frame-1",
        "series": "bad",
        "frame": 0,
        "dtype": "<u2",
        "shape": [24, 24],
        "encoding": "raw",
        **header,
    }
    parts = [json.dumps(fields).encode()]
    return parts + ([] if payload is None else [payload])


def _float_frame_with_nan() -> list[bytes]:
    frame = FRAME.astype(np.float32)
    frame[5, 5] = np.nan
    return p.native_frame("floats", 0, frame)


MESSAGE_CASES: list[tuple[str, list[list[bytes]], str]] = [
    # (what is wrong, messages sent, reason of the one refusal)
    ("JSON syntax", [[b"{oops"]], "bad_json"),
    ("JSON not an object", [[b"[1, 2]"]], "bad_json"),
    ("header not UTF-8", [[b"\xff\xfe{}"]], "bad_json"),
    ("empty header part", [[b""]], "bad_json"),
    ("header without its payload", [_native()], "truncated"),
    ("three parts", [[*_native(FRAME.tobytes()), b"extra"]], "truncated"),
    ("unknown htype", [[b'{"htype": "n2s-frame-9"}']], "unknown_htype"),
    ("unknown encoding", [_native(FRAME.tobytes(), encoding="zip")], "unknown_encoding"),
    ("payload too short", [_native(FRAME.tobytes()[:100])], "size_mismatch"),
    ("payload too long", [_native(FRAME.tobytes() * 2)], "size_mismatch"),
    ("path traversal in series", [p.native_frame("../escape", 0, FRAME)], "bad_series_name"),
    ("absolute path as series", [p.native_frame("/etc/passwd", 0, FRAME)], "bad_series_name"),
    ("non-ASCII series name", [_native(FRAME.tobytes(), series="sc\u00e9ne")], "bad_series_name"),
    (
        "unpaired surrogate in series",
        [[b'{"htype": "n2s-frame-1", "series": "s\\udcff"}', b"x"]],
        "bad_series_name",
    ),
    ("series not a string", [_native(FRAME.tobytes(), series=17)], "bad_series_name"),
    ("huge declared shape", [_native(b"x", shape=[100_000, 100_000])], "too_large"),
    ("zero-size frame", [_native(b"", shape=[0, 24])], "shape"),
    ("wrong rank", [_native(FRAME.tobytes(), shape=[1, 24, 24])], "shape"),
    ("negative frame number", [_native(FRAME.tobytes(), frame=-1)], "bad_header"),
    ("frame number as text", [_native(FRAME.tobytes(), frame="7")], "bad_header"),
    (
        "bad end-of-series count",
        [[b'{"htype": "n2s-end-1", "series": "bad", "frames": -1}']],
        "bad_header",
    ),
    ("string dtype", [_native(FRAME.tobytes(), dtype="<U8")], "dtype"),
    ("unknown dtype", [_native(FRAME.tobytes(), dtype="pixels")], "dtype"),
    ("corrupt lz4", [_native(b"\xff" * 64, encoding="lz4")], "corrupt"),
    ("bslz4 shorter than its header", [_native(b"\x00" * 4, encoding="bslz4")], "truncated"),
    ("oversized message (> zmq_max_message_mb)", [_native(b"\x00" * (2 << 20))], "too_large"),
    ("NaN in a float frame", [_float_frame_with_nan()], "nan"),
    (
        "sentinel-only frame",
        [p.native_frame("dead", 0, np.full((24, 24), 65535, np.uint16))],
        "no_valid_pixels",
    ),
    (
        "frame shape changes within a series",
        [p.native_frame("mixed", 0, FRAME), p.native_frame("mixed", 1, FRAME[:16, :16])],
        "shape_change",
    ),
]


def test_bad_messages_each_refused_with_its_reason(tmp_path, fault_figures):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 5000)
    push.bind(endpoint)
    daemon = DaemonProcess(tmp_path, "--zmq", endpoint, "--zmq-max-message-mb", "1")
    refused = 0
    try:
        daemon.wait_ready()
        expected: Counter = Counter()
        for what, messages, reason in MESSAGE_CASES:
            for message in messages:
                push.send_multipart(message)
            expected[reason] += 1
            rejected = _wait_for_rejections(daemon, dict(expected), timeout=20, what=what)
            refused += rejected == dict(expected)
        for index in range(5):
            push.send_multipart(p.native_frame("good", index, FRAME + index, "bslz4"))
        push.send_multipart(p.native_end("good", 5))
        daemon.wait_for(r"closed output .*good_n2s.h5 \(5 frames\)", timeout=60)
        metrics = daemon.scrape()
        log = daemon.log()
        assert daemon.terminate() == 0
    finally:
        push.close()
        context.term()
    assert read_output(daemon.out / "good_n2s.h5")[1]["source_frame"].tolist() == [0, 1, 2, 3, 4]
    assert metrics["n2s_frames_missing_total"] == 0
    assert sorted(p.name for p in daemon.out.iterdir()) == ["good_n2s.h5", "mixed_n2s.h5"]
    assert not list(tmp_path.rglob("escape*")) and not list(tmp_path.rglob("passwd*"))
    assert "Traceback" not in log
    fault_figures.append(
        FaultFigure(
            f"bad-input corpus: {len(MESSAGE_CASES)} ZeroMQ messages", len(MESSAGE_CASES), refused
        )
    )


def _wait_for_rejections(
    daemon: DaemonProcess, expected: dict[str, float], *, timeout: float, what: str = ""
) -> dict[str, float]:
    """Scrape until ``n2s_frames_rejected_total`` by reason equals ``expected``."""
    deadline = time.monotonic() + timeout
    while True:
        rejected = {
            k.split('"')[1]: v
            for k, v in daemon.scrape().items()
            if k.startswith("n2s_frames_rejected_total")
        }
        if rejected == expected or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert rejected == expected, f"{what}: rejections {rejected}, expected {expected}"
    return rejected


def _refused_as_expected(cases, rejected: dict[str, float]) -> int:
    expected = Counter()
    for case in cases:
        expected[case[2]] += case[3]
    return len(cases) if dict(expected) == rejected else 0
