#!/usr/bin/env bash
# Creates the framework venvs that tests/test_integrations.py's slow tests run in, outside the repo (each framework
# pins its own transformers/TRL/peft, so none can share the main .venv). Usage:
#   scripts/framework_venvs.sh [axolotl] [llamafactory]      (default: both)
# Venvs go to $HF_SAM_VENVS, else $HF_SAM_CACHE/venvs, else ~/.cache/hf_sam/venvs; the tests look there too.
# Each venv: CPU torch first and pinned (an unpinned torch pulls a multi-GB CUDA build), then the framework at a pinned
# version, then hf_sam from this checkout without deps (the framework's transformers is the one under test).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
VENVS="${HF_SAM_VENVS:-${HF_SAM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hf_sam}/venvs}"
PYTHON="${PYTHON:-python3}"
TORCH="torch==2.13.0"
AXOLOTL="axolotl==0.19.0"
LLAMAFACTORY="llamafactory==0.9.5"
# LLaMA-Factory 0.9.5's own requirements (its wheel metadata) with one change: it caps transformers at <=5.6.0, below
# hf_sam's minimum 5.10.1, so it is installed with --no-deps and transformers is lifted into hf_sam's range. Run it with
# DISABLE_VERSION_CHECK=1 (its runtime check repeats the cap). Below 5.23: from 5.23.0 on, transformers' checkpointed
# layers call `partial(forward, self)`, which LLaMA-Factory's gradient checkpointing cannot handle ("'function' object
# has no attribute '__self__'", also without SAM).
LLAMAFACTORY_DEPS=(
    "transformers>=5.10.1,<5.23" "trl>=0.18.0,<=0.24.0" "peft>=0.18.0,<=0.18.1" "accelerate>=1.3.0,<=1.11.0"
    "datasets>=2.16.0,<=4.0.0" "av>=10.0.0,<=16.0.0" "gradio>=4.38.0,<=5.50.0" "torchdata>=0.10.0,<=0.11.0"
    "tyro<0.9.0" einops fastapi fire hf-transfer "matplotlib>=3.7.0" modelscope numpy omegaconf packaging pandas
    protobuf pydantic pyyaml safetensors scipy sentencepiece sse-starlette tiktoken torchaudio torchvision uvicorn
)
export PIP_DISABLE_PIP_VERSION_CHECK=1

make_venv() {  # name, a requirement to install with --no-deps ("" for none), then requirements with their deps
    local name="$1" venv="$VENVS/$1" start=$SECONDS
    shift
    mkdir -p "$VENVS"
    [ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q "$TORCH"
    "$venv/bin/python" -m pip install -q "$TORCH" "${@:2}"
    [ -z "$1" ] || "$venv/bin/python" -m pip install -q --no-deps "$1"
    "$venv/bin/python" -m pip install -q --no-deps -e "$REPO"
    echo "$name: $venv in $((SECONDS - start)) s, $(du -sh "$venv" | cut -f1)"
}

# PyPI's torchvision and torchaudio wheels are CUDA builds: against the CPU torch they fail to load (torchaudio:
# "libc10_cuda.so: cannot open shared object file"; torchvision: "operator torchvision::nms does not exist", which
# breaks `import transformers.modeling_utils`). LLaMA-Factory imports torchaudio at module level, for audio inputs
# only: remove both and leave a stub torchaudio that fails on use. Text-only training is unaffected.
stub_torchaudio() {
    local venv="$VENVS/$1" site
    "$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio
    site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    mkdir -p "$site/torchaudio"
    cat >"$site/torchaudio/__init__.py" <<'PY'
"""Stub from hf_sam's scripts/framework_venvs.sh: PyPI's torchaudio is a CUDA build that cannot load against this
venv's CPU torch. LLaMA-Factory imports torchaudio at module level but uses it for audio inputs only."""


def __getattr__(name):
    raise ImportError(f"torchaudio.{name}: this venv has a stub torchaudio (text-only tests); install a real build")
PY
}

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(axolotl llamafactory)
for target in "${targets[@]}"; do
    case "$target" in
        axolotl) make_venv axolotl "" "$AXOLOTL" ;;
        llamafactory)
            make_venv llamafactory "$LLAMAFACTORY" "${LLAMAFACTORY_DEPS[@]}"
            stub_torchaudio llamafactory
            ;;
        *)
            echo "unknown framework '$target'; valid: axolotl, llamafactory" >&2
            exit 2
            ;;
    esac
done
