#!/usr/bin/env bash
# Creates the venv that tests/test_deepspeed.py's slow tests launch DeepSpeed in (CPU, gloo), outside the repo: the
# main .venv has no DeepSpeed (hf_sam must import and work without it). Usage:
#   scripts/deepspeed_venv.sh [VENV]       (default: $HF_SAM_DEEPSPEED_VENV, else `deepspeed` beside the framework
#                                           venvs: $HF_SAM_VENVS, $HF_SAM_CACHE/venvs or ~/.cache/hf_sam/venvs)
# Pinned and in this order: CPU torch first (an unpinned torch pulls a multi-GB CUDA build, and deepspeed's sdist
# builds against the torch it finds), then deepspeed with torch held at its pin, then hf_sam from this checkout,
# editable, with its dependencies (transformers, accelerate). The tests find the venv through HF_SAM_DEEPSPEED_PYTHON
# (its python), HF_SAM_DEEPSPEED_VENV or the default above, and skip without one. The first DeepSpeed launch also
# builds DeepSpeed's `deepspeed_shm_comm` op once (about 70 s, into ~/.cache/torch_extensions).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
VENVS="${HF_SAM_VENVS:-${HF_SAM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hf_sam}/venvs}"
VENV="${1:-${HF_SAM_DEEPSPEED_VENV:-$VENVS/deepspeed}}"
PYTHON="${PYTHON:-python3}"
TORCH="torch==2.13.0"
DEEPSPEED="deepspeed==0.19.8"
export PIP_DISABLE_PIP_VERSION_CHECK=1

start=$SECONDS
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q "$TORCH"
"$VENV/bin/python" -m pip install -q "$TORCH" "$DEEPSPEED"
"$VENV/bin/python" -m pip install -q "$TORCH" -e "$REPO"
DS_ACCELERATOR=cpu "$VENV/bin/python" -c "import deepspeed, torch, transformers, accelerate, hf_sam
print(f'torch {torch.__version__}, deepspeed {deepspeed.__version__}, transformers {transformers.__version__}, '
      f'accelerate {accelerate.__version__}')"
echo "deepspeed venv: $VENV in $((SECONDS - start)) s, $(du -sh "$VENV" | cut -f1)"
echo "tests: HF_SAM_DEEPSPEED_PYTHON=$VENV/bin/python .venv/bin/python -m pytest tests/test_deepspeed.py -m 'slow or not slow'"
