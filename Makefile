# One command each for a fresh machine: `make demo` runs the main job, `make test` the tests.
# Both create the virtual environment in $(VENV) when there is none.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Pinned for the development machine and CI (these wheels are on its local disk); the package itself
# only asks for ranges (setup.cfg), so users elsewhere keep their own torch.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: venv demo test docs lint format clean

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
	CUDA_VISIBLE_DEVICES="" $(PY) -m pytest -q

# The API reference and the guides, from the docstrings, into docs/_build/html; warnings are errors.
docs: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[docs]" $(TORCH_PINS)
	$(VENV)/bin/sphinx-build -W --keep-going -q -b html docs docs/_build/html

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.installed
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache docs/_build
