"""Each benchmark script runs on a tiny setting and writes its JSON (no timing asserted)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from n2s_stream.pretrained import BLIND, NONBLIND

BENCHMARKS = Path(__file__).parents[2] / "benchmarks"
PEER_PYTHON = BENCHMARKS.parent / ".venv-peers" / "bin" / "python"
HAS_BENCH = all(importlib.util.find_spec(name) for name in ("bm3d", "bm4d", "pyFAI"))
"""The optional [bench] extra (BM3D/BM4D, pyFAI): make setup installs it."""
FIDELITY_GUARDS = ("flux", "outliers", "local4")
"""The guards fidelity.py applies to the live and refined output."""


def run_benchmark(script: str, *args: str, out: Path, timeout: float = 300) -> tuple[str, dict]:
    """Run ``benchmarks/<script>`` with ``args``, its report going to ``out``; returns what
    it printed and the report, after checking that it exited 0."""
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, json.loads(out.read_text())


def test_offline_quality_runs(tmp_path):
    stdout, report = run_benchmark(
        "offline_quality.py",
        "--doses",
        "20",
        "--budget",
        "3",
        "--tiles",
        "4",
        "--tile",
        "64",
        out=tmp_path / "q.json",
        timeout=600,
    )
    row = report["rows"][0]
    assert row["dose"] == 20
    assert row["n2s"]["steps"] > 0
    for name in ("wavelet", "tv", "nl_means"):
        assert row["classical"][name]["psnr"] > row["noisy"]["psnr"]
    if HAS_BENCH:  # at 20 counts BM3D beats the best calibrated classical denoiser
        best = max(row["classical"][name]["psnr"] for name in ("wavelet", "tv", "nl_means"))
        assert row["bm3d"]["psnr"] > best and row["bm3d"]["cpu_seconds_per_frame"] > 0
    assert "N2S J-inv" in stdout and "BM3D" in stdout


def test_machine_noise_runs(tmp_path):
    out = tmp_path / "n.json"
    stdout, report = run_benchmark(
        "machine_noise.py", "--size", "32", "--seconds", "2", "--slice-seconds", "0.25", out=out
    )
    assert [r["threads"] for r in report["rows"]] == [1, 2]
    assert all(r["slices"] >= 2 and 0 < r["min"] <= r["p50"] <= r["max"] for r in report["rows"])
    assert "max / min" in stdout and out.with_suffix(".png").exists()


@pytest.mark.slow  # 25 s; the soak smoke test samples the daemon's RSS in the default run
def test_daemon_memory_runs(tmp_path):
    out = tmp_path / "m.json"
    stdout, report = run_benchmark(
        "daemon_memory.py",
        "--frames",
        "24",
        "--buffer-frames",
        "4",
        "--shape",
        "32x32",
        "--threads",
        "1",
        "--idle-seconds",
        "1",
        out=out,
    )
    assert report["peak_rss_mib"] > 0 and report["end_to_end_fps"] > 0
    assert report["samples"][-1]["written"] == 24
    assert "peak RSS" in stdout and out.with_suffix(".png").exists()


@pytest.mark.slow  # 25 s; tests/integration/test_pva.py covers the PVA path in the default run
def test_pva_throughput_runs(tmp_path):
    pytest.importorskip("p4p", reason="optional extra [pva] not installed")
    stdout, report = run_benchmark(
        "pva_throughput.py",
        "--sizes",
        "32",
        "--codecs",
        "bslz4",
        "--seconds",
        "1",
        "--e2e-seconds",
        "2",
        "--warm-up",
        "1",
        out=tmp_path / "p.json",
    )
    (row,) = report["rows"]
    assert row["codec"] == "bslz4" and row["source_fps"] > 0 and row["end_to_end_fps"] > 0
    assert 0 <= row["source_dropped"] < 1 and "end-to-end fps" in stdout


@pytest.mark.slow  # 28 s; tests/integration/test_zmq.py covers the feeds and the fan-out
def test_zmq_throughput_runs(tmp_path):
    _, report = run_benchmark(
        "zmq_throughput.py",
        "--sizes",
        "32",
        "--frames",
        "20",
        "--e2e-frames",
        "5",
        out=tmp_path / "z.json",
    )
    rows = report["rows"]
    assert {r["protocol"] for r in rows} == {"native", "dectris-stream1", "dectris-stream2"}
    assert all(r["source_fps"] > 0 for r in rows)
    assert [r["workers"] for r in report["fan_out"]] == [1, 2]
    assert all(r["fps"] > 0 for r in report["fan_out"])


def test_model_speed_runs(tmp_path):
    # compiling is tested in test_daemon
    _, report = run_benchmark(
        "model_speed.py",
        "--sizes",
        "32",
        "--seconds",
        "0.2",
        "--variants",
        "float32",
        "channels_last",
        "bf16",
        out=tmp_path / "s.json",
    )
    assert report["matmul_peak_gflops"] > 0
    assert {r["variant"] for r in report["rows"]} == {"float32", "channels_last", "bf16"}


def test_soak_runs(tmp_path):
    out = tmp_path / "soak.json"
    stdout, report = run_benchmark(
        "soak.py", "--minutes", "0.1", "--rate", "100", "--series-frames", "20", out=out
    )
    assert report["frames_written"] == report["frames_sent"] == 600
    assert report["output_files"] == 30 and report["daemon_exit"] == 0
    assert "MiB/hour" in stdout and out.with_suffix(".png").exists()


@pytest.mark.slow  # two minutes on 2 cores; test_soak_runs covers the soak itself
def test_soak_traces_memory(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACED_DAEMON_EVERY", "1")
    stdout, report = run_benchmark(
        "soak.py",
        "--minutes",
        "0.1",
        "--rate",
        "100",
        "--series-frames",
        "20",
        "--trace",
        out=tmp_path / "s.json",
    )
    assert report["frames_written"] == 600
    trace = report["trace"]
    assert trace["samples"] >= 2
    assert trace["figures"]["python_mib"]["last"] > 0
    assert trace["figures"]["malloc_in_use_mib"]["last"] > trace["figures"]["python_mib"]["last"]
    assert "dict" in trace["objects"] and "malloc_free_mib" in stdout


@pytest.mark.slow  # 12 s; a profiling aid, model_speed covers the model benchmark
def test_profile_model_runs(tmp_path):
    stdout, report = run_benchmark(
        "profile_model.py",
        "--sizes",
        "32",
        "--batch",
        "2",
        "--patch",
        "32",
        "--passes",
        "2",
        "--rounds",
        "1",
        "--round-seconds",
        "0.1",
        out=tmp_path / "p.json",
    )
    (inference,) = report["inference"].values()
    assert any("conv" in op["name"] for op in inference["operators"])
    assert abs(sum(op["share"] for op in inference["operators"]) - 1) < 0.5
    assert set(report["training"]) == {"contiguous", "channels_last", "channels_last+fused_adam"}
    assert all(len(r) == 1 and r[0] > 0 for r in report["training_ratios"].values())
    assert "channels_last / contiguous" in stdout


@pytest.mark.slow  # 20 s; registered_context and the context tests cover the code
def test_context_quality_runs(tmp_path):
    out = tmp_path / "c.json"
    _, report = run_benchmark(
        "context_quality.py",
        "--budget",
        "2",
        "--sweep-budget",
        "1",
        "--frames",
        "6",
        "--size",
        "32",
        "--contexts",
        "1",
        "3",
        "--doses",
        "20",
        "--drifts",
        "1",
        out=out,
        timeout=600,
    )
    assert {(r["context"], r["residual"]) for r in report["rows"]} == {
        (1, False),
        (1, True),
        (3, False),
        (3, True),
    }
    assert all(r["jinv"]["psnr"] > 0 and r["single_pass"]["fps"] > 0 for r in report["rows"])
    assert len(report["by_drift"]) == 2 and out.with_suffix(".png").exists()


@pytest.mark.slow  # 20 s; first_pass's and the daemon's quality tests cover the path
def test_online_quality_runs(tmp_path):
    out = tmp_path / "o.json"
    stdout, report = run_benchmark(
        "online_quality.py",
        "--tiles",
        "6",
        "--tile",
        "48",
        "--rate",
        "10",
        "--passes",
        "2",
        "--offline-budget",
        "2",
        out=out,
    )
    assert len(report["online_pass_psnr"]) == 2 and len(report["curve_psnr"]) == 12
    assert report["online_pass_psnr"][0] > report["noisy_psnr"]  # cold start: never worse
    assert "online, pass 2" in stdout and out.with_suffix(".png").exists()


@pytest.mark.parametrize(
    "engine",
    [
        "torch",
        # 25 s; test_daemon.py's faster-engines test covers ONNX Runtime in the default run
        pytest.param("onnxruntime", marks=pytest.mark.slow),
    ],
)
def test_daemon_throughput_runs(tmp_path, engine):
    if engine == "onnxruntime":
        pytest.importorskip("onnxruntime", reason="optional extra [onnx] not installed")
    out = tmp_path / "t.json"
    stdout, report = run_benchmark(
        "daemon_throughput.py",
        "--engine",
        engine,
        "--sizes",
        "32",
        "--threads",
        "1",
        "--buffer-frames",
        "4",
        "--bare-seconds",
        "0.2",
        "--flat-seconds",
        "0.001",
        "--paced-seconds",
        "0.01",
        out=out,
    )
    (row,) = report["rows"]
    assert row["size"] == 32 and row["threads"] == 1
    assert row["flat_frames"] == 12 and row["paced_frames"] == 10
    assert row["daemon_fps"] > 0 and row["bare_fps_before"] > 0 and row["ratio"] > 0
    assert 0 < row["latency_p50_s"] <= row["latency_p99_s"] and row["peak_rss_mib"] > 0
    assert row["exit_code"] == 0
    assert "peak RSS MiB" in stdout and out.with_suffix(".png").exists()


@pytest.mark.skipif(
    not PEER_PYTHON.exists(), reason="the peer's own venv is made by `make bench-peers` only"
)
def test_peer_quality_runs(tmp_path):
    stdout, report = run_benchmark(
        "peer_quality.py",
        "--doses",
        "20",
        "--budget",
        "2",
        "--tiles",
        "8",
        "--peer-python",
        str(PEER_PYTHON),
        out=tmp_path / "p.json",
        timeout=600,
    )
    (row,) = report["rows"]
    assert row["careamics_n2v"]["steps"] > 0 and row["n2s_stream"]["steps"] > 0
    assert row["careamics_n2v2"]["steps"] > 0
    # two seconds are too few for either denoiser to beat the noisy input reliably (N2V
    # scored 13.1 dB against the input's 16.1 once): the 90 s benchmark judges quality,
    # this checks that both were scored, on the same tiles, by the same code
    scores = [
        row["noisy"],
        row["n2s_stream"]["single_pass"],
        row["careamics_n2v"],
        row["careamics_n2v2"],
    ]
    assert all(0 < score["psnr"] < 60 for score in scores), scores
    assert "CAREamics N2V" in stdout


@pytest.mark.slow  # 20 s; test_daemon_throughput_runs covers a daemon benchmark
def test_daemon_vs_offline_runs(tmp_path):
    stdout, report = run_benchmark(
        "daemon_vs_offline.py",
        "--frames",
        "30",
        "--shape",
        "48x48",
        "--variants",
        "daemon",
        "daemon no-train",
        out=tmp_path / "d.json",
        timeout=600,
    )
    assert report["offline"]["fps"] > 0 and len(report["offline"]["runs_fps"]) == 2
    assert set(report["daemons"]) == {"daemon", "daemon no-train"}
    assert report["daemons"]["daemon no-train"]["train_steps"] == 0
    assert all(0 < row["forward_share"] <= 1.5 for row in report["daemons"].values())
    assert "/ offline" in stdout


@pytest.mark.slow
def test_registered_context_runs(tmp_path):
    _, report = run_benchmark(
        "registered_context.py",
        "--budget",
        "2",
        "--frames",
        "8",
        "--size",
        "48",
        "--drifts",
        "3",
        out=tmp_path / "r.json",
        timeout=600,
    )
    assert [row["scene"] for row in report["rows"]] == [
        "drift 3 px/frame",
        "drift 3, jump half-way",
    ]
    assert all(row["K=3 registered"] > row["noisy"] for row in report["rows"])


def test_prior_quality_runs(tmp_path):
    """Starting models scored before any training: the shipped one and a given file (here
    the same weights, so the same numbers), each well above the noisy frames, each file
    named with its own record of training and its hash."""
    _, report = run_benchmark(
        "prior_quality.py",
        "--models",
        f"copy={BLIND}",
        "--frames",
        "8",
        "--every",
        "2",
        "--size",
        "64",
        "--doses",
        "20",
        out=tmp_path / "p.json",
    )
    (row,) = report["rows"]
    assert row["frames"] == 4
    assert row["shipped"]["mean"] > row["noisy"]["mean"] + 5
    assert row["copy"]["mean"] == pytest.approx(row["shipped"]["mean"], abs=1e-6)
    assert set(row["by_image"]) == {"astronaut"}
    files = report["model_files"]  # the copy is named as given, the shipped file too
    assert files[report["settings"]["models"]["copy"]] == files[str(BLIND)]
    assert files[str(BLIND)]["pretrained"]["augment"] is True


@pytest.mark.slow
def test_pretrained_start_runs(tmp_path):
    _, report = run_benchmark(
        "pretrained_start.py",
        "--tiles",
        "6",
        "--rate",
        "3",
        "--doses",
        "20",
        out=tmp_path / "p.json",
        timeout=600,
    )
    (row,) = report["rows"]
    assert row["pretrained"]["all"] > row["noisy"] and row["from scratch"]["all"] > row["noisy"]


@pytest.mark.slow  # 20 s; tests/unit/test_unblind.py covers the un-blind step
def test_n2s_levers_runs(tmp_path):
    stdout, report = run_benchmark(
        "n2s_levers.py",
        "--doses",
        "20",
        "--budget",
        "2",
        "--tiles",
        "4",
        "--tile",
        "64",
        "--grids",
        "4",
        "2",
        "--n2n",
        out=tmp_path / "l.json",
        timeout=600,
    )
    (row,) = report["rows"]
    assert set(row["grids"]) == {"4", "2"}
    assert row["n2n"]["steps"] > 0 and row["n2n"]["single_pass"]["psnr"] > row["noisy"]["psnr"]
    assert 0 < row["unblind_frame"]["psnr"] < 60 and 0 < row["unblind_local15"]["psnr"] < 60
    assert "un-blind" in stdout


@pytest.mark.slow  # a minute: a daemon, its refinement and offline training
def test_first_pass_runs(tmp_path):
    stdout, report = run_benchmark(
        "first_pass.py",
        "--frames",
        "24",
        "--size",
        "64",
        "--doses",
        "20",
        "--drifts",
        "3",
        "--rate",
        "8",
        "--variants",
        f"avg0=--average-steps 0 --no-refine --pretrained-model {NONBLIND}",
        "--unblind",
        out=tmp_path / "f.json",
        timeout=600,
    )
    (row,) = report["rows"]
    if HAS_BENCH:  # the [bench] extra: the gold standard beside TV
        assert row["bm3d"]["mean"] > row["tv"]["mean"], stdout
        assert row["bm3d_cpu_seconds_per_frame"] > 0 and "vs BM3D: live" in stdout
    for name in (
        "tv",
        "offline",
        "offline_shipped",
        "live",
        "refined",
        "final_no_tta",
        "final_jinv",
        "final_unblind",
        "final_unblind15",
    ):
        assert row[name]["mean"] > row["noisy"]["mean"] + 3, (name, stdout)
    assert len(row["live_tv_frames_10s"]) == 24 and "worst" in stdout
    # the 64-px window's centre crosses from the first strip image into the second at frame 11
    assert list(row["by_image"]) == ["astronaut", "gravel"]
    gravel = row["by_image"]["gravel"]
    assert gravel["live"] > gravel["noisy"] + 3 and "gravel (13 frames from 11)" in stdout
    assert row["variants"]["avg0"]["refined"] is None
    assert "avg0: live" in stdout
    # the model file a variant names is recorded with its hash and its own training record
    named = report["model_files"][str(NONBLIND)]
    assert named["sha256"] == hashlib.sha256(NONBLIND.read_bytes()).hexdigest()
    assert named["pretrained"]["objective"] == "neighbor2neighbor"


def test_first_pass_scores_each_strip_image_on_the_frames_that_show_it(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from first_pass import image_sections

    # a 64-px window's centre at 32 + 3k: astronaut, then gravel from frame 11, then (the
    # scan reflected at the strip's end, column 128) back into astronaut from frame 54
    sections = image_sections(60, 64, 3.0, ("astronaut", "gravel"))
    assert list(sections) == ["astronaut", "gravel"]
    assert sections["astronaut"].tolist() == [*range(11), *range(54, 60)]
    assert sections["gravel"].tolist() == list(range(11, 54))
    fractional = image_sections(200, 63, 2.7, ("astronaut", "gravel"))
    assert sorted(np.concatenate(list(fractional.values())).tolist()) == list(range(200))


@pytest.mark.parametrize(
    ("strip", "reason"),
    [
        (["gravel", "brick"], "['brick'] are in the shipped models' training set"),
        (["cat"], "['cat'] are in the shipped models' training set"),  # chelsea's alias
        (["gravel", "gravel"], "['gravel'] named more than once"),
        (["no_such_image"], "['no_such_image'] are not scikit-image's bundled images"),
    ],
)
def test_first_pass_refuses_a_strip_it_cannot_score_fairly(tmp_path, strip, reason):
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "first_pass.py"),
            "--strip",
            *strip,
            "--out",
            str(tmp_path / "f.json"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and f"--strip: {reason}" in proc.stderr
    assert not (tmp_path / "f.json").exists()


@pytest.mark.slow  # 20 s; tests/integration/test_offline.py checks pretrained_lr itself
def test_pretrained_lr_runs(tmp_path):
    stdout, report = run_benchmark(
        "pretrained_lr.py",
        "--frames",
        "16",
        "--size",
        "64",
        "--doses",
        "20",
        "--seconds",
        "2",
        "--lrs",
        "1e-3",
        "0",
        out=tmp_path / "p.json",
    )
    (row,) = report["rows"]
    assert row["shipped lr 0"] > row["noisy"] + 3  # the shipped model unchanged denoises
    assert row["shipped lr 0.001"] > row["noisy"] + 3 and row["scratch lr 0.003"] > row["noisy"]
    assert "shipped lr 0.001" in stdout


def test_cold_start_classical_runs(tmp_path):
    stdout, report = run_benchmark(
        "cold_start_classical.py",
        "--frames",
        "3",
        "--size",
        "64",
        "--doses",
        "20",
        out=tmp_path / "c.json",
    )
    assert [row["candidate"] for row in report["rows"]][-3:] == [
        "shipped network",
        "shipped network, no blind spot",
        "the same, scored by photon splits",
    ]
    assert all(len(row["margins"]) == 3 for row in report["rows"])
    assert all(
        row["picked"] in ("network writes", "classical writes") for row in report["rows"][-3:]
    )
    assert "shipped network" in stdout


def test_detector_scale_runs(tmp_path):
    out = tmp_path / "d.json"
    stdout, report = run_benchmark(
        "detector_scale.py",
        "--sizes",
        "96x80",
        "--frames",
        "10",
        "--network-frames",
        "2",
        "--forward-seconds",
        "0.3",
        "--repeat",
        "1",
        out=out,
        timeout=600,
    )
    (size,) = report["rows"]
    assert size["shape"] == [96, 80]
    assert set(size["daemon"]) == {
        "passthrough",
        "passthrough_float32",
        "near_free",
        "passthrough_live_swmr",
        "passthrough_stream2",
        "default_network",
    }
    assert all(
        row["frames"] >= 10 for name, row in size["daemon"].items() if name != "default_network"
    )
    assert size["daemon"]["passthrough"]["output_dtype"] == "float16"
    assert size["daemon"]["passthrough_float32"]["output_dtype"] == "float32"
    formats = {(f["dtype"], f["compression"]): f for f in size["formats"]}
    assert formats[("float32", "none")]["psnr_loss_db"] == 0
    assert (
        formats[("float32", "sz3")]["max_error"]
        <= formats[("float32", "sz3")]["error_bound"] * 1.0001
    )
    assert set(size["stage_ms"]) >= {
        "read",
        "decode",
        "prepare",
        "forward_near_free",
        "register_context",
        "restore",
        "encode",
        "write",
        "forward_default",
    }
    assert [r["mean_count"] for r in size["float16_by_count"]] == [2, 20, 200, 2000, 10000]
    assert all(abs(r["loss_db"]) < 0.05 for r in size["float16_by_count"])
    precision = {(r["precision"], r["tile"]): r for r in size["precision"]}
    assert set(precision) == {("float32", 0), ("float32", 512), ("bfloat16", 0)}
    assert precision[("float32", 0)]["loss_db"] == 0
    assert report["provenance"]["commit"] and report["provenance"]["versions"]["torch"]
    assert "passthrough / bare loop" in stdout and out.with_suffix(".png").exists()
    tables = subprocess.run(
        [sys.executable, str(BENCHMARKS / "detector_scale.py"), "--markdown", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "| daemon: passthrough |" in tables and "change against float32" in tables


def test_fidelity_tables_take_bm3d_only_from_a_run_of_the_same_frames(tmp_path):
    """--bm3d-from fills the BM3D column from another run only where that run scored the
    same noisy frames; a run of other frames is refused, naming the scene and dose."""

    def report(noisy_psnr: float, with_bm3d: bool) -> Path:
        methods = {"noisy": {"psnr": noisy_psnr, "ring_bias_pct": -0.1}}
        if with_bm3d:
            methods["bm3d"] = {"psnr": 37.58, "ring_bias_pct": -0.56}
        path = tmp_path / f"{noisy_psnr}_{with_bm3d}.json"
        path.write_text(
            json.dumps({"rows": [{"scene": "powder", "dose": 5.0, "methods": methods}]})
        )
        return path

    def tables(bm3d_from: Path) -> subprocess.CompletedProcess:
        command = [BENCHMARKS / "fidelity.py", "--markdown", report(18.66, False)]
        return subprocess.run(
            [sys.executable, *command, "--bm3d-from", bm3d_from],
            capture_output=True,
            text=True,
            timeout=60,
        )

    same = tables(report(18.66, True))
    assert same.returncode == 0, same.stderr
    assert "37.58" in same.stdout
    other = tables(report(18.70, True))
    assert other.returncode != 0
    assert "powder at dose 5: its noisy frames score otherwise" in other.stderr


@pytest.mark.skipif(not HAS_BENCH, reason="the [bench] extra (bm3d, bm4d, pyFAI) is not installed")
def test_fidelity_runs(tmp_path):
    """Powder rings on an EIGER2 4M crop (pyFAI) and Bragg spots, every method scored on
    the same frames; the gaps stay unmeasured in what the daemon and offline N2S write."""
    stdout, report = run_benchmark(
        "fidelity.py",
        "--scenes",
        "powder",
        "spots",
        "--doses",
        "5",
        "--frames",
        "8",
        "--size",
        "64",
        "--powder-size",
        "128",
        "--score-every",
        "2",
        "--rate",
        "8",
        "--refine-timeout",
        "60",
        out=tmp_path / "fidelity.json",
        timeout=600,
    )
    powder, spots = report["rows"]
    assert (powder["scene"], spots["scene"]) == ("powder", "spots")
    assert powder["scored"] == spots["scored"] == 4
    methods = {"noisy", "tv", "bm3d", "live", "refined", "offline"}
    guarded = {f"{name}+{guard}" for name in ("live", "refined") for guard in FIDELITY_GUARDS}
    assert set(powder["methods"]) == methods | guarded
    noisy = powder["methods"]["noisy"]
    assert powder["methods"]["bm3d"]["psnr"] > noisy["psnr"] + 10
    assert abs(noisy["ring_bias_pct"]) < 3  # Poisson noise integrates away without bias
    assert powder["methods"]["live"]["psnr"] > noisy["psnr"] + 5
    assert all(powder["methods"][m]["masked_kept"] for m in guarded | {"live", "offline"})
    assert spots["methods"]["noisy"]["spots_found_pct"] > 90
    assert spots["methods"]["noisy"]["false_spots_per_frame"] > 0
    assert "ring_bias_pct" in stdout and "spots_found_pct" in stdout
    tables = subprocess.run(  # the Quantitative use page's tables, from this report
        [sys.executable, BENCHMARKS / "fidelity.py", "--markdown", tmp_path / "fidelity.json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    live_bias = powder["methods"]["live"]["ring_bias_pct"]
    assert f"| 5 | ring bias | {noisy['ring_bias_pct']:.2f} % |" in tables
    assert f" {live_bias:.2f} % |" in tables and "| 5 | spot bias |" in tables
    assert "| | PSNR (dB) |" in tables
