# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of PyTorch goes in first, so the project's torch range is already met
# and no multi-GB CUDA build is pulled.
TORCH_SPEC ?= torch==2.13.0
# Likewise TensorFlow's CPU build (x86_64 only; elsewhere the one `tensorflow` build is the CPU build),
# installed in place of the `tensorflow` extra, whose full build would pull GPU libraries.
TENSORFLOW_SPEC ?= $(if $(filter x86_64,$(shell uname -m)),tensorflow-cpu>=2.16,tensorflow>=2.16)
EXTRAS ?= torch,dashboard,postgres,studies,lightning,huggingface,dev

.PHONY: demo test test-all test-gpu lint bench venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" "$(TENSORFLOW_SPEC)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

demo: venv
	$(VENV)/bin/autobatch tune digits-cnn --backend torch --memory-budget 1GiB --horizon 20ep --trials 12 --study-name demo-digits-cnn-20ep

# The default run, CI's: everything but the `extended` end-to-end runs, whose guarantees faster
# tests check too (each says which beside its marker); `make test-all` adds them (about 6 minutes more).
test: venv
	$(PY) -m pytest -m "not extended"

test-all: venv
	$(PY) -m pytest

# The GPU tests, on a machine with an NVIDIA GPU and its driver: a separate venv with the CUDA
# builds (several GB from the package index), then the `gpu` marker. There a GPU that NVML sees
# but a framework cannot use fails the run instead of skipping.
GPU_VENV := .venv-gpu
TORCH_GPU_SPEC ?= torch>=2.3
TENSORFLOW_GPU_SPEC ?= tensorflow[and-cuda]>=2.16
test-gpu:
	$(PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install -q --upgrade pip
	$(GPU_VENV)/bin/python -m pip install -q "$(TORCH_GPU_SPEC)" "$(TENSORFLOW_GPU_SPEC)"
	$(GPU_VENV)/bin/python -m pip install -q -e ".[dashboard,postgres,dev]"
	AUTOBATCH_REQUIRE_GPU=1 $(GPU_VENV)/bin/python -m pytest -m gpu

# What CI checks before the tests: lint, formatting, and types of the framework-free library.
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: venv
	$(PY) -m pip install -q -e ".[$(EXTRAS),bench]"
	$(PY) benchmarks/probe.py --quick

clean:
	rm -rf $(VENV) $(GPU_VENV) build *.egg-info autobatch.db
