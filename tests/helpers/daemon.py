"""Run the daemon, a detector writer and readers as real processes, for the daemon tests."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np

from n2s_stream.runtime.metrics import scrape

N2S = [sys.executable, "-m", "n2s_stream"]
FLOAT32 = ("--output-dtype", "float32", "--output-compression", "none")
"""Plain float32 output, for tests that compare what was written with float32 values or
that fill a small disk (the default float16 + bitshuffle-LZ4 is ~3x smaller)."""
STARTED: list[subprocess.Popen] = []
"""Every process started here; conftest kills what a failed test left running."""


def reap() -> None:
    """Kill whatever a test left running (a failed assertion skips its clean stop)."""
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


class DaemonProcess:
    """``n2s-stream --watch`` as a subprocess, its log in a file, its metrics scraped."""

    def __init__(
        self,
        tmp: Path,
        *extra: str,
        env: dict | None = None,
        name: str = "daemon",
        prefix: list[str] | None = None,
    ):
        tmp.mkdir(parents=True, exist_ok=True)
        self.log_path = tmp / f"{name}.log"
        self.watch, self.out, self.state = tmp / "acq", tmp / "out", tmp / "state"
        self.watch.mkdir(exist_ok=True)
        source = (
            [] if {"--zmq", "--pva", "--bluesky"} & set(extra) else ["--watch", str(self.watch)]
        )
        args = [
            *(prefix or []),
            *N2S,
            *source,
            "--out",
            str(self.out),
            "--state-dir",
            str(self.state),
            "--device",
            "cpu",
            "--metrics-port",
            "0",
            "--settle-seconds",
            "2",
            "--threads",
            "1",
            *extra,
        ]
        self._log = open(self.log_path, "a")  # noqa: SIM115 (closed in wait())
        self.proc = subprocess.Popen(
            args, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
        STARTED.append(self.proc)
        self.port: int | None = None

    def log(self) -> str:
        """Everything the daemon logged so far."""
        return self.log_path.read_text()

    def wait_for(self, pattern: str, timeout: float = 60.0) -> re.Match:
        """Wait until the log matches ``pattern``; fail with the log if it does not."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.log())
            if found:
                return found
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"{pattern!r} not in daemon log:\n{self.log()[-3000:]}")

    def wait_for_ended(self, series: int = 1, timeout: float = 60.0) -> None:
        """Wait until ``series`` series have ended in this process (complete, or closed
        for idleness: their frames written and their outputs closed), by the metric
        ``n2s_series_ended_total``, not by the log's wording."""
        self.wait_for_metric("n2s_series_ended_total", series, timeout)

    def wait_for_metric(
        self, name: str, at_least: float = 1.0, timeout: float = 60.0
    ) -> dict[str, float]:
        """Wait until the metric ``name`` (summed over its labels) reaches ``at_least``;
        return that scrape."""
        return self.wait_until(
            lambda metrics: total(metrics, name) >= at_least, f"{name} >= {at_least:g}", timeout
        )

    def wait_until(
        self, condition: Callable[[dict[str, float]], bool], what: str, timeout: float = 60.0
    ) -> dict[str, float]:
        """Wait until ``condition`` holds on a scrape of the metrics; return that scrape.
        Fails with the scrape and the log's end if it never does, or the daemon exits."""
        assert self.port is not None, "wait_ready() first: the metrics port comes from it"
        deadline = time.monotonic() + timeout
        metrics: dict[str, float] = {}
        while time.monotonic() < deadline and self.proc.poll() is None:
            metrics = scrape(self.port)  # {} while the endpoint does not answer
            if metrics and condition(metrics):
                return metrics
            time.sleep(0.05)
        seen = {k: v for k, v in metrics.items() if k.startswith("n2s_")}
        raise AssertionError(
            f"never {what}; last scrape {seen}; the daemon log ends:\n{self.log()[-3000:]}"
        )

    def output(self, name: str) -> Path:
        """The one output file called ``name`` under ``--out`` (outputs may sit in
        subfolders that mirror the watched directory)."""
        (path,) = self.out.rglob(name)
        return path

    def wait_ready(self) -> None:
        """Wait for READY; learn the metrics port."""
        self.port = int(self.wait_for(r"metrics on http://127\.0\.0\.1:(\d+)/metrics").group(1))
        self.wait_for("n2s-stream ready")

    def scrape(self) -> dict[str, float]:
        """Metrics over HTTP, as ``{'name{labels}': value}``."""
        values = scrape(self.port)
        assert values, "metrics endpoint did not answer"
        return values

    def terminate(self, timeout: float = 120.0) -> int:
        """SIGTERM, then wait for the drain to finish; returns the exit status."""
        self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        """SIGKILL: no chance to clean up."""
        self.proc.kill()
        self.wait(30)

    def wait(self, timeout: float) -> int:
        """Wait for exit; returns the status."""
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._log.close()


