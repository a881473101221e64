#!/usr/bin/env python
"""The main job: what SAM buys over AdamW at the same step budget, on CPU, with no network, and whether it is noise.

Two parts, both AdamW next to SAM with the same seed, data, data order, initialisation, schedule and step budget:

1. Where the benefit benchmark (`benchmarks/bench_benefit.py`, docs/benefit.md) found a gain beyond seed-to-seed
   noise: a small ResNet (BatchNorm) trained from scratch on scikit-learn's digit images with 40% of the training
   labels wrong. Run here over `--image_seeds` seeds, with the gain's 95% interval paired by seed.
2. The language-model job: SmolLM2-135M-Instruct + LoRA on the word-reversal task (held-out prompts of unseen words),
   with 30% of the training answers wrong, through `examples/sft_lora.py`: the base model, LoRA + AdamW, LoRA + SAM.
   One seed here; the seed-to-seed spread next to it is the one the benefit benchmark measured on the same setting.

It prints both tables and a verdict for each (a gain, or a difference inside the noise), and writes `results.json`
and `training_curves.png` under `--output_dir` (default `outputs/demo`), with each language-model run's adapter and
metrics in a subdirectory (`adamw/`, `sam/`) and the held-out prompts beside them as `heldout.jsonl`, the file
`hf-sam sharpness` and `hf-sam landscape` take as `--data` (docs/analysis.md). 7 min 8 s on 2 idle CPU cores
(docs/examples/demo.md).

Example:
    ```bash
    make demo                      # = python examples/demo.py --output_dir outputs/demo
    python examples/demo.py --skip_lm                  # the image part only (minutes)
    ```
"""

from __future__ import annotations

import argparse
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
# What the benefit benchmark measured (committed with docs/benefit.md): the spread the demo's one LM seed is read on.
BENCHMARK_SUMMARY = ROOT / "docs" / "benefit" / "summary.json"


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
    p.add_argument("--max_steps", type=int, default=120, help="LM part: optimizer steps per run (both runs).")
    p.add_argument("--batch_size", type=int, default=8, help="LM part: training batch size.")
    p.add_argument("--learning_rate", type=float, default=2e-3, help="LM part: peak learning rate (linear decay).")
    p.add_argument("--sam_rho", type=float, default=0.05, help="LM part: SAM's neighbourhood radius.")
    p.add_argument("--lora_r", type=int, default=8, help="LoRA rank.")
    p.add_argument("--lora_last_layers", type=int, default=8, help="Adapt only the last N of the 30 layers.")
    p.add_argument("--train_size", type=int, default=2000, help="Generated training examples.")
    p.add_argument("--eval_size", type=int, default=100, help="Held-out examples (unseen words).")
    p.add_argument("--words", type=int, default=3, help="Words per example (training and held-out).")
    p.add_argument("--system_prompt", default="Be brief.", help="System message (short: fewer tokens per step).")
    p.add_argument("--label_noise", type=float, default=0.3, help="LM part: fraction of corrupted training answers.")
    p.add_argument("--seed", type=int, default=0, help="LM part: seed of the data, the LoRA init and the data order.")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads.")
    p.add_argument("--logging_steps", type=int, default=5, help="Steps between training-loss logs.")
    return p


