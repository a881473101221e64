#!/usr/bin/env bash
# CI: the fast test suite against the lowest supported versions (constraints-min.txt), in a venv of its own, on the
# lowest Python that pyproject.toml allows (PYTHON=python3.11 if `python3` is another version). The latest versions
# are tested by the main `.venv` (`make install`). Usage: scripts/ci_min_versions.sh [venv dir]
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
import sys
import tomllib

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

pins = {}
for line in open("constraints-min.txt"):
    line = line.split("#")[0].strip()
    if "==" in line:
        name, version = line.split("==")
        pins[name] = version
for name, version in pins.items():
    installed = metadata.version(name).split("+")[0]
    assert installed == version, f"{name}: installed {installed}, constraints-min.txt pins {version}"
# What is tested is what pyproject.toml states: each dependency's lower bound is pinned above, and this Python is the
# lowest that `requires-python` allows.
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for requirement in map(Requirement, project["dependencies"]):
    floors = [s.version for s in requirement.specifier if s.operator == ">="]
    assert floors and Version(floors[0]) == Version(pins.get(requirement.name, "0")), (
        f"pyproject.toml states {requirement}, constraints-min.txt pins {pins.get(requirement.name)}"
    )
python = ".".join(map(str, sys.version_info[:2]))
(floor,) = [s.version for s in SpecifierSet(project["requires-python"]) if s.operator == ">="]
assert Version(python) == Version(floor), f"Python {python}: pyproject.toml's lowest is {floor} (set PYTHON=python{floor})"
print("minimum versions:", f"python=={python},", ", ".join(f"{n}=={v}" for n, v in pins.items()))
PY
HF_HUB_OFFLINE=1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider
