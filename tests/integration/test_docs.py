"""The documentation site: its generated pages are fresh, it builds strict, and its home
and configuration pages render in a real headless Chromium."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.daemon import chromium_dom

ROOT = Path(__file__).parents[2]
MKDOCS = shutil.which("mkdocs", path=str(Path(sys.executable).parent))


def test_generated_pages_match_the_code_and_the_records():
    check = subprocess.run(
        [sys.executable, "docs/generate.py", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_every_option_and_metric_has_a_row():
    from prometheus_client import CollectorRegistry

    from n2s_stream.config import DaemonConfig
    from n2s_stream.options import options_of
    from n2s_stream.runtime.metrics import Metrics

    options = (ROOT / "docs/reference/options.md").read_text()
    for opt in options_of(DaemonConfig):
        assert f"| `{opt.name}` | " in options, opt.name
    metrics = (ROOT / "docs/reference/metrics.md").read_text()
    names = {family.name for family in Metrics(CollectorRegistry()).registry.collect()}
    assert {"n2s_frames_rejected", "n2s_worker_up", "n2s_build"} <= names
    missing = [name for name in names if f"| `{name}" not in metrics]
    assert not missing


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    if MKDOCS is None:
        pytest.skip("mkdocs not installed (pip install -e '.[docs]')")
    out = tmp_path_factory.mktemp("site")
    # not --quiet: it hides the warnings that --strict turns into a failure
    build = subprocess.run(
        [MKDOCS, "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    return out


def test_site_builds_strict_with_every_page(site):
    for page in ("index.html", "reference/options/index.html", "reference/api/index.html"):
        assert (site / page).exists(), page
    api = (site / "reference/api/index.html").read_text()
    assert "open_series" in api and "SinkChain" in api  # mkdocstrings read the code


@pytest.mark.browser
@pytest.mark.parametrize(
    ("page", "expected"),
    [
        ("index.html", "n2s-stream"),
        ("reference/options/index.html", "N2S_WATCH"),
        ("operations/configuration/index.html", "check-config"),
    ],
)
def test_page_renders_in_headless_chromium(site, tmp_path, page, expected):
    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        pytest.skip("no chromium (Debian: apt install chromium)")
    proc = chromium_dom((site / page).as_uri(), tmp_path / "ud", budget_ms=3000)
    dom = proc.stdout
    assert expected in dom, proc.stderr[-2000:]
    # the theme's script ran: Material marks the rendered page with its own attributes
    assert 'data-md-component="content"' in dom or "md-content" in dom, dom[:2000]


def test_every_test_the_docs_cite_exists():
    """A promise cites the test that checks it (``tests/x/test_y.py::test_z``): the file and
    a test of exactly that name (a name ending in ``_`` cites the family it starts) must
    exist, so a moved or renamed test cannot leave a promise pointing at nothing."""
    import re

    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    cited = {
        match
        for page in pages
        for match in re.findall(r"tests/[\w/]+\.py(?:::\w+)?", page.read_text())
    }
    assert len(cited) > 20  # the guarantees table alone cites more
    missing = []
    for citation in sorted(cited):
        path, _, name = citation.partition("::")
        source = ROOT / path
        family = r"\w*" if name.endswith("_") else r"\b"  # test_x_ names every test_x_*
        defined = source.is_file() and (
            not name
            or re.search(rf"^(async )?def {name}{family}", source.read_text(), re.MULTILINE)
        )
        if not defined:
            missing.append(citation)
    assert not missing, missing
