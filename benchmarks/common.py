"""What the benchmark scripts share: where results go, how to start n2s-stream, a port,
the bare model's speed and a process's memory."""

from __future__ import annotations

import json
import os
import platform
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from n2s_stream.models import build_model, use_fast_layout
from n2s_stream.n2s.specs import ModelConfig
from n2s_stream.runtime.onnx_engine import OnnxRuntimeModel

RESULTS = Path(__file__).parent / "results"
N2S = [sys.executable, "-m", "n2s_stream"]


def write_report(out: Path, benchmark: str, settings: object, rows: list, **more: object) -> None:
    """The benchmark's JSON: its name, the machine, its settings (an argparse namespace),
    its rows and anything else, with what produced it (`provenance`); then say where it
    went."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            with_provenance(
                {
                    "benchmark": benchmark,
                    "machine": platform.machine(),
                    "cores": os.cpu_count(),
                    "settings": vars(settings) | {"out": str(out)},
                    "model_files": model_files(vars(settings)),
                    "rows": rows,
                    **more,
                }
            ),
            indent=2,
            default=float,
        )
    )
    print(f"wrote {out}")


def model_files(settings: object) -> dict[str, dict]:
    """Each model file (``.pt``) the settings name, in an option or a variant's options,
    with its SHA-256 and the training settings it records: a record names the weights it
    measured, whatever the path holds later."""
    from n2s_stream.errors import CheckpointError
    from n2s_stream.formats.checkpoint import load_checkpoint
    from n2s_stream.pretrained.__main__ import file_sha256

    def strings(value: object) -> list[str]:
        if isinstance(value, dict):
            return [text for item in value.values() for text in strings(item)]
        if isinstance(value, list | tuple):
            return [text for item in value for text in strings(item)]
        return [str(value)] if isinstance(value, str | Path) else []

    named = {
        token
        for text in strings(settings)
        for word in text.split()
        for token in word.split("=")
        if token.endswith(".pt") and Path(token).is_file()
    }
    files = {}
    for name in sorted(named):
        entry: dict[str, object] = {"sha256": file_sha256(Path(name))}
        try:
            entry["pretrained"] = load_checkpoint(Path(name)).extra.get("pretrained")
        except CheckpointError as exc:
            entry["unreadable"] = str(exc)
        files[name] = entry
    return files


def with_provenance(report: dict) -> dict:
    """``report`` with what produced it (`provenance`, as the benchmark started)."""
    return {**report, "provenance": STARTED}


def provenance() -> dict:
    """What produced a result: the commit (and whether the tree had changes), the date,
    the command, the CPU, and the versions of the packages that decide speed; as they were
    when the benchmark started (`STARTED`)."""
    import importlib.metadata
    import subprocess

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args],
                capture_output=True,
                text=True,
                timeout=10,
                cwd=Path(__file__).parent,
            ).stdout.strip()
        except OSError:
            return ""

    versions = {}
    for package in (
        "n2s-stream",
        "torch",
        "numpy",
        "h5py",
        "hdf5plugin",
        "bitshuffle",
        "zstandard",
        "onnxruntime",
    ):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    cpu = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else platform.processor()
    )
    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(sys.argv),
        "python": platform.python_version(),
        "cpu": cpu,
        "versions": versions,
    }


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or None (saying so) where
    matplotlib is not installed: the JSON report is the result, the plot a convenience."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib not installed: no plot")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


PNG_PROVENANCE = "Provenance"
"""The PNG text chunk that holds a plot's `provenance` (JSON), as its report does."""


def save_figure(fig, path: Path) -> None:
    """Lay ``fig`` out and write it as a PNG beside the JSON report, with the same
    provenance in a text chunk (``PNG_PROVENANCE``)."""
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={PNG_PROVENANCE: json.dumps(STARTED)})


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def proc_status(pid: int) -> dict[str, int]:
    """The numeric fields of ``/proc/<pid>/status`` (memory in kiB, thread count, ...)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        first = value.split()[:1]
        if first and first[0].isdigit():
            fields[name] = int(first[0])
    return fields


def rss_mb(pid: int) -> float:
    """Resident set size of a process in MiB."""
    return proc_status(pid).get("VmRSS", float("nan")) / 1024


def bare_forward_fps(
    shape: tuple[int, int],
    threads: int,
    seconds: float = 5.0,
    batch: int = 1,
    compile: bool = False,
    min_passes: int = 1,
    engine: str = "torch",
) -> float:
    """Frames/s of the default model's forward pass alone, ``batch`` frames per pass, in
    the layout the daemon uses (channels_last on CPU; compiled as the daemon's with
    ``compile``; through ONNX Runtime as the daemon's with ``engine="onnxruntime"``), timed
    over ``seconds`` and at least ``min_passes`` passes."""
    torch.set_num_threads(threads)
    model = daemon_model()
    if compile:
        model = torch.compile(model)
    if engine == "onnxruntime":
        model = OnnxRuntimeModel(model, threads)
    x = torch.randn(batch, 1, *shape)
    with torch.inference_mode():
        warm_until = time.perf_counter() + min(1.0, seconds / 5)
        while time.perf_counter() < warm_until:  # first passes set up oneDNN's kernels
            model(x)
        return batch * calls_per_second(lambda: model(x), seconds, min_calls=min_passes)


def daemon_model() -> torch.nn.Module:
    """The default UNet, in eval mode and in the layout the daemon runs it in on CPU."""
    return use_fast_layout(build_model(ModelConfig()).eval(), torch.device("cpu"))


def calls_per_second(work: Callable[[], object], seconds: float, min_calls: int = 2) -> float:
    """Calls of ``work`` per second, timed over ``seconds`` and at least ``min_calls``."""
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or count < min_calls:
        work()
        count += 1
    return count / (time.perf_counter() - started)


def peak_rss_mb(pid: int) -> float:
    """The most resident memory a process has had so far (VmHWM), in MiB."""
    return proc_status(pid).get("VmHWM", float("nan")) / 1024


STARTED = provenance()
"""The provenance of this run, taken when the benchmark started (a later edit of the tree
does not make it dirty)."""
