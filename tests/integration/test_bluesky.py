"""The Bluesky source with the real programs on loopback: a RunEngine drives ophyd-async's
simulated area detector (it writes a SWMR HDF5 file), its documents go through a real
bluesky 0MQ proxy to the daemon, which reads exactly the frames the StreamDatum documents
announce. Plus the document decoder on its own (pickles refused unread)."""

from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

import h5py
import msgpack
import numpy as np
import pytest

from n2s_stream.formats.codecs import MessageError
from n2s_stream.sources.bluesky.documents import decode_message, frame_stream, series_name
from tests.helpers.bluesky_run import PEER, bluesky_ready, run_scan, start_proxy
from tests.helpers.daemon import STARTED, DaemonProcess, frames_in, read_output


def test_documents_decode_from_json_and_msgpack_and_pickles_are_refused_unread(tmp_path):
    document = {"uid": "abc", "scan_id": 7, "plan_name": "count"}
    assert decode_message(b" start " + json.dumps(document).encode()) == ("start", document)
    assert decode_message(b"beamline1 start " + msgpack.packb(document)) == ("start", document)
    marker = tmp_path / "unpickled"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    with pytest.raises(MessageError) as refused:
        decode_message(b" start " + pickle.dumps(Evil()))
    assert refused.value.reason == "pickle" and not marker.exists()
    for message, reason in (
        (b"no spaces", "undecodable"),
        (b" bogus {}", "undecodable"),
        (b" start \x00\x01", "undecodable"),
        (b" start {", "undecodable"),
        (b" start [1, 2]", "undecodable"),
        (b' start {"scan_id": 1}', "bad_document"),
        (b" stream_datum {}", "bad_document"),
    ):
        with pytest.raises(MessageError) as error:
            decode_message(message)
        assert error.value.reason == reason, message


def test_stream_resources_and_series_names():
    resource = {
        "uid": "r1",
        "data_key": "det",
        "mimetype": "application/x-hdf5",
        "uri": "file://localhost/data/bl1/a%20b.h5",
        "parameters": {"dataset": "/entry/data/data", "chunk_shape": [1, 4, 4]},
    }
    stream = frame_stream(resource, "run1", 2)
    assert (stream.path, stream.dataset, stream.multiplier) == (
        "/data/bl1/a b.h5",
        "/entry/data/data",
        2,
    )
    for change in ({"mimetype": "application/x-tiff"}, {"uri": "http://host/x.h5"}):
        with pytest.raises(MessageError):
            frame_stream({**resource, **change}, "run1", 1)
    assert series_name({"scan_id": 12}, "0123456789abcdef", "det/cam") == "scan12_01234567_det_cam"
    assert series_name(None, "0123456789abcdef", "../det") == "01234567_.._det"


def _following_daemon(tmp_path: Path) -> tuple[DaemonProcess, str, str, Path]:
    """A real proxy and a daemon following its output (files under ``tmp/detector``);
    returns the daemon, the proxy's input and output, and the detector's folder."""
    bluesky_ready()
    proxy_in, proxy_out = start_proxy()
    data = tmp_path / "detector"
    daemon = DaemonProcess(
        tmp_path, "--bluesky", proxy_out, "--bluesky-root", str(data), "--no-refine"
    )
    daemon.wait_ready()
    return daemon, proxy_in, proxy_out, data


def test_a_bluesky_run_is_followed_through_the_proxy(tmp_path):
    daemon, proxy_in, _, data = _following_daemon(tmp_path)
    marker = tmp_path / "unpickled"
    # each document twice: JSON (followed) and pickle, bluesky's default (refused unread)
    run = run_scan(
        proxy_in,
        data,
        "--frames",
        "12",
        "--serializers",
        "json",
        "pickle",
        "--evil-pickle",
        str(marker),
    )
    series = f"scan{run['scan_id']}_{run['uid'][:8]}_bdet"
    daemon.wait_for_ended(1, timeout=120)
    assert frames_in(daemon.output(f"{series}_n2s.h5")) == 12
    # a second run, msgpack, that fails after 5 frames: its series ends with those
    failed = run_scan(
        proxy_in, data, "--frames", "12", "--serializers", "msgpack", "--abort-after", "5"
    )
    assert failed["exit_status"] == "fail"
    failed_series = f"scan{failed['scan_id']}_{failed['uid'][:8]}_bdet"
    daemon.wait_for_ended(2, timeout=120)
    assert frames_in(daemon.output(f"{failed_series}_n2s.h5")) == 5
    metrics = daemon.scrape()
    assert daemon.terminate() == 0, daemon.log()[-2000:]

    assert not marker.exists()  # the crafted pickle was never unpickled
    assert metrics['n2s_frames_rejected_total{reason="pickle"}'] == run["published"] + 1
    assert metrics["n2s_frames_denoised_total"] == 12 + 5
    frames, provenance = read_output(daemon.out / f"{series}_n2s.h5")
    with h5py.File(run["file"], "r") as handle:
        raw = handle["/entry/data/data"][()]
    assert frames.shape == raw.shape == (12, 240, 320)
    assert np.array_equal(provenance["source_frame"], np.arange(12))
    assert np.array_equal(provenance["source_id"], np.arange(1, 13))  # the events' seq_nums
    with h5py.File(daemon.out / f"{series}_n2s.h5", "r") as handle:
        start = json.loads(handle["/entry/process/bluesky_start"][()])
    assert start["uid"] == run["uid"] and start["plan_name"] == "count"
    short, _ = read_output(daemon.out / f"{failed_series}_n2s.h5")
    assert short.shape == (5, 240, 320)
    records = [json.loads(p.read_text()) for p in (daemon.state / "bluesky").iterdir()]
    # both runs are stopped; housekeeping (every 10 s) may already have pruned them as written
    assert len(records) <= 2 and all(r["stopped"] for r in records)


