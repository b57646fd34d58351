"""EPICS PVAccess throughput: the PVA source alone (monitor + NTNDArray decode) and the
daemon end to end, for uncompressed and bitshuffle-LZ4 frames.

A server process (p4p, as NDPluginPva) posts a few pre-encoded Poisson frames as fast as it
can for ``--seconds``; PVA squashes the updates a client cannot take, so what a client
counts is the most it can take. "source" counts frames through `PvaSource` (p4p monitor,
decode, nothing else); "end to end" runs the daemon (a separate process, training on) and
counts frames written to its SWMR output. Both report the updates PVA dropped for them
(gaps in ``uniqueId``). Everything on loopback, found by name server. Prints a table,
writes ``benchmarks/results/pva_throughput.json``.

    python benchmarks/pva_throughput.py
    python benchmarks/pva_throughput.py --sizes 64 --seconds 2 --e2e-seconds 5   # smoke
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import free_port, write_report

from n2s_stream.config import PvaOptions
from n2s_stream.runtime.metrics import scrape
from n2s_stream.sinks.pva import loopback_client_env, loopback_server_env
from n2s_stream.stages import Frame

RESULTS = Path(__file__).parent / "results"
N2S = [sys.executable, "-m", "n2s_stream"]


def serve(
    pv: str, size: int, codec: str, seconds: float, env: dict[str, str], rate: float = 0.0
) -> None:
    """Post pre-encoded frames on ``pv`` for ``seconds``, at ``rate`` frames/s or as fast as
    possible (0); a process of its own."""
    os.environ.update(env)
    from p4p.server import Server
    from p4p.server.thread import SharedPV

    from n2s_stream.commands.simulate import poisson_frames
    from n2s_stream.formats.ntndarray import encode

    rng = np.random.default_rng(0)
    frames = [poisson_frames(rng.random((size, size), np.float32), 20.0, rng) for _ in range(4)]
    values = [encode(frame, 1, timestamp=time.time(), codec=codec) for frame in frames]
    pv_object = SharedPV(initial=values[0])
    with Server(providers=[{pv: pv_object}]):
        time.sleep(2.0)  # the client connects
        started, unique_id = time.monotonic(), 1
        while time.monotonic() < started + seconds:
            unique_id += 1
            value = values[unique_id % len(values)]
            value["uniqueId"] = unique_id
            pv_object.post(value)
            if rate:
                time.sleep(max(0.0, started + (unique_id - 1) / rate - time.monotonic()))
        time.sleep(1.0)


def _server(
    pv: str, size: int, codec: str, seconds: float, port: int, rate: float = 0.0
) -> multiprocessing.process.BaseProcess:
    env = loopback_server_env(port, free_port())
    process = multiprocessing.get_context("spawn").Process(
        target=serve, args=(pv, size, codec, seconds, env, rate)
    )
    process.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # listening before the client starts
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return process
        time.sleep(0.1)
    raise RuntimeError(f"the PVA server on port {port} did not start")


def _client_env(port: int) -> dict[str, str]:
    return loopback_client_env(port, free_port())


def source_only(size: int, codec: str, seconds: float) -> dict[str, float]:
    """Frames/s decoded by `PvaSource` from a saturated server, and the share PVA dropped."""
    from n2s_stream.sources.pva import PvaSource

    port, pv = free_port(), f"N2SBENCH:{os.getpid()}:{size}:{codec}"
    server = _server(pv, size, codec, seconds, port)
    os.environ.update(_client_env(port))
    ids: list[int] = []
    stamps: list[float] = []

    def emit(item: object) -> bool:
        if isinstance(item, Frame):
            ids.append(item.source_id or 0)
            stamps.append(time.perf_counter())
        return True

    with tempfile.TemporaryDirectory() as tmp:
        source = PvaSource(
            PvaOptions(pv=pv, queue_size=4, series_gap=60),
            out_root=Path(tmp),
            state_dir=Path(tmp),
            emit=emit,
            reject=lambda reason, message: print(reason, message),
        )
        source.start()
        server.join(timeout=seconds + 30)
        source.stop()
    if len(ids) < 2:
        return {"fps": 0.0, "dropped": 1.0}
    fps = (len(ids) - 1) / (stamps[-1] - stamps[0])
    return {"fps": fps, "dropped": 1 - len(ids) / (ids[-1] - ids[0] + 1)}


def end_to_end(
    size: int, codec: str, seconds: float, rate: float, warm_up: float
) -> dict[str, float]:
    """Frames/s written by the daemon (training on) following a server that offers
    ``rate`` frames/s (a saturated one on the same cores would starve the daemon; a real
    IOC runs elsewhere), and the share PVA dropped; measured after ``warm_up`` s, once the
    daemon's queues are full and what is dropped shows as gaps."""
    port, pv = free_port(), f"N2SBENCH:{os.getpid()}:{size}:{codec}:e2e"
    server = _server(pv, size, codec, seconds + warm_up + 20, port, rate)
    metrics_port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        daemon = subprocess.Popen(
            [
                *N2S,
                "--pva",
                pv,
                "--out",
                f"{tmp}/out",
                "--state-dir",
                f"{tmp}/state",
                "--metrics-port",
                str(metrics_port),
                "--device",
                "cpu",
                "--log-level",
                "ERROR",
                "--pva-series-gap",
                "60",
                "--no-cold-start",
            ],
            env={**os.environ, **_client_env(port)},
        )
        deadline = time.monotonic() + 300
        while not scrape(metrics_port).get("n2s_frames_denoised_total"):
            if time.monotonic() > deadline or daemon.poll() is not None:
                daemon.kill()
                raise RuntimeError("the daemon wrote nothing within 300 s")
            time.sleep(0.2)
        time.sleep(warm_up)
        first = scrape(metrics_port)
        started = time.perf_counter()
        time.sleep(seconds)
        last = scrape(metrics_port)
        elapsed = time.perf_counter() - started
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=120)
    server.terminate()
    server.join()
    written = last["n2s_frames_denoised_total"] - first["n2s_frames_denoised_total"]
    received = last["n2s_frames_received_total"] - first["n2s_frames_received_total"]
    # PVA drops what the daemon cannot take (it counts those as missing as it reaches them,
    # after the frames queued before them): here, what it did not receive of what was sent
    return {"fps": written / elapsed, "dropped": max(0.0, 1 - received / (rate * elapsed))}


