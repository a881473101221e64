"""Step time and peak memory of hf_sam's SAM against the two-pass floor, a plain step and a peer SAM.

Every row trains the same model on the same batch with the Hugging Face `Trainer`:

- `plain`: one forward-backward pass per step (the Trainer as is).
- `floor`: two forward-backward passes per step on the same inputs with no perturbation; the second pass's gradient
  is the one the optimizer uses. No SAM step can be cheaper: the ratio SAM / floor is SAM's own overhead.
- `floor-2`: the floor again, in a process of its own (an A/A check of the method's noise).
- `peer`: `pytorch_optimizer.SAM` (AdamW inside) driven by a minimal Trainer subclass, its documented two-step use.
- one row per hf_sam variant in `VARIANTS` (a name and its `sam_*` arguments; `--variants` picks them).

Cases: (a) `llama25m`, full fine-tuning of a 25M-parameter Llama built from a config; (b) `smollm2-lora`, LoRA on
every linear projection of the embedded SmolLM2-135M (420 small adapter tensors). `--tiny` swaps in tiny models.

Method (docs/benchmarks.md has the details): each row trains in its own process on one thread; all rows' processes
live at once but run one step at a time, the row order rotating every step. A step's time is its CPU time
(`time.process_time`) from the Trainer's `on_step_begin` to `on_step_end` (both passes, clipping, optimizer step);
warm-up steps are dropped, and a ratio is the median over steps of (row's step k) / (reference's step k). The time
inside the forward-backward passes (`Trainer.training_step`) is measured too: every row's passes do the same work, so
a row's time around them minus the floor's is what the row adds, free of the few per cent by which one process's
passes run faster than another's (the A/A row shows that spread). Extra peak memory, in multiples of the trainable
parameters' bytes, is the row's peak minus the plain row's peak, measured two ways: the bytes torch allocates (exact:
`torch.profiler` memory events over a fresh 2-step run) and the resident set (the kernel's high-water mark, reset
just before `train()`).

Usage:
    python benchmarks/bench_sam.py                 # both cases, ~12 minutes on 2 CPU cores
    python benchmarks/bench_sam.py --quick         # smoke run, rows in one process, ~2 minutes
    python benchmarks/bench_sam.py --quick --tiny  # tiny models, seconds (what tests/test_benchmarks.py runs)
    python benchmarks/bench_sam.py --variants sam asam looksam
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.util
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULT_PREFIX = "BENCH_RESULT "
STEP_PREFIX = "BENCH_STEP "
# "floor-2" is the floor again in a process of its own: an A/A check. Identical work, so its ratios to the floor show
# how much a row's figures move with the process it happens to run in (memory placement), not with what it does.
REFERENCE_ROWS = ("plain", "floor", "floor-2", "peer")

# hf_sam rows: a name and the `sam_*` arguments of `SAMTrainingArguments`. Add a row per variant here; a row with
# "cases" runs only on those cases (e.g. a LoRA-only method).
VARIANTS: dict[str, dict[str, Any]] = {
    "sam": {"sam_rho": 0.05},
    "asam": {"sam_rho": 0.5, "sam_adaptive": True},
    "sam-micro": {"sam_rho": 0.05, "sam_accumulation": "micro"},
    "looksam": {"sam_rho": 0.05, "sam_method": "looksam", "sam_looksam_interval": 5},
    "sam-every-2": {"sam_rho": 0.05, "sam_interval": 2},
    "sam-quarter-batch": {"sam_rho": 0.05, "sam_ascent_fraction": 0.25},
    "sam-late": {"sam_rho": 0.05, "sam_start_fraction": 0.85},
    "rho-lr": {"sam_rho": 0.05, "sam_rho_schedule": "lr"},
    "flat-lora": {"sam_rho": 0.05, "sam_method": "flat_lora", "cases": ["smollm2-lora", "tiny-lora"]},
    "functional": {"sam_rho": 0.05, "sam_method": "functional"},
    "msam": {"sam_rho": 3.0, "sam_method": "msam"},
    "friendly": {"sam_rho": 0.05, "sam_method": "friendly"},
    "sam-adam-preconditioned": {"sam_rho": 0.05, "sam_preconditioner": "adam"},
}
DEFAULT_VARIANTS = ("sam",)


@dataclasses.dataclass(frozen=True)
class Case:
    """One model and batch. `steps` are measured after `warmup` steps; `quick_*` for `--quick`."""

    name: str
    description: str
    batch_size: int
    seq_len: int
    steps: int
    warmup: int
    quick_steps: int
    quick_warmup: int
    quick_seq_len: int


CASES = {
    "llama25m": Case("llama25m", "(a) full fine-tuning, Llama 25.3M from a config", 4, 128, 12, 2, 2, 1, 32),
    "smollm2-lora": Case("smollm2-lora", "(b) LoRA r=8 on all linears, SmolLM2-135M", 2, 128, 8, 1, 2, 1, 32),
}
TINY_CASES = {
    "tiny-full": Case("tiny-full", "tiny Llama, full fine-tuning", 2, 16, 4, 1, 2, 1, 16),
    "tiny-lora": Case("tiny-lora", "tiny Llama, LoRA on all linears", 2, 16, 4, 1, 2, 1, 16),
}


# ---- models ---------------------------------------------------------------------------------------------------------
def _llama(hidden: int, intermediate: int, layers: int, heads: int, vocab: int, positions: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=positions,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).float()


def _with_lora(model):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def smollm2_checkpoint() -> Path:
    """The plain float32 checkpoint of the embedded SmolLM2-135M (converted from its GGUF file on first use)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))  # examples/embedded/
    from embedded.models import smollm2_path

    return Path(smollm2_path())


