# `make demo`: set up a local virtual environment and run the main job.
# `make test`: set up the same environment and run the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,data]'
	touch $@

.PHONY: setup demo test verify
setup: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/minisam demo

verify: $(VENV)/.installed
	$(VENV)/bin/minisam verify reference_results/*.npz

test: $(VENV)/.installed
	$(PY) -m pytest -q
