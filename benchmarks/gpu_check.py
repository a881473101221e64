"""One-GPU check of hf_sam: SAM against the two-pass floor and a plain step, QLoRA, torch.compile, CUDA kernels.

Needs one CUDA GPU; without one it exits at once with status 2. On the GPU it prints one table (and writes it to
`<output_dir>/gpu_check.json`), in an estimated 3 to 5 minutes on a recent data-centre GPU: an estimate, not a
measurement, since the script has not yet run on any GPU. The rows:

- `plain`, `floor`, `sam` in bf16 (autocast) and in fp16 with GradScaler (`fp16=True`): the rows of
  `benchmarks/bench_sam.py` (imported from it: the floor runs two forward-backward passes with no perturbation, the
  cheapest any SAM step can be), on its 25M-parameter Llama built from a config, full fine-tuning with AdamW. Each
  step is timed with CUDA events from the Trainer's `on_step_begin` to `on_step_end` (both passes, clipping, optimizer
  step), after warm-up steps; the median and a 95% bootstrap interval of the median are shown, and x floor / x plain
  are ratios of medians within the same precision.
- `floor` and `sam` with `torch_compile=True` (bf16): SAM's passes through the compiled model.
- QLoRA with SAM: `examples/sft_lora.py --load_in_4bit` (bitsandbytes NF4 base, LoRA adapters, bf16) on the
  embedded SmolLM2-135M-Instruct, a few steps in a subprocess; its mean step time includes the first steps.
- CUDA kernels per step (`torch.profiler`, device kernel events, no memcpy/memset) of one plain, floor and SAM step in
  bf16, and how many SAM adds to the floor: its perturbation and restore should be a few dozen `_foreach` kernels.

Usage:
    python benchmarks/gpu_check.py                                # everything (estimated 3-5 min, never timed)
    python benchmarks/gpu_check.py --skip qlora compile           # the precision rows and the kernel count only
    python benchmarks/gpu_check.py --steps 50 --batch_size 32 --output_dir outputs/gpu_check
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

NEEDS_GPU = (
    "gpu_check needs one CUDA GPU, and torch sees none (torch.cuda.is_available() is False). Run it on a machine "
    "with an NVIDIA GPU and a CUDA build of torch; CPU costs are measured by benchmarks/bench_sam.py."
)
PRECISIONS = {"bf16": {"bf16": True}, "fp16": {"fp16": True}}  # fp16=True: autocast + Accelerate's GradScaler
PRECISION_LABELS = {"bf16": "bf16", "fp16": "fp16 + GradScaler", "4bit": "NF4 base, bf16 LoRA"}
PARTS = ("precision", "compile", "qlora", "kernels")
ROOT = Path(__file__).resolve().parents[1]


def load_bench_sam():
    """`benchmarks/bench_sam.py` as a module (benchmarks/ is not a package): its row definitions and statistics."""
    if "bench_sam" in sys.modules:
        return sys.modules["bench_sam"]
    spec = importlib.util.spec_from_file_location("bench_sam", Path(__file__).with_name("bench_sam.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


# ---- results into a table (no GPU needed: tested on CPU with made-up timings) ---------------------------------------
def row_summary(
    name: str, precision: str, times_ms: list[float], peak_bytes: int | None = None, **extra: Any
) -> dict[str, Any]:
    """One row from its per-step times (ms): median, 95% bootstrap interval of the median, peak memory."""
    bench = load_bench_sam()
    lo, hi = bench._median_ci(times_ms)
    return {
        "row": name,
        "precision": precision,
        "steps": len(times_ms),
        "median_ms": bench._median(times_ms),
        "ci_ms": [lo, hi],
        "peak_mib": peak_bytes / 2**20 if peak_bytes is not None else float("nan"),
        "kernels": None,
        "notes": "",
        "step_times_ms": list(times_ms),
        **extra,
    }


def skipped_row(name: str, precision: str, why: str) -> dict[str, Any]:
    """A row that did not run, with the reason in its notes."""
    row = row_summary(name, precision, [])
    row["notes"] = why
    return row


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """x floor and x plain of each row: ratios of medians to the rows of the same precision and compile setting."""
    for row in rows:
        group = [r for r in rows if r["precision"] == row["precision"] and r.get("compiled") == row.get("compiled")]
        refs = {r["row"].split(",")[0]: r["median_ms"] for r in group}
        for ref in ("floor", "plain"):
            base = refs.get(ref, float("nan"))
            ok = not math.isnan(base) and base > 0 and not math.isnan(row["median_ms"])
            row[f"x_{ref}"] = row["median_ms"] / base if ok else float("nan")


def count_kernels(events: Any) -> int:
    """CUDA kernels among profiler events (kineto's: objects with `.name()` and `.device_type()`); no memcpy/memset."""
    from torch.autograd import DeviceType

    return sum(
        1
        for e in events
        if e.device_type() == DeviceType.CUDA and not e.name().startswith(("Memcpy", "Memset", "memcpy", "memset"))
    )


def kernel_row(counts: dict[str, int]) -> dict[str, Any]:
    """The summary row: kernels one SAM step adds over the two-pass floor (both profiled in bf16)."""
    row = skipped_row("sam - floor, kernels added", "bf16", "")
    if any(counts.get(k) is None for k in ("plain", "floor", "sam")):
        row["notes"] = f"profiling gave no count: {counts}"
        return row
    if counts["floor"] == 0:
        row["notes"] = f"the profiler saw no CUDA kernel (is CUPTI available?): {counts}"
        return row
    added = counts["sam"] - counts["floor"]
    row["kernels"] = added
    row["notes"] = (
        f"per step: plain {counts['plain']}, floor {counts['floor']}, sam {counts['sam']}; "
        f"SAM's perturbation and restore add {added:+d}"
    )
    return row


def _fmt(value: float, spec: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def format_table(rows: list[dict[str, Any]]) -> str:
    """The Markdown table that the script prints."""
    lines = [
        "| row | precision | steps | median step, ms (95% CI) | × floor | × plain | peak memory, MiB "
        "| CUDA kernels per step | notes |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lo, hi = r["ci_ms"]
        median = _fmt(r["median_ms"], ".2f")
        if not math.isnan(lo):
            median += f" ({lo:.2f} to {hi:.2f})"
        kernels = "" if r["kernels"] is None else str(r["kernels"])
        lines.append(
            f"| {r['row']} | {PRECISION_LABELS.get(r['precision'], r['precision'])} | {r['steps']} | {median} "
            f"| {_fmt(r.get('x_floor', float('nan')), '.3f')} | {_fmt(r.get('x_plain', float('nan')), '.3f')} "
            f"| {_fmt(r['peak_mib'], '.0f')} | {kernels} | {r['notes']} |"
        )
    return "\n".join(lines)


def write_json(path: Path, rows: list[dict[str, Any]], environment: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"environment": environment, "rows": rows}, indent=2) + "\n")


# ---- the measurements (CUDA) ----------------------------------------------------------------------------------------
def _step_timer():
    import torch
    from transformers import TrainerCallback

    class CudaStepTimer(TrainerCallback):
        """CUDA events around each optimizer step; read once at the end (no synchronisation inside the run)."""

        def __init__(self) -> None:
            self.pairs: list[tuple[Any, Any]] = []

        def on_step_begin(self, args, state, control, **kwargs):
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self.pairs.append((start, None))

        def on_step_end(self, args, state, control, **kwargs):
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.pairs[-1] = (self.pairs[-1][0], end)

        def times_ms(self) -> list[float]:
            torch.cuda.synchronize()
            return [s.elapsed_time(e) for s, e in self.pairs if e is not None]

    return CudaStepTimer()


def _profile_step_callback(step: int):
    """Profiles (CPU + CUDA activity) exactly the optimizer step `step` (0-based)."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    class ProfileOneStep(TrainerCallback):
        def __init__(self) -> None:
            self.prof = None
            self.kernels: int | None = None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == step:
                torch.cuda.synchronize()
                self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                self.prof.start()

        def on_step_end(self, args, state, control, **kwargs):
            if self.prof is not None and self.kernels is None:
                torch.cuda.synchronize()
                self.prof.stop()
                self.kernels = count_kernels(self.prof.profiler.kineto_results.events())

    return ProfileOneStep()


def make_trainer(row: str, precision: str, args: argparse.Namespace, max_steps: int, compiled: bool = False):
    """The Trainer of `row` ("plain", "floor" or "sam") on a fresh copy of bench_sam's 25M Llama, on the GPU."""
    import torch
    from transformers import PrinterCallback, Trainer, TrainingArguments

    from hf_sam import SAMTrainer, SAMTrainingArguments

    bench = load_bench_sam()
    model, vocab = bench.build_model("llama25m")
    ids = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": x, "labels": x.clone()} for x in ids] * max_steps  # one batch, repeated
    common = dict(
        output_dir=tempfile.mkdtemp(prefix="gpu_check_"),
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
        per_device_train_batch_size=args.batch_size,
        max_steps=max_steps,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        torch_compile=compiled,
        **PRECISIONS[precision],
    )
    if row == "sam":
        trainer = SAMTrainer(
            model=model, args=SAMTrainingArguments(**common, **bench.VARIANTS["sam"]), train_dataset=data
        )
    else:
        cls = bench.floor_trainer_class() if row == "floor" else Trainer
        trainer = cls(model=model, args=TrainingArguments(**common), train_dataset=data)
    trainer.remove_callback(PrinterCallback)
    return trainer


def time_row(row: str, precision: str, args: argparse.Namespace, compiled: bool = False) -> dict[str, Any]:
    import torch

    trainer = make_trainer(row, precision, args, args.warmup + args.steps, compiled)
    timer = _step_timer()
    trainer.add_callback(timer)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    times = timer.times_ms()[args.warmup :]
    name = f"{row}, torch_compile" if compiled else row
    result = row_summary(name, precision, times, torch.cuda.max_memory_allocated(), compiled=compiled)
    if compiled:
        result["notes"] = f"first {args.warmup} steps (compilation) not timed"
    del trainer
    torch.cuda.empty_cache()
    return result


def _measured(row: str, precision: str, args: argparse.Namespace, compiled: bool) -> dict[str, Any]:
    """`time_row`, or a row that says why it failed: one failure should not lose the other rows."""
    name = f"{row}, torch_compile" if compiled else row
    try:
        result = time_row(row, precision, args, compiled)
    except Exception as err:
        result = skipped_row(name, precision, f"failed: {type(err).__name__}: {str(err)[:200]}")
        result["compiled"] = compiled
    print(f"  {name} ({precision}): {result['median_ms']:.2f} ms {result['notes']}", flush=True)
    return result


def kernels_per_step(row: str, args: argparse.Namespace) -> int | None:
    """CUDA kernels of one bf16 step of `row`, profiled after two unprofiled steps."""
    trainer = make_trainer(row, "bf16", args, max_steps=3)
    probe = _profile_step_callback(step=2)
    trainer.add_callback(probe)
    trainer.train()
    return probe.kernels


def qlora_row(args: argparse.Namespace) -> dict[str, Any]:
    """`examples/sft_lora.py --load_in_4bit` with SAM for a few steps, in a subprocess."""
    name = "sam, QLoRA via examples/sft_lora.py"
    if importlib.util.find_spec("bitsandbytes") is None:
        return skipped_row(name, "4bit", "skipped: bitsandbytes is not installed (pip install bitsandbytes)")
    out = Path(args.output_dir) / "qlora"
    cmd = [
        sys.executable,
        str(ROOT / "examples" / "sft_lora.py"),
        "--output_dir",
        str(out),
        "--load_in_4bit",
        "true",
        "--dtype",
        "bfloat16",
        "--bf16",
        "true",
        "--max_steps",
        str(args.qlora_steps),
        "--per_device_train_batch_size",
        "8",
        "--logging_steps",
        "1",
        "--save_strategy",
        "no",
        "--report_to",
        "none",
        "--task_train_size",
        "256",
        "--task_eval_size",
        "8",
        "--max_new_tokens",
        "12",
        "--sam_rho",
        "0.05",
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        (Path(args.output_dir) / "qlora.log").parent.mkdir(parents=True, exist_ok=True)
        (Path(args.output_dir) / "qlora.log").write_text(proc.stdout + proc.stderr)
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return skipped_row(name, "4bit", f"failed (exit {proc.returncode}, log in qlora.log): {last[0][:200]}")
    metrics_file = out / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    runtime = metrics.get("train_runtime_s")
    row = skipped_row(name, "4bit", "")
    if runtime is not None:
        row["median_ms"] = runtime / args.qlora_steps * 1e3  # a mean over all steps, first ones included
        row["steps"] = args.qlora_steps
    notes = [f"ran {args.qlora_steps} steps; mean step (first steps included), {wall:.0f} s with loading"]
    for key in ("final_loss", "final_sam_sharpness", "final_sam_skipped", "eval_exact_match"):
        if key in metrics:
            notes.append(f"{key.removeprefix('final_')} {metrics[key]:.3g}")
    row["notes"] = "; ".join(notes)
    return row


def environment() -> dict[str, Any]:
    import torch
    import transformers

    env = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "gpu": torch.cuda.get_device_name(0),
        "gpus_visible": torch.cuda.device_count(),
    }
    with contextlib.suppress(ImportError):
        import bitsandbytes

        env["bitsandbytes"] = bitsandbytes.__version__
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="outputs/gpu_check", help="Where gpu_check.json (and logs) go.")
    parser.add_argument("--steps", type=int, default=20, help="Timed steps per row.")
    parser.add_argument("--warmup", type=int, default=5, help="Untimed steps first (compilation included).")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--qlora_steps", type=int, default=10)
    parser.add_argument("--skip", nargs="*", default=[], choices=PARTS, help="Parts to leave out.")
    args = parser.parse_args(argv)

    # One GPU: with several visible, the Trainer would wrap the model in DataParallel. Set before CUDA starts.
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")
    import torch

    if not torch.cuda.is_available():
        print(NEEDS_GPU, file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    start = time.perf_counter()
    env = environment()
    print(f"gpu_check: {env['gpu']}, torch {env['torch']} (CUDA {env['cuda']}), transformers {env['transformers']}")
    rows: list[dict[str, Any]] = []
    if "precision" not in args.skip:
        for precision in PRECISIONS:
            for row in ("plain", "floor", "sam"):
                rows.append(_measured(row, precision, args, compiled=False))
    if "compile" not in args.skip:
        for row in ("floor", "sam"):
            rows.append(_measured(row, "bf16", args, compiled=True))
    if "qlora" not in args.skip:
        rows.append(qlora_row(args))
        print(f"  qlora: {rows[-1]['notes']}", flush=True)
    add_ratios(rows)
    if "kernels" not in args.skip:
        counts = {}
        for row in ("plain", "floor", "sam"):
            try:
                counts[row] = kernels_per_step(row, args)
            except Exception as err:
                print(f"  kernels of {row}: failed: {type(err).__name__}: {err}", flush=True)
                counts[row] = None
        for r in rows:
            if r["precision"] == "bf16" and not r.get("compiled") and r["row"] in counts:
                r["kernels"] = counts[r["row"]]
        rows.append(kernel_row(counts))
    env["seconds"] = round(time.perf_counter() - start, 1)
    env["batch"] = f"{args.batch_size} x {args.seq_len} tokens"
    table = format_table(rows)
    print(
        f"\nLlama 25.3M from a config (bench_sam's case a), full fine-tuning, AdamW, {env['batch']} per step, "
        f"{args.steps} timed steps after {args.warmup} warm-up; {env['seconds']:.0f} s in all\n"
    )
    print(table)
    write_json(Path(args.output_dir) / "gpu_check.json", rows, env)
    print(f"\n(written to {Path(args.output_dir) / 'gpu_check.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
