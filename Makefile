# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= tiny
RUN_ARGS ?=

.PHONY: demo test venv clean-artifacts

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

venv: $(VENV)/.installed

## Run the whole pipeline headless (papermill) on PROFILE (default: tiny, CPU, minutes).
demo: venv
	$(PY) -m kormedgemma run --profile $(PROFILE) $(RUN_ARGS)

## Run the test suite.
test: venv
	$(PY) -m pytest -q

## Remove pipeline artifacts (data/raw, data/processed, models, runs); keeps bundled samples.
clean-artifacts:
	rm -rf data/raw/* data/processed/* data/bilingual_dict/* models/* runs/*
	touch data/raw/.gitkeep data/processed/.gitkeep data/bilingual_dict/.gitkeep models/.gitkeep runs/.gitkeep
