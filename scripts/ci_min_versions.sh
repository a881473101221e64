#!/usr/bin/env bash
# CI: the fast test suite against the lowest supported versions (constraints-min.txt), in a venv of its own.
# The latest versions are tested by the main `.venv` (`make install`). Usage: scripts/ci_min_versions.sh [venv dir]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-${MIN_VENV:-${TMPDIR:-/tmp}/hf_sam-venv-min}}"
PYTHON="${PYTHON:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# torch first and pinned: the local CPU wheel installs in seconds, an unpinned torch pulls a multi-GB CUDA build.
"$VENV/bin/python" -m pip install -q "$(grep -E '^torch==' constraints-min.txt)"
"$VENV/bin/python" -m pip install -q -c constraints-min.txt -e ".[test]"
"$VENV/bin/python" - <<'PY'
import importlib.metadata as metadata

pins = {}
for line in open("constraints-min.txt"):
    line = line.split("#")[0].strip()
    if "==" in line:
        name, version = line.split("==")
        pins[name] = version
for name, version in pins.items():
    installed = metadata.version(name).split("+")[0]
    assert installed == version, f"{name}: installed {installed}, constraints-min.txt pins {version}"
print("minimum versions:", ", ".join(f"{n}=={v}" for n, v in pins.items()))
PY
HF_HUB_OFFLINE=1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider
