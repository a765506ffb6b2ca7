# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of PyTorch goes in first, so the project's torch range is already met
# and no multi-GB CUDA build is pulled.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= torch,tensorflow,dashboard,postgres,dev

.PHONY: demo test bench venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

demo: venv
	$(VENV)/bin/autobatch tune digits-cnn --backend torch --memory-budget 1GiB --trials 12 --study-name demo-digits-cnn

test: venv
	$(PY) -m pytest

bench: venv
	$(PY) -m pip install -q -e ".[$(EXTRAS),bench]"
	$(PY) benchmarks/probe.py --quick

clean:
	rm -rf $(VENV) build *.egg-info autobatch.db
