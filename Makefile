# Everything a fresh machine needs. torch is pinned to the CPU wheel that lies on disk
# and installed before the package, so pip never pulls a multi-GB CUDA build.
VENV ?= .venv
PEER_VENV ?= .venv-peers
TILED_VENV ?= .venv-tiled
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup demo test test-unit test-integration test-slow test-faults test-browser lint docs docs-pages docs-serve bench bench-full bench-context \
	bench-soak bench-peers bench-scale gpu-wheels tiled-venv clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev,docs,interop,bench]"
	touch $@

demo: setup
	$(VENV)/bin/n2s-stream demo

test: setup tiled-venv
	$(PY) -m pytest -q -n 2 --dist worksteal $(PYTEST_ARGS)

# One kind of test at a time (docs/contributing.md, Tests): the in-process units, or the
# daemon, the commands and their peers as real processes.
test-unit: setup
	$(PY) -m pytest -q tests/unit $(PYTEST_ARGS)

test-integration: setup tiled-venv
	$(PY) -m pytest -q -n 2 --dist worksteal tests/integration $(PYTEST_ARGS)

# A Tiled server for tests/integration/test_tiled.py (about 1 GB of packages the daemon
# never needs: its own venv); where it cannot be installed, that test is skipped.
tiled-venv: $(TILED_VENV)/.installed

$(TILED_VENV)/.installed:
	(python3 -m venv $(TILED_VENV) && $(TILED_VENV)/bin/pip install --quiet \
		"tiled[server]==0.2.20" && touch $@) \
		|| echo "Tiled server not installed: tests/integration/test_tiled.py will be skipped"

test-slow: setup
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

test-faults: setup
	$(PY) -m pytest -q -m "faults or slow" tests/faults $(PYTEST_ARGS)

test-browser: setup
	$(PY) -m pytest -q -m browser tests/integration/test_preview.py $(PYTEST_ARGS)

# What CI checks besides the tests: ruff's lint and format, and mypy on the package.
lint: setup
	$(VENV)/bin/ruff check n2s_stream tests benchmarks docs/generate.py
	$(VENV)/bin/ruff format --check n2s_stream tests benchmarks docs/generate.py
	$(VENV)/bin/mypy n2s_stream

# The documentation site: generated pages must be fresh, and the build strict (a broken
# link or a page missing from the nav fails; never --quiet, which hides the warnings that
# --strict counts). `make docs-serve` shows it on :8000.
docs: setup
	$(PY) docs/generate.py --check
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

docs-pages: setup
	$(PY) docs/generate.py

docs-serve: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve

# Every benchmark on small settings, in about 9 minutes on 2 cores, into
# benchmarks/results/quick/: their pages are under Benchmark records in the docs.
QUICK := benchmarks/results/quick
bench: setup
	mkdir -p $(QUICK)
	$(PY) benchmarks/machine_noise.py --seconds 20 --out $(QUICK)/machine_noise.json
	$(PY) benchmarks/offline_quality.py --doses 20 --budget 20 --tiles 16 --out $(QUICK)/offline_quality.json
	$(PY) benchmarks/online_quality.py --tiles 16 --rate 0.5 --offline-budget 20 --out $(QUICK)/online_quality.json
	$(PY) benchmarks/daemon_memory.py --frames 120 --idle-seconds 5 --no-cold-start \
		--out $(QUICK)/daemon_memory.json
	$(PY) benchmarks/daemon_throughput.py --sizes 256 512 --flat-seconds 5 --paced-seconds 5 \
		--out $(QUICK)/daemon_throughput.json
	$(PY) benchmarks/daemon_vs_offline.py --frames 200 --variants daemon \
		--out $(QUICK)/daemon_vs_offline.json
	$(PY) benchmarks/zmq_throughput.py --sizes 256 --frames 200 --e2e-frames 40 --workers 1 2 \
		--out $(QUICK)/zmq_throughput.json
	$(PY) benchmarks/pva_throughput.py --sizes 512 --seconds 5 --e2e-seconds 10 \
		--out $(QUICK)/pva_throughput.json
	$(PY) benchmarks/model_speed.py --sizes 256 512 --seconds 1 --out $(QUICK)/model_speed.json
	$(PY) benchmarks/profile_model.py --sizes 256 --passes 10 --rounds 4 --round-seconds 1 \
		--out $(QUICK)/profile_model.json
	$(PY) benchmarks/detector_scale.py --sizes 1M --frames 60 --network-frames 2 \
		--forward-seconds 2 --repeat 1 --precision-crop 256 --out $(QUICK)/detector_scale.json

# The README's main tables, as committed under benchmarks/results/ (about 40 minutes).
bench-full: setup
	$(PY) benchmarks/machine_noise.py
	$(PY) benchmarks/offline_quality.py
	$(PY) benchmarks/online_quality.py
	$(PY) benchmarks/daemon_memory.py --no-cold-start
	$(PY) benchmarks/daemon_throughput.py
	$(PY) benchmarks/daemon_vs_offline.py
	$(PY) benchmarks/zmq_throughput.py
	$(PY) benchmarks/pva_throughput.py
	$(PY) benchmarks/model_speed.py
	$(PY) benchmarks/profile_model.py

bench-context: setup
	$(PY) benchmarks/context_quality.py --budget 150 --sweep-budget 45

# The peer (CAREamics Noise2Void) pins an older torch than ours, which PyPI only has as a
# CUDA build (~5 GB with its libraries): it gets its own venv, never the runtime's.
$(PEER_VENV)/.installed:
	python3 -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/pip install --quiet --upgrade pip
	$(PEER_VENV)/bin/pip install --quiet "careamics==0.3.5"
	touch $@

bench-peers: setup $(PEER_VENV)/.installed
	$(PY) benchmarks/peer_quality.py --peer-python $(PEER_VENV)/bin/python

bench-soak: setup
	$(PY) benchmarks/soak.py --minutes 10

# Detector sizes (EIGER2 4M and 16M) end to end on this machine: about 10 minutes.
bench-scale: setup
	$(PY) benchmarks/detector_scale.py

# Wheels of what the GPU machine lacks (it has torch and h5py, and cannot download), for
# benchmarks/gpu_check.sh; the `device` tool carries .whl/ (64 MiB at most with the tree).
gpu-wheels:
	rm -rf .whl && mkdir -p .whl
	python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
		--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
		hdf5plugin==4.4.0 bitshuffle==0.5.2 lz4 pyzmq cbor2 watchdog
	du -sh .whl

clean:
	rm -rf $(VENV) $(PEER_VENV) $(TILED_VENV) runs demo-output .pytest_cache