def test_paths_outside_the_allowed_root_are_refused(tmp_path):
    bluesky_ready()
    proxy_in, proxy_out = start_proxy()
    daemon = DaemonProcess(
        tmp_path,
        "--bluesky",
        proxy_out,
        "--bluesky-root",
        str(tmp_path / "elsewhere"),
        "--no-refine",
    )
    daemon.wait_ready()
    run_scan(proxy_in, tmp_path / "detector", "--frames", "3", "--serializers", "json")
    metrics = daemon.wait_until(
        lambda m: m.get('n2s_frames_rejected_total{reason="outside_root"}', 0) >= 1,
        "a frame rejected outside the root",
    )
    assert re.search(r"rejected.*outside", daemon.log())
    assert daemon.terminate() == 0
    assert metrics['n2s_frames_rejected_total{reason="outside_root"}'] >= 1
    assert metrics.get("n2s_frames_denoised_total", 0) == 0


def test_a_restart_mid_run_continues_its_series(tmp_path):
    """kill -9 while a run goes on: the restarted daemon knows the run's resource from the
    state dir, catches up from the frames its output holds at the next StreamDatum, and
    ends the series at RunStop: every frame written exactly once."""
    bluesky_ready()
    proxy_in, proxy_out = start_proxy()
    data = tmp_path / "detector"
    args = ("--bluesky", proxy_out, "--bluesky-root", str(data), "--no-refine")
    daemon = DaemonProcess(tmp_path, *args)
    daemon.wait_ready()
    peer = subprocess.Popen(
        [
            sys.executable,
            str(PEER),
            "--proxy",
            proxy_in,
            "--dir",
            str(data),
            "--frames",
            "90",
            "--serializers",
            "json",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    STARTED.append(peer)
    # early in the scan: the restart (a few seconds) must find most of it still to come
    while daemon.scrape().get("n2s_frames_denoised_total", 0) < 2:
        assert peer.poll() is None, "the scan ended before the kill"
        time.sleep(0.05)
    daemon.kill()
    again = DaemonProcess(tmp_path, *args, name="again")
    again.wait_ready()
    again.wait_for(r"run \S+ still open: series \S+ continues at frame [1-9]")
    run = json.loads(peer.communicate(timeout=180)[0].strip().splitlines()[-1])
    series = f"scan{run['scan_id']}_{run['uid'][:8]}_bdet"
    again.wait_for_ended(1, timeout=120)
    assert frames_in(again.output(f"{series}_n2s.h5")) == 90
    assert again.terminate() == 0, again.log()[-2000:]
    frames, provenance = read_output(again.out / f"{series}_n2s.h5")
    assert frames.shape == (90, 240, 320)
    assert np.array_equal(provenance["source_frame"], np.arange(90))


def test_an_older_area_detectors_resource_and_datums_are_followed(tmp_path):
    """ophyd's AD_HDF5 documents (resource, datum/datum_page, event/event_page naming the
    datums, 2 frames per point) through the real proxy: every frame of every point is
    read from the SWMR file once, tagged with its event's seq_num, and the scalar beside
    the detector is ignored."""
    daemon, proxy_in, proxy_out, data = _following_daemon(tmp_path)
    run = run_scan(proxy_in, data, "--legacy", "2", "--frames", "10", "--serializers", "msgpack")
    series = f"scan41_{run['uid'][:8]}_adsim_image"
    daemon.wait_for_ended(1, timeout=120)
    assert frames_in(daemon.output(f"{series}_n2s.h5")) == 20
    metrics = daemon.scrape()
    assert daemon.terminate() == 0, daemon.log()[-2000:]
    assert metrics["n2s_frames_denoised_total"] == 20
    assert metrics.get("n2s_frames_missing_total", 0) == 0
    frames, provenance = read_output(daemon.out / f"{series}_n2s.h5")
    assert frames.shape == (20, 48, 64)
    assert np.array_equal(provenance["source_frame"], np.arange(20))
    assert np.array_equal(provenance["source_id"], np.repeat(np.arange(1, 11), 2))
    # the run's record is kept until its series is written; the next start forgets it
    assert len(list((daemon.state / "bluesky").iterdir())) == 1
    again = DaemonProcess(
        tmp_path, "--bluesky", proxy_out, "--bluesky-root", str(data), "--no-refine", name="again"
    )
    again.wait_ready()
    assert again.terminate() == 0
    assert not list((daemon.state / "bluesky").iterdir())
