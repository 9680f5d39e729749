# Everything runs inside a virtual environment in the project (.venv), created on first use.
#   make repro   set up, then run the whole DVC pipeline (dvc repro) on the embedded default data set
#   make faces   set up, then the faces experiment (experiments/faces) on ../shared/data/orl
#   make lfw-dev the lfw-dev experiment (experiments/lfw-dev) on ../shared/data/lfw-dev (faces in the wild)
#   make test    set up, then lint and run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup build repro faces faces-seeds lfw-dev lfw-dev-seeds test pytest lint format cuda-check bench-quick gpu-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py $(shell find csrc -type f 2>/dev/null)
	test -x $(PY) || $(PYTHON) scripts/check_free_space.py $(VENV)  # a first install: room for torch?
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "torch>=2.4" "torchvision>=0.19" "setuptools>=64" wheel "ninja>=1.11"
	$(PY) -m pip install -q --disable-pip-version-check --no-build-isolation -e ".[dev,serve,pipeline]"
	$(PY) -c "import angular.ops as o; print('angular backend:', o.backend())"
	touch $@

# Rebuild the extension in place after editing csrc/ (what `make setup` does on a fresh checkout).
build: setup
	$(PY) setup.py -q build_ext --inplace

# DVC runs each stage as `python -m pipeline.<stage>`: the venv's python must come first on PATH.
repro: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro

# The faces experiment: the same stages on the ORL faces, in experiments/faces (docs/faces.md).
FACES := experiments/faces

faces: setup
	$(PY) $(FACES)/check_data.py
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro $(FACES)/dvc.yaml

# Three seeds of it, outside DVC; writes $(FACES)/seeds.md (the table of docs/faces.md).
faces-seeds: setup
	$(PY) $(FACES)/seeds.py

# The lfw-dev experiment: the same stages on ../shared/data/lfw-dev (faces in the wild), in
# experiments/lfw-dev (docs/faces.md, "Faces in the wild"); and three seeds of it.
LFW_DEV := experiments/lfw-dev

lfw-dev: setup
	$(PY) $(FACES)/check_data.py --experiment lfw-dev
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro $(LFW_DEV)/dvc.yaml

lfw-dev-seeds: setup
	$(PY) $(FACES)/seeds.py --experiment lfw-dev

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

pytest: setup
	$(PY) -m pytest -q -ra

test: lint pytest

# Compile (and link) the CUDA kernels with nvcc; needs no GPU. A .cu that does not compile fails.
cuda-check: setup
	bash scripts/check_cuda_build.sh

bench-quick: setup
	$(PY) benchmarks/bench_margin.py --quick

# On a machine with an NVIDIA GPU: build, CUDA tests, benchmarks; results under $$OUT (or ./gpu-results).
gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf build angular/ops/_C*.so angular/_C*.so *.egg-info
