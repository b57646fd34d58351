"""The Tiled sink with a real Tiled server (``SimpleTiledServer``, from ``.venv-tiled``) on
loopback: the outputs of a Bluesky run are registered under the run's uid, its refined
frames beside them, both read back with the Tiled client equal to the output file, and an
outage at the start is retried."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.helpers.bluesky_run import bluesky_ready, run_scan, start_proxy
from tests.helpers.daemon import STARTED, DaemonProcess, frames_in, free_port, read_output

ROOT = Path(__file__).parents[2]
READ_BACK = """
import json, sys, time
import numpy as np
from tiled.client import from_uri
uri, uid, out = sys.argv[1:4]
client = from_uri(uri)
deadline = time.monotonic() + 90
for key in ("bdet_denoised", "bdet_refined"):
    while uid not in client or key not in client[uid] or \\
            client[uid][key].shape != (12, 240, 320):
        assert time.monotonic() < deadline, f"{key} never registered with 12 frames"
        time.sleep(0.5)
node = client[uid]["bdet_denoised"]
np.save(out, node.read())
np.save(out.replace(".npy", "_refined.npy"), client[uid]["bdet_refined"].read())
print(json.dumps({"shape": list(node.shape), "metadata": dict(node.metadata),
                  "container": dict(client[uid].metadata),
                  "refined_metadata": dict(client[uid]["bdet_refined"].metadata)}, default=str))
"""
TILED_PYTHON = ROOT / ".venv-tiled" / "bin" / "python"


def _tiled_server(tmp: Path, readable: Path, api_key: str, port: int) -> subprocess.Popen:
    """A real Tiled server on 127.0.0.1:``port`` serving files under ``readable``."""
    proc = subprocess.Popen(
        [
            str(TILED_PYTHON),
            str(ROOT / "tests" / "helpers" / "tiled_server.py"),
            "--dir",
            str(tmp),
            "--readable",
            str(readable),
            "--api-key",
            api_key,
            "--port",
            str(port),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    STARTED.append(proc)
    assert proc.stdout is not None and proc.stdout.readline().startswith("http://127.0.0.1")
    return proc


def test_outputs_are_registered_in_tiled_and_an_outage_is_retried(tmp_path):
    bluesky_ready()
    if not (TILED_PYTHON.parents[1] / ".installed").exists():
        pytest.skip("no Tiled server: `make tiled-venv` builds .venv-tiled")
    proxy_in, proxy_out = start_proxy()
    data, port, key = tmp_path / "detector", free_port(), secrets.token_hex(8)
    uri = f"http://127.0.0.1:{port}/api/v1"
    daemon = DaemonProcess(
        tmp_path,
        "--bluesky",
        proxy_out,
        "--bluesky-root",
        str(data),
        "--refine-idle-seconds",
        "0.5",
        "--refine-tta",
        "2",
        # refining waits until the network beats the classical cold-start denoiser: on these
        # noiseless frames (0 counts per photon) a non-blind network's masked score is slow to
        "--no-cold-start",
        "--tiled",
        uri,
        "--tiled-update-seconds",
        "0.5",
        env={"TILED_API_KEY": key},
    )
    daemon.wait_ready()
    # Tiled is down: the run is denoised all the same, and the failures are counted
    run = run_scan(proxy_in, data, "--frames", "12", "--serializers", "json")
    series = f"scan{run['scan_id']}_{run['uid'][:8]}_bdet"
    output = daemon.out / f"{series}_n2s.h5"
    daemon.wait_for_ended(1, timeout=120)
    assert frames_in(daemon.output(f"{series}_n2s.h5")) == 12
    daemon.wait_for_metric("n2s_tiled_errors_total", 1, timeout=30)
    daemon.wait_for("Tiled .* cannot register", timeout=10)  # logged just after the count
    server = _tiled_server(tmp_path / "tiled", daemon.out, key, port)
    try:
        daemon.wait_for(f"registered .*{series}_n2s.h5 in Tiled", timeout=60)
        # read back by the Tiled client in a process of its own (its HTTP client leaves
        # worker threads behind), polling until the registered shape is final
        read = subprocess.run(
            [sys.executable, "-c", READ_BACK, uri, run["uid"], str(tmp_path / "read.npy")],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "TILED_API_KEY": key},
        )
        assert read.returncode == 0, read.stderr[-2000:]
        seen = json.loads(read.stdout.strip().splitlines()[-1])
    finally:
        server.stdin.close()
        server.wait(timeout=60)
    assert daemon.terminate() == 0, daemon.log()[-2000:]
    frames, _ = read_output(output)
    assert seen["shape"] == [12, 240, 320]
    assert np.array_equal(np.load(tmp_path / "read.npy"), frames)
    with h5py.File(output, "r") as handle:  # the refined frames, registered beside them
        refined = handle["/entry/refined/data"][()]
    assert np.array_equal(np.load(tmp_path / "read_refined.npy"), refined)
    assert seen["refined_metadata"]["refined"] is True
    container, metadata = seen["container"], seen["metadata"]
    assert container["parent_uid"] == run["uid"] and container["scan_id"] == run["scan_id"]
    assert metadata["data_key"] == "bdet" and metadata["output"] == str(output.resolve())
    assert metadata["program"].startswith("n2s-stream") and metadata["model_version"] >= 0


def test_a_second_output_of_a_run_gets_a_key_of_its_own():
    from types import SimpleNamespace

    from n2s_stream.sinks.tiled import _free_key, _Registration

    def node(output):
        return SimpleNamespace(metadata={"output": output})

    container = {"bdet_denoised": node("/out/a_n2s.h5"), "bdet_denoised_2": node("/out/b.h5")}
    mine = _Registration(
        "run", "bdet_denoised", "/out/x.h5", (4, 4), "<u2", {"output": "/out/a_n2s.h5"}
    )
    assert _free_key(container, mine) == "bdet_denoised"  # its own: updated
    other = _Registration(
        "run", "bdet_denoised", "/out/y.h5", (4, 4), "<u2", {"output": "/out/c_n2s.h5"}
    )
    assert _free_key(container, other) == "bdet_denoised_3"
