"""The shipped alert rules and Grafana dashboard against the real programs: promtool's own
unit tests of the rules, and a real Prometheus (Debian's package) on loopback scraping a
running daemon, evaluating every dashboard and alert expression through its HTTP API."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import zmq

from n2s_stream.formats import protocols
from tests.helpers.daemon import STARTED, DaemonProcess, frames_in, free_port

CONFIG = Path(__file__).parents[2] / "config"
PROMETHEUS, PROMTOOL = shutil.which("prometheus"), shutil.which("promtool")
pytestmark = pytest.mark.skipif(
    not (PROMETHEUS and PROMTOOL), reason="no prometheus (Debian: apt install prometheus)"
)


def test_alert_rules_pass_promtool_check_and_unit_tests():
    check = subprocess.run(
        [PROMTOOL, "check", "rules", "prometheus-alerts.yaml"],
        cwd=CONFIG,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0 and "SUCCESS: 13 rules found" in check.stdout, check.stdout
    unit = subprocess.run(
        [PROMTOOL, "test", "rules", "prometheus-alerts.test.yaml"],
        cwd=CONFIG,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert unit.returncode == 0 and "SUCCESS" in unit.stdout, unit.stdout + unit.stderr


def _prometheus_config(target_port: int) -> str:
    """The shipped scrape job (1 s interval, the test daemon's port) and alert rules."""
    job = (CONFIG / "prometheus-scrape.yaml").read_text()
    job = job.replace("127.0.0.1:9750", f"127.0.0.1:{target_port}")
    job = job.replace("scrape_interval: 5s", "scrape_interval: 1s")
    indented = "\n".join("  " + line for line in job.splitlines() if not line.startswith("#"))
    return (
        f"global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f'rule_files: ["{CONFIG / "prometheus-alerts.yaml"}"]\n'
        f"scrape_configs:\n{indented}\n"
    )


def _query(port: int, expr: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as reply:
        body = json.loads(reply.read())
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


def _up(port: int) -> bool:
    try:
        result = _query(port, 'up{job="n2s-stream"}')
    except OSError:
        return False  # not listening yet
    return bool(result) and result[0]["value"][1] == "1"


def _wait(condition, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.5)


def _feed(endpoint: str) -> None:
    """Frames 0, 1, 2, 4 of one series (a gap), one undecodable message, then the end."""
    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    push.bind(endpoint)
    rng = np.random.default_rng(0)
    try:
        for index in (0, 1, 2, 4):
            push.send_multipart(
                protocols.native_frame(
                    "scan_0001", index, rng.poisson(20, (32, 32)).astype(np.uint16)
                )
            )
        push.send_multipart([b"not json"])
        push.send_multipart(protocols.native_end("scan_0001", 5))
    finally:
        push.close(linger=10_000)
        context.term()


def test_dashboard_and_alert_expressions_return_data_from_a_real_prometheus(tmp_path):
    endpoint, tee = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    daemon = DaemonProcess(
        tmp_path / "d", "--zmq", endpoint, "--zmq-tee", tee, "--publish-every", "5"
    )
    daemon.wait_ready()
    prom_port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(_prometheus_config(daemon.port))
    check = subprocess.run(
        [PROMTOOL, "check", "config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr
    prometheus = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
            "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "prometheus.log", "w"),  # noqa: SIM115 (closed with the process)
    )
    STARTED.append(prometheus)
    try:
        _wait(lambda: _up(prom_port), seconds=60)  # scraped before the frames: increase()
        _feed(endpoint)  # sees the counters move
        daemon.wait_for_ended(1, timeout=90)
        assert frames_in(daemon.output("scan_0001_n2s.h5")) == 4
        _wait(
            lambda: (
                _query(prom_port, 'n2s_frames_denoised_total{job="n2s-stream"}')
                and float(_query(prom_port, "n2s_frames_denoised_total")[0]["value"][1]) == 4
            ),
            seconds=60,
        )
        time.sleep(5)  # a few more scrapes: rate() over [1m] needs two points at least
        checked = (_check_dashboard(prom_port), _check_alerts(prom_port))
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=30)
        status = daemon.terminate()
    assert status == 0, daemon.log()[-2000:]
    print(f"expressions checked against Prometheus: dashboard {checked[0]}, alerts {checked[1]}")
    assert checked == (22, 13)


def _check_dashboard(port: int) -> int:
    """Every panel expression returns data, with the labels its aggregation keeps."""
    dashboard = json.loads((CONFIG / "grafana" / "n2s-stream-dashboard.json").read_text())
    count = 0
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"].replace("$instance", ".*")
            result = _query(port, expr)
            assert result, f"{panel['title']}: {expr} returned no data"
            kept = re.search(r"by \(([^)]*)\)", expr)
            expected = (
                {"instance", "job"}
                if kept is None
                else {name.strip() for name in kept.group(1).split(",")} - {"le"}
            )
            for series in result:
                assert expected <= set(series["metric"]), (expr, series["metric"])
            count += 1
    return count


def _check_alerts(port: int) -> int:
    """Every alert expression is valid PromQL on the real server, and every series it
    selects exists in the daemon's scrape with the labels the rule uses."""
    text = (CONFIG / "prometheus-alerts.yaml").read_text()
    exprs = re.findall(r"^\s+expr: (.+)$", text, flags=re.MULTILINE)
    for expr in exprs:
        _query(port, expr)  # valid, evaluates (empty when not firing)
        for name, selector in re.findall(r"\b((?:n2s|process|up)\w*)(\{[^}]*\})", expr):
            result = _query(port, name + selector)
            assert result, f"{name}{selector} (in {expr}) has no series"
            for series in result:
                assert {"job", "instance"} <= set(series["metric"]), series["metric"]
                if name == "n2s_worker_up":
                    assert series["metric"]["worker"] in {
                        "source",
                        "inference",
                        "trainer",
                        "refiner",
                        "http",
                    }
    _wait(
        lambda: _query(port, 'ALERTS{alertname="N2SFramesMissing", alertstate="firing"}'),
        seconds=30,
    )  # the gap fed in raises its alert on the real server
    return len(exprs)
