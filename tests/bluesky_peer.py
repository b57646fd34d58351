"""A Bluesky experiment for the tests: a RunEngine drives ophyd-async's simulated area
detector (pure Python, it writes a SWMR HDF5 file and emits StreamResource/StreamDatum),
its documents go to a bluesky 0MQ proxy through Publishers (JSON, msgpack, and pickle,
bluesky's default, which the daemon must refuse unread). Prints one JSON line per run:
``{"uid", "scan_id", "exit_status", "file", "published"}``.

    python tests/bluesky_peer.py --proxy tcp://127.0.0.1:5577 --dir DATA --frames 20 \
        --serializers json pickle [--abort-after 6] [--evil-pickle MARKER]
"""

from __future__ import annotations

import argparse
import json
import pickle
import time
from pathlib import Path

import bluesky.plan_stubs as bps
import bluesky.plans as bp
import msgpack
import zmq
from bluesky.callbacks.zmq import Publisher
from bluesky.run_engine import RunEngine
from event_model import NumpyEncoder, sanitize_doc
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


def main() -> None:
    """Run the scans; print what was published."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--proxy", required=True, help="the proxy's input address")
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--frames", type=int, default=10)
    parser.add_argument("--serializers", nargs="+", default=["json"])
    parser.add_argument("--abort-after", type=int, default=0)
    parser.add_argument("--evil-pickle", default=None)
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
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
    print(json.dumps({"uid": starts[-1]["uid"], "scan_id": starts[-1].get("scan_id"),
                      "exit_status": exit_status, "file": str(files[-1]),
                      "published": published["count"]}), flush=True)


if __name__ == "__main__":
    main()
