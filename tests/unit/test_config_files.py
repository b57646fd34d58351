"""Shipped configuration: the commented TOML, Grafana dashboard and check-config."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from n2s_stream.cli import config_template
from n2s_stream.config import DaemonConfig, DenoiseConfig, TrainConfig
from n2s_stream.options import options_of
from n2s_stream.runtime.metrics import Metrics

CONFIG = Path(__file__).parents[2] / "config"


def _table_keys(text: str, table: str) -> set[str]:
    body = text.split(f"[{table}]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^#?\s*([a-z_0-9]+)\s*=", body, flags=re.MULTILINE))


def test_default_config_is_the_generated_template_of_every_option():
    """The shipped file is what `check-config --template` makes from the declarations,
    so it documents every option of every command at its default."""
    text = (CONFIG / "n2s-stream.toml").read_text()
    assert text == config_template(), "regenerate: n2s-stream check-config --template"
    for table, cls in (
        ("daemon", DaemonConfig),
        ("train", TrainConfig),
        ("denoise", DenoiseConfig),
    ):
        names = {o.name for o in options_of(cls) if not o.positional}
        assert names == _table_keys(text, table), table


def test_check_config(tmp_path):
    ok = subprocess.run(
        [sys.executable, "-m", "n2s_stream", "check-config", str(CONFIG / "n2s-stream.toml")],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0 and "OK" in ok.stdout, ok.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[daemon]\nwatch = '/acq'\nmetrics_prot = 9000\n")
    proc = subprocess.run(
        [sys.executable, "-m", "n2s_stream", "check-config", str(bad)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "unknown option 'metrics_prot'" in proc.stderr
    bad.write_text("[daemon]\nqueue_size = 'many'\n")
    proc = subprocess.run(
        [sys.executable, "-m", "n2s_stream", "check-config", str(bad)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "queue_size" in proc.stderr


def test_dashboard_uses_only_exported_metrics():
    dashboard = json.loads((CONFIG / "grafana" / "n2s-stream-dashboard.json").read_text())
    assert dashboard["uid"] == "n2s-stream-overview"
    registry = CollectorRegistry()
    Metrics(registry)
    exported = generate_latest(registry).decode()
    names = set(re.findall(r"^# TYPE (\S+)", exported, flags=re.MULTILINE))
    series = names | {n + s for n in names for s in ("_total", "_bucket", "_count", "_sum")}
    used = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            used |= set(re.findall(r"\b(n2s_[a-z_]+)", target["expr"]))
    assert used and used <= series, used - series
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for topic in ("frames per second", "latency", "queue", "loss", "model version", "reason"):
        assert topic in titles
    assert (CONFIG / "grafana" / "provisioning.yaml").read_text().startswith("# Grafana")
