"""State dir: checkpoint fallback, series headers, output naming; metrics on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from n2s_stream.errors import UsageError
from n2s_stream.formats.checkpoint import save_checkpoint
from n2s_stream.formats.writer import FrameWriter, OutputHeader, close_left_open
from n2s_stream.models import build_model
from n2s_stream.n2s.normalize import Normalizer
from n2s_stream.n2s.specs import MaskerConfig, ModelConfig
from n2s_stream.runtime.metrics import Metrics, MetricsServer, scrape
from n2s_stream.runtime.state import StateDir


def _save(state: StateDir, version: int) -> None:
    config = ModelConfig(width=4, depth=1)
    save_checkpoint(
        state.checkpoint_path(version),
        model=build_model(config),
        model_config=config,
        masker_config=MaskerConfig(),
        normalizer=Normalizer(),
        version=version,
        step=version * 10,
    )


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path):
    state = StateDir(tmp_path)
    for version in (1, 2, 3, 4):
        _save(state, version)
    state.prune_checkpoints()
    assert [p.name for p in sorted(state.checkpoints.glob("*.pt"))] == [
        "ckpt_v00000002.pt",
        "ckpt_v00000003.pt",
        "ckpt_v00000004.pt",
    ]
    state.checkpoint_path(4).write_bytes(b"half a checkpoint")
    assert state.latest_checkpoint().version == 3


def test_series_headers_survive_a_new_state_object(tmp_path):
    mask = np.zeros((4, 5), bool)
    mask[1, 2] = True
    StateDir(tmp_path).series_headers["series_000001"] = mask
    StateDir(tmp_path).series_headers["series_000002"] = None
    headers = StateDir(tmp_path).series_headers
    assert np.array_equal(headers["series_000001"], mask)
    assert headers["series_000002"] is None and "series_000003" not in headers
    assert sorted(headers) == ["series_000001", "series_000002"]
    del headers["series_000001"]  # the series ended: its file goes too
    assert sorted(StateDir(tmp_path).series_headers) == ["series_000002"]


def test_finished_series_seen_again_gets_a_new_output(tmp_path):
    state = StateDir(tmp_path / "state")
    default = tmp_path / "out" / "s_n2s.h5"
    assert state.output_for("s", default) == default
    state.record("s", output=default, written=3, finished=False)
    assert state.output_for("s", default) == default  # in progress: continue it
    state.record("s", output=default, written=5, finished=True)
    second = state.output_for("s", default)
    assert second.name == "s_r2_n2s.h5"
    assert StateDir(tmp_path / "state").output_for("s", default) == second  # persisted


def test_metrics_endpoint_is_loopback_by_default():
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.reject("nan", 2)
    server = MetricsServer(registry, port=0)
    assert not server.alive  # built, not yet bound
    server.start()
    try:
        assert server._server is not None
        assert server._server.server_address[0] == "127.0.0.1"
        assert scrape(server.port)['n2s_frames_rejected_total{reason="nan"}'] == 2
    finally:
        server.close()


def test_output_left_open_by_a_killed_writer_is_made_readable(tmp_path):
    """A run killed after writing every frame of a series leaves its output flagged "open
    for write"; the next run, with nothing new to write, clears that and keeps the frames."""
    output = tmp_path / "s_n2s.h5"
    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            f"""
import os, numpy as np
from n2s_stream.formats.writer import FrameWriter
writer = FrameWriter({str(output)!r}, frame_shape=(8, 8))
for k in range(3):
    writer.append(np.full((1, 8, 8), k, np.float32), source_frames=[k], model_version=0,
                  t_received=0.0)
os.kill(os.getpid(), 9)
""",
        ],
        timeout=60,
    )
    assert killed.returncode == -9
    with pytest.raises(OSError, match="already open for write"):
        h5py.File(output, "r")
    close_left_open(output)
    with h5py.File(output, "r") as handle:
        assert handle["/entry/provenance/source_frame"][()].tolist() == [0, 1, 2]
    close_left_open(output)  # a clean file stays as it is
    with h5py.File(output, "r") as handle:
        assert handle["/entry/provenance/source_frame"][()].tolist() == [0, 1, 2]


