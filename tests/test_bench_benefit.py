"""Smoke test of the benefit benchmark (`--quick` on the digits task) and unit tests of its measures."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from testing_utils import REPO, lm_dataset, load_benchmark_script, tiny_llama


def test_quick_digits_run_writes_every_measure(tmp_path, capsys):
    pytest.importorskip("sklearn")
    bench = load_benchmark_script("bench_benefit")
    out = tmp_path / "benefit"
    argv = ["--quick", "--tasks", "digits", "--methods", "sam", "late_sam", "--seeds", "0", "1", "--noise", "0.4"]
    assert bench.main([*argv, "--weight_noise", "0.1", "--noise_draws", "1", "--out_dir", str(out)]) == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert {(r["method"], r["seed"]) for r in runs} == {(m, s) for m in ("adamw", "sam", "late_sam") for s in (0, 1)}
    for r in runs:
        for key in ("accuracy", "merged", "noise_0.1", "int8", "int4"):
            assert 0.0 <= r[key] <= 1.0, (key, r)
        assert r["merged"] == r["accuracy"]  # a full-precision model without adapters: the copy is the same model
        assert r["hessian_top"] > 0 and r["step_cpu_s"] > 0 and r["sam_sharpness"] == pytest.approx(r["sam_sharpness"])
    assert next(r for r in runs if r["method"] == "sam")["sam_kwargs"] == {"sam_rho": 0.1}
    rows = {r["method"]: r for r in json.loads((out / "summary.json").read_text())["rows"]}
    sam, base = rows["sam"], rows["adamw"]
    diff = sam["accuracy"]["diff"]
    assert diff["n"] == 2 and diff["low"] <= diff["mean"] <= diff["high"]
    assert diff["mean"] == pytest.approx(sam["accuracy"]["mean"] - base["accuracy"]["mean"])
    assert base["cost_x_adamw"] == 1.0 and "diff" not in base["accuracy"]
    assert (out / "pareto.png").stat().st_size > 5_000
    assert "| sam | 2 |" in capsys.readouterr().out


def test_paired_interval_and_quantizer():
    bench = load_benchmark_script("bench_benefit")
    d = bench.paired({0: 0.5, 1: 0.6, 2: 0.7}, {0: 0.4, 1: 0.4, 2: 0.4})
    assert d["mean"] == pytest.approx(0.2) and d["n"] == 3
    assert d["high"] - d["mean"] == pytest.approx(4.302652729911275 * 0.1 / 3**0.5)  # t(0.975, 2) * sd / sqrt(n)
    w = torch.randn(4, 128)
    q = w.clone()
    bench.quantize_rtn_(q, 4, 64)
    groups = q.reshape(4, 2, 64)
    assert all(len(torch.unique(g)) <= 16 for g in groups.reshape(8, 64))  # 4 bits per group
    assert (q - w).abs().max() <= w.abs().reshape(4, 2, 64).amax(-1).max() / 7 / 2 + 1e-6  # half a step at most
    q8 = w.clone()
    bench.quantize_rtn_(q8, 8, None)
    assert (q8 - w).abs().max() < (q - w).abs().max()


def test_method_table_entries_are_sam_arguments():
    bench = load_benchmark_script("bench_benefit")
    from hf_sam import SAMTrainingArguments

    fields = set(SAMTrainingArguments.__dataclass_fields__)
    for name, kwargs in bench.METHODS.items():
        assert kwargs is None or set(kwargs) - {"rho_scale", "lora_only"} <= fields, name
    assert bench._parse_methods(['x={"sam_rho": 0.2}']) == {"x": {"sam_rho": 0.2}}
    with pytest.raises(SystemExit):
        bench._parse_methods(['x={"rho": 0.2}'])


def test_no_seeds_without_tune_is_an_error_naming_the_field(tmp_path, capsys):
    bench = load_benchmark_script("bench_benefit")
    with pytest.raises(SystemExit):
        bench.main(["--tasks", "digits", "--seeds", "--out_dir", str(tmp_path)])
    assert "--seeds: give at least one seed" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


def test_merge_keeps_one_run_per_task_noise_method_seed(capsys):
    bench = load_benchmark_script("bench_benefit")
    run = {"task": "t", "noise": 0.3, "method": "adamw", "seed": 0, "accuracy": 0.5}
    other_seed = dict(run, seed=1, accuracy=0.7)
    kept = bench._drop_repeated_runs([run, other_seed, dict(run), dict(run, accuracy=0.6)])
    assert kept == [run, other_seed]  # a shared baseline counts once in the paired interval
    assert "ran twice with accuracy 0.5 and 0.6" in capsys.readouterr().out


def test_table_shows_a_dash_for_a_measure_a_run_did_not_take():
    bench = load_benchmark_script("bench_benefit")
    measured = {"hessian_top": 1.0, "sam_sharpness": 0.1, "train_slice_loss": 0.2, "step_cpu_s": 1.0, "int4": 0.5}
    base = [
        dict(measured, task="t", noise=0.4, method="adamw", seed=s, accuracy=0.5, **{"noise_0.1": 0.4}) for s in (0, 1)
    ]
    other = [dict(measured, task="t", noise=0.4, method="sam", seed=s, accuracy=0.6) for s in (0, 1)]  # no sweep
    table = bench.format_table(bench.summarize(base + other))
    assert "acc. σ=0.1 |" in table
    assert "| adamw | 2 | 50.0 (0.0) | — | 1 | 0.1 | 40.0 |" in table
    assert "| sam | 2 | 60.0 (0.0) | +10.0 [+10.0, +10.0] | 1 | 0.1 | — |" in table
    assert "merged copy" not in table  # the control column appears only where a run measured it
    table = bench.format_table(bench.summarize([dict(r, merged=0.45) for r in base] + other))
    assert "| adamw | 2 | 50.0 (0.0) | — | 1 | 0.1 | 45.0 | 40.0 |" in table
    assert "| sam | 2 | 60.0 (0.0) | +10.0 [+10.0, +10.0] | 1 | 0.1 | — | — |" in table
    rows = bench.summarize(base + [dict(r, merged=0.6) for r in other])  # a measure the baseline did not take
    sam = next(r for r in rows if r["method"] == "sam")
    assert sam["merged"]["mean"] == 0.6 and "diff" not in sam["merged"] and "diff" in sam["accuracy"]
    # extra seeds run without the sweep: the sweep's column is left out for the group, not averaged over fewer seeds
    extra = [dict(measured, task="t", noise=0.4, method="adamw", seed=s, accuracy=0.7) for s in (2, 3)]
    adamw = next(r for r in bench.summarize(base + extra + other) if r["method"] == "adamw")
    assert adamw["seeds"] == [0, 1, 2, 3] and "noise_0.1" not in adamw and adamw["int4"]["values"] == [0.5] * 4


def test_tables_list_methods_in_the_scripts_order_whatever_the_merge_order():
    bench = load_benchmark_script("bench_benefit")
    measured = {"hessian_top": 1.0, "sam_sharpness": 0.1, "train_slice_loss": 0.2, "step_cpu_s": 1.0, "accuracy": 0.5}
    merged = [
        dict(measured, task="t", noise=0.0, method=method, seed=0)
        for method in ("late_sam", "my_variant", "adamw", "sam")  # e.g. a later --out_dir merged after an earlier one
    ]
    methods = [row["method"] for row in bench.summarize(merged)]
    assert methods == ["adamw", "sam", "late_sam", "my_variant"]  # METHODS' order, then --method extras


def test_robustness_measures_the_perturbed_copy_of_a_trl_trained_lora_model(tmp_path):
    """TRL patches the LM's forward with a closure over the original module; the measured copy must not run it."""
    from peft import LoraConfig
    from testing_utils import tiny_tokenizer
    from trl import SFTConfig, SFTTrainer

    bench = load_benchmark_script("bench_benefit")
    args = SFTConfig(
        output_dir=str(tmp_path), max_steps=1, use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True
    )
    trainer = SFTTrainer(
        model=tiny_llama(),
        processing_class=tiny_tokenizer(),
        args=args,
        train_dataset=lm_dataset().remove_columns("labels"),  # tokenized: TRL's language-modelling path
        peft_config=LoraConfig(r=4, target_modules=["q_proj"]),
    )
    trainer.train()
    x = torch.arange(2, 12)[None]
    with torch.no_grad():
        before = trainer.model(input_ids=x).logits.clone()

    def logit_sum(model):
        with torch.no_grad():
            return model(input_ids=x).logits.double().sum().item()

    run = SimpleNamespace(lora=True, accuracy=logit_sum)
    clean = before.double().sum().item()
    measured = bench.robustness(run, trainer.model, [0.5], 1, 0, [])
    # Noise of half each matrix's RMS on every weight moves the logits by far more than 1%, when it reaches the
    # model that runs (through TRL's patched forward the copy ran the original weights: 0.02% from the unmerged
    # adapters' rounding).
    assert measured["noise_0.5"] != pytest.approx(clean, rel=1e-2)
    assert measured["merged"] == pytest.approx(clean, rel=1e-3)  # the control: merging alone changes ~nothing
    with torch.no_grad():
        assert torch.equal(trainer.model(input_ids=x).logits, before)  # and never the trained model


