"""Monitor an NTNDArray PV with pvapy (EPICS pvAccessCPP, independent of p4p) and save what
came: ``uniqueId``, the uncompressed float32 frames (dimension[0] is x), and the numeric
attributes. Run by the PVA tests in a process of its own."""

from __future__ import annotations

import sys
import threading
import time

import numpy as np
import pvaccess


def main(pv_name: str, wanted: str, out: str, timeout: str) -> None:
    frames, ids, attributes = [], [], []
    done = threading.Event()

    def update(value) -> None:
        union = value["value"][0]
        if "floatValue" not in union:
            print("not float32:", list(union), flush=True)
            return
        width, height = (d["size"] for d in value["dimension"])
        frames.append(np.asarray(union["floatValue"], np.float32).reshape(height, width))
        ids.append(value["uniqueId"])
        attributes.append({a["name"]: a["value"][0]["value"] for a in value["attribute"]})
        if len(frames) >= int(wanted):
            done.set()

    channel = pvaccess.Channel(pv_name)
    channel.monitor(update, "field()")
    print("monitoring", pv_name, flush=True)
    done.wait(float(timeout))
    channel.stopMonitor()
    np.savez(
        out,
        frames=np.array(frames),
        ids=np.array(ids, dtype=np.int64),
        version=np.array([a.get("N2SModelVersion", -1) for a in attributes]),
        denoiser=np.array([a.get("N2SDenoiser", -1) for a in attributes]),
    )
    print("saved", len(frames), flush=True)
    time.sleep(0.1)


if __name__ == "__main__":
    main(*sys.argv[1:])
