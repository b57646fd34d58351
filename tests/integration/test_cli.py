"""The command line as a user runs it: seed flags, config layering, exit codes, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.helpers.daemon import write_stack


def run(*args: str, env: dict | None = None, cwd: Path | None = None):
    """Run ``python -m n2s_stream`` and return the completed process."""
    return subprocess.run(
        [sys.executable, "-m", "n2s_stream", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


@pytest.fixture(scope="module")
def cli_checkpoint(noisy_series, tmp_path_factory):
    """A checkpoint trained through the CLI with every seed flag."""
    path, _, _ = noisy_series
    out_dir = tmp_path_factory.mktemp("cli_runs")
    proc = run(
        "train",
        "--h5",
        str(path),
        "--max-samples",
        "16",
        "--device",
        "cpu",
        "--model",
        "unet",
        "--patch",
        "32",
        "--batch",
        "4",
        "--epochs",
        "2",
        "--amp",
        "--val-frac",
        "0.25",
        "--save-best",
        "--early-stop-patience",
        "5",
        "--early-stop-min-delta",
        "1e-5",
        "--normalize",
        "percentile",
        "--dataset",
        "/data",
        "--lr",
        "1e-3",
        "--seed",
        "1",
        "--out-dir",
        str(out_dir),
        "--width",
        "8",
        "--steps-per-epoch",
        "5",
        "--no-progress",
    )
    assert proc.returncode == 0, proc.stderr
    return out_dir, proc


def test_train_with_seed_flags(cli_checkpoint):
    out_dir, proc = cli_checkpoint
    assert (out_dir / "ckpt_last.pt").is_file() and (out_dir / "ckpt_best.pt").is_file()
    assert "--amp has no effect on CPU" in proc.stderr
    assert "epoch 1/2: train masked loss" in proc.stderr
    assert "epoch 2/2: train masked loss" in proc.stderr and "val masked loss 0." in proc.stderr


def test_denoise_with_seed_flags(cli_checkpoint, noisy_series, tmp_path):
    path, _, _ = noisy_series
    out_dir, _ = cli_checkpoint
    proc = run(
        "denoise",
        "--h5",
        str(path),
        "--ckpt",
        str(out_dir / "ckpt_best.pt"),
        "--out",
        str(tmp_path / "d.h5"),
        "--device",
        "cpu",
        "--batch",
        "7",
        "--amp",
        "--jinv",
        "--dataset",
        "/data",
        "--no-progress",
    )
    assert proc.returncode == 0, proc.stderr
    assert "wrote 24 frames" in proc.stdout
    with h5py.File(tmp_path / "d.h5") as handle:
        assert handle["/entry/data/data"].shape == (24, 64, 64)


def _one_line_error(proc, code: int, *words: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_bad_input_file_is_one_line(tmp_path, cli_checkpoint):
    out_dir, _ = cli_checkpoint
    bad = write_stack(tmp_path / "bad.h5", np.zeros((3, 8, 8)), "/entry/other")
    proc = run(
        "denoise", "--h5", str(bad), "--ckpt", str(out_dir / "ckpt_last.pt"), "--no-progress"
    )
    _one_line_error(proc, 1, "bad.h5", "no frame dataset")
    rank = write_stack(tmp_path / "rank.h5", np.zeros((2, 2, 2, 8, 8)))
    _one_line_error(run("train", "--h5", str(rank)), 1, "rank.h5", "rank 5")


def test_inexact_reconstruction_is_refused(tmp_path, cli_checkpoint, noisy_series):
    out_dir, _ = cli_checkpoint
    path, _, _ = noisy_series
    proc = run(
        "denoise",
        "--h5",
        str(path),
        "--ckpt",
        str(out_dir / "ckpt_last.pt"),
        "--out",
        str(tmp_path / "x.h5"),
        "--require-reconstructable",
    )
    _one_line_error(proc, 1, "--require-reconstructable", "percentile")
    assert not (tmp_path / "x.h5").exists()


def test_usage_errors_exit_2(tmp_path, noisy_series):
    path, _, _ = noisy_series
    _one_line_error(run("train", "--h5", str(path), "--grid-size", "1"), 2, "grid_size")
    _one_line_error(run("train"), 2, "--h5 is required")
    config = tmp_path / "c.toml"
    config.write_text("[train]\nepochs = 1\ncolour = 'red'\n")
    _one_line_error(
        run("train", "--config", str(config), "--h5", str(path)),
        2,
        "c.toml",
        "unknown option 'colour'",
    )
    assert run("train", "--bogus").returncode == 2


def test_config_file_then_env_then_cli(tmp_path, noisy_series):
    """Precedence: command line > N2S_TRAIN_* > [train] table > defaults."""
    path, _, _ = noisy_series
    config = tmp_path / "c.toml"
    config.write_text(
        f"[train]\nh5 = '{path}'\nepochs = 5\nsteps_per_epoch = 2\n"
        f"width = 4\ndepth = 1\npatch = 16\nbatch = 2\ndevice = 'cpu'\n"
        f"out_dir = '{tmp_path / 'from_file'}'\nprogress = false\n"
    )
    proc = run(
        "train",
        "--config",
        str(config),
        "--epochs",
        "1",
        env={"N2S_TRAIN_EPOCHS": "3", "N2S_TRAIN_OUT_DIR": str(tmp_path / "from_env")},
    )
    assert proc.returncode == 0, proc.stderr
    assert "epoch 1/1" in proc.stderr and "epoch 2/" not in proc.stderr  # CLI beat env
    assert (tmp_path / "from_env" / "ckpt_last.pt").exists()  # env beat file


def test_version_and_help():
    proc = run("--version")
    assert proc.returncode == 0 and "n2s-stream" in proc.stdout
    help_text = run("train", "--help").stdout
    for flag in ("--h5", "--max-samples", "--early-stop-min-delta", "--no-scale-integers"):
        assert flag in help_text


def test_simulate_layouts(tmp_path):
    for layout in ("areadetector", "eiger", "plain"):
        proc = run(
            "simulate",
            "--dir",
            str(tmp_path / layout),
            "--frames",
            "3",
            "--shape",
            "16x24",
            "--layout",
            layout,
        )
        assert proc.returncode == 0, proc.stderr
    from n2s_stream.formats.stack import open_stack

    with open_stack(tmp_path / "eiger" / "scan_0001_master.h5") as stack:
        assert stack.shape == (3, 16, 24)
    with h5py.File(tmp_path / "plain" / ".truth" / "scan_0001_truth.h5") as handle:
        assert handle["clean"].shape == (3, 16, 24)


def test_denoise_context_frames_must_match_the_checkpoint(cli_checkpoint, noisy_series, tmp_path):
    """``--context-frames`` is accepted when it matches what the checkpoint records, and a
    mismatch is one line naming both (exit 2), never the daemon's usage text."""
    path, _, _ = noisy_series
    out_dir, _ = cli_checkpoint
    ckpt = str(out_dir / "ckpt_last.pt")
    proc = run(
        "denoise",
        "--h5",
        str(path),
        "--ckpt",
        ckpt,
        "--out",
        str(tmp_path / "k1.h5"),
        "--dataset",
        "/data",
        "--context-frames",
        "1",
        "--no-progress",
    )
    assert proc.returncode == 0, proc.stderr
    proc = run(
        "denoise",
        "--h5",
        str(path),
        "--ckpt",
        ckpt,
        "--out",
        str(tmp_path / "k3.h5"),
        "--dataset",
        "/data",
        "--context-frames",
        "3",
        "--no-progress",
    )
    _one_line_error(proc, 2, "--context-frames 3", "trained with 1")
    assert "usage:" not in proc.stderr and not (tmp_path / "k3.h5").exists()
