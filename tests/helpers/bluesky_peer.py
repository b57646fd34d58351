"""A Bluesky experiment for the tests: a RunEngine drives ophyd-async's simulated area
detector (pure Python, it writes a SWMR HDF5 file and emits StreamResource/StreamDatum),
its documents go to a bluesky 0MQ proxy through Publishers (JSON, msgpack, and pickle,
bluesky's default, which the daemon must refuse unread). Prints one JSON line per run:
``{"uid", "scan_id", "exit_status", "file", "published"}``.

    python tests/helpers/bluesky_peer.py --proxy tcp://127.0.0.1:5577 --dir DATA --frames 20 \
        --serializers json pickle [--abort-after 6] [--evil-pickle MARKER]

With ``--legacy N``, the run is an older ophyd area detector's instead, composed with
event-model as ophyd does: a ``resource`` (spec AD_HDF5, N frames per point), one
``datum`` per point and ``event`` documents naming it (the second half of the points as
``datum_page``/``event_page``), while this process writes the frames to a SWMR HDF5 file
as the areaDetector HDF5 plugin lays it out.
"""

from __future__ import annotations

import argparse
import json
import pickle
import time
import uuid
from pathlib import Path

import bluesky.plan_stubs as bps
import bluesky.plans as bp
import h5py
import msgpack
import numpy as np
import zmq
from bluesky.callbacks.zmq import Publisher
from bluesky.run_engine import RunEngine
from event_model import (
    NumpyEncoder,
    compose_run,
    pack_datum_page,
    pack_event_page,
    sanitize_doc,
)
from ophyd_async import sim
from ophyd_async.core import StaticPathProvider, UUIDFilenameProvider, init_devices

SERIALIZERS = {
    "json": lambda doc: json.dumps(doc, cls=NumpyEncoder).encode(),
    "msgpack": lambda doc: msgpack.packb(sanitize_doc(doc)),
    "pickle": pickle.dumps,
}


class Evil:
    """Unpickling this creates ``marker``: proof that nobody unpickled it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def aborted_count(detector, frames: int, after: int):
    """``count`` that fails after ``after`` frames (exit_status "fail")."""

    def failing():
        yield from bps.null()
        raise RuntimeError("the sample moved: aborting the scan")

    def plan():
        uid = yield from bps.open_run({"plan_name": "count", "num_points": frames})
        yield from bps.stage(detector)
        for _ in range(after):
            yield from bps.trigger_and_read([detector])
        yield from failing()
        return uid

    return plan()


def legacy_run(publish, directory: Path, points: int, per_point: int) -> dict:
    """An older area detector's run (see the module docstring); returns what to report."""
    height, width = 48, 64
    bundle = compose_run(metadata={"plan_name": "count", "scan_id": 41, "num_points": points})
    publish("start", bundle.start_doc)
    descriptor = bundle.compose_descriptor(
        name="primary",
        data_keys={
            "adsim_image": {
                "source": "PV:13SIM1:image1:ArrayData",
                "dtype": "array",
                "shape": [height, width],
                "external": "FILESTORE:",
            },
            "adsim_stats_total": {
                "source": "PV:13SIM1:Stats1:Total_RBV",
                "dtype": "number",
                "shape": [],
            },
        },
    )
    publish("descriptor", descriptor.descriptor_doc)
    path = directory / f"{uuid.uuid4()}.h5"
    resource = bundle.compose_resource(
        spec="AD_HDF5",
        root=str(directory),
        resource_path=path.name,
        resource_kwargs={"frame_per_point": per_point},
    )
    publish("resource", resource.resource_doc)
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[:height, :width]
    with h5py.File(path, "w", libver="latest") as file:
        frames = file.create_dataset(
            "/entry/data/data",
            shape=(0, height, width),
            maxshape=(None, height, width),
            dtype="u2",
            chunks=(1, height, width),
        )
        file.swmr_mode = True
        for point in range(points):
            clean = 20 + 15 * np.sin((xx + 2 * point) / 6.0) * np.cos(yy / 5.0)
            frames.resize(frames.shape[0] + per_point, axis=0)
            frames[-per_point:] = rng.poisson(np.clip(clean, 0, None), (per_point, height, width))
            frames.flush()
            datum = resource.compose_datum(datum_kwargs={"point_number": point})
            event = descriptor.compose_event(
                data={"adsim_image": datum["datum_id"], "adsim_stats_total": float(point)},
                timestamps={"adsim_image": time.time(), "adsim_stats_total": time.time()},
                filled={"adsim_image": False},
                seq_num=point + 1,
            )
            if point < points // 2:
                publish("datum", datum)
                publish("event", event)
            else:
                publish("datum_page", pack_datum_page(datum))
                publish("event_page", pack_event_page(event))
            time.sleep(0.05)
    stop = bundle.compose_stop(exit_status="success")
    publish("stop", stop)
    return {
        "uid": bundle.start_doc["uid"],
        "scan_id": 41,
        "exit_status": "success",
        "file": str(path),
        "published": 4 + 2 * points,
    }


def main() -> None:
    """Run the scans; print what was published."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--proxy", required=True, help="the proxy's input address")
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--frames", type=int, default=10)
    parser.add_argument("--serializers", nargs="+", default=["json"])
    parser.add_argument("--abort-after", type=int, default=0)
    parser.add_argument("--evil-pickle", default=None)
    parser.add_argument("--legacy", type=int, default=0, help="frames per point")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    if args.legacy:
        publishers = [
            Publisher(args.proxy, serializer=SERIALIZERS[name]) for name in args.serializers
        ]
        time.sleep(1.5)  # PUB to SUB: a subscription takes a moment to reach the publisher

        def publish(name: str, doc: dict) -> None:
            for publisher in publishers:
                publisher(name, doc)

        report = legacy_run(publish, args.dir, args.frames, args.legacy)
        time.sleep(0.5)
        print(json.dumps(report), flush=True)
        return
    engine = RunEngine({})
    published = {"count": 0}
    for name in args.serializers:
        engine.subscribe(Publisher(args.proxy, serializer=SERIALIZERS[name]))
    starts: list[dict] = []
    engine.subscribe(lambda name, doc: published.__setitem__("count", published["count"] + 1))
    engine.subscribe(lambda name, doc: starts.append(doc), "start")
    if args.evil_pickle:
        raw = zmq.Context.instance().socket(zmq.PUB)
        raw.connect(args.proxy)
    time.sleep(1.5)  # PUB to SUB: a subscription takes a moment to reach the publisher
    if args.evil_pickle:
        raw.send(b" start " + pickle.dumps(Evil(args.evil_pickle)))
    with init_devices():
        bdet = sim.SimBlobDetector(StaticPathProvider(UUIDFilenameProvider(), args.dir))
    published["count"] = 0
    exit_status = "success"
    try:
        if args.abort_after:
            engine(aborted_count(bdet, args.frames, args.abort_after))
        else:
            engine(bp.count([bdet], num=args.frames))
    except RuntimeError:
        exit_status = "fail"
    files = sorted(args.dir.glob("*.h5"), key=lambda p: p.stat().st_mtime)
    time.sleep(0.5)  # let the publishers' last messages leave
    print(
        json.dumps(
            {
                "uid": starts[-1]["uid"],
                "scan_id": starts[-1].get("scan_id"),
                "exit_status": exit_status,
                "file": str(files[-1]),
                "published": published["count"],
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
