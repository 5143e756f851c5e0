# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= tiny
RUN_ARGS ?=
LAB_ARGS ?=

SERVE_VENV ?= .venv-serve
LMEVAL_VENV ?= .venv-lmeval
PARITY_MODEL ?= models/final/instruct
PARITY_DATA ?= data/processed/kormedmcqa
PARITY_OUT ?= runs/harness_parity.json
PARITY_ARGS ?=

.PHONY: demo test test-slow test-all lint lab venv serve-env parity clean-artifacts

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

## The test suite's first tier (minutes): the linter, then everything but the tests marked slow.
test: venv lint
	$(PY) -m pytest -q -m "not slow"

## ruff (pyproject.toml's [tool.ruff]): pycodestyle, pyflakes, import order, over code, tests, notebooks.
lint: venv
	$(VENV)/bin/ruff check .

## The second tier: the whole tiny pipeline through papermill, multi-process (DDP, ZeRO-2) launches,
## kill-and-resume runs. CI runs it after `make test`.
test-slow: venv
	$(PY) -m pytest -q -m slow

## Both tiers in one run.
test-all: venv
	$(PY) -m pytest -q

## Optional: JupyterLab (requirements-lab.txt, into .venv) on the repository, to step through the
## notebooks; the project's kernel is registered inside .venv (--sys-prefix), nothing outside it.
## Headless machine: make lab LAB_ARGS="--no-browser --ip=127.0.0.1", then open the URL it prints.
lab: venv $(VENV)/.lab-installed
	$(PY) -m jupyter lab --notebook-dir=. $(LAB_ARGS)

$(VENV)/.lab-installed: $(VENV)/.installed requirements-lab.txt
	$(PY) -m pip install --quiet -r requirements-lab.txt
	$(PY) -m ipykernel install --sys-prefix --name kormedgemma --display-name "Python (kormedgemma .venv)"
	touch $@

## Serving environment for the GPU box: vLLM pins its own torch, so it gets its own venv.
## Then: $(SERVE_VENV)/bin/python -m kormedgemma serve --model models/final/korean_medgemma_awq --backend vllm --profile a5000
serve-env: $(SERVE_VENV)/.installed

$(SERVE_VENV)/.installed: requirements-serve.txt pyproject.toml
	$(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(SERVE_VENV)/bin/python -m pip install --quiet -r requirements-serve.txt
	$(SERVE_VENV)/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

## The evaluator against lm-evaluation-harness itself (lm_eval in its own venv, not a project
## dependency), question by question: PARITY_MODEL on the first 25 questions per subset of PARITY_DATA.
parity: venv $(LMEVAL_VENV)/.installed
	$(PY) -m kormedgemma parity --model $(PARITY_MODEL) --data $(PARITY_DATA) --out $(PARITY_OUT) \
		--lm-eval-python $(LMEVAL_VENV)/bin/python $(PARITY_ARGS)

$(LMEVAL_VENV)/.installed: requirements-lmeval.txt
	$(PYTHON) -m venv $(LMEVAL_VENV)
	$(LMEVAL_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LMEVAL_VENV)/bin/python -m pip install --quiet -r requirements-lmeval.txt
	touch $@

## Remove pipeline artifacts (data/raw, data/processed, models, runs); keeps bundled samples.
clean-artifacts:
	rm -rf data/raw/* data/processed/* data/bilingual_dict/* models/* runs/*
	touch data/raw/.gitkeep data/processed/.gitkeep data/bilingual_dict/.gitkeep models/.gitkeep runs/.gitkeep
