"""Serve an NTNDArray PV that posts a script of frames (a JSON list of steps), as an
areaDetector IOC's NDPluginPva would. Run by the PVA tests in a process of its own.

Each step: ``{"sleep": s}``, or a frame ``{"id": uniqueId, "codec": "none", "shape":
[H, W], "dtype": "uint16", "value": counts}`` (codec ``jpeg`` sends bytes labelled as JPEG).
The first frame step is the value present when clients connect (the stale frame).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
from p4p.server import Server
from p4p.server.thread import SharedPV

from n2s_stream.formats.ntndarray import encode


def value_of(step: dict):
    """The NTNDArray a frame step describes."""
    shape = tuple(step.get("shape", (16, 20)))
    rng = np.random.default_rng(step["id"])
    frame = rng.poisson(step.get("value", 30), shape).astype(step.get("dtype", "uint16"))
    codec = step.get("codec", "none")
    value = encode(
        frame, step["id"], timestamp=time.time(), codec="none" if codec == "jpeg" else codec
    )
    if codec == "jpeg":
        jpeg = np.frombuffer(b"\xff\xd8\xff\xe0" + bytes(60), dtype=np.uint8)
        value["value"] = ("ubyteValue", jpeg)
        value["codec.name"] = "jpeg"
        value["codec.parameters"] = 5
        value["compressedSize"] = len(jpeg)
        value["uncompressedSize"] = frame.nbytes
    return value


def main(pv_name: str, script_path: str) -> None:
    steps = json.loads(Path(script_path).read_text())
    frames = [step for step in steps if "id" in step]
    pv = SharedPV(initial=value_of(frames[0]))
    with Server(providers=[{pv_name: pv}]):
        print("serving", pv_name, flush=True)
        for step in steps[steps.index(frames[0]) + 1 :]:
            if "sleep" in step:
                time.sleep(step["sleep"])
            else:
                pv.post(value_of(step))
        print("done", flush=True)
        time.sleep(2)


if __name__ == "__main__":
    main(*sys.argv[1:])
