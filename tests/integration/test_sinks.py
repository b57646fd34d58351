"""Sinks: a new one written here alone works through config, and each sink's failure
policy holds (a viewer's failure is counted and the files are still written)."""

from __future__ import annotations

import json
import os
import queue
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from n2s_stream.models import build_model
from n2s_stream.n2s.specs import ModelConfig
from n2s_stream.runtime.metrics import Metrics
from n2s_stream.runtime.snapshot import ModelStore, copy_state
from n2s_stream.sinks import SinkContext
from n2s_stream.stages import Frame, FrameMeta, SeriesEnd, SeriesStart
from tests.helpers.daemon import FLOAT32, DaemonProcess, frames_in, start_writer
from tests.helpers.pipeline import make_loop

TESTS = Path(__file__).parent
# What a daemon subprocess needs on PYTHONPATH to load a sink from this file by its name
# (``test_sinks:RecordingSink``): this folder, and the project root for its ``tests.helpers``
# imports.
SINK_PATH = os.pathsep.join([str(TESTS), str(TESTS.parents[1])])


class RecordingSink:
    """Writes one JSON line per event to ``<out>/recorded.jsonl``: what a new output (a
    viewer, a catalogue) would see. Declared here, nowhere in the package."""

    name = "recorder"
    required = False

    def __init__(self, context: SinkContext) -> None:
        context.config.output.out.mkdir(parents=True, exist_ok=True)
        self._file = open(context.config.output.out / "recorded.jsonl", "a")  # noqa: SIM115

    def _note(self, **event: object) -> None:
        self._file.write(json.dumps(event) + "\n")
        self._file.flush()

    def open_series(self, start: SeriesStart) -> None:
        self._note(event="open", series=start.series, shape=list(start.frame_shape))

    def write(self, frame: Frame, denoised: np.ndarray, meta: FrameMeta) -> None:
        self._note(
            event="frame",
            series=frame.series,
            index=frame.index,
            version=meta.version,
            total=float(denoised.astype(np.float64).sum()),
        )

    def end_series(self, end: SeriesEnd) -> None:
        self._note(event="end", series=end.series, complete=end.complete)

    def close(self) -> None:
        self._note(event="close")
        self._file.close()


class BrokenViewer:
    """A sink that fails on every frame, as a viewer with a bug would."""

    name = "broken_viewer"
    required = False

    def open_series(self, start: SeriesStart) -> None:
        pass

    def write(self, frame: Frame, denoised: np.ndarray, meta: FrameMeta) -> None:
        raise RuntimeError("viewer crashed")

    def end_series(self, end: SeriesEnd) -> None:
        pass

    def close(self) -> None:
        pass


def test_a_sink_declared_in_a_test_file_is_used_by_the_daemon_through_config(tmp_path):
    config = tmp_path / "n2s.toml"
    config.write_text('[daemon]\nsinks = ["test_sinks:RecordingSink"]\n')
    daemon = DaemonProcess(
        tmp_path,
        *FLOAT32,
        "--config",
        str(config),
        "--no-cold-start",
        env={"PYTHONPATH": SINK_PATH},
    )
    daemon.wait_ready()
    assert "sink recorder from test_sinks:RecordingSink" in daemon.log()
    writer = start_writer(daemon.watch, frames=12, rate=20, shape="32x32")
    assert writer.wait(timeout=60) == 0
    daemon.wait_for_ended(1, timeout=60)
    assert frames_in(daemon.output("scan_0001_n2s.h5")) == 12
    assert daemon.terminate() == 0, daemon.log()[-2000:]
    events = [json.loads(line) for line in (daemon.out / "recorded.jsonl").read_text().splitlines()]
    assert events[0] == {"event": "open", "series": "scan_0001", "shape": [32, 32]}
    frames = [e for e in events if e["event"] == "frame"]
    assert [e["index"] for e in frames] == list(range(12))
    with h5py.File(daemon.out / "scan_0001_n2s.h5") as handle:
        data = handle["/entry/data/data"][()]
        versions = handle["/entry/provenance/model_version"][()]
    # the recorder saw exactly what the HDF5 sink wrote, frame for frame
    np.testing.assert_allclose(
        [e["total"] for e in frames], data.astype(np.float64).sum(axis=(1, 2)), rtol=1e-6
    )
    assert [e["version"] for e in frames] == versions.tolist()
    assert {"event": "end", "series": "scan_0001", "complete": True} in events
    assert events[-1] == {"event": "close"}


def test_a_failing_viewer_is_counted_and_the_files_are_still_written(tmp_path):
    frames: queue.Queue = queue.Queue()
    metrics = Metrics(CollectorRegistry())
    model = build_model(ModelConfig(width=4, depth=1))
    out = tmp_path / "s_n2s.h5"
    for index in range(5):
        frames.put(Frame("s", index, np.full((16, 16), 7 + index, np.uint16), time.time(), out))
    frames.put(SeriesEnd("s", 5, out))
    loop = make_loop(
        tmp_path / "state",
        frames,
        model=model,
        metrics=metrics,
        store=ModelStore(copy_state(model), 0),
        extra_sinks=(BrokenViewer(),),
    )
    loop.start()
    loop.stop()
    with h5py.File(out) as handle:
        assert handle["/entry/provenance/source_frame"][()].tolist() == [0, 1, 2, 3, 4]
    value = metrics.registry.get_sample_value
    assert value("n2s_frames_denoised_total") == 5
    assert value("n2s_sink_errors_total", {"sink": "broken_viewer"}) == 5


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_colon", "is not 'module:factory'"),
        ("test_sinks:Nothing", "cannot load"),
        ("test_sinks:TESTS", "is not callable"),
    ],
)
def test_a_bad_sink_spec_is_a_one_line_usage_error(tmp_path, spec, message):
    import subprocess
    import sys

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "n2s_stream",
            "--watch",
            str(tmp_path),
            "--state-dir",
            str(tmp_path / "s"),
            "--out",
            str(tmp_path / "o"),
            "--metrics-port",
            "-1",
            "--sinks",
            spec,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": SINK_PATH},
    )
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_served_pva_binds_loopback_unless_the_environment_says_otherwise():
    from n2s_stream.sinks.pva import LOOPBACK, server_conf

    assert server_conf({}) == LOOPBACK
    assert server_conf({"EPICS_PVAS_INTF_ADDR_LIST": "10.0.0.5"}) == {}  # the facility's
    assert server_conf({"EPICS_PVAS_BEACON_ADDR_LIST": "10.0.0.255"}) == {
        "EPICS_PVAS_INTF_ADDR_LIST": "127.0.0.1",
        "EPICS_PVAS_AUTO_BEACON_ADDR_LIST": "NO",
    }
