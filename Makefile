# Two commands do all set-up on a fresh clone:
#   make demo   train -> evaluate -> predict on real apple photos (../shared/data, or a download)
#   make test   the test suite
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install demo test bench

install:
	$(PIP) install -q --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1" || \
		$(PIP) install -q --disable-pip-version-check torch torchvision
	$(PIP) install -q --disable-pip-version-check -e ".[lite,serve,test]"

demo: install
	bash scripts/demo.sh

test: install
	$(PYTHON) -m pytest -q

bench: install
	$(PYTHON) benchmarks/grocery.py
	$(PYTHON) benchmarks/fruits360.py
