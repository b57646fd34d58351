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


def test_the_output_layout_page_names_everything_a_written_output_holds(tmp_path):
    """The output layout page is written by hand: every group, dataset and attribute that
    the writers create (live frames with attribute columns, the process notes, refined
    frames) must appear in its overview tree, so the page cannot silently fall behind."""
    import re

    import h5py
    import numpy as np

    from n2s_stream.formats.writer import FrameWriter, OutputHeader, RefinedWriter

    output = tmp_path / "s_n2s.h5"
    header = OutputHeader(
        config_text="[daemon]\n",
        source="s",
        notes={"cold_start": "tv", "bluesky_start": "{}", "bluesky_data_key": "det"},
        attribute_names=["Temp"],
    )
    with FrameWriter(output, frame_shape=(4, 4), header=header) as writer:
        writer.append(
            np.zeros((2, 4, 4), np.float32),
            source_frames=[0, 1],
            model_version=0,
            t_received=1.0,
            attributes=[{"Temp": 1.0}, {"Temp": 2.0}],
        )
    refined = RefinedWriter(output, description="refined")
    refined.append(np.zeros((2, 4, 4), np.float32), 1)
    refined.close()

    names: set[str] = set()
    with h5py.File(output, "r") as handle:

        def visit(path: str, node: h5py.Group | h5py.Dataset) -> None:
            names.add(path.rsplit("/", 1)[-1])
            names.update(node.attrs)

        handle.visititems(visit)
    overview = (ROOT / "docs/reference/output-layout.md").read_text().split("## Overview")[1]
    overview = overview.split("\n## ")[0]
    names -= {"Temp"}  # an attribute column: the tree shows it as <name>
    assert {"source_frame", "refined", "meaning", "NX_class", "config"} <= names
    missing = sorted(name for name in names if not re.search(rf"(?<!\w){name}(?!\w)", overview))
    assert not missing, f"docs/reference/output-layout.md's overview lacks {missing}"


def test_the_wire_protocols_page_covers_every_protocol_and_refusal():
    """The wire protocols page is written by hand: each ``--zmq-protocol`` has a section,
    and every reason the decoders give a refused message has a row."""
    import re

    from n2s_stream.formats.protocols import PROTOCOLS

    page = (ROOT / "docs/reference/wire-protocols.md").read_text()
    for protocol in PROTOCOLS:
        assert f"### Protocol `{protocol}`" in page, protocol
    sources = "".join(
        (ROOT / "n2s_stream" / name).read_text()
        for name in ("formats/protocols.py", "formats/codecs.py", "sources/zmq.py")
    )
    reasons = set(re.findall(r'reason="([a-z_]+)"', sources))
    reasons |= set(re.findall(r'self\._reject\(\s*"([a-z_]+)"', sources))  # the source's own
    assert {"truncated", "bad_cbor", "size_mismatch", "too_large", "internal_error"} <= reasons
    missing = sorted(reason for reason in reasons if f"| `{reason}` |" not in page)
    assert not missing, f"docs/reference/wire-protocols.md has no row for {missing}"


def _png_text(path: Path) -> dict[str, str]:
    """The tEXt chunks of a PNG file."""
    import struct

    data, texts, position = path.read_bytes(), {}, 8
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        if data[position + 4 : position + 8] == b"tEXt":
            key, value = data[position + 8 : position + 8 + length].split(b"\0", 1)
            texts[key.decode("latin-1")] = value.decode("latin-1")
        position += 12 + length
    return texts


def test_every_benchmark_result_names_what_produced_it():
    """Each committed file in ``benchmarks/results`` names its commit, date, package
    versions, machine and command: a report in its ``provenance``, a plot in its PNG text
    chunk ``Provenance``, the soak trace on its first line. Prose never has to."""
    import json

    listed = subprocess.run(
        ["git", "ls-files", "benchmarks/results"], cwd=ROOT, capture_output=True, text=True
    )
    files = [ROOT / name for name in listed.stdout.split()]
    if not files:
        pytest.skip("not a git checkout")
    lacking = []
    for path in files:
        if path.suffix == ".json":
            provenance = json.loads(path.read_text()).get("provenance", {})
        elif path.suffix == ".png":
            provenance = json.loads(_png_text(path).get("Provenance", "{}"))
        elif path.suffix == ".jsonl":
            provenance = json.loads(path.read_text().split("\n", 1)[0]).get("provenance", {})
        else:
            provenance = {}
        if not all(provenance.get(k) for k in ("commit", "date", "versions", "command", "cpu")):
            lacking.append(path.relative_to(ROOT).as_posix())
    assert not lacking, f"results without provenance: {lacking}"
