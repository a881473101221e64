"""The tests' own layout: helpers come from `testing_utils.py` and the references from `references.py`; no file under
`tests/` imports a test module or `conftest.py`, and the scripts run in the DeepSpeed and framework venvs (which have
neither pytest nor datasets) import no more than `tiny_llama.py` from here."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
# Run with another venv's python, which lacks pytest and datasets: of the tests folder they may import tiny_llama only.
LIGHT_SCRIPTS = [
    "dist_scripts/_deepspeed_setup.py",
    "dist_scripts/deepspeed_probe.py",
    "dist_scripts/deepspeed_trainer.py",
    "scripts/tiny_llm.py",
    "scripts/axolotl_check_config.py",
]
HEAVY = {"pytest", "datasets", "conftest", "testing_utils", "references"}


def imported_modules(source: str, filename: str = "<source>") -> list[tuple[int, str]]:
    """(line, top-level module) of every import in `source`, at any depth (inside functions too); relative imports
    are named by their dots."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, node.module.split(".")[0] if node.module and not node.level else "."))
    return found


def layout_violations(tests_dir: Path) -> list[str]:
    """'path:line imports X' for each import of a test module (test_*) or of conftest by a file under `tests_dir`."""
    out = []
    for path in sorted(tests_dir.rglob("*.py")):
        for line, module in imported_modules(path.read_text(), str(path)):
            if module == "conftest" or module.startswith("test_"):
                out.append(f"{path.relative_to(tests_dir)}:{line} imports {module}")
    return out


def test_no_file_imports_a_test_module_or_conftest():
    assert layout_violations(TESTS) == []


def test_the_check_sees_a_planted_import(tmp_path):
    """The check above can fail: a copy of the tests with imports planted, at module level and inside a function."""
    for path in TESTS.rglob("*.py"):
        target = tmp_path / path.relative_to(TESTS)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text())
    assert layout_violations(tmp_path) == []
    planted = tmp_path / "test_variants.py"
    lines = planted.read_text().count("\n")
    planted.write_text(planted.read_text() + "\n\ndef helper():\n    from test_trainer import windows_of\n")
    script = tmp_path / "scripts" / "resume_run.py"
    script.write_text("import conftest\n" + script.read_text())
    assert layout_violations(tmp_path) == [
        "scripts/resume_run.py:1 imports conftest",
        f"test_variants.py:{lines + 4} imports test_trainer",
    ]


def test_scripts_for_other_venvs_import_only_the_tiny_model():
    for name in LIGHT_SCRIPTS:
        modules = {module for _, module in imported_modules((TESTS / name).read_text(), name)}
        assert not modules & HEAVY, (name, modules & HEAVY)
    # The check can fail: the other scripts import the helpers, which need pytest's venv.
    resume = {module for _, module in imported_modules((TESTS / "scripts" / "resume_run.py").read_text())}
    assert resume & HEAVY == {"testing_utils"}