def run_args(opts: argparse.Namespace, output_dir: Path, use_sam: bool) -> list[str]:
    """The `sft_lora.py` command line of one LM run."""
    return [
        "--output_dir", str(output_dir),
        "--use_sam", str(use_sam).lower(),
        "--sam_rho", str(opts.sam_rho),
        "--max_steps", str(opts.max_steps),
        "--per_device_train_batch_size", str(opts.batch_size),
        "--learning_rate", str(opts.learning_rate),
        "--lr_scheduler_type", "linear",
        "--warmup_steps", str(max(1, opts.max_steps // 10)),
        "--weight_decay", "0.0",
        "--lora_r", str(opts.lora_r),
        "--lora_alpha", str(2 * opts.lora_r),
        "--lora_dropout", "0.0",
        "--lora_target_modules", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
        "--lora_last_layers", str(opts.lora_last_layers),
        "--task_train_size", str(opts.train_size),
        "--task_eval_size", str(opts.eval_size),
        "--task_min_words", str(opts.words),
        "--task_max_words", str(opts.words),
        "--system_prompt", opts.system_prompt,
        "--max_new_tokens", str(4 * opts.words),
        "--label_noise", str(opts.label_noise),
        "--seed", str(opts.seed),
        "--data_seed", str(opts.seed),
        "--logging_steps", str(opts.logging_steps),
        "--save_strategy", "no",
        "--report_to", "none",
        "--use_cpu", "true",
        "--dataloader_num_workers", "0",
        "--max_length", "64",
        "--disable_tqdm", "false",
    ]  # fmt: skip


def benchmark_row(task: str, noise: float, method: str) -> dict[str, Any] | None:
    """The benefit benchmark's committed summary row for this setting, if it measured it."""
    if not BENCHMARK_SUMMARY.is_file():
        return None
    for row in json.loads(BENCHMARK_SUMMARY.read_text())["rows"]:
        if row["task"] == task and math.isclose(row["noise"], noise) and row["method"] == method:
            return row
    return None


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
    measure = argparse.Namespace(
        steps=opts.image_steps, quick=opts.quick, sharpness_rho=0.05, hessian_iters=20, weight_noise=[], noise_draws=1,
        quant=[],
    )  # fmt: skip
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


def format_lm_table(rows: list[dict[str, Any]]) -> str:
    def fmt(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    header = f"{'run':<22} {'held-out exact match':>21} {'final train loss':>17} {'sam_sharpness':>14} {'time':>8}"
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row['run']:<22} {fmt(row['eval_exact_match'], '.3f'):>21} {fmt(row['final_train_loss'], '.4f'):>17} "
            f"{fmt(row['final_sam_sharpness'], '.4f'):>14} {fmt(row['runtime_s'], '.0f'):>7}s"
        )
    return "\n".join(lines)


def lm_part(opts: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Base model, LoRA + AdamW and LoRA + SAM on the noisy word-reversal task, through `sft_lora.py`."""
    sft = load_module(HERE / "sft_lora.py", "hf_sam_example_sft_lora")
    from _common import held_out_exact_match, reverse_task_conversations
    from embedded import smollm2_path
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print("== base model: held-out exact match before fine-tuning", flush=True)
    _, training_args, _, _, example_args = sft.make_parser().parse_args_and_config(
        args=run_args(opts, out / "adamw", use_sam=False)
    )
    test = reverse_task_conversations(example_args, training_args.seed)["test"]
    heldout = write_heldout(test, out / "heldout.jsonl")
    base_model = AutoModelForCausalLM.from_pretrained(smollm2_path())
    t0 = time.perf_counter()
    base_em, base_records = held_out_exact_match(base_model, AutoTokenizer.from_pretrained(smollm2_path()), test,
                                                 example_args)  # fmt: skip
    base_runtime = time.perf_counter() - t0
    del base_model
    print(f"base exact match: {base_em:.3f} (e.g. {base_records[0]['prompt']!r} -> {base_records[0]['prediction']!r})")
    runs: dict[str, Any] = {}
    for label, use_sam in (("AdamW", False), ("SAM", True)):
        print(f"== LoRA + {label}: {opts.max_steps} steps", flush=True)
        runs[label] = sft.run(run_args(opts, out / label.lower(), use_sam=use_sam))
    rows = [{"run": "base (no fine-tuning)", "eval_exact_match": base_em, "final_train_loss": None,
             "final_sam_sharpness": None, "runtime_s": base_runtime}]  # fmt: skip
    for label, metrics in runs.items():
        rows.append(
            {
                "run": f"LoRA + {label}" + (f" (rho={opts.sam_rho})" if label == "SAM" else ""),
                "eval_exact_match": metrics.get("eval_exact_match"),
                "final_train_loss": metrics.get("final_loss"),
                "final_sam_sharpness": metrics.get("final_sam_sharpness"),
                "runtime_s": metrics.get("train_runtime_s", 0) + metrics.get("eval_generation_runtime_s", 0),
            }
        )
    return {"runs": runs, "table": rows, "base_examples": base_records[:5], "heldout_file": str(heldout)}


def write_heldout(test: Any, path: Path) -> Path:
    """The held-out prompts and answers as `{"prompt", "completion"}` lines of plain text, for `hf-sam --data`.

    The runs are trained and scored through the chat template (with the system prompt): measure them with
    `--chat-template --system-prompt ...`, which builds the same turns from these lines.
    """
    from _common import _text

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for prompt, completion in zip(test["prompt"], test["completion"]):
            f.write(json.dumps({"prompt": _text(prompt), "completion": _text(completion)}) + "\n")
    return path


def lm_reading(opts: argparse.Namespace, lm: dict[str, Any]) -> str:
    """This run's SAM - AdamW next to what the benchmark measured over seeds on the same setting."""
    diff_here = lm["runs"]["SAM"]["eval_exact_match"] - lm["runs"]["AdamW"]["eval_exact_match"]
    line = f"SAM - AdamW here: {100 * diff_here:+.1f} points (one seed). "
    bench_sam, bench_adamw = (
        benchmark_row("smollm", opts.label_noise, "sam"),
        benchmark_row("smollm", opts.label_noise, "adamw"),
    )
    same_setting = opts.max_steps == 120 and opts.eval_size == 100 and opts.sam_rho == 0.05
    if bench_sam is None or bench_adamw is None or not same_setting:
        return line + "The benefit benchmark has no multi-seed measurement of this exact setting to read it against."
    d = bench_sam["accuracy"]["diff"]
    return line + (
        f"The benefit benchmark, same setting, {d['n']} seeds: AdamW {bench_adamw['accuracy']['mean']:.3f} "
        f"(sd {bench_adamw['accuracy']['sd']:.3f}), SAM {bench_sam['accuracy']['mean']:.3f} "
        f"(sd {bench_sam['accuracy']['sd']:.3f}), SAM - AdamW {100 * d['mean']:+.1f} points, 95% interval "
        f"[{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]: {verdict(d)}."
    )


def plot_curves(lm: dict[str, Any] | None, image: dict[str, Any], path: Path) -> None:
    """Left: held-out accuracy per seed (image part). Right: LM training loss of both runs (SAM's w + e dashed)."""
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
        for (label, metrics), color in zip(lm["runs"].items(), ("tab:blue", "tab:orange")):
            curves = metrics["curves"]
            ax.plot(curves["step"], curves["loss"], color=color, label=f"{label}: training loss")
            perturbed = curves.get("sam_perturbed_loss") or []
            if any(v is not None for v in perturbed):
                ax.plot(curves["step"], perturbed, color=color, linestyle="--", label=f"{label}: loss at w + e")
        ax.set_title("SmolLM2-135M + LoRA, noisy word reversal: training loss")
        ax.set_xlabel("optimizer step")
        ax.set_yscale("log")
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
    getattr(bench, "benefit_tasks", bench).WORKDIR = out / "image"

    print(f"== part 1: ResNet on digits, {opts.image_noise:.0%} wrong training labels, AdamW vs SAM", flush=True)
    image = image_part(opts, bench)
    lm = None if opts.skip_lm else lm_part(opts, out)
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
        print(format_lm_table(lm["table"]))
        print(f"held-out: {opts.eval_size} prompts with words never seen in training; exact match, greedy decoding")
        print(lm_reading(opts, lm))
    print(f"\ntotal time: {results['total_runtime_s']:.0f}s")
    written = [out / "results.json", out / "training_curves.png"] + ([lm["heldout_file"]] if lm else [])
    print("wrote " + ", ".join(str(p) for p in written))
    return results


if __name__ == "__main__":
    main()