# ---- the tuned study (rho chosen on validation) ---------------------------------------------------------------------
def _tuned_records():
    """Selection runs where validation and test disagree about the best rho, and test runs at the chosen one."""
    records = []

    def run(method, seed, rho, phase, val, acc, **extra):
        records.append(dict(task="t", noise=0.4, method=method, seed=seed, rho=rho, phase=phase, val_accuracy=val,
                            accuracy=acc, step_cpu_s=1.0 if method == "adamw" else 2.0, **extra))  # fmt: skip

    for seed in (100, 101):
        run("adamw", seed, None, "select", 0.60, 0.60)
        run("sam", seed, 0.01, "select", 0.62, 0.70)  # the test split would pick 0.01
        run("sam", seed, 0.1, "select", 0.66 + 0.01 * (seed - 100), 0.61)  # validation picks 0.1
        run("sam", seed, 0.3, "select", 0.66 + 0.01 * (seed - 100), 0.65)  # equal on validation: the smaller wins
    run("sam", 100, 1.0, "select", 0.99, 0.99)  # run on one of two seeds: not a candidate
    for seed, (a, s) in enumerate([(0.60, 0.64), (0.61, 0.66), (0.59, 0.62)]):
        run("adamw", seed, None, "test", 0.6, a, test_at_best_val=a + 0.05, fit_noisy=0.99)
        run("sam", seed, 0.1, "test", 0.6, s, test_at_best_val=s + 0.05, fit_noisy=0.40)
    return records


