"""``n2s-stream demo``: a simulated detector, the daemon learning from it, quality live.

Starts ``n2s-stream simulate`` (a growing SWMR file of a drifting scene with Poisson noise,
clean truth kept aside; or, with ``source="pva"``, an NTNDArray PV on loopback that keeps a
copy of what it served) and the daemon on it as two processes, then every few seconds
reads the daemon's output like a live viewer would (SWMR) and prints a row: frames in and
out, model version, PSNR of the newest frames against the truth (noisy, the classical
denoiser of the cold start on the same frames, and what the daemon wrote) and the
self-supervised validation loss the daemon exports (which needs no truth).

Absolute PSNR follows the scene (a drifting sample brings harder texture into view); the
classical column on the same frames is the yardstick: the network's margin over it is
what online training earns.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np

from n2s_stream.commands.simulate import truth_path
from n2s_stream.config import NetworkOptions
from n2s_stream.formats.writer import OUTPUT_SUFFIX, output_stem, series_output
from n2s_stream.n2s.classical import ClassicalDenoiser, calibrate_classical
from n2s_stream.n2s.normalize import Normalizer
from n2s_stream.n2s.quality import psnr
from n2s_stream.runtime.metrics import scrape
from n2s_stream.sinks.pva import loopback_client_env, loopback_server_env

DEMO_SHAPE = "96x96"
DEMO_DOSE = 20.0
DEMO_RATE = 6.0  # frames per second
NEWEST = 12  # frames scored per row


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Classical:
    """The daemon's cold-start denoiser, rebuilt the way the daemon builds it (normalised
    as the first frame says, calibrated J-invariantly on it), to score the same frames."""

    def __init__(self, first_frame: np.ndarray) -> None:
        # the demo runs the daemon with its defaults
        self.normalizer: Normalizer = NetworkOptions().fit_normalizer(
            first_frame[np.newaxis], source_dtype=first_frame.dtype
        )
        self.denoiser: ClassicalDenoiser = calibrate_classical(
            self.normalizer.forward(first_frame[np.newaxis].astype(np.float32))[0]
        )

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        """Denoised ``(n, H, W)`` frames, in counts."""
        normalized = self.normalizer.forward(frames.astype(np.float32))
        return self.normalizer.inverse(np.stack([self.denoiser(image) for image in normalized]))


def _newest_quality(
    output: Path, source: Path, truth: np.ndarray, classical: _Classical | None = None
) -> tuple[float, float, float, int]:
    """PSNR of the newest denoised frames, of the same noisy frames and of the classical
    denoiser on them (with ``classical``), and the count written."""
    try:
        with h5py.File(output, "r", swmr=True) as out:
            n = out["/entry/provenance/t_written"].shape[0]
            if n == 0:
                return float("nan"), float("nan"), float("nan"), 0
            index = out["/entry/provenance/source_frame"][max(0, n - NEWEST) : n]
            denoised = out["/entry/data/data"][max(0, n - NEWEST) : n]
        with h5py.File(source, "r", swmr=True) as src:
            noisy = src["/entry/data/data"][index[0] : index[-1] + 1].astype(np.float32)
    except (OSError, KeyError):
        return float("nan"), float("nan"), float("nan"), 0
    noisy = noisy[index - index[0]]
    clean = truth[index] * DEMO_DOSE
    classical_db = float("nan") if classical is None else psnr(clean, classical(noisy), DEMO_DOSE)
    return psnr(clean, noisy, DEMO_DOSE), psnr(clean, denoised, DEMO_DOSE), classical_db, n


def run_demo(
    work_dir: Path, *, seconds: float = 60.0, context_frames: int = 1, source: str = "directory"
) -> None:
    """Run simulator and daemon for about ``seconds`` and print quality as it improves.

    With ``context_frames`` K > 1 a second daemon, seeing K frames at a time, follows the
    same acquisition, and its PSNR is printed beside the single-frame one: the margin
    temporal context gains online, measured in one run on the same frames. With ``source``
    "pva" the frames travel as an NTNDArray PV and each daemon also serves its denoised PV.
    """
    work_dir = Path(work_dir).resolve()
    acq = work_dir / "acq"
    acq.mkdir(parents=True, exist_ok=True)
    name = f"demo_{time.strftime('%Y%m%d_%H%M%S')}"
    frames = int(seconds * DEMO_RATE)
    command = [sys.executable, "-m", "n2s_stream"]
    variants: list[tuple[str, str, list[str]]] = [("n2s", "", [])]
    if context_frames > 1:
        variants.append(
            (
                f"K={context_frames}",
                f"_k{context_frames}",
                ["--context-frames", str(context_frames)],
            )
        )
    feed = _Feed(source, acq, name)
    simulator = [
        *command,
        "simulate",
        *feed.simulator_args,
        "--frames",
        str(frames),
        "--rate",
        str(DEMO_RATE),
        "--shape",
        DEMO_SHAPE,
        "--dose",
        str(DEMO_DOSE),
        "--name",
        name,
        "--log-level",
        "WARNING",
    ]
    # a PV must be up before its clients start (they retry a refused name server only every
    # 10 s); a file is followed from its first frame whenever the daemon starts
    detector = subprocess.Popen(simulator, stdout=subprocess.DEVNULL, env=feed.env(None))
    daemons = [
        _start_daemon(
            command, work_dir, suffix, [*feed.daemon_args(suffix), *extra], feed.env(suffix)
        )
        for _, suffix, extra in variants
    ]
    series_names = [feed.series_name for _ in daemons]
    source_path = feed.recorded
    print(
        f"detector: {frames} frames {DEMO_SHAPE} at {DEMO_RATE:g}/s, Poisson dose "
        f"{DEMO_DOSE:g} counts -> {feed.describe()}"
    )
    for (label, suffix, extra), daemon in zip(variants, daemons, strict=True):
        print(
            f"daemon {label}: n2s-stream {' '.join(feed.daemon_args(suffix))} --out "
            f"{daemon.out} {' '.join(extra)} (log: {daemon.log_path}; live preview: "
            f"http://127.0.0.1:{daemon.port}/)"
        )
    psnr_columns = " ".join(f"{'PSNR ' + label:>9}" for label, _, _ in variants)
    print(
        f"{'elapsed':>7} {'in':>5} {'out':>5} {'model':>5} {'PSNR noisy':>10} "
        f"{'classical':>9} {psnr_columns} {'n2s-classical':>13} {'self-sup val loss':>17} "
        f"{'denoiser':>9}"
    )
    started = time.monotonic()
    truth, classical = None, None
    try:
        while True:
            time.sleep(5)
            if truth is None and truth_path(source_path).exists():
                with h5py.File(truth_path(source_path), "r") as handle:
                    truth = handle["clean"][()]
            if classical is None and truth is not None:
                classical = _classical_for(source_path)
            series_names = [
                name or feed.find_series(daemon.out)
                for name, daemon in zip(series_names, daemons, strict=True)
            ]
            scores = _print_row(
                daemons, series_names, source_path, truth, classical, time.monotonic() - started
            )
            if detector.poll() is not None and all(s[-1] >= frames for s in scores):
                break
            if any(d.process.poll() is not None for d in daemons):
                print("a daemon stopped unexpectedly; see its log")
                break
        if truth is not None and all(d.process.poll() is None for d in daemons):
            _print_refined(daemons, variants, series_names, source_path, truth, classical, frames)
    finally:
        detector.terminate()
        for daemon in daemons:
            daemon.stop()
        detector.wait(timeout=30)
    statuses = ", ".join(str(d.process.returncode) for d in daemons)
    denoised = series_output(daemons[0].out, series_names[0] or "?")
    print(
        f"denoised series: {denoised} (raw: {source_path});"
        f" the daemon stopped with status {statuses}"
    )


def _classical_for(source: Path) -> _Classical | None:
    """The cold-start denoiser for the acquisition in ``source``, once its first frame
    is there."""
    try:
        with h5py.File(source, "r", swmr=True) as src:
            data = src["/entry/data/data"]
            return _Classical(data[0]) if data.shape[0] else None
    except (OSError, KeyError):
        return None  # not there yet: the next row tries again


def _print_row(
    daemons: list[_DemoDaemon],
    names: list[str | None],
    source: Path,
    truth: np.ndarray | None,
    classical: _Classical | None,
    elapsed: float,
) -> list[tuple[float, float, float, int]]:
    """One line of the demo's table (PSNR of each daemon's newest frames against the
    truth, of the classical denoiser on the first daemon's, the first daemon's metrics);
    returns each daemon's (noisy dB, dB, classical dB, written)."""
    metrics = scrape(daemons[0].port)
    scores = [
        _newest_quality(series_output(d.out, name), source, truth, classical if k == 0 else None)
        if truth is not None and name
        else (np.nan, np.nan, np.nan, 0)
        for k, (name, d) in enumerate(zip(names, daemons, strict=True))
    ]
    noisy_db, denoised_db, classical_db, written = scores[0]
    received = metrics.get("n2s_frames_received_total", 0)
    version = metrics.get("n2s_model_version", 0)
    val_loss = metrics.get("n2s_selfsup_val_loss", 0.0)  # 0 until the first score
    loss_text = f"{val_loss:17.4f}" if val_loss else f"{'-':>17}"
    denoiser = (
        "-"
        if not written  # the daemon is starting, or nothing written yet
        else "classical"
        if metrics.get("n2s_cold_start_active")
        else "network"
    )
    columns = " ".join(_decibels(db, 9) for _, db, _, _ in scores)
    margin = denoised_db - classical_db
    margin_text = f"{margin:+11.2f}dB" if np.isfinite(margin) else f"{'-':>13}"
    print(
        f"{elapsed:6.0f}s {received:5.0f} {written:5d} {version:5.0f} "
        f"{_decibels(noisy_db, 10)} {_decibels(classical_db, 9)} {columns} {margin_text} "
        f"{loss_text} {denoiser:>9}",
        flush=True,
    )
    return scores


