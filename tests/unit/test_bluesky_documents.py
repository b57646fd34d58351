"""The Bluesky source's handling of documents, driven in-process (no proxy): the corner
cases a RunEngine does not produce on demand. ``tests/integration/test_bluesky.py`` runs the real
programs."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from n2s_stream.config import BlueskyOptions
from n2s_stream.sources.bluesky import BlueskySource
from n2s_stream.stages import Frame, SeriesEnd

RUN = "0123456789abcdef-run"


class Recorder:
    """What the source emitted and rejected."""

    def __init__(self) -> None:
        self.items: list[Frame | SeriesEnd] = []
        self.rejected: list[tuple[str, str]] = []

    def emit(self, item: Frame | SeriesEnd) -> bool:
        self.items.append(item)
        return True

    def reject(self, reason: str, message: str) -> None:
        self.rejected.append((reason, message))

    def frames(self, series: str) -> list[int]:
        return [i.index for i in self.items if isinstance(i, Frame) and i.series == series]

    def ends(self) -> list[SeriesEnd]:
        return [i for i in self.items if isinstance(i, SeriesEnd)]


SOURCES: list[BlueskySource] = []


@pytest.fixture(autouse=True)
def _stop_sources():
    yield
    while SOURCES:  # closes their files and ZeroMQ sockets (else the context never ends)
        SOURCES.pop().stop()


def _source(
    tmp_path, recorder: Recorder, start_position=lambda series, output: 0, **options
) -> BlueskySource:
    source = BlueskySource(
        BlueskyOptions(endpoint="tcp://127.0.0.1:9", root=tmp_path / "det", **options),
        out_root=tmp_path / "out",
        state_dir=tmp_path / "state",
        emit=recorder.emit,
        reject=recorder.reject,
        start_position=start_position,
    )
    SOURCES.append(source)
    return source


def _detector_file(path, frames: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w", libver="latest") as handle:
        handle["/entry/data/data"] = np.arange(frames * 16, dtype=np.uint16).reshape(frames, 4, 4)


def _stream_resource(uid: str, path) -> dict:
    return {
        "uid": uid,
        "run_start": RUN,
        "data_key": "det",
        "mimetype": "application/x-hdf5",
        "uri": f"file://localhost{path}",
        "parameters": {"dataset": "/entry/data/data", "chunk_shape": [1, 4, 4]},
    }


def _start(source: BlueskySource) -> None:
    source._handle("start", {"uid": RUN, "scan_id": 5})
    source._handle(
        "descriptor",
        {
            "uid": "d1",
            "run_start": RUN,
            "data_keys": {
                "det": {"shape": [1, 4, 4], "external": "STREAM:"},
                "img": {"shape": [4, 4], "external": "FILESTORE:"},
                "tif": {"shape": [4, 4], "external": "FILESTORE:"},
            },
        },
    )


def test_frames_announced_but_missing_at_runstop_are_counted_and_files_get_series(tmp_path):
    recorder = Recorder()
    source = _source(tmp_path, recorder)
    _start(source)
    first, second = tmp_path / "det" / "a.h5", tmp_path / "det" / "b.h5"
    _detector_file(first, 4)
    _detector_file(second, 2)
    for _ in range(2):  # a second Publisher sends every document again: followed once
        source._handle("stream_resource", _stream_resource("r1", first))
    source._handle("stream_resource", _stream_resource("r2", second))  # a second file
    source._handle(
        "stream_datum",
        {
            "stream_resource": "r1",
            "indices": {"start": 0, "stop": 6},
            "seq_nums": {"start": 1, "stop": 7},
        },
    )
    source._handle(
        "stream_datum",
        {
            "stream_resource": "r2",
            "indices": {"start": 0, "stop": 2},
            "seq_nums": {"start": 1, "stop": 3},
        },
    )
    source._handle("stop", {"run_start": RUN, "exit_status": "success"})
    series = "scan5_01234567_det"
    assert recorder.frames(series) == [0, 1, 2, 3]  # all the file holds of the 6 announced
    assert recorder.frames(series + "_2") == [0, 1]
    ends = {end.series: end for end in recorder.ends()}
    assert ends[series].n_frames == 6 and ends[series].sender_count  # 2 counted missing
    assert ends[series + "_2"].n_frames == 2


def test_an_older_detector_continues_after_a_restart_and_a_bad_key_does_not_stop_it(tmp_path):
    recorder = Recorder()
    source = _source(tmp_path, recorder)
    _start(source)
    path = tmp_path / "det" / "old.h5"
    _detector_file(path, 6)
    source._handle(
        "resource",
        {
            "uid": "res",
            "run_start": RUN,
            "spec": "AD_HDF5",
            "root": str(tmp_path / "det"),
            "resource_path": "old.h5",
            "resource_kwargs": {"frame_per_point": 2},
        },
    )
    source._handle(
        "resource",
        {
            "uid": "tiff",
            "run_start": RUN,
            "spec": "AD_TIFF",
            "root": "/",
            "resource_path": "x",
            "resource_kwargs": {},
        },
    )
    source._handle(
        "datum", {"datum_id": "res/0", "resource": "res", "datum_kwargs": {"point_number": 0}}
    )
    source._handle(
        "datum", {"datum_id": "tiff/0", "resource": "tiff", "datum_kwargs": {"point_number": 0}}
    )
    source._handle(
        "event", {"descriptor": "d1", "seq_num": 1, "data": {"img": "res/0", "tif": "tiff/0"}}
    )
    assert recorder.frames("scan5_01234567_img") == [0, 1]
    assert [reason for reason, _ in recorder.rejected] == ["unsupported"]  # the TIFF key
    # the daemon restarts: the next event of the same descriptor finds its stream again
    again = Recorder()
    restarted = _source(tmp_path, again, start_position=lambda series, output: 2)
    restarted._handle(
        "datum", {"datum_id": "res/1", "resource": "res", "datum_kwargs": {"point_number": 1}}
    )
    restarted._handle("event", {"descriptor": "d1", "seq_num": 2, "data": {"img": "res/1"}})
    assert again.frames("scan5_01234567_img") == [2, 3]
    frames = [i for i in again.items if isinstance(i, Frame)]
    assert [f.source_id for f in frames] == [2, 2]
    assert np.array_equal(frames[0].data, np.arange(32, 48).reshape(4, 4))


def test_a_silent_run_is_ended_and_resumes_if_it_goes_on(tmp_path):
    recorder = Recorder()
    source = _source(tmp_path, recorder, idle_end_seconds=1.0)
    _start(source)
    path = tmp_path / "det" / "a.h5"
    _detector_file(path, 3)
    source._handle("stream_resource", _stream_resource("r1", path))
    source._handle("stream_datum", {"stream_resource": "r1", "indices": {"start": 0, "stop": 2}})
    source._followed["r1"].heard -= 5  # as if silent for 5 s (its RunStop lost)
    assert source._housekeeping()
    (end,) = recorder.ends()
    assert not end.complete and end.n_frames == 3  # all the file held
    assert recorder.frames("scan5_01234567_det") == [0, 1, 2]
    _detector_file(path, 5)  # the run goes on after all
    source._handle("stream_datum", {"stream_resource": "r1", "indices": {"start": 2, "stop": 5}})
    assert recorder.frames("scan5_01234567_det") == [0, 1, 2, 3, 4]
    source._handle("stop", {"run_start": RUN, "exit_status": "success"})
    assert recorder.ends()[-1].complete and recorder.ends()[-1].n_frames == 5
