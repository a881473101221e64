#!/usr/bin/env python
"""The main job: LoRA fine-tuning of SmolLM2-135M-Instruct, AdamW versus SAM, on CPU, with no network.

Runs `examples/sft_lora.py` three ways on the embedded word-reversal task (held-out split: unseen words):

1. the base model, no fine-tuning (held-out exact match only);
2. LoRA + AdamW (TRL's `SFTTrainer`);
3. LoRA + SAM (`hf_sam.trl.SAMSFTTrainer`): same seed, data order, step budget and hyper-parameters.

It prints a table (held-out exact match, final training loss, `sam_sharpness`), and writes `results.json` and
`training_curves.png` under `--output_dir` (default `outputs/demo`), with each run's adapter and metrics in a
subdirectory. The defaults fit in about 15 minutes on 2 CPU cores.

Example:
    ```bash
    make demo                      # = python examples/demo.py --output_dir outputs/demo
    python examples/demo.py --max_steps 60 --sam_rho 0.1
    ```
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent


def load_sft_module() -> Any:
    """Import `examples/sft_lora.py` (a script, not a package module)."""
    spec = importlib.util.spec_from_file_location("hf_sam_example_sft_lora", HERE / "sft_lora.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def build_parser() -> argparse.ArgumentParser:
    """The demo's few knobs; everything else is fixed in `run_args`."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--output_dir", default="outputs/demo", help="Where results, plot and runs go.")
    p.add_argument("--max_steps", type=int, default=120, help="Optimizer steps per run (both runs).")
    p.add_argument("--batch_size", type=int, default=8, help="Training batch size.")
    p.add_argument("--learning_rate", type=float, default=2e-3, help="Peak learning rate (linear decay, warmup).")
    p.add_argument("--sam_rho", type=float, default=0.05, help="SAM's neighbourhood radius.")
    p.add_argument("--lora_r", type=int, default=8, help="LoRA rank.")
    p.add_argument("--lora_last_layers", type=int, default=8, help="Adapt only the last N of the 30 layers.")
    p.add_argument("--train_size", type=int, default=2000, help="Generated training examples.")
    p.add_argument("--eval_size", type=int, default=100, help="Held-out examples (unseen words).")
    p.add_argument("--words", type=int, default=3, help="Words per example (training and held-out).")
    p.add_argument("--system_prompt", default="Be brief.", help="System message (short: fewer tokens per step).")
    p.add_argument("--label_noise", type=float, default=0.0, help="Fraction of corrupted training answers.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the data, the LoRA init and the data order.")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads.")
    p.add_argument("--logging_steps", type=int, default=5, help="Steps between training-loss logs.")
    return p


def run_args(opts: argparse.Namespace, output_dir: Path, use_sam: bool) -> list[str]:
    """The `sft_lora.py` command line of one run."""
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


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of the runs."""

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


def plot_curves(runs: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    """Training loss of each run against the step (and SAM's perturbed loss), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for (label, metrics), color in zip(runs.items(), ("tab:blue", "tab:orange")):
        curves = metrics["curves"]
        ax.plot(curves["step"], curves["loss"], color=color, label=f"{label}: training loss")
        perturbed = curves.get("sam_perturbed_loss") or []
        if any(v is not None for v in perturbed):
            ax.plot(curves["step"], perturbed, color=color, linestyle="--", label=f"{label}: loss at w + e (SAM)")
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (completion tokens, mean per token)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the three evaluations and two trainings; print the table; write results and plot."""
    opts = build_parser().parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(opts.threads))
    import torch

    torch.set_num_threads(opts.threads)
    sft = load_sft_module()
    out = Path(opts.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    print("== base model: held-out exact match before fine-tuning", flush=True)
    model_args, data_args, _, _, args = sft.parse_args(run_args(opts, out / "adamw", use_sam=False))
    path = sft.resolve_model_path(model_args)
    tokenizer = sft.load_tokenizer(path)
    base_model = sft.load_model(path, model_args)
    base_data = sft.load_data(data_args, args.seed)["validation"]
    t0 = time.perf_counter()
    base_em, base_records = sft.evaluate_held_out(base_model, tokenizer, base_data, data_args)
    base_runtime = time.perf_counter() - t0
    del base_model
    print(f"base exact match: {base_em:.3f} (e.g. {base_records[0]['prompt']!r} -> {base_records[0]['prediction']!r})")

    results: dict[str, Any] = {"runs": {}}
    for label, use_sam in (("AdamW", False), ("SAM", True)):
        print(f"== LoRA + {label}: {opts.max_steps} steps", flush=True)
        metrics = sft.main(run_args(opts, out / label.lower(), use_sam=use_sam))
        results["runs"][label] = metrics

    rows = [
        {
            "run": "base (no fine-tuning)",
            "eval_exact_match": base_em,
            "final_train_loss": None,
            "final_sam_sharpness": None,
            "runtime_s": base_runtime,
        }
    ]
    for label, metrics in results["runs"].items():
        rows.append(
            {
                "run": f"LoRA + {label}" + (f" (rho={opts.sam_rho})" if label == "SAM" else ""),
                "eval_exact_match": metrics.get("eval_exact_match"),
                "final_train_loss": metrics.get("final_loss"),
                "final_sam_sharpness": metrics.get("final_sam_sharpness"),
                "runtime_s": metrics.get("train_runtime_s", 0) + metrics.get("eval_generation_runtime_s", 0),
            }
        )
    table = format_table(rows)
    results.update(
        {
            "settings": vars(opts),
            "base": {"eval_exact_match": base_em, "eval_samples": len(base_records), "examples": base_records[:5]},
            "table": rows,
            "total_runtime_s": time.perf_counter() - started,
            "torch_threads": torch.get_num_threads(),
        }
    )
    plot_curves(
        results["runs"],
        out / "training_curves.png",
        f"SmolLM2-135M + LoRA on word reversal: AdamW vs SAM (rho={opts.sam_rho}, {opts.max_steps} steps)",
    )
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(table)
    print(f"\nheld-out: {len(base_records)} prompts with words never seen in training; exact match by greedy decoding")
    print(f"total time: {results['total_runtime_s']:.0f}s")
    print(f"wrote {out / 'results.json'} and {out / 'training_curves.png'}")
    return results


if __name__ == "__main__":
    main()