def _print_refined(
    daemons: list[_DemoDaemon],
    variants: list,
    names: list[str | None],
    source: Path,
    truth: np.ndarray,
    classical: _Classical | None,
    frames: int,
    timeout: float = 120.0,
) -> None:
    """Once the series has ended: wait for each daemon's refined frames (the whole series
    denoised again with its newest model) and print the whole series' PSNR: noisy,
    classical, live and refined."""
    print("series ended; waiting for the refined output (the whole series again, newest model)")
    deadline = time.monotonic() + timeout
    for (label, _, _), daemon, name in zip(variants, daemons, names, strict=True):
        output = series_output(daemon.out, name or "?")
        while time.monotonic() < deadline:
            if scrape(daemon.port).get("n2s_refined_frames_total", 0) >= frames:
                try:
                    with h5py.File(output, "r", swmr=True) as out:
                        if "/entry/refined/data" in out:
                            live = out["/entry/data/data"][()]
                            refined = out["/entry/refined/data"][()]
                            index = out["/entry/provenance/source_frame"][()]
                            version = int(out["/entry/refined/model_version"][-1])
                            # a series refined while idle is refined again in parts
                            if len(refined) == len(live):
                                break
                except OSError:
                    pass  # being appended to: read it again
            time.sleep(1.0)
        else:
            print(f"{label}: no refined output within {timeout:g} s")
            continue
        with h5py.File(source, "r", swmr=True) as src:
            noisy = src["/entry/data/data"][()].astype(np.float32)[index]
        clean = truth[index] * DEMO_DOSE
        scores = [psnr(clean, stack, DEMO_DOSE) for stack in (noisy, live, refined)]
        classical_db = np.nan if classical is None else psnr(clean, classical(noisy), DEMO_DOSE)
        print(
            f"whole series, {label}: noisy {scores[0]:.2f} dB, classical {classical_db:.2f} "
            f"dB, live {scores[1]:.2f} dB, refined {scores[2]:.2f} dB (model version "
            f"{version})",
            flush=True,
        )


