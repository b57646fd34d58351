"""PVAccess servers and clients in their own processes on loopback, for the PVA tests.

Discovery goes by name server (``EPICS_PVA_NAME_SERVERS``): UDP search between processes
on one host is fragile. Each process that serves gets its own server port.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from n2s_stream.sinks.pva import loopback_client_env, loopback_server_env
from tests.helpers.daemon import STARTED, free_port

HERE = Path(__file__).parent


def client_env(server_port: int) -> dict[str, str]:
    """A client that finds PVs at the server on ``server_port`` (loopback), nowhere else."""
    return loopback_client_env(server_port, free_port())


def server_env(port: int) -> dict[str, str]:
    """A server on loopback, TCP ``port``, no beacons beyond this host."""
    return loopback_server_env(port, free_port())


def pva_env() -> tuple[dict[str, str], int]:
    """Environment for a detector server and a daemon that follows it: the daemon's own
    server (``--pva-serve``) must then use another port (``server_env``)."""
    port = free_port()
    return {**client_env(port), **server_env(port)}, port


def scripted_server(pv: str, steps: list[dict], env: dict[str, str], log: Path) -> subprocess.Popen:
    """A PVA server process posting ``steps`` on NTNDArray ``pv`` (see pva_script.py)."""
    script = log.with_suffix(".json")
    script.write_text(json.dumps(steps))
    with open(log, "w") as handle:
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "pva_script.py"), pv, str(script)],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
        )
    STARTED.append(proc)
    return proc


def pvapy_reader(
    pv: str, frames: int, out: Path, env: dict[str, str], timeout: float = 120
) -> subprocess.Popen:
    """pvapy (EPICS pvAccessCPP, its own wheel) monitoring ``pv`` until it has ``frames``
    updates or ``timeout`` s pass; saves them to ``out`` (see pvapy_read.py)."""
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "pvapy_read.py"), pv, str(frames), str(out), str(timeout)],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    STARTED.append(proc)
    return proc