def start_writer(
    directory: Path,
    *,
    frames: int,
    rate: float,
    shape: str = "48x48",
    name: str = "scan_0001",
    layout: str = "areadetector",
    seed: int = 0,
) -> subprocess.Popen:
    """A detector writing a growing SWMR file, as a separate process."""
    proc = subprocess.Popen(
        [
            *N2S,
            "simulate",
            "--dir",
            str(directory),
            "--frames",
            str(frames),
            "--rate",
            str(rate),
            "--shape",
            shape,
            "--name",
            name,
            "--layout",
            layout,
            "--seed",
            str(seed),
            "--log-level",
            "WARNING",
        ]
    )
    STARTED.append(proc)
    return proc


def without_root_file_access() -> list[str] | None:
    """A command prefix that runs a process as root but without the capabilities that
    let root read any file, so that file permissions apply to it; None if unavailable."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return None
    probe = subprocess.run(
        ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "true"], capture_output=True
    )
    return (
        None
        if probe.returncode
        else ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
    )


@contextmanager
def mounted_tmpfs(mount_point: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted on ``mount_point`` (created) with ``options`` (e.g. ``size=3m``) for
    the duration; the test is skipped where mounting is not allowed (not root, container)."""
    import pytest

    mount_point.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def remount(mount_point: Path, options: str) -> None:
    """Change a mounted tmpfs's options (``ro``, ``rw``, ``size=...``) while in use."""
    subprocess.run(["mount", "-o", f"remount,{options}", str(mount_point)], check=True)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_output(path: Path):
    """``(frames, provenance dict)`` of an output file."""
    with h5py.File(path, "r") as handle:
        return (
            handle["/entry/data/data"][()],
            {
                k: v[()]
                for k, v in handle["/entry/provenance"].items()
                if isinstance(v, h5py.Dataset)
            },
        )


def write_stack(path: Path, frames: np.ndarray, dataset: str = "/data", **kwargs) -> Path:
    """Write ``frames`` to ``path`` at ``dataset`` (plain HDF5, optional filter kwargs)."""
    with h5py.File(path, "w") as handle:
        handle.create_dataset(dataset, data=frames, **kwargs)
    return path


def chromium_dom(url: str, profile: Path, budget_ms: int = 6000) -> subprocess.CompletedProcess:
    """Render ``url`` in a real headless Chromium and return its run, the DOM after
    ``budget_ms`` of virtual time on stdout. No background networking: the machines are
    offline and the pages need none. The caller skips where `shutil.which` finds none."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser is not None
    return subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            f"--virtual-time-budget={budget_ms}",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def total(metrics: dict[str, float], name: str) -> float:
    """The metric ``name`` summed over its labels (0 where it is not exported)."""
    return sum(v for k, v in metrics.items() if k == name or k.startswith(name + "{"))


def frames_in(path: Path) -> int:
    """Denoised frames in an output file (``/entry/data/data``)."""
    # no file lock: the refiner may be opening the finished output at the same moment
    with h5py.File(path, "r", swmr=True, locking=False) as f:
        return int(f["/entry/data/data"].shape[0])