def test_rho_is_chosen_on_validation_over_complete_grid_points():
    bench = load_benchmark_script("bench_benefit")
    assert bench.chosen_rhos(_tuned_records(), "t", 0.4) == {"sam": 0.1}


def test_tuned_tables_show_the_chosen_rho_and_the_paired_difference():
    bench = load_benchmark_script("bench_benefit")
    records = _tuned_records()
    rows = bench.summarize([r for r in records if r["phase"] == "test"])
    tuned = bench.format_tuned(rows, records)
    sam_line = next(line for line in tuned.splitlines() if line.startswith("| sam |"))
    assert "| 0.1 | 3 |" in sam_line and "+4.0 [" in sam_line  # mean of 0.04, 0.05, 0.03
    assert "| 40.0 |" in sam_line  # the wrong labels SAM fitted
    for r in records:
        r.update(train_wall_s=60.0, measure_wall_s=0.0)
    selection = bench.format_selection(bench.selection_rows(records), records)
    assert "| sam | **0.1** | 2 |" in selection and "| sam | 0.3 | 2 |" in selection
    assert "| sam | 1 | 1 |" in selection  # shown, never chosen
    assert "Cost of the search: adamw 2 runs, 2 min; sam 7 runs, 7 min" in selection


def test_tuned_tables_give_both_robustness_readings_and_the_loss_on_the_wrong_labels():
    """Accuracy after a perturbation and accuracy lost to it can disagree: the table shows both, paired by seed."""
    bench = load_benchmark_script("bench_benefit")
    records = _tuned_records()
    for r in records:  # SAM: 2 points higher after 4-bit than AdamW, yet it lost 3 points more to it
        sam = r["method"] == "sam"
        r.update(merged=0.70 if sam else 0.65, int4=0.62 if sam else 0.60, train_loss_noisy=0.75 if sam else 0.011)
    reported = [r for r in records if r["phase"] == "test"]
    tuned = bench.format_tuned(bench.summarize(reported), reported)
    header = next(line for line in tuned.splitlines() if line.startswith("| method |"))
    assert "| wrong labels fitted (loss on them) |" in header and "| Δ after 4-bit | Δ lost to 4-bit |" in header
    sam_line = next(line for line in tuned.splitlines() if line.startswith("| sam |"))
    assert "| 40.0 (0.75) | +2.0 [+2.0, +2.0] | +3.0 [+3.0, +3.0] |" in sam_line
    adamw_line = next(line for line in tuned.splitlines() if line.startswith("| adamw |"))
    assert "| 99.0 (0.011) | 60.0 | 5.0 |" in adamw_line  # AdamW's own row: its accuracy after, and lost


