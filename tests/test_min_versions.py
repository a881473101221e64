"""The supported versions the README states are pyproject.toml's lower bounds, and those are the versions that the
minimum-versions CI run (scripts/ci_min_versions.sh) pins in constraints-min.txt and tests: a claim without a test
fails here, without the 10-minute run."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


def _floor(specifier: SpecifierSet) -> str:
    (floor,) = [s.version for s in specifier if s.operator == ">="]
    return floor


def test_readme_pyproject_and_the_minimum_versions_run_agree():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in (ROOT / "constraints-min.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[name] = version
    floors = {r.name: _floor(r.specifier) for r in map(Requirement, project["dependencies"])}
    assert set(floors) == set(pins) == {"torch", "transformers", "accelerate"}
    for name, floor in floors.items():
        assert Version(floor) == Version(pins[name]), (name, floor, pins[name])
    python = _floor(SpecifierSet(project["requires-python"]))
    (supported,) = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("Supported:")]
    assert f"Python ≥ {python}," in supported and f"Python {python}," in supported
    for name, floor in floors.items():
        assert f"{name} ≥ {floor}," in supported or f"{name} ≥ {floor} " in supported, name
        assert f"{name} {pins[name]}" in supported, name  # the tested version, named
