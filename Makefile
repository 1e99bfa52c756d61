# One command each for a fresh machine: `make demo` runs the main job, `make test` the tests.
# Both create the virtual environment in $(VENV) when there is none.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Pinned for the development machine and CI (these wheels are on its local disk); the package itself
# only asks for ranges (setup.cfg), so users elsewhere keep their own torch.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: venv demo test test-soak test-fast test-min docs lint format clean

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -e ".[test]" $(TORCH_PINS)
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) examples/train_swav.py $(ARGS)

test: $(VENV)/.installed
	CUDA_VISIBLE_DEVICES="" $(PY) -m pytest -q -m "not soak"

# The long tests (torchrun's elastic agents, 200 random kills, preempted multi-process runs, a queue resharded
# 2 -> 3, a model compiled by inductor, the benchmark scripts' smoke runs): about 5 minutes more, run by CI beside
# make test.
test-soak: $(VENV)/.installed
	CUDA_VISIBLE_DEVICES="" $(PY) -m pytest -q -m soak

# Everyday work: the suite without the example runs, subprocesses and multi-process runs (marked slow, distributed).
test-fast: $(VENV)/.installed
	CUDA_VISIBLE_DEVICES="" $(PY) -m pytest -q -m "not slow and not distributed and not soak"

# The lowest pytorch-ignite that setup.cfg declares, tried with the fast suite: Ignite is pure Python, so it is put
# in front of the venv's own on the path rather than installed into it.
IGNITE_FLOOR ?= 0.5.1
test-min: $(VENV)/.installed
	$(PY) -m pip install --quiet --upgrade --no-deps --target $(VENV)/ignite-floor pytorch-ignite==$(IGNITE_FLOOR)
	CUDA_VISIBLE_DEVICES="" PYTHONPATH=$(VENV)/ignite-floor $(PY) -m pytest -q -m "not slow and not distributed" \
		-p no:cacheprovider
	PYTHONPATH=$(VENV)/ignite-floor $(PY) -c "import ignite; assert ignite.__version__ == '$(IGNITE_FLOOR)', ignite.__version__"

# The API reference and the guides, from the docstrings, into docs/_build/html; warnings are errors.
docs: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[docs]" $(TORCH_PINS)
	$(VENV)/bin/sphinx-build -W --keep-going -q -b html docs docs/_build/html

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: $(VENV)/.installed
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache docs/_build
