#!/usr/bin/env python
"""The main job: what SAM buys over AdamW at the same step budget, on CPU, with no network, and whether it is noise.

Two parts, both AdamW next to SAM with the same seed, data, data order, initialisation, schedule and step budget,
both where the benefit benchmark (`benchmarks/bench_benefit.py`, docs/benefit.md) found a gain beyond seed-to-seed
noise, through the benchmark's own training and measurement code:

1. A small ResNet (BatchNorm) trained from scratch on scikit-learn's digit images with 40% of the training labels
   wrong, over `--image_seeds` seeds, with the gain's 95% interval paired by seed.
2. The language-model job: SmolLM2-135M-Instruct + LoRA classifying the sentiment of 1,000 words of which 40% carry
   the wrong label (the benchmark's `sentiment_smollm` task, 16 epochs: AdamW learns every wrong label), SAM at the
   rho the benchmark chose on its validation split (1.0), scored on 2,002 test words of other word families, at the
   last step and at the epoch of best validation accuracy (early stopping). One seed here; the demo reads it against
   the benchmark's seeds of the same setting (docs/benefit/tuned/summary.json).

It prints both tables and a verdict for each (a gain, or a difference inside the noise), and writes `results.json`
and `training_curves.png` under `--output_dir` (default `outputs/demo`). About 10 minutes on 2 CPU cores
(docs/examples/demo.md).

Example:
    ```bash
    make demo                      # = python examples/demo.py --output_dir outputs/demo
    python examples/demo.py --skip_lm                  # the image part only (minutes)
    ```
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))  # examples/_common.py
# What the benefit benchmark measured (committed with docs/benefit.md): the tuned study's summary over seeds,
# that the demo's one language-model seed is read against.
BENCHMARK_SUMMARY = ROOT / "docs" / "benefit" / "tuned" / "summary.json"
LM_TASK = "sentiment_smollm"


def load_module(path: Path, name: str) -> Any:
    """Import a script (not a package module) by path."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--output_dir", default="outputs/demo", help="Where results, plot and runs go.")
    p.add_argument("--image_seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="Seeds of the image part.")
    p.add_argument("--image_noise", type=float, default=0.4, help="Fraction of wrong training labels (image).")
    p.add_argument("--image_steps", type=int, default=None, help="Image part steps (default: the benchmark's).")
    p.add_argument("--skip_lm", action="store_true", help="Run the image part only.")
    p.add_argument("--quick", action="store_true", help="Image part on the benchmark's smoke-run scale (tests).")
    p.add_argument("--lm_noise", type=float, default=0.4, help="LM part: fraction of wrong training labels.")
    p.add_argument(
        "--lm_rho", type=float, default=1.0, help="LM part: SAM's rho (1.0: the benchmark's choice on validation)."
    )
    p.add_argument("--lm_steps", type=int, default=None, help="LM part: steps (default: the benchmark's, 16 epochs).")
    p.add_argument("--seed", type=int, default=0, help="LM part: seed of the data, the LoRA init and the data order.")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads.")
    return p


@functools.cache
def benchmark_summary() -> dict[str, Any]:
    """The benefit benchmark's committed tuned-study summary, read once (empty where the file is missing)."""
    return json.loads(BENCHMARK_SUMMARY.read_text()) if BENCHMARK_SUMMARY.is_file() else {}


def benchmark_row(task: str, noise: float, method: str) -> dict[str, Any] | None:
    """The benefit benchmark's committed summary row for this setting, if it measured it."""
    for row in benchmark_summary().get("rows", []):
        if row["task"] == task and math.isclose(row["noise"], noise) and row["method"] == method:
            return row
    return None


def benchmark_chosen_rho(task: str, noise: float) -> float | None:
    """The rho the benefit benchmark chose for SAM on this task's validation split, if it tuned it."""
    chosen = benchmark_summary().get("info", {}).get("chosen_rho", {})
    return chosen.get(f"{task} {noise:g}", {}).get("sam")


def measure_options(steps: int | None, quick: bool, hessian_iters: int) -> argparse.Namespace:
    """The benchmark's measurement options for `run_one`: flatness, and no weight-noise or quantisation readings."""
    return argparse.Namespace(
        steps=steps,
        quick=quick,
        sharpness_rho=0.05,
        hessian_iters=hessian_iters,
        weight_noise=[],
        noise_draws=1,
        quant=[],
    )


def verdict(diff: dict[str, float] | None) -> str:
    """Whether a paired 95% interval of a difference excludes zero."""
    if not diff or math.isnan(diff.get("low", math.nan)):
        return "no interval (fewer than 2 seeds)"
    if diff["low"] > 0:
        return "a gain beyond seed-to-seed noise"
    if diff["high"] < 0:
        return "a loss beyond seed-to-seed noise"
    return "inside seed-to-seed noise: no gain shown"


def image_part(opts: argparse.Namespace, bench: Any) -> dict[str, Any]:
    """AdamW and SAM on noisy-label digits over several seeds, through the benefit benchmark's own run."""
    task = bench.TASKS["digits"]
    measure = measure_options(opts.image_steps, opts.quick, hessian_iters=20)
    records = []
    for seed in opts.image_seeds:
        for method in ("adamw", "sam"):
            t0 = time.perf_counter()
            record = bench.run_one(task, method, bench.METHODS[method], seed, opts.image_noise, measure)
            records.append(record)
            print(
                f"  seed {seed} {method:<5}: held-out accuracy {record['accuracy']:.3f}, top Hessian eigenvalue "
                f"{record['hessian_top']:.3g}, SAM sharpness {record['sam_sharpness']:.3g} "
                f"({time.perf_counter() - t0:.0f}s)",
                flush=True,
            )
    rows = {row["method"]: row for row in bench.summarize(records)}
    return {"records": records, "summary": rows}


def format_image_table(rows: dict[str, Any], noise: float) -> str:
    diff = rows["sam"]["accuracy"]["diff"]
    lines = [
        f"{'ResNet on digits, ' + format(noise, '.0%') + ' wrong labels':<40} {'held-out acc. (sd)':>19} "
        f"{'top Hessian eig.':>17} {'SAM sharpness':>14}",
        "-" * 93,
    ]
    for method in ("adamw", "sam"):
        r = rows[method]
        lines.append(
            f"{method.upper() if method == 'sam' else 'AdamW':<40} "
            f"{r['accuracy']['mean']:>11.3f} ({r['accuracy']['sd']:.3f}) {r['hessian_top']['mean']:>17.3g} "
            f"{r['sam_sharpness']['mean']:>14.3g}"
        )
    lines.append(
        f"SAM - AdamW: {100 * diff['mean']:+.1f} points, 95% interval paired by seed "
        f"[{100 * diff['low']:+.1f}, {100 * diff['high']:+.1f}] over {diff['n']} seeds: {verdict(diff)}"
    )
    return "\n".join(lines)


LM_COLUMNS = (
    ("final test acc.", "accuracy", ".3f"),
    ("at best-val epoch", "test_at_best_val", ".3f"),
    ("wrong labels fitted", "fit_noisy", ".1%"),
    ("forgetting (nats)", "forgetting", "+.3f"),
)


def format_lm_table(runs: dict[str, dict[str, Any]], noise: float) -> str:
    title = f"SmolLM2-135M + LoRA, word sentiment, {noise:.0%} wrong labels"
    header = f"{title:<56}" + "".join(f"{name:>21}" for name, _, _ in LM_COLUMNS) + f"{'time':>8}"
    lines = [header, "-" * len(header)]
    for label, record in runs.items():
        cells = "".join(f"{format(record[key], spec) if key in record else '-':>21}" for _, key, spec in LM_COLUMNS)
        lines.append(f"{label:<56}{cells}{record['train_wall_s'] + record['measure_wall_s']:>7.0f}s")
    return "\n".join(lines)


def lm_part(opts: argparse.Namespace, bench: Any) -> dict[str, Any]:
    """LoRA + AdamW and LoRA + SAM on noisy word sentiment, through the benefit benchmark's own run of the task:
    test accuracy at the last step and at the best-on-validation epoch, the share of wrong training labels the model
    reproduces, and forgetting (the change of the language-model loss on general text)."""
    task = bench.TASKS[LM_TASK]
    measure = measure_options(opts.lm_steps, opts.quick, hessian_iters=10)
    runs: dict[str, dict[str, Any]] = {}
    for method, label in (("adamw", "LoRA + AdamW"), ("sam", f"LoRA + SAM (rho={opts.lm_rho:g})")):
        print(f"== {label}", flush=True)
        rho = opts.lm_rho if method == "sam" else None
        runs[label] = bench.run_one(task, method, bench.METHODS[method], opts.seed, opts.lm_noise, measure, rho=rho)
        r = runs[label]
        print(
            f"  final test accuracy {r['accuracy']:.3f}, at the best-validation epoch {r['test_at_best_val']:.3f} "
            f"(step {r['best_val_step']}), wrong training labels reproduced {r.get('fit_noisy', math.nan):.1%} "
            f"({r['train_wall_s'] + r['measure_wall_s']:.0f}s)",
            flush=True,
        )
    return {"runs": runs}


def lm_reading(opts: argparse.Namespace, lm: dict[str, Any]) -> str:
    """This run's SAM - AdamW next to what the benchmark measured over seeds on the same setting."""
    from hf_sam.compare.stats import format_diff

    adamw, sam = lm["runs"].values()
    line = (
        f"SAM - AdamW here (seed {opts.seed}): {100 * (sam['accuracy'] - adamw['accuracy']):+.1f} points at the last "
        f"step, {100 * (sam['test_at_best_val'] - adamw['test_at_best_val']):+.1f} at the best-validation epoch. "
    )
    bench_sam = benchmark_row(LM_TASK, opts.lm_noise, "sam")
    chosen = benchmark_chosen_rho(LM_TASK, opts.lm_noise)
    if bench_sam is None or opts.lm_steps is not None or opts.quick or chosen != opts.lm_rho:
        return line + "The benefit benchmark has no multi-seed measurement of this exact setting to read it against."
    final, early = bench_sam["accuracy"]["diff"], bench_sam["test_at_best_val"]["diff"]
    line += (
        f"The benefit benchmark, same setting, {final['n']} seeds, SAM - AdamW with 95% intervals paired by seed: "
        f"at the last step {format_diff(final)} points ({verdict(final)}); at the best-validation epoch "
        f"{format_diff(early)} ({verdict(early)})."
    )
    if final["low"] > 0 and early["low"] <= 0 <= early["high"]:
        line += " SAM's final model is about as good as AdamW's early-stopped one, "
        line += "without a validation split to stop on."
    return line


def plot_curves(lm: dict[str, Any] | None, image: dict[str, Any], path: Path) -> None:
    """Left: held-out accuracy per seed (image part). Right: LM validation accuracy after every epoch, both runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if lm else 1, figsize=(12 if lm else 6, 4.5), squeeze=False)
    ax = axes[0][0]
    for method, color in (("adamw", "tab:blue"), ("sam", "tab:orange")):
        recs = [r for r in image["records"] if r["method"] == method]
        ax.plot([r["seed"] for r in recs], [r["accuracy"] for r in recs], "o-", color=color, label=method)
    ax.set_xticks(sorted({r["seed"] for r in image["records"]}))  # seeds are integers: no 0.5, 1.5 ticks
    ax.set_title("ResNet on digits, noisy labels: held-out accuracy per seed")
    ax.set_xlabel("seed")
    ax.set_ylabel("held-out accuracy")
    ax.grid(True, alpha=0.3)
    ax.legend()
    if lm:
        ax = axes[0][1]
        for (label, record), color in zip(lm["runs"].items(), ("tab:blue", "tab:orange")):
            points = record.get("curve") or []
            ax.plot([p["step"] for p in points], [p["val"] for p in points], "o-", color=color, label=label)
        ax.set_title("SmolLM2-135M + LoRA, noisy word sentiment: validation accuracy")
        ax.set_xlabel("optimizer step (one point per epoch)")
        ax.set_ylabel("validation accuracy")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run both parts; print the tables and verdicts; write results and plot."""
    opts = build_parser().parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(opts.threads))
    import torch

    torch.set_num_threads(opts.threads)
    out = Path(opts.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    bench = load_module(ROOT / "benchmarks" / "bench_benefit.py", "hf_sam_bench_benefit")
    # the trainers' output_dir (nothing is saved there), a global of the module that holds the benchmark's tasks
    getattr(bench, "benefit_tasks", bench).WORKDIR = out / "runs"

    print(f"== part 1: ResNet on digits, {opts.image_noise:.0%} wrong training labels, AdamW vs SAM", flush=True)
    image = image_part(opts, bench)
    lm = None
    if not opts.skip_lm:
        print(f"== part 2: SmolLM2-135M + LoRA, word sentiment, {opts.lm_noise:.0%} wrong labels", flush=True)
        lm = lm_part(opts, bench)
    results = {
        "settings": vars(opts),
        "image": image,
        "lm": lm,
        "total_runtime_s": time.perf_counter() - started,
        "torch_threads": torch.get_num_threads(),
    }
    plot_curves(lm, image, out / "training_curves.png")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(format_image_table(image["summary"], opts.image_noise))
    if lm:
        print()
        print(format_lm_table(lm["runs"], opts.lm_noise))
        print("test: words of word families never seen in training; the best-validation epoch is chosen on others")
        print(lm_reading(opts, lm))
    print(f"\ntotal time: {results['total_runtime_s']:.0f}s")
    written = [out / "results.json", out / "training_curves.png"]
    print("wrote " + ", ".join(str(p) for p in written))
    return results


if __name__ == "__main__":
    main()