def test_step_time_ratios_never_pair_two_machines():
    bench = load_benchmark_script("bench_benefit")

    def run(method, seed, cpu, step, noise=0.4):
        return dict(task="t", noise=noise, method=method, seed=seed, cpu=cpu, step_cpu_s=step, accuracy=0.5)

    runs = [
        run("adamw", 0, "A", 1.0), run("adamw", 1, "B", 0.8), run("adamw", 2, "B", 0.6),
        run("sam", 0, "A", 2.2),  # paired by seed on machine A
        run("sam", 1, "B", 1.4),  # paired by seed on machine B
        run("sam", 3, "B", 1.05),  # AdamW never ran seed 3: its mean on B (0.7)
        run("sam", 4, "C", 9.9),  # no AdamW run on C: no ratio
        run("sam", 5, "B", 1.0, noise=0.0),  # nor in another setting on the same machine
    ]  # fmt: skip
    ratios = bench.step_time_ratios(runs)
    assert ratios[:3] == [1.0, 1.0, 1.0]
    assert ratios[3:] == [pytest.approx(2.2), pytest.approx(1.75), pytest.approx(1.5), None, None]
    rows = {(r["noise"], r["method"]): r for r in bench.summarize(runs)}
    assert rows[(0.4, "sam")]["cost_x_adamw"] == pytest.approx((2.2 + 1.75 + 1.5) / 3)
    assert math.isnan(rows[(0.0, "sam")]["cost_x_adamw"])
    legacy = [{k: v for k, v in r.items() if k != "cpu"} for r in runs]  # the control: recorded before `cpu`
    assert bench.step_time_ratios(legacy)[6] == pytest.approx(9.9 / 0.8)  # one machine: AdamW's mean in the setting


def test_merged_runs_compare_against_the_baseline_asked_for(tmp_path):
    """`--merge ... --baseline sam`: the differences and step-time ratios against SAM, paired by seed."""
    bench = load_benchmark_script("bench_benefit")
    runs = [dict(r, hessian_top=1.0, sam_sharpness=0.1, train_wall_s=60.0) for r in _tuned_records()]
    (tmp_path / "results.json").write_text(json.dumps({"info": {}, "runs": runs}))
    merge = ["--merge", str(tmp_path / "results.json"), "--out_dir", str(tmp_path / "out")]
    assert bench.main([*merge, "--baseline", "sam"]) == 0
    table = (tmp_path / "out" / "table.md").read_text()
    assert "Δ vs sam [95% CI]" in table and "× sam step" in table and "× AdamW step" not in table
    adamw_line = next(line for line in table.splitlines() if line.startswith("| adamw | — |"))  # the tuned table
    assert "-4.0 [" in adamw_line and adamw_line.endswith("| 0.50 |")  # AdamW - SAM; half SAM's step time
    sam_line = next(line for line in table.splitlines() if line.startswith("| sam | 0.1 |"))
    assert "| — |" in sam_line.split("(")[1]  # the baseline's own row has no difference
    assert bench.main(merge) == 0  # the control: against AdamW by default
    assert "+4.0 [" in next(line for line in (tmp_path / "out" / "table.md").read_text().splitlines()
                            if line.startswith("| sam | 0.1 |"))  # fmt: skip
    with pytest.raises(SystemExit, match="--baseline: unknown method 'sgd'"):
        bench.main([*merge, "--baseline", "sgd"])