def build_model(case: str):
    """The model of `case`, identical in every subprocess (fixed seeds)."""
    import torch

    if case == "llama25m":
        return _llama(512, 1152, 6, 8, 8192, 512), 8192
    if case == "smollm2-lora":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(smollm2_checkpoint(), dtype=torch.float32)
        torch.manual_seed(0)
        return _with_lora(model), model.config.vocab_size
    if case == "tiny-full":
        return _llama(32, 64, 2, 2, 128, 64), 128
    if case == "tiny-lora":
        return _with_lora(_llama(32, 64, 2, 2, 128, 64)), 128
    raise ValueError(f"Unknown case {case!r}.")


# ---- trainers -------------------------------------------------------------------------------------------------------
def floor_trainer_class():
    """The floor: a Trainer whose step runs two forward-backward passes on the same inputs, no perturbation."""
    from transformers import Trainer

    class FloorTrainer(Trainer):
        """Two forward-backward passes on the same inputs, no perturbation: the cost floor of any SAM step.

        The gradient accumulated over earlier micro-batches is set aside during the first pass, whose gradient is
        then dropped; the second pass accumulates onto it, so the optimizer sees what SAM's second pass would give.
        """

        _floor_params: list | None = None

        def training_step(self, model, inputs, num_items_in_batch=None):
            if self._floor_params is None:  # listed once: the floor carries no per-step bookkeeping
                self._floor_params = [p for p in model.parameters() if p.requires_grad]
            accumulated = [p.grad for p in self._floor_params]
            for p in self._floor_params:
                p.grad = None
            loss = super().training_step(model, inputs, num_items_in_batch)
            for p, g in zip(self._floor_params, accumulated):
                p.grad = g  # drops the first pass's gradient
            super().training_step(model, inputs, num_items_in_batch)
            return loss

    return FloorTrainer


def peer_trainer_class():
    """The peer: `pytorch_optimizer.SAM` in a minimal Trainer subclass, used the way its documentation shows."""
    from pytorch_optimizer import SAM
    from transformers import Trainer

    class TrainerSAM(SAM):
        """`pytorch_optimizer.SAM` whose closure-less `step()` (the Trainer's call) is its `second_step()`."""

        def step(self, closure=None):
            if closure is not None:
                return super().step(closure)
            self.second_step()  # w + e -> w, then the base optimizer steps with the SAM gradient
            return None

    class PeerSAMTrainer(Trainer):
        """The peer's two-step use: pass 1, `first_step(zero_grad=True)`, pass 2; the Trainer's step: `second_step`."""

        peer_rho = 0.05

        def create_optimizer(self, model=None):
            if self.optimizer is None:
                model = model if model is not None else self.model
                decay = set(self.get_decay_parameter_names(model))
                params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
                groups = [
                    {"params": [p for n, p in params if n in decay], "weight_decay": self.args.weight_decay},
                    {"params": [p for n, p in params if n not in decay], "weight_decay": 0.0},
                ]
                base_cls, base_kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, model)
                self.optimizer = TrainerSAM(groups, base_cls, rho=self.peer_rho, **base_kwargs)
            return self.optimizer

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)  # gradient at w
            self.optimizer.optimizer.first_step(zero_grad=True)  # w -> w + e (under accelerate's wrapper)
            super().training_step(model, inputs, num_items_in_batch)  # gradient at w + e
            return loss  # the Trainer then clips and calls optimizer.step(), i.e. second_step()

    return PeerSAMTrainer