def main() -> None:
    """Every size and codec: print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024])
    parser.add_argument("--codecs", nargs="+", default=["none", "bslz4"])
    parser.add_argument("--seconds", type=float, default=10.0, help="source-only window")
    parser.add_argument("--e2e-seconds", type=float, default=30.0, help="end-to-end window")
    parser.add_argument(
        "--e2e-rate", type=float, default=10.0, help="frames/s the server offers end to end"
    )
    parser.add_argument(
        "--warm-up", type=float, default=10.0, help="seconds end to end before measuring"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "pva_throughput.json")
    args = parser.parse_args()
    rows = []
    print(
        f"{'size':>6} {'codec':>6} {'source fps':>11} {'source MB/s':>12} {'dropped':>8} "
        f"{'end-to-end fps':>15} {'dropped':>8}   (end to end: {args.e2e_rate:g} frames/s "
        "offered)"
    )
    for size in args.sizes:
        for codec in args.codecs:
            source = source_only(size, codec, args.seconds)
            e2e = end_to_end(size, codec, args.e2e_seconds, args.e2e_rate, args.warm_up)
            row = {
                "size": size,
                "codec": codec,
                "source_fps": source["fps"],
                "source_mb_s": source["fps"] * size * size * 2 / 1e6,
                "source_dropped": source["dropped"],
                "end_to_end_fps": e2e["fps"],
                "end_to_end_dropped": e2e["dropped"],
            }
            rows.append(row)
            print(
                f"{size:6d} {codec:>6} {row['source_fps']:11.0f} {row['source_mb_s']:12.0f} "
                f"{source['dropped']:8.0%} {e2e['fps']:15.1f} {e2e['dropped']:8.0%}",
                flush=True,
            )
    write_report(args.out, "pva_throughput", args, rows)


if __name__ == "__main__":
    main()
