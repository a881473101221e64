"""The README's first screen: its "which method when" numbers are the benefit benchmark's; docs/index.md repeats it."""

from __future__ import annotations

import dataclasses
import json

import pytest
from testing_utils import REPO, load_benchmark_script

which_method = load_benchmark_script("which_method")


def test_readme_and_docs_index_carry_what_the_result_files_give():
    # fails (naming the file) when a result file, a row or the README's first screen changed without the other
    assert which_method.main(["--check"]) == 0


def test_a_changed_result_changes_the_table(tmp_path):
    # the control: the table is computed from the files, so a different accuracy gives a different cell
    row = which_method.ROWS[0]
    runs = [json.loads(path.read_text())["runs"] for path in row.files]
    for part in runs:
        for r in part:
            if r["task"] == row.task and r["noise"] == row.noise and r["method"] == row.method:
                r["accuracy"] += 0.05
    files = []
    for i, part in enumerate(runs):
        files.append(tmp_path / f"{i}.json")
        files[-1].write_text(json.dumps({"runs": part}))
    before, _, _ = which_method.measure(row)
    after, _, _ = which_method.measure(dataclasses.replace(row, files=tuple(files)))
    assert after["mean"] - before["mean"] == pytest.approx(0.05)
    assert after["n"] == before["n"] >= 5  # the README cites this row: five seeds or more


def test_the_first_screen_says_what_was_never_run_and_how_to_measure():
    readme = (REPO / "README.md").read_text()
    first = readme[: readme.index("<!-- first-screen:end -->")]
    assert len(first.splitlines()) < 80
    for needed in ("## Status", "Never run", "GPU", "benchmarks/gpu_check.py", "## Which method when", "## Install"):
        assert needed in first, needed
    # the findings are at most five bullets
    findings = first[first.index("## What the benefit study found") : first.index("## Install")]
    assert sum(line.startswith("- ") for line in findings.splitlines()) <= 5
    assert "hf-sam compare" in readme[: readme.index("## Settings")]