def test_merging_lanes_records_each_earlier_invocation_once(tmp_path):
    """Lanes resume from copies of the study's file and are merged back: the merged file names every invocation that
    made its runs once (command, commit), however many merges deep, including those of files nested the old way."""
    bench = load_benchmark_script("bench_benefit")
    runs = [dict(r, hessian_top=1.0, sam_sharpness=0.1, train_wall_s=60.0) for r in _tuned_records()]
    study = tmp_path / "study.json"
    nested = {"command": "study", "commit": "c2", "merged": [{"command": "first lane", "commit": "c1"}]}
    study.write_text(json.dumps({"info": nested, "runs": runs}))

    def merge_two_lanes(round_: int) -> dict:
        lanes = []
        for lane in ("A", "B"):
            copy = json.loads(study.read_text())  # lane.sh: a copy of the study's file, resumed and run further
            lanes.append(tmp_path / f"lane{lane}{round_}.json")
            info = {"command": f"lane {lane} round {round_}", "commit": "c3", "resumed": copy["info"]}
            lanes[-1].write_text(json.dumps({"info": info, "runs": copy["runs"]}))
        out = tmp_path / f"out{round_}"
        assert bench.main(["--merge", str(study), *map(str, lanes), "--out_dir", str(out)]) == 0
        study.write_text((out / "results.json").read_text())
        return json.loads((out / "summary.json").read_text())["info"]

    merge_two_lanes(1)
    info = merge_two_lanes(2)
    commands = [entry["command"] for entry in info["history"]]
    assert commands[:3] == ["first lane", "study", "lane A round 1"]  # earliest first
    assert sorted(commands) == sorted(set(commands)) and len(commands) == 7  # 2, then 2 lanes + merge, 2 lanes
    assert info["command"].startswith("python benchmarks/bench_benefit.py --merge")
    text = json.dumps(info)
    assert text.count('"lane A round 1"') == 1 and text.count('"first lane"') == 1  # nested, these would repeat
    assert len(json.loads(study.read_text())["runs"]) == len(runs)  # the lanes' copies of the runs merged once


@pytest.mark.slow
def test_quick_tuned_language_tasks_write_every_measure(tmp_path):
    """`--quick --tune` on the three language tasks (the embedded MiniLM and SmolLM2): the grid on one selection seed,
    the chosen rho on two test seeds, and the tasks' own measures. Run as two jobs: `--seeds` with no seeds runs the
    selection only; `--resume` with the test seeds reuses those runs and tests the rho chosen from them."""
    pytest.importorskip("vaderSentiment")
    bench = load_benchmark_script("bench_benefit")
    out = tmp_path / "tuned"
    argv = ["--quick", "--tune", "--tasks", "sentiment_minilm", "sentiment_smollm", "fewshot_smollm", "--methods",
            "sam", "--grid", "0.01", "0.1", "--selection_seeds", "100", "--noise", "0.4", "--resume",
            "--weight_noise", "0.1", "--noise_draws", "1", "--hessian_iters", "2", "--out_dir", str(out)]  # fmt: skip
    assert bench.main([*argv, "--seeds"]) == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert {r["phase"] for r in runs} == {"select"}
    selected = {(r["task"], r["method"], r["rho"]): r["train_wall_s"] for r in runs}
    assert bench.main([*argv, "--seeds", "0", "1"]) == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert {(r["task"], r["method"], r["rho"]): r["train_wall_s"] for r in runs if r["phase"] == "select"} == selected
    for task in ("sentiment_minilm", "sentiment_smollm", "fewshot_smollm"):
        mine = [r for r in runs if r["task"] == task]
        select = [r for r in mine if r["phase"] == "select"]
        assert sorted((r["method"], r["rho"] or 0) for r in select) == [("adamw", 0), ("sam", 0.01), ("sam", 0.1)]
        chosen = bench.chosen_rhos(runs, task, 0.4)["sam"]
        test = [r for r in mine if r["phase"] == "test"]
        assert sorted((r["method"], r["seed"], r["rho"]) for r in test if r["method"] == "sam") == [
            ("sam", 0, chosen),
            ("sam", 1, chosen),
        ]
        for r in mine:
            assert 0 <= r["val_accuracy"] <= 1 and 0 <= r["accuracy"] <= 1 and 0 <= r["test_at_best_val"] <= 1
            assert 0 <= r["fit_noisy"] <= 1 and r["train_loss_noisy"] >= 0
        for r in test:
            assert "int4" in r and "hessian_top" in r and "lost_int4" not in r  # the loss is derived when summarising
        if task != "sentiment_minilm":  # forgetting: the change from the one base model's general-text loss
            bases = {round(r["general_text_loss"] - r["forgetting"], 9) for r in test}
            assert len(bases) == 1 and next(iter(bases)) > 0
            assert len({r["general_text_loss"] for r in test}) > 1  # each trained model has its own
    table = (out / "table.md").read_text()
    assert "ρ chosen on validation" in table and "ρ selection" in table
    assert (out / "rho_sensitivity.png").stat().st_size > 5_000