def test_ledger_appends_a_line_per_change_and_compacts_at_start(tmp_path):
    state = StateDir(tmp_path / "state")
    journal = tmp_path / "state" / "ledger.jsonl"
    for k in range(50):
        output = tmp_path / "out" / f"s{k}_n2s.h5"
        state.record(f"s{k}", output=output, written=0, finished=False)
        state.record(f"s{k}", output=output, written=10, finished=k < 49)
    # one appended line per change, not the whole ledger again (it was O(series) per write)
    assert len(journal.read_text().splitlines()) == 100
    reopened = StateDir(tmp_path / "state")
    assert len(journal.read_text().splitlines()) == 50  # compacted: one line per series
    assert len(reopened.ledger) == 50
    assert reopened.start_position("s0", tmp_path / "out" / "s0_n2s.h5") is None  # finished
    assert reopened.output_for("s49", tmp_path / "x_n2s.h5") == tmp_path / "out" / "s49_n2s.h5"


def test_ledger_skips_a_torn_last_line_and_a_bad_entry(tmp_path):
    root = tmp_path / "state"
    root.mkdir()
    (root / "ledger.jsonl").write_text(
        json.dumps(
            {
                "series": "new",
                "output": str(tmp_path / "new_n2s.h5"),
                "written": 1,
                "finished": False,
            }
        )
        + "\n"
        + json.dumps({"series": "odd", "output": "x", "written": "many"})
        + "\n"
        + '{"series": "torn", "outp'
    )
    state = StateDir(root)
    assert state.ledger.entry("new")["written"] == 1
    assert state.ledger.entry("torn") is None and state.ledger.entry("odd") is None


def test_ledger_write_that_failed_is_carried_by_the_next_one(tmp_path):
    errors = []
    state = StateDir(tmp_path / "state", on_write_error=lambda: errors.append(1))
    journal = tmp_path / "state" / "ledger.jsonl"
    journal.unlink()
    journal.mkdir()  # appending to a directory fails, as a read-only state dir would
    state.record("a", output=tmp_path / "a_n2s.h5", written=3, finished=True)
    assert errors == [1]
    journal.rmdir()
    state.record("b", output=tmp_path / "b_n2s.h5", written=1, finished=False)
    assert errors == [1]
    lines = [json.loads(line) for line in journal.read_text().splitlines()]
    assert {line["series"] for line in lines} == {"a", "b"}  # "a" was not lost


def test_output_keeps_detector_time_and_attributes_across_a_resume(tmp_path):
    """Per-frame detector time and attributes are provenance columns (NaN where a frame
    has none; a name the first frame lacked is not kept, since SWMR allows no new
    datasets), and a resumed output goes on with the same columns."""
    output = tmp_path / "s_n2s.h5"
    header = OutputHeader(attribute_names=["Temp", "a/b"])
    with FrameWriter(output, frame_shape=(4, 4), header=header) as writer:
        writer.append(
            np.zeros((2, 4, 4), np.float32),
            source_frames=[0, 1],
            model_version=0,
            t_received=9.0,
            t_source=[5.0, 6.0],
            attributes=[{"Temp": 1.0, "Label": "x"}, {"Temp": 2.0, "a/b": 3.0, "Late": 4.0}],
        )
    with FrameWriter(output, frame_shape=(4, 4), resume=True) as writer:
        writer.append(
            np.zeros((1, 4, 4), np.float32),
            source_frames=[2],
            model_version=1,
            t_received=9.0,
            t_source=7.0,
            attributes=[{"Temp": 4.0}],
        )
    with h5py.File(output, "r") as handle:
        provenance = handle["/entry/provenance"]
        assert provenance["source_frame"][()].tolist() == [0, 1, 2]
        assert provenance["t_source"][()].tolist() == [5.0, 6.0, 7.0]
        assert provenance["attributes/Temp"][()].tolist() == [1.0, 2.0, 4.0]
        assert np.isnan(provenance["attributes/a_b"][()]).tolist() == [True, False, True]
        assert sorted(provenance["attributes"]) == ["Temp", "a_b"]


def test_a_state_dir_is_held_by_one_daemon_at_a_time(tmp_path):
    first = StateDir(tmp_path, claim=True)
    first.record("s", output=tmp_path / "s_n2s.h5", written=3, finished=True)
    ledger = (tmp_path / "ledger.jsonl").read_text()
    with pytest.raises(UsageError, match=rf"in use by another n2s-stream \(pid {os.getpid()}\)"):
        StateDir(tmp_path, claim=True)
    assert (tmp_path / "ledger.jsonl").read_text() == ledger  # refused before touching it
    os.close(first._lock_fd)  # the process ended: the lock goes with it
    StateDir(tmp_path, claim=True)
