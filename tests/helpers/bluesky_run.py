"""A Bluesky experiment on loopback for the tests: a real bluesky 0MQ proxy, and the peer
script (``bluesky_peer.py``: a RunEngine driving ophyd-async's simulated detector) that
publishes its documents through it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.daemon import STARTED, free_port

PEER = Path(__file__).with_name("bluesky_peer.py")


def bluesky_ready() -> None:
    pytest.importorskip("bluesky", reason="bluesky is in the [dev] extra")
    pytest.importorskip("ophyd_async", reason="ophyd-async is in the [dev] extra")
    if shutil.which("bluesky-0MQ-proxy", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("bluesky-0MQ-proxy not installed")


def start_proxy() -> tuple[str, str]:
    """A real bluesky 0MQ proxy on loopback; returns its input and output addresses."""
    proxy_in, proxy_out = (f"tcp://127.0.0.1:{free_port()}" for _ in range(2))
    command = Path(sys.executable).parent / "bluesky-0MQ-proxy"
    proc = subprocess.Popen(
        [str(command), "--in-address", proxy_in, "--out-address", proxy_out],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    STARTED.append(proc)
    return proxy_in, proxy_out


def run_scan(proxy_in: str, data: Path, *args: str) -> dict:
    """Run the peer experiment; returns what it reports."""
    done = subprocess.run(
        [sys.executable, str(PEER), "--proxy", proxy_in, "--dir", str(data), *args],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