@pytest.mark.slow
def test_the_smollm2_tail_computes_the_full_models_label_logits():
    """benefit_tasks runs SmolLM2's last layers on the cached output of the frozen ones: the label logits equal the
    full model's to float32 rounding (left padding, positions counted from each prompt's start)."""
    tasks = load_benchmark_script("benefit_tasks")
    prefix = tasks.FrozenPrefix.get(tasks.TAIL_LAYERS)
    words = ["wonderful", "awful", "table", "joyless", "brilliant", "hopelessly"]
    texts = [tasks._prompt(w) for w in words]
    batch = tasks._left_pad_collate([{"inputs_embeds": h, "labels": 0} for h in prefix.hidden(texts)])
    tail = prefix.tail_classifier().eval()
    with torch.no_grad():
        got = tail(**{k: v for k, v in batch.items() if k != "labels"}).logits
        label_ids = [ids[0] for ids in prefix.label_ids]
        want = torch.stack(
            [prefix.full(**prefix.tokenizer(t, return_tensors="pt")).logits[0, -1, label_ids] for t in texts]
        )
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (got.argmax(-1) != got.argmin(-1)).all()  # two distinct label logits per prompt (a real comparison)


def _titled_tables(text: str) -> dict[str, list[str]]:
    """Each markdown table of `text` under a bold title line (`**...**`, a blank line, the table), by title."""
    lines = text.splitlines()
    tables = {}
    for i, line in enumerate(lines[:-2]):
        if line.startswith("**") and line.endswith("**") and lines[i + 2].startswith("|"):
            end = i + 2
            while end < len(lines) and lines[end].startswith("|"):
                end += 1
            tables[line] = lines[i + 2 : end]
    return tables


def test_the_tuned_study_tables_in_the_docs_are_the_scripts_output():
    """docs/benefit.md's tables of the tuned study are what bench_benefit.py writes from the committed results."""
    bench = load_benchmark_script("bench_benefit")
    records = json.loads((REPO / "docs" / "benefit" / "tuned" / "results.json").read_text())["runs"]
    reported = bench.reported_runs(records)
    written = _titled_tables(
        bench.format_tuned(bench.summarize(reported), reported)
        + bench.format_selection(bench.selection_rows(records), records)
    )
    doc = (REPO / "docs" / "benefit.md").read_text()
    start = doc.index("## Language models, rho tuned on validation")
    in_docs = _titled_tables(doc[start : doc.index("\n## ", start + 1)])
    assert len(in_docs) >= 5 and set(in_docs) <= set(written)
    for title, table in in_docs.items():
        assert table == written[title], title
    # the control: a changed result gives a table the docs no longer match
    for r in records:
        if r["method"] == "sam" and r.get("phase") == "test":
            r["accuracy"] += 0.05
    reported = bench.reported_runs(records)
    changed = _titled_tables(bench.format_tuned(bench.summarize(reported), reported))
    assert any(changed[title] != table for title, table in in_docs.items() if title in changed)


def test_test_runs_at_a_rho_no_longer_chosen_are_not_reported():
    """A grid that grew moves the choice: the test runs at the old rho stay in the records but are not reported."""
    bench = load_benchmark_script("bench_benefit")

    def run(method, phase, seed, rho, val=0.5, acc=0.5):
        return {"task": "t", "noise": 0.4, "method": method, "phase": phase, "seed": seed, "rho": rho,
                "val_accuracy": val, "accuracy": acc}  # fmt: skip

    records = [run("adamw", "select", 100, None), run("sam", "select", 100, 0.1, val=0.6)]
    records += [run(m, "test", s, rho) for s in (0, 1) for m, rho in (("adamw", None), ("sam", 0.1))]
    assert bench.reported_runs(records) == [r for r in records if r["phase"] == "test"]
    records.append(run("sam", "select", 100, 0.01, val=0.7))  # the grid grew; 0.01 is better on validation
    records += [run("sam", "test", s, 0.01, acc=0.9) for s in (0, 1)]
    reported = bench.reported_runs(records)
    assert [(r["method"], r["seed"], r["rho"]) for r in reported] == [
        ("adamw", 0, None), ("adamw", 1, None), ("sam", 0, 0.01), ("sam", 1, 0.01)
    ]  # fmt: skip
    (sam,) = [row for row in bench.summarize(reported) if row["method"] == "sam"]
    assert sam["accuracy"]["values"] == [0.9, 0.9]
