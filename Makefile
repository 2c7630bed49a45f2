# `make demo`: set up a local virtual environment with what the demo needs, run the main job.
# `make test`: set up the same environment with the test and data extras, run the tests
# (then the gpu-marked ones again on the GPU code path, under the strict CuPy stand-in).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.venv-made:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	touch $@

# the demo needs numpy, tqdm and matplotlib (the plots extra); no TensorFlow
$(VENV)/.demo-installed: pyproject.toml $(VENV)/.venv-made
	$(PY) -m pip install --quiet -e '.[plots]'
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.venv-made
	$(PY) -m pip install --quiet -e '.[dev,data]'
	touch $@

.PHONY: setup demo test verify
setup: $(VENV)/.installed

demo: $(VENV)/.demo-installed
	$(VENV)/bin/minisam demo

verify: $(VENV)/.demo-installed
	$(VENV)/bin/minisam verify reference_results/*.npz

# then the gpu-marked tests once more, under the strict CuPy stand-in (tests/standin)
test: $(VENV)/.installed
	$(PY) -m pytest -q
	MINISAM_STRICT_CUPY=1 $(PY) -m pytest -q -m gpu -p no:cacheprovider
