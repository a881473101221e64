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


def test_the_advice_column_says_what_the_runs_did():
    """The advice is typed, not computed: its ρ and its counts of runs stuck at one class, against the runs."""
    import re
    import statistics
    import sys

    sys.path.insert(0, str(REPO / "examples"))
    from embedded.sentiment import make_sentiment_task

    labels = make_sentiment_task()["test"]["label"]  # the study's test split (split seed 0)
    one_class_scores = [statistics.fmean(label == c for label in labels) for c in (0, 1)]

    def tested(task, noise, method):
        return [r for r in which_method.reported_runs(which_method.TUNED_STUDY[0])
                if (r["task"], r["noise"], r["method"], r.get("phase")) == (task, noise, method, "test")]  # fmt: skip

    def stuck(runs):  # at one class: the score of predicting one label everywhere, within one point
        return sum(min(abs(r["accuracy"] - s) for s in one_class_scores) < 0.01 for r in runs)

    sam, asam = tested("sentiment_minilm", 0.4, "sam"), tested("sentiment_minilm", 0.4, "asam")
    asam_45 = tested("sentiment_minilm", 0.45, "asam")
    assert {r["rho"] for r in sam} == {0.1} and {r["rho"] for r in asam + asam_45} == {1.0}
    advice = which_method.NOISY_FULL.advice
    assert f"SAM at its 0.1 on {stuck(sam)} of {len(sam)} seeds, ASAM at 1.0 on {stuck(asam)} of {len(asam)}" in advice
    assert f"ASAM's 1.0 stayed at one class on {stuck(asam_45)} of {len(asam_45)}" in advice
    assert stuck(tested("sentiment_minilm", 0.4, "adamw")) == 0  # the control: the rule does not count every run
    checked = 0
    for row in which_method.ROWS:  # a tuned row's own ρ, where its advice names one
        named = re.match(r"A?SAM,? ρ ([0-9.]+)", row.advice)
        if row.phase == "test" and named:
            assert {r["rho"] for r in row.runs() if r["method"] == row.method} == {float(named[1])}, row.advice
            checked += 1
    assert checked >= 4
    searched = {r["rho"] for r in json.loads(which_method.TUNED_STUDY[0].read_text())["runs"]
                if (r["task"], r["method"], r.get("phase")) == ("fewshot_smollm", "sam", "select")}  # fmt: skip
    assert f"no ρ from {min(searched):g} to {max(searched):g} helped" in which_method.ROWS[-2].advice


def test_the_early_stopping_advice_quotes_its_first_and_its_fresh_seeds_from_the_runs(tmp_path):
    """The advice's lead over the first seeds and its replication on the later ones are computed from the runs: the
    per-seed differences, worked out here with scipy's t quantile, give the same text; a changed fresh run moves it."""
    import statistics

    from scipy import stats as scipy_stats

    row = next(r for r in which_method.ROWS if r.fresh_from is not None)
    assert row.metric == "test_at_best_val" and "{found}" in row.advice and "{fresh}" in row.advice

    def expected_advice(runs):
        mine, base = ({r["seed"]: r[row.metric] for r in runs if r["method"] == m} for m in (row.method, "adamw"))
        diffs = {s: mine[s] - base[s] for s in mine.keys() & base.keys()}
        found = [d for s, d in diffs.items() if s < row.fresh_from]
        fresh = [d for s, d in diffs.items() if s >= row.fresh_from]
        mean = statistics.fmean(fresh)
        half = scipy_stats.t.ppf(0.975, len(fresh) - 1) * statistics.stdev(fresh) / len(fresh) ** 0.5
        return row.advice.format(
            found=f"{100 * statistics.fmean(found):+.1f}",
            fresh=f"{100 * mean:+.1f} [{100 * (mean - half):+.1f}, {100 * (mean + half):+.1f}]",
            n_fresh=len(fresh),
        )

    assert len({r["seed"] for r in row.runs() if r["seed"] >= row.fresh_from}) >= 20
    assert which_method.advice(row) == expected_advice(row.runs())
    assert which_method.advice(row) in which_method.render()
    # the control: a fresh seed's run scored 10 points higher gives a different advice, the recomputed one
    (study,) = row.files
    runs, reported = json.loads(study.read_text())["runs"], row.runs()
    fresh_run = next(r for r in runs if r in reported and r["method"] == row.method and r["seed"] >= row.fresh_from)
    fresh_run[row.metric] += 0.10
    changed = tmp_path / "results.json"
    changed.write_text(json.dumps({"runs": runs}))
    moved = dataclasses.replace(row, files=(changed,))
    assert which_method.advice(moved) == expected_advice(moved.runs()) != which_method.advice(row)
