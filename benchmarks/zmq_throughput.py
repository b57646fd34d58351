"""ZeroMQ feed throughput: the source alone (receive + decode) and the daemon end to end.

For each frame size and protocol, a PUSH socket on 127.0.0.1 sends ``--frames`` Poisson
frames as fast as it can. "source" counts frames through `ZmqSource` (socket, decode,
nothing else); "end to end" runs the daemon (a separate process, training on) and counts
frames written to its SWMR output. Prints a table, writes
``benchmarks/results/zmq_throughput.json``.

    python benchmarks/zmq_throughput.py
    python benchmarks/zmq_throughput.py --sizes 64 --frames 20 --e2e-frames 10   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import zmq
from common import with_provenance

from n2s_stream.commands.simulate import poisson_frames
from n2s_stream.config import ZmqOptions
from n2s_stream.formats import protocols as p
from n2s_stream.runtime.metrics import scrape
from n2s_stream.sources.zmq import ZmqSource
from n2s_stream.stages import Frame

RESULTS = Path(__file__).parent / "results"
N2S = [sys.executable, "-m", "n2s_stream"]


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def messages(protocol: str, size: int, n: int) -> list[list[bytes]]:
    """A whole series as the detector would send it (header, images, end)."""
    rng = np.random.default_rng(0)
    frames = [
        poisson_frames(rng.random((size, size), np.float32), 20.0, rng) for _ in range(min(n, 8))
    ]
    if protocol == "native":
        body = [p.native_frame("bench", k, frames[k % len(frames)], "bslz4") for k in range(n)]
        return [*body, p.native_end("bench")]
    if protocol == "dectris-stream1":
        body = [p.stream1_image(1, k, frames[k % len(frames)]) for k in range(n)]
        return [p.stream1_header(1), *body, p.stream1_end(1)]
    body = [p.stream2_image(1, k, frames[k % len(frames)]) for k in range(n)]
    return [p.stream2_start(1, (size, size)), *body, p.stream2_end(1)]


def source_only(protocol: str, series: list[list[bytes]], n: int) -> float:
    """Frames/s through the ZeroMQ source (receive + decode) with a counting sink."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    push.bind(endpoint)
    got = threading.Event()
    count = 0
    started = [0.0]

    def emit(item: object) -> bool:
        nonlocal count
        if isinstance(item, Frame):
            if count == 0:
                started[0] = time.perf_counter()
            count += 1
            if count == n:
                got.set()
        return True

    source = ZmqSource(
        ZmqOptions(endpoint=endpoint, protocol=protocol),
        out_root=Path("."),
        emit=emit,
        reject=lambda reason, message: print(reason, message),
    )
    source.start()
    for message in series:
        push.send_multipart(message)
    got.wait(timeout=300)
    elapsed = time.perf_counter() - started[0]
    source.stop()
    push.close(linger=0)
    context.term()
    return (n - 1) / elapsed


def end_to_end(
    protocol: str, series: list[list[bytes]], n: int, workers: int = 1
) -> dict[str, float]:
    """Frames/s written by ``workers`` daemon processes PULLing one feed (ZeroMQ deals the
    frames round-robin): the first trains, the others adopt its checkpoints (fan-out as
    the README describes); the machine's cores are split between them."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    push.bind(endpoint)
    threads = max(1, (os.cpu_count() or 2) // workers)
    with tempfile.TemporaryDirectory() as tmp:
        daemons, ports = [], []
        for k in range(workers):
            port = free_port()
            follow = ["--model-from", f"{tmp}/w0/state"] if k else ["--checkpoint-every", "5"]
            if workers > 1:
                follow.append("--shared-feed")
            daemons.append(
                subprocess.Popen(
                    [
                        *N2S,
                        "--zmq",
                        endpoint,
                        "--zmq-protocol",
                        protocol,
                        "--out",
                        f"{tmp}/w{k}/out",
                        "--state-dir",
                        f"{tmp}/w{k}/state",
                        "--metrics-port",
                        str(port),
                        "--device",
                        "cpu",
                        "--threads",
                        str(threads),
                        "--log-level",
                        "WARNING",
                        *follow,
                    ]
                )
            )
            ports.append(port)
        for port in ports:
            while not scrape(port):
                time.sleep(0.2)
        started = time.perf_counter()
        for message in series:
            push.send_multipart(message)
        written = 0.0
        while written < n:
            written = sum(scrape(port).get("n2s_frames_denoised_total", 0.0) for port in ports)
            time.sleep(0.05)
        elapsed = time.perf_counter() - started
        for daemon in daemons:
            daemon.send_signal(signal.SIGTERM)
        for daemon in daemons:
            daemon.wait(timeout=120)
    push.close(linger=0)
    context.term()
    return {"fps": n / elapsed, "workers": workers, "threads_each": threads}


def main() -> None:
    """Run every size and protocol, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--frames", type=int, default=400, help="frames for source-only")
    parser.add_argument("--e2e-frames", type=int, default=100, help="frames end to end")
    parser.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=[1, 2],
        help="fan-out: daemon processes PULLing one feed (native, first size)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "zmq_throughput.json")
    args = parser.parse_args()
    rows = []
    print(
        f"{'size':>6} {'protocol':>16} {'source fps':>11} {'source MB/s':>12} "
        f"{'end-to-end fps':>15}"
    )
    for size in args.sizes:
        for protocol in p.PROTOCOLS:
            fps = source_only(protocol, messages(protocol, size, args.frames), args.frames)
            e2e = (
                end_to_end(protocol, messages(protocol, size, args.e2e_frames), args.e2e_frames)
                if protocol == "native"
                else None
            )
            row = {
                "size": size,
                "protocol": protocol,
                "source_fps": fps,
                "source_mb_s": fps * size * size * 2 / 1e6,
                "end_to_end_fps": e2e["fps"] if e2e else None,
            }
            rows.append(row)
            e2e_text = f"{row['end_to_end_fps']:15.1f}" if e2e else f"{'-':>15}"
            print(
                f"{size:6d} {protocol:>16} {fps:11.0f} {row['source_mb_s']:12.0f} {e2e_text}",
                flush=True,
            )
    size = args.sizes[0]
    scaling = [
        end_to_end("native", messages("native", size, args.e2e_frames), args.e2e_frames, workers)
        for workers in args.workers
    ]
    print(
        f"fan-out, native {size}x{size}, {os.cpu_count()} cores shared: "
        + "; ".join(
            f"{r['workers']} worker(s) x {r['threads_each']} threads {r['fps']:.1f} frames/s"
            for r in scaling
        )
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            with_provenance(
                {
                    "benchmark": "zmq_throughput",
                    "machine": platform.machine(),
                    "rows": rows,
                    "fan_out": scaling,
                    "settings": vars(args) | {"out": str(args.out)},
                }
            ),
            indent=2,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