def _decibels(value: float, width: int) -> str:
    """``value`` dB in ``width`` characters; "-" until there is something to score."""
    return f"{value:{width - 2}.2f}dB" if np.isfinite(value) else f"{'-':>{width}}"


class _DemoDaemon:
    """One daemon process of the demo, with its output folder, log and metrics port."""

    def __init__(self, process: subprocess.Popen, out: Path, log_path: Path, log, port: int):
        self.process, self.out, self.log_path, self._log, self.port = (
            process,
            out,
            log_path,
            log,
            port,
        )

    def stop(self) -> None:
        """SIGTERM and wait for the drain."""
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=120)
        self._log.close()


class _Feed:
    """How the demo's frames travel, and where the daemons find them: a growing file in
    ``acq``, or an NTNDArray PV on loopback (found by name server; each daemon serves its
    denoised PV on a port of its own)."""

    def __init__(self, source: str, acq: Path, name: str) -> None:
        self.source, self.acq, self.name = source, acq, name
        self.pv = f"N2SDEMO:{name}:Image"
        self._ports: dict[str | None, int] = {None: _free_port()}

    @property
    def simulator_args(self) -> list[str]:
        """Where the simulator sends (it keeps what it sent in ``acq`` either way)."""
        if self.source == "pva":
            return ["--pva-serve", self.pv, "--dir", str(self.acq), "--start-delay", "12"]
        return ["--dir", str(self.acq)]

    def daemon_args(self, suffix: str) -> list[str]:
        """What a daemon follows (and, over PVA, the PV it serves)."""
        if self.source == "pva":
            return ["--pva", self.pv, "--pva-serve", f"N2SDEMO:{self.name}:Denoised{suffix}"]
        return ["--watch", str(self.acq)]

    def env(self, suffix: str | None) -> dict[str, str]:
        """Loopback EPICS settings for the simulator (None) or one daemon."""
        if self.source != "pva":
            return dict(os.environ)
        port = self._ports.setdefault(suffix, _free_port())
        return {
            **os.environ,
            **loopback_client_env(self._ports[None], _free_port()),
            **loopback_server_env(port, _free_port()),
        }

    @property
    def recorded(self) -> Path:
        """The noisy frames as sent (the simulator's file, or its copy of the PV)."""
        return self.acq / (f"{self.name}_1.h5" if self.source == "pva" else f"{self.name}.h5")

    @property
    def series_name(self) -> str | None:
        """The daemon's name for the series when known in advance (files: yes)."""
        return None if self.source == "pva" else self.name

    def find_series(self, out: Path) -> str | None:
        """The series the daemon opened for the PV (named by the PV and its start time)."""
        found = sorted(out.glob("*" + OUTPUT_SUFFIX))
        return output_stem(found[-1]) if found else None

    def describe(self) -> str:
        """Where the frames go, for the first line of the demo."""
        if self.source == "pva":
            return (
                f"PV {self.pv} (EPICS_PVA_NAME_SERVERS=127.0.0.1:{self._ports[None]}; "
                f"kept in {self.recorded})"
            )
        return str(self.recorded)


def _start_daemon(
    command: list[str], work_dir: Path, suffix: str, args: list[str], env: dict[str, str]
) -> _DemoDaemon:
    out, state = work_dir / f"out{suffix}", work_dir / f"state{suffix}"
    port = _free_port()
    log_path = work_dir / f"daemon{suffix}.log"
    log = open(log_path, "w")  # noqa: SIM115 (closed by _DemoDaemon.stop)
    process = subprocess.Popen(
        [
            *command,
            *args,
            "--out",
            str(out),
            "--state-dir",
            str(state),
            "--metrics-port",
            str(port),
            "--device",
            "cpu",
            "--publish-every",
            "25",
            "--settle-seconds",
            "3",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    return _DemoDaemon(process, out, log_path, log, port)