# ---- the worker: one row of one case, in its own process ----------------------------------------------------------
def _status_kib(field: str) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark of this process (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _peak_rss_bytes(reset_ok: bool) -> int:
    hwm = _status_kib("VmHWM") if reset_ok else None
    if hwm is not None:
        return hwm * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB, since process start


def _make_trainer(case: Case, row: str, sam_kwargs: dict[str, Any], max_steps: int, seq_len: int):
    """A fresh model and the Trainer of `row` on it; returns (trainer, model)."""
    import torch
    from transformers import PrinterCallback, Trainer, TrainingArguments

    from hf_sam import SAMTrainer, SAMTrainingArguments

    model, vocab = build_model(case.name)
    # One batch, repeated: every step of every row sees the same inputs.
    ids = torch.randint(0, vocab, (case.batch_size, seq_len), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": x, "labels": x.clone()} for x in ids] * max_steps
    common = dict(
        output_dir=tempfile.mkdtemp(prefix="bench_sam_"),
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        per_device_train_batch_size=case.batch_size,
        max_steps=max_steps,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        optim="adamw_torch",
    )
    if row in REFERENCE_ROWS:
        cls = {
            "plain": lambda: Trainer,
            "floor": floor_trainer_class,
            "floor-2": floor_trainer_class,
            "peer": peer_trainer_class,
        }[row]()
        trainer = cls(model=model, args=TrainingArguments(**common), train_dataset=data)
    else:
        trainer = SAMTrainer(model=model, args=SAMTrainingArguments(**common, **sam_kwargs), train_dataset=data)
    trainer.remove_callback(PrinterCallback)  # no end-of-training metrics on stdout
    return trainer, model


def _peak_allocated_bytes(trainer) -> int:
    """Train under the profiler's memory tracking; the peak of the bytes allocated (net of frees) since `train()`.

    The count is exact and allocator-independent: every CPU tensor allocation and free that torch makes, in order.
    Memory held before `train()` (the model) is not counted; the optimizer state and SAM's buffers, created in the
    first step, are.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        trainer.train()
    # The raw event stream: one "[memory]" event per allocation (+bytes) or free (-bytes), with its timestamp.
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


class PassTimer:
    """CPU time spent inside `Trainer.training_step`, the forward-backward pass that every row runs the same way.

    Every row's passes go through it: the plain Trainer's own, the floor's and the peer's `super().training_step`,
    and SAMTrainer's (its mixin calls the parent's). A step's time minus its passes' time is the work the row does
    around them (its perturbation and restore, clipping, the optimizer step): short and steady, so the difference
    between a row's and the floor's carries far less noise than the ratio of whole steps.
    """

    def __init__(self) -> None:
        self.total = 0.0

    @contextlib.contextmanager
    def timing(self):
        from transformers import Trainer

        original = Trainer.training_step

        def timed(trainer, *args, **kwargs):
            start = time.process_time()
            try:
                return original(trainer, *args, **kwargs)
            finally:
                self.total += time.process_time() - start

        Trainer.training_step = timed
        try:
            yield self
        finally:
            Trainer.training_step = original


def run_worker(
    case_name: str,
    row: str,
    sam_kwargs: dict[str, Any],
    steps: int,
    warmup: int,
    seq_len: int,
    baton: bool = False,
    memory_steps: int = 2,
) -> dict:
    """Train one row of one case twice: timed, then under memory tracking; return its step times and peaks.

    The timed run measures the CPU time of each step and the resident-set peak. With `baton`, each of its steps waits
    for a line on stdin before it starts and reports its time on stdout when it ends, so that the driver runs one
    step of one row at a time, alternating rows. The memory run trains a fresh copy for `memory_steps` steps.
    """
    import warnings

    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)
    from transformers import TrainerCallback
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    case = {**CASES, **TINY_CASES}[case_name]

    class StepTimer(TrainerCallback):
        def __init__(self, passes: PassTimer) -> None:
            self.times: list[float] = []
            self.pass_times: list[float] = []
            self._passes = passes
            self._start = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            if baton:
                sys.stdin.readline()
            self._passes.total = 0.0
            self._start = time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.process_time() - self._start)
            self.pass_times.append(self._passes.total)
            if baton:
                print(f"{STEP_PREFIX}{self.times[-1]}", flush=True)

    trainer, model = _make_trainer(case, row, sam_kwargs, warmup + steps, seq_len)
    trainable = [p for p in model.parameters() if p.requires_grad]
    info = {
        "case": case_name,
        "row": row,
        "trainable_bytes": sum(p.numel() * p.element_size() for p in trainable),
        "trainable_tensors": len(trainable),
        "trainable_params": sum(p.numel() for p in trainable),
        "total_params": sum(p.numel() for p in model.parameters()),
        "tokens_per_step": case.batch_size * seq_len,
    }
    passes = PassTimer()
    timer = StepTimer(passes)
    trainer.add_callback(timer)
    gc.collect()
    reset_ok = _reset_peak_rss()
    with passes.timing():
        trainer.train()
    info["rss_peak_bytes"] = _peak_rss_bytes(reset_ok)
    info["rss_peak_since_train"] = reset_ok
    info["step_times"] = timer.times[warmup:]
    info["pass_times"] = timer.pass_times[warmup:]
    del trainer, model, trainable
    gc.collect()

    trainer, model = _make_trainer(case, row, sam_kwargs, memory_steps, seq_len)
    info["alloc_peak_bytes"] = _peak_allocated_bytes(trainer)
    del trainer, model
    gc.collect()
    return info


# ---- the driver -----------------------------------------------------------------------------------------------------
def _parse_variants(items: list[str]) -> dict[str, dict[str, Any]]:
    """Names from `VARIANTS`, or inline `NAME={"sam_rho": 0.1, ...}` definitions."""
    out = {}
    for item in items:
        name, _, spec = item.partition("=")
        if spec:
            out[name] = json.loads(spec)
        elif name in VARIANTS:
            out[name] = VARIANTS[name]
        else:
            raise SystemExit(f"Unknown variant {name!r}; known: {', '.join(VARIANTS)} (or NAME='{{json}}').")
        if name in REFERENCE_ROWS or any(k != "cases" and not k.startswith("sam_") for k in out[name]):
            raise SystemExit(f"Variant {name!r}: a new name, and every setting a `sam_*` argument (or `cases`).")
    return out


def _worker_env(allocator: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env["PYTHONWARNINGS"] = "ignore"
    if allocator == "mmap":
        # Every allocation above 64 KiB gets its own mapping, returned on free: the resident set follows the live
        # tensors instead of glibc's heap high-water mark.
        env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="131072")
    return env


def _read_line(proc: subprocess.Popen, prefix: str, what: str, log: Path) -> str:
    """The next stdout line of `proc` that starts with `prefix` (other lines are passed through to stderr)."""
    for line in proc.stdout:
        if line.startswith(prefix):
            return line[len(prefix) :]
        sys.stderr.write(line)
    proc.wait()
    raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{log.read_text()[-6000:]}")


def run_case_interleaved(
    case: str, rows: dict[str, dict], steps: int, warmup: int, seq_len: int, allocator: str
) -> dict[str, dict]:
    """One process per row, all alive at once; one step of one row at a time, the row order rotating every step."""
    procs: dict[str, subprocess.Popen] = {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        logs = {row: Path(tmp) / f"{row}.log" for row in rows}
        for row, sam_kwargs in rows.items():
            spec = {
                "case": case,
                "row": row,
                "sam_kwargs": sam_kwargs,
                "steps": steps,
                "warmup": warmup,
                "seq_len": seq_len,
            }
            procs[row] = stack.enter_context(
                subprocess.Popen(
                    [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                    env=_worker_env(allocator),
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=stack.enter_context(logs[row].open("w")),
                    text=True,
                )
            )
            stack.callback(lambda p=procs[row]: p.poll() is None and p.kill())  # runs before the Popen exits
        names = list(rows)
        for step in range(warmup + steps):
            k = step % len(names)
            for row in names[k:] + names[:k]:
                procs[row].stdin.write("go\n")
                procs[row].stdin.flush()
                _read_line(procs[row], STEP_PREFIX, f"Row {row!r} of case {case!r}", logs[row])
        return {row: json.loads(_read_line(p, RESULT_PREFIX, f"Row {row!r}", logs[row])) for row, p in procs.items()}


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _median_ci(values: list[float], level: float = 0.95, resamples: int = 2000) -> tuple[float, float]:
    """A bootstrap confidence interval of the median (percentile method, fixed seed: the same data, the same CI)."""
    if len(values) < 2:
        return float("nan"), float("nan")
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    tail = int(resamples * (1 - level) / 2)
    return medians[tail], medians[-tail - 1]


def summarize(case: str, results: dict[str, dict]) -> list[dict]:
    """One summary per row: median step time, ratios to floor and plain, extra peak memory over plain.

    A ratio is the median over steps of (this row's step k) / (the reference's step k): the two ran one after the
    other, so a change in the machine's load between steps cancels out of it.
    """

    def ratio_of(row: str, ref: str, key: str) -> float:
        pairs = zip(results[row][key], results[ref][key])
        return _median([a / b for a, b in pairs if b > 0])

    def ratio(row: str, ref: str) -> float:
        return ratio_of(row, ref, "step_times")

    def mean_ratio(row: str, ref: str) -> float:  # for variants whose steps differ (LookSAM, SAM every k steps)
        return sum(results[row]["step_times"]) / sum(results[ref]["step_times"])

    def around(row: str) -> list[float]:  # each step's time outside the forward-backward passes
        return [t - p for t, p in zip(results[row]["step_times"], results[row]["pass_times"])]

    def added_around(row: str) -> list[float]:
        """The row's work around the passes minus the floor's, step by step: what it adds to the floor."""
        if row == "plain":  # one pass, not two: its passes are not the floor's
            return []
        return [a - b for a, b in zip(around(row), around("floor"))]

    floor_median = _median(results["floor"]["step_times"])

    trainable = results["plain"]["trainable_bytes"]

    def extra(row: str, key: str) -> float:
        return results[row][key] - results["plain"][key]

    summaries = []
    for row, r in results.items():
        added = added_around(row)
        added_s = _median(added)
        summaries.append(
            {
                "case": case,
                "row": row,
                "steps": len(r["step_times"]),
                "median_s": _median(r["step_times"]),
                "x_floor": ratio(row, "floor"),
                "x_plain": ratio(row, "plain"),
                "x_plain_mean": mean_ratio(row, "plain"),
                "around_ms": _median(around(row)) * 1e3,
                "extra_around_ms": added_s * 1e3,
                "extra_around_ci_ms": [x * 1e3 for x in _median_ci(added)],
                "x_floor_around": 1 + added_s / floor_median,
                "x_floor_passes": ratio_of(row, "floor", "pass_times"),
                "extra_alloc_mib": extra(row, "alloc_peak_bytes") / 2**20,
                "extra_alloc_x_trainable": extra(row, "alloc_peak_bytes") / trainable,
                "extra_rss_mib": extra(row, "rss_peak_bytes") / 2**20,
                "extra_rss_x_trainable": extra(row, "rss_peak_bytes") / trainable,
                "alloc_peak_mib": r["alloc_peak_bytes"] / 2**20,
                "rss_peak_mib": r["rss_peak_bytes"] / 2**20,
                "step_times": r["step_times"],
                "pass_times": r["pass_times"],
            }
        )
    return summaries


def _fmt(value: float, spec: str) -> str:
    return "n/a" if math.isnan(value) else format(value, spec)


def print_table(case: Case, rows: list[dict], info: dict) -> None:
    print(
        f"\n### {case.name}: {case.description}\n\n"
        f"{info['total_params'] / 1e6:.1f}M parameters, {info['trainable_params'] / 1e6:.2f}M trainable in "
        f"{info['trainable_tensors']} tensors ({info['trainable_bytes'] / 2**20:.1f} MiB), "
        f"{info['tokens_per_step']} tokens per step\n"
    )
    print(
        "| row | steps | median step (CPU s) | × floor | added to the floor's work around the passes, ms (95% CI) "
        "| × floor, from that | × plain | extra peak, allocated (MiB) | × trainable "
        "| extra peak, RSS (MiB) | × trainable | × plain, mean |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        lo, hi = r["extra_around_ci_ms"]
        added = "n/a" if math.isnan(lo) else f"{r['extra_around_ms']:+.1f} ({lo:+.1f} to {hi:+.1f})"
        print(
            f"| {r['row']} | {r['steps']} | {r['median_s']:.3f} | {r['x_floor']:.3f} | "
            f"{added} | "
            f"{_fmt(r['x_floor_around'], '.4f')} | {r['x_plain']:.3f} | "
            f"{r['extra_alloc_mib']:+.1f} | {r['extra_alloc_x_trainable']:+.2f} | "
            f"{_fmt(r['extra_rss_mib'], '+.1f')} | {_fmt(r['extra_rss_x_trainable'], '+.2f')} | "
            f"{r['x_plain_mean']:.3f} |"
        )
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or, with `--worker`, one row of it) and print one table per case."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="A smoke run: few steps, short sequences, rows in this process."
    )
    parser.add_argument("--tiny", action="store_true", help="Tiny models instead of the real cases (for tests).")
    parser.add_argument("--cases", nargs="+", help="Cases to run (default: all of the chosen size).")
    parser.add_argument(
        "--variants", nargs="+", default=list(DEFAULT_VARIANTS), help=f"hf_sam rows, from: {', '.join(VARIANTS)}."
    )
    parser.add_argument("--steps", type=int, help="Measured steps per row (default: the case's).")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="Run the rows one after another in this process (default with --quick and --tiny): no start-up cost, "
        "but no RSS figures and no interleaving of the rows' steps.",
    )
    parser.add_argument(
        "--allocator",
        choices=("mmap", "default"),
        default="mmap",
        help="'mmap' (default): glibc maps every allocation above 64 KiB on its own, so peak RSS follows the live "
        "tensors. 'default': glibc as configured (peak RSS then includes heap fragmentation).",
    )
    parser.add_argument("--json", help="Also write the per-row summaries to this JSON file.")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        spec = json.loads(args.worker)
        result = run_worker(
            spec["case"],
            spec["row"],
            spec["sam_kwargs"],
            spec["steps"],
            spec["warmup"],
            spec["seq_len"],
            baton=True,
        )
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return 0

    cases = TINY_CASES if args.tiny else CASES
    selected = args.cases or list(cases)
    for name in selected:
        if name not in cases:
            raise SystemExit(f"Unknown case {name!r}; known: {', '.join(cases)}.")
    variants = _parse_variants(args.variants)
    in_process = args.in_process or args.quick or args.tiny
    mode = "rows one after another in this process" if in_process else "one process per row, steps interleaved"
    print(f"bench_sam: {'quick, ' if args.quick else ''}{mode}; one thread, CPU time; {os.cpu_count()} CPUs")
    summaries = []
    t0 = time.time()
    for name in selected:
        case = cases[name]
        steps, warmup = (case.quick_steps, case.quick_warmup) if args.quick else (case.steps, case.warmup)
        steps = args.steps or steps
        seq_len = case.quick_seq_len if args.quick else case.seq_len
        if name == "smollm2-lora":
            smollm2_checkpoint()  # convert once, before any timed process
        rows = {row: {} for row in REFERENCE_ROWS}
        if importlib.util.find_spec("pytorch_optimizer") is None:
            print("(pytorch-optimizer is not installed: no peer row; pip install 'hf-sam[bench]')")
            del rows["peer"]
        for variant, kwargs in variants.items():
            if name in kwargs.get("cases", [name]):
                rows[variant] = {k: v for k, v in kwargs.items() if k != "cases"}
        if in_process:
            results = {row: run_worker(name, row, kw, steps, warmup, seq_len) for row, kw in rows.items()}
            for r in results.values():  # one resident set shared by every row: no per-row figure
                r["rss_peak_bytes"] = float("nan")
        else:
            results = run_case_interleaved(name, rows, steps, warmup, seq_len, args.allocator)
        rows_summary = summarize(name, results)
        print_table(case, rows_summary, results["plain"])
        summaries.extend(rows_summary)
    print(f"\n(total {time.time() - t0:.0f} s wall)")
    if args.json:
        Path(args.json).write_text(json.dumps(summaries, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
