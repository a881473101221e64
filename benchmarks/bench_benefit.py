"""What each SAM method buys: held-out accuracy, flatness and robustness against AdamW, at the same step budget.

For every task, label-noise setting, method and seed, one training run (the plain Trainer for `adamw`, hf_sam's
SAMTrainer / SAMSFTTrainer otherwise; same data, data order, initialisation and schedule for a given seed), then:

- accuracy on the held-out split (exact match by greedy generation for the language-model task);
- flatness of the final weights on a fixed slice of the training data: the top Hessian eigenvalue and the SAM
  sharpness at radius `--sharpness_rho` (`hf_sam.analysis`, in the trained parameters' space);
- robustness: held-out accuracy after Gaussian noise on every weight matrix (std = sigma x the matrix's RMS, for each
  sigma in `--weight_noise`, averaged over `--noise_draws` draws), and after round-to-nearest quantisation of every
  weight matrix (symmetric, per output row: int8; 4-bit in groups of 64 along the input), of the merged weights for
  LoRA;
- cost: CPU time per optimizer step (`time.process_time` from `on_step_begin` to `on_step_end`, the cost benchmark's
  clock, warm-up steps dropped), as a multiple of AdamW's at the same seed on the same machine
  (`step_time_ratios`).

Over seeds: mean and spread (sample standard deviation) of each measure, and the difference to AdamW (or to
`--baseline`) with a 95% interval paired by seed (t distribution, n - 1 degrees of freedom; `hf_sam.compare.stats`,
the statistics `hf-sam compare` uses). Results: `results.json` (every run), `summary.json`, `table.md` and
`pareto.png` (gain against cost) under `--out_dir`.

Tasks: `benchmarks/benefit_tasks.py` (all embedded, offline).

Usage:
    python benchmarks/bench_benefit.py --tasks digits minilm --seeds 0 1 2 --noise 0.0 0.4 --out_dir outputs/benefit
    python benchmarks/bench_benefit.py --tasks smollm --methods adamw sam --seeds 0 1 2 --noise 0.3
    python benchmarks/bench_benefit.py --quick --tasks digits          # smoke run (tests/test_bench_benefit.py)
    python benchmarks/bench_benefit.py --method 'sam_rho02={"sam_rho": 0.2}' --methods adamw sam_rho02
    python benchmarks/bench_benefit.py --tasks sentiment_smollm --noise 0.4 --tune --methods sam \
        --selection_seeds 100 101 --seeds 0 1 2 3 4       # rho chosen on validation, then reported on test
    python benchmarks/bench_benefit.py --merge docs/benefit/tuned/results.json --baseline sam --out_dir outputs/vs-sam
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the tasks, beside this script

import benefit_tasks  # noqa: E402
from benefit_tasks import TASKS, Task, TaskRun  # noqa: E402

from hf_sam.compare import stats  # noqa: E402

# A method is a name and its `sam_*` arguments; `None` is the AdamW baseline (the plain Trainer). "rho_scale"
# multiplies the task's rho (ASAM's ball is in relative units, so larger), "lora_only" marks methods that need
# adapters. A new `sam_method` is one line here.
METHODS: dict[str, dict[str, Any] | None] = {
    "adamw": None,
    "sam": {},
    "asam": {"sam_adaptive": True, "rho_scale": 10.0},
    "looksam": {"sam_method": "looksam"},
    "late_sam": {"sam_start_fraction": 0.85},
    "flat_lora": {"sam_method": "flat_lora", "sam_rho": 0.05, "lora_only": True},
    # the language-model variants
    "functional": {"sam_method": "functional"},
    "preconditioned": {"sam_preconditioner": "adam"},
    "functional_preconditioned": {"sam_method": "functional", "sam_preconditioner": "adam"},
    "msam": {"sam_method": "msam"},
    "friendly": {"sam_method": "friendly"},
}
BASELINE = "adamw"
QUANT_GROUP = 64


# The statistics, the table cells and the figure are hf_sam.compare.stats's, shared with `hf-sam compare`.
_t975 = stats.t975  # the 97.5% quantile of Student's t with `df` degrees of freedom


# ---- measures -------------------------------------------------------------------------------------------------------
class StepClock:
    """CPU time of each optimizer step, from `on_step_begin` to `on_step_end` (a `TrainerCallback`)."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Clock(TrainerCallback):
            def __init__(self):
                self.times: list[float] = []
                self._start = 0.0

            def on_step_begin(self, args, state, control, **kwargs):
                self._start = time.process_time()

            def on_step_end(self, args, state, control, **kwargs):
                self.times.append(time.process_time() - self._start)

        return _Clock()


def weight_matrices(model: Any) -> list[Any]:
    """Every floating-point parameter with 2 or more dimensions (linear, conv and embedding weights)."""
    return [p for p in model.parameters() if p.dim() >= 2 and p.is_floating_point()]


def quantize_rtn_(weight: Any, bits: int, group: int | None) -> None:
    """Symmetric round-to-nearest quantisation in place: per output row, or per `group` inputs of each row."""
    import torch

    with torch.no_grad():
        rows = weight.reshape(weight.shape[0], -1)
        shaped = rows.reshape(rows.shape[0], -1, group) if group and rows.shape[1] % group == 0 else rows[:, None, :]
        qmax = 2 ** (bits - 1) - 1
        scale = shaped.abs().amax(-1, keepdim=True).clamp_min(1e-12) / qmax
        quantized = (shaped / scale).round().clamp(-qmax - 1, qmax) * scale
        weight.copy_(quantized.reshape(weight.shape))


def merged_copy(model: Any, lora: bool) -> Any:
    """A deep copy of the model, LoRA adapters merged into their base weights, that runs its own weights.

    Trainers patch `forward` on module instances (TRL wraps the causal LM's forward in a closure over the bound
    original; Accelerate's autocast wraps it too). `deepcopy` copies such a closure as is, so the copy's forward would
    still run the *original* module and ignore every perturbation of the copy's weights: the instance attributes are
    dropped, leaving the class's forward.
    """
    clone = copy.deepcopy(model)
    if lora:
        clone = clone.merge_and_unload()
    for module in clone.modules():
        for name in ("forward", "_original_forward"):
            module.__dict__.pop(name, None)
    return clone.eval()


QUANTIZERS = {"int8": (8, None), "int4": (4, QUANT_GROUP)}


def robustness(
    run: TaskRun, model: Any, sigmas: list[float], draws: int, seed: int, quant: list[str]
) -> dict[str, float]:
    """Held-out accuracy under Gaussian weight noise (per sigma, mean over draws) and after int8 / 4-bit RTN, and of
    the unperturbed copy they start from ("merged"): the copy runs without the trainer's forward wrappers (in fp32
    where training used mixed precision), so its accuracy, not the trained model's, is the reference for the rest."""
    import torch

    base = merged_copy(model, run.lora)
    out: dict[str, float] = {"merged": run.accuracy(base)}
    weights = [p.detach().clone() for p in weight_matrices(base)]
    generator = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        for sigma in sigmas:
            scores = []
            for _ in range(draws):
                for p, w in zip(weight_matrices(base), weights):
                    rms = w.pow(2).mean().sqrt()
                    p.copy_(w + sigma * rms * torch.randn(w.shape, generator=generator, dtype=w.dtype))
                scores.append(run.accuracy(base))
            out[f"noise_{sigma:g}"] = sum(scores) / len(scores)
        for name in quant:
            bits, group = QUANTIZERS[name]
            for p, w in zip(weight_matrices(base), weights):
                p.copy_(w)
                quantize_rtn_(p, bits, group)
            out[name] = run.accuracy(base)
    return out


def flatness(run: TaskRun, model: Any, rho: float, max_iter: int) -> dict[str, float]:
    """Top Hessian eigenvalue and SAM sharpness at `rho` of the trained parameters, on the measurement batches."""
    from hf_sam.analysis import hessian_eigenvalues, sam_sharpness

    eig = hessian_eigenvalues(model, run.measure_data, k=1, max_iter=max_iter, tol=1e-2, progress=False)
    sharp = sam_sharpness(model, run.measure_data, rho=rho, progress=False)
    return {"hessian_top": eig.eigenvalues[0], "sam_sharpness": sharp.sharpness, "train_slice_loss": sharp.loss}


class EpochCurve:
    """Validation accuracy after every epoch (a `TrainerCallback`), and a copy of the trainable weights at the best one
    so far: the best-on-validation checkpoint, whose test accuracy is the early-stopping reading (`best_test`).
    Evaluation forks the random streams and puts the model back in training mode: the run trains exactly as without
    it."""

    def __new__(cls, run: TaskRun):
        import torch
        from transformers import TrainerCallback

        class _Curve(TrainerCallback):
            def __init__(self):
                self.points: list[dict[str, float]] = []
                self.best: dict[str, Any] | None = None

            def on_step_end(self, args, state, control, model=None, **kwargs):
                if state.global_step % run.epoch_steps and state.global_step != state.max_steps:
                    return
                with torch.random.fork_rng(devices=[]):
                    val = run.validation(model)
                model.train()
                self.points.append({"step": state.global_step, "val": val})
                if self.best is None or val > self.best["val"]:  # the first of equals: the earliest checkpoint
                    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
                    self.best = {"step": state.global_step, "val": val, "weights": weights}

            def best_test(self, model) -> float:
                """Test accuracy of the best-on-validation weights; the model's own weights are put back after."""
                params = dict(model.named_parameters())
                final = {n: params[n].detach().clone() for n in self.best["weights"]}
                with torch.no_grad():
                    for n, w in self.best["weights"].items():
                        params[n].copy_(w)
                    try:
                        return run.accuracy(model)
                    finally:
                        for n, w in final.items():
                            params[n].copy_(w)

        return _Curve()


def run_one(
    task: Task,
    method: str,
    sam_kwargs: dict | None,
    seed: int,
    noise: float,
    opts: Any,
    rho: float | None = None,
    phase: str | None = None,
) -> dict[str, Any]:
    """Train one (task, method, seed, noise) and measure it; `rho` overrides the task's (a tuning grid point).
    Selection runs (`phase="select"`) take only the accuracies and the task's own measures."""
    steps = opts.steps or (task.quick_steps if opts.quick else task.steps)
    kwargs = None
    if sam_kwargs is not None:
        kwargs = {k: v for k, v in sam_kwargs.items() if k.startswith("sam_")}
        kwargs.setdefault("sam_rho", task.rho * sam_kwargs.get("rho_scale", 1.0))
        if rho is not None:
            kwargs["sam_rho"] = rho
    from transformers.trainer_callback import PrinterCallback

    run = task.build(method, kwargs, seed, noise, steps, opts.quick)
    clock = StepClock()
    run.trainer.add_callback(clock)  # before the curve: its evaluations are not counted as step time
    curve = EpochCurve(run) if run.epoch_steps and run.validation else None
    if curve is not None:
        run.trainer.add_callback(curve)
    run.trainer.remove_callback(PrinterCallback)  # one line per run instead of every log
    started = time.perf_counter()
    result = run.trainer.train()
    train_s = time.perf_counter() - started
    model = run.trainer.model
    record: dict[str, Any] = {
        "task": task.name,
        "noise": noise,
        "method": method,
        "seed": seed,
        "steps": steps,
        "sam_kwargs": kwargs,
        "train_loss_mean": result.training_loss,
        "train_wall_s": train_s,
    }
    if phase is not None:
        record.update(phase=phase, rho=kwargs["sam_rho"] if kwargs else None)
    timed = clock.times[2:] if len(clock.times) > 4 else clock.times
    record["step_cpu_s"] = sum(timed) / len(timed)
    started = time.perf_counter()
    record["accuracy"] = run.accuracy(model)
    if run.validation is not None:
        record["val_accuracy"] = run.validation(model)
    if curve is not None and curve.best is not None:
        record.update(curve=curve.points, best_val_step=curve.best["step"], test_at_best_val=curve.best_test(model))
    if run.measures is not None:
        record.update(run.measures(model, phase != "select"))
    if phase != "select":
        record.update(flatness(run, model, opts.sharpness_rho, 3 if opts.quick else opts.hessian_iters))
        record.update(robustness(run, model, opts.weight_noise, opts.noise_draws, seed, opts.quant))
    record["measure_wall_s"] = time.perf_counter() - started
    return record


def chosen_rhos(records: list[dict], task: str, noise: float) -> dict[str, float]:
    """For each method, the grid rho with the best mean validation accuracy over its selection runs (the test split
    is never looked at; of equals, the smaller rho). Only rhos run on every selection seed of the method count."""
    runs = [r for r in records if r.get("phase") == "select" and r["task"] == task and r["noise"] == noise]
    by_method: dict[str, dict[float, list[float]]] = {}
    for r in runs:
        if r["rho"] is not None:
            by_method.setdefault(r["method"], {}).setdefault(r["rho"], []).append(r["val_accuracy"])
    chosen = {}
    for method, grid in by_method.items():
        n = max(len(v) for v in grid.values())
        complete = {rho: statistics.fmean(v) for rho, v in grid.items() if len(v) == n}
        chosen[method] = min(complete, key=lambda rho: (-complete[rho], rho))
    return chosen


def reported_runs(records: list[dict]) -> list[dict]:
    """The runs a summary reports: every run outside the tuned study's selection phase, except test runs at a rho
    the search no longer chooses (a grid that grew can move the choice; those runs stay in results.json unreported)."""
    chosen: dict[tuple, dict[str, float]] = {}
    out = []
    for r in records:
        if r.get("phase") == "select":
            continue
        if r.get("phase") == "test" and r.get("rho") is not None:
            setting = (r["task"], r["noise"])
            if setting not in chosen:
                chosen[setting] = chosen_rhos(records, *setting)
            if chosen[setting].get(r["method"]) != r["rho"]:
                continue
        out.append(r)
    return out


# ---- summary --------------------------------------------------------------------------------------------------------
FLATNESS = ["hessian_top", "sam_sharpness", "train_slice_loss"]


# The tuned study's own measures (benefit_tasks' language tasks), compared with AdamW where every run has them.
TUNED_MEASURES = [
    "val_accuracy",
    "test_at_best_val",
    "fit_noisy",
    "train_loss_noisy",
    "fit_clean",
    "general_text_loss",
    "forgetting",
]


def accuracy_keys(records: list[dict]) -> list[str]:
    """The accuracy measures every run of the group took: a mean over fewer seeds than the row's would mislead, so a
    measure some runs lack (extra seeds run without the robustness set) is left out of the row. With the merged copy's
    accuracy, each perturbation also gives the accuracy it costs (`lost_<measure>` = merged - after)."""
    perturbed = sorted(k for k in records[0] if k.startswith("noise_")) + list(QUANTIZERS)
    keys = ["accuracy", "merged", *perturbed, *(f"lost_{k}" for k in perturbed), *TUNED_MEASURES]
    return stats.common_keys(records, keys)


def with_losses(records: list[dict]) -> list[dict]:
    """The records, each with `lost_<measure>` = merged-copy accuracy - accuracy after the perturbation, where the run
    measured both (a run before the merged-copy control has no such reading)."""
    out = []
    for r in records:
        lost = {
            f"lost_{k}": r["merged"] - r[k] for k in r if "merged" in r and (k.startswith("noise_") or k in QUANTIZERS)
        }
        out.append({**r, **lost})
    return out


# Mean difference to the baseline over the seeds both have, with its 95% t interval.
paired = stats.paired_difference


# A step's CPU time over AdamW's at the same seed in the same setting on the same machine (the run's `cpu`; runs
# recorded without one count as one machine), else over the mean of AdamW's runs of the setting on that machine; none
# where AdamW never ran the setting there. The same step differs by 10-20% between machines, more than some variants'
# overheads, so a ratio never pairs two machines.
STEP_TIME = {"cost_key": "step_cpu_s", "cost_match": ("cpu",), "cost_unpaired": "mean"}
GROUP = ("task", "noise", "method")


def step_time_ratios(records: list[dict], baseline: str = BASELINE) -> list[float | None]:
    """Each run's step-time ratio (`STEP_TIME`) to `baseline`, in `records`' order."""
    return stats.cost_ratios(records, group_by=GROUP, baseline=baseline, **STEP_TIME)


def summarize(records: list[dict], baseline: str = BASELINE) -> list[dict]:
    """One row per (task, noise, method): mean and spread over seeds, paired differences to `baseline` (accuracies
    the baseline took too), cost (`cost_x_<baseline>`: the mean of `step_time_ratios`). Tables list methods in
    METHODS' order (AdamW first), whatever order the runs were merged in; methods added with --method follow, in the
    order they first appear."""
    return stats.summarize(
        with_losses(records),
        metrics=lambda runs: accuracy_keys(runs) + stats.common_keys(runs, FLATNESS),
        group_by=GROUP,
        baseline=baseline,
        compared=accuracy_keys,
        order=list(METHODS),
        **STEP_TIME,
    )


_pct = stats.format_value  # a fraction as a percentage with one decimal, "—" for none
_diff = stats.format_diff  # a paired difference in points: "+1.2 [-0.3, +2.7]"


def _name(method: str) -> str:
    """A method as the tables' headers name it."""
    return "AdamW" if method == BASELINE else method


def format_table(rows: list[dict], baseline: str = BASELINE) -> str:
    """Markdown tables, one per (task, noise): accuracy in %, differences to `baseline` (the rows' own, from
    `summarize`) in points with 95% paired intervals."""
    out = []
    for task, noise in dict.fromkeys((r["task"], r["noise"]) for r in rows):
        group = [r for r in rows if r["task"] == task and r["noise"] == noise]
        noise_keys = sorted({k for r in group for k in r if k.startswith("noise_")})  # a run may lack some
        control = ["merged"] if any("merged" in r for r in group) else []  # runs before the control lack it
        header = [
            "method",
            "seeds",
            "held-out acc. (sd)",
            f"Δ vs {_name(baseline)} [95% CI]",
            "λ_max",
            "SAM sharpness",
            *["acc. merged copy"] * len(control),
            *[f"acc. σ={k[6:]}" for k in noise_keys],
            "acc. int8",
            "acc. 4-bit",
            f"Δ 4-bit vs {_name(baseline)} [95% CI]",
            f"× {_name(baseline)} step",
        ]
        cells = [
            [
                r["method"],
                str(len(r["seeds"])),
                f"{_pct(r['accuracy']['mean'])} ({_pct(r['accuracy']['sd'])})",
                _diff(r["accuracy"].get("diff")),
                f"{r['hessian_top']['mean']:.3g}",
                f"{r['sam_sharpness']['mean']:.3g}",
                *[_pct(r[k]["mean"]) if k in r else "—" for k in control + noise_keys],
                _pct(r["int8"]["mean"]) if "int8" in r else "—",
                _pct(r["int4"]["mean"]) if "int4" in r else "—",
                _diff(r["int4"].get("diff")) if "int4" in r else "—",
                stats.format_value(r[f"cost_x_{baseline}"], 1, ".2f"),
            ]
            for r in group
        ]
        out += [f"\n**{task}, label noise {noise:g}**\n", *stats.markdown_table(header, cells)]
    return "\n".join(out) + "\n"


def plot_pareto(rows: list[dict], path: Path, baseline: str = BASELINE) -> None:
    """Gain in held-out accuracy over `baseline` (95% paired interval) against cost per step, one panel per
    setting."""
    stats.plot_benefit_vs_cost(
        rows,
        path,
        metric="accuracy",
        panel=lambda r: (r["task"], r["noise"]),
        title=lambda setting: f"{setting[0]}, label noise {setting[1]:g}",
        scale=100,
        baseline=baseline,
        xlabel=f"CPU time per step, × {_name(baseline)}",
        ylabel=f"held-out accuracy − {_name(baseline)} (points)",
    )


# ---- the tuned study: rho chosen on validation --------------------------------------------------------------------
def selection_rows(records: list[dict]) -> list[dict]:
    """One row per (task, noise, method, rho) of the selection runs: validation and test accuracy over the selection
    seeds (the test column is shown, never used to choose), and whether `chosen_rhos` picked that rho."""
    select = [r for r in records if r.get("phase") == "select"]
    rows = stats.summarize(
        select,
        metrics=["val_accuracy", "accuracy"],
        group_by=("task", "noise", "method", "rho"),
        baseline=BASELINE,
        compared=[],
        order=list(METHODS),
    )
    chosen = {}
    for task, noise in dict.fromkeys((r["task"], r["noise"]) for r in select):
        for method, rho in chosen_rhos(records, task, noise).items():
            chosen[(task, noise, method)] = rho
    for row in rows:
        row["chosen"] = row["rho"] is not None and chosen.get((row["task"], row["noise"], row["method"])) == row["rho"]
    order = {m: i for i, m in enumerate(METHODS)}
    return sorted(rows, key=lambda r: (r["task"], r["noise"], order.get(r["method"], len(order)), r["rho"] or 0.0))


def format_selection(rows: list[dict], records: list[dict]) -> str:
    """Per setting: each method's grid, validation accuracy (chooses) and test accuracy (reported only) per rho."""
    out = []
    for task, noise in dict.fromkeys((r["task"], r["noise"]) for r in rows):
        cells = [
            [
                r["method"],
                "—" if r["rho"] is None else (f"**{r['rho']:g}**" if r["chosen"] else f"{r['rho']:g}"),
                str(len(r["seeds"])),
                _pct(r["val_accuracy"]["mean"]),
                _pct(r["accuracy"]["mean"]),
            ]
            for r in rows
            if (r["task"], r["noise"]) == (task, noise)
        ]
        header = ["method", "ρ (chosen in bold)", "selection seeds", "validation acc.", "test acc. (not used)"]
        out += [f"\n**{task}, label noise {noise:g}: ρ selection**\n", *stats.markdown_table(header, cells)]
        cost = search_cost(records, task, noise)
        out.append(
            "\nCost of the search: "
            + "; ".join(f"{m} {n} run{'s' * (n != 1)}, {minutes:.0f} min" for m, (n, minutes) in cost.items())
            + " (wall time of training and measuring, one thread each)."
        )
    return "\n".join(out) + "\n"


def search_cost(records: list[dict], task: str, noise: float) -> dict[str, tuple[int, float]]:
    """Per method, the number of selection runs and their wall minutes (training and measures)."""
    cost: dict[str, tuple[int, float]] = {}
    for r in records:
        if r.get("phase") == "select" and (r["task"], r["noise"]) == (task, noise):
            n, minutes = cost.get(r["method"], (0, 0.0))
            cost[r["method"]] = (n + 1, minutes + (r["train_wall_s"] + r.get("measure_wall_s", 0.0)) / 60)
    return cost


def format_tuned(rows: list[dict], records: list[dict], baseline: str = BASELINE) -> str:
    """Per setting of the tuned study: each method at its chosen rho against `baseline` (the rows' own, from
    `summarize`) on the test split, by seed. `records`: the reported runs (`reported_runs`)."""
    out = []
    tuned = [r for r in records if r.get("phase") == "test"]
    for task, noise in dict.fromkeys((r["task"], r["noise"]) for r in tuned):
        rho = {r["method"]: r["rho"] for r in tuned if (r["task"], r["noise"]) == (task, noise)}
        group = [r for r in rows if (r["task"], r["noise"]) == (task, noise) and r["method"] in rho]
        keys = {k for r in group for k in r}

        def diff(r, key, scale=100.0):
            """Points (accuracies) or the raw value (losses, `scale` 1): the paired difference, or the mean where
            there is no difference (the baseline's own row)."""
            if key not in r:
                return "—"
            spec = ".1f" if scale == 100.0 else ".3f"
            d = r[key].get("diff")
            return (
                stats.format_value(r[key]["mean"], scale, spec)
                if d is None
                else stats.format_diff(d, scale, "+" + spec)
            )

        header = ["method", "ρ", "seeds", "test acc. (sd)", "Δ test [95% CI]", "Δ at best-val checkpoint"]
        header += ["wrong labels fitted (loss on them)"] * ("fit_noisy" in keys)
        header += ["Δ forgetting (general-text loss)"] * ("forgetting" in keys)
        # Both readings of robustness: the accuracy after the perturbation, and the accuracy it cost (merged - after).
        perturbed = [(k, f"lost_{k}") for k in ("noise_0.1", "int4") if f"lost_{k}" in keys]
        names = {"noise_0.1": "σ=0.1", "int4": "4-bit"}
        header += [h for k, _ in perturbed for h in (f"Δ after {names[k]}", f"Δ lost to {names[k]}")]
        header += [f"× {_name(baseline)} step"]
        cells = []
        for r in group:
            row = [
                r["method"],
                "—" if rho[r["method"]] is None else f"{rho[r['method']]:g}",
                str(len(r["seeds"])),
                f"{_pct(r['accuracy']['mean'])} ({_pct(r['accuracy']['sd'])})",
                diff(r, "accuracy") if r["method"] != baseline else "—",
                diff(r, "test_at_best_val"),
            ]
            if "fit_noisy" in keys:
                fitted = _pct(r["fit_noisy"]["mean"]) if "fit_noisy" in r else "—"
                loss = f" ({r['train_loss_noisy']['mean']:.2g})" if "train_loss_noisy" in r else ""
                row.append(fitted + loss)
            row += [diff(r, "forgetting", scale=1.0)] * ("forgetting" in keys)
            row += [diff(r, k) for pair in perturbed for k in pair]
            row += [stats.format_value(r[f"cost_x_{baseline}"], 1, ".2f")]
            cells.append(row)
        out += [f"\n**{task}, label noise {noise:g}: each method at its ρ chosen on validation**\n"]
        out += stats.markdown_table(header, cells)
    return "\n".join(out) + "\n"


def plot_rho_sensitivity(rows: list[dict], path: Path, tested: list[dict] = ()) -> None:
    """Per setting, one panel: each method's validation (solid) and test (dashed) accuracy against rho over the
    selection seeds (`selection_rows`), and at the chosen rho the test seeds' mean test accuracy with its spread (a
    star, +- one sd; `tested`: the reported test runs). AdamW: its selection seeds' validation (solid grey line, their
    range shaded) and test accuracy (dashed grey), and its test seeds' range (hatched)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted(dict.fromkeys((r["task"], r["noise"]) for r in rows))  # a task's noise levels side by side
    cols = min(2, len(settings))
    n_rows = math.ceil(len(settings) / cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(6.4 * cols, 4.0 * n_rows), squeeze=False)
    for ax in axes.flat[len(settings) :]:
        ax.set_visible(False)
    for ax, (task, noise) in zip(axes.flat, settings):
        here = [r for r in rows if (r["task"], r["noise"]) == (task, noise)]
        test_runs: dict[str, list[dict]] = {}
        for r in tested:
            if (r["task"], r["noise"], r.get("phase")) == (task, noise, "test"):
                test_runs.setdefault(r["method"], []).append(r)
        for r in here:
            if r["rho"] is None:
                values = [100 * v for v in r["val_accuracy"]["values"]]
                ax.axhline(statistics.fmean(values), color="grey", label="AdamW (validation)")
                ax.axhspan(min(values), max(values), color="grey", alpha=0.25)  # more than one selection seed
                ax.axhline(100 * r["accuracy"]["mean"], color="grey", ls="--")
        if BASELINE in test_runs:
            values = [100 * r["accuracy"] for r in test_runs[BASELINE]]
            label = f"AdamW, {len(values)} test seeds (range)"
            ax.axhspan(min(values), max(values), facecolor="none", edgecolor="grey", hatch="//", label=label)
        for method in dict.fromkeys(r["method"] for r in here if r["rho"] is not None):
            points = sorted((r for r in here if r["method"] == method), key=lambda r: r["rho"])
            x = [r["rho"] for r in points]
            (line,) = ax.plot(x, [100 * r["val_accuracy"]["mean"] for r in points], marker="o", label=method)
            ax.plot(x, [100 * r["accuracy"]["mean"] for r in points], ls="--", color=line.get_color())
            runs = test_runs.get(method, [])
            if runs:
                values = [100 * r["accuracy"] for r in runs]
                spread = statistics.stdev(values) if len(values) > 1 else 0.0
                ax.errorbar(runs[0]["rho"], statistics.fmean(values), yerr=spread, marker="*", ms=11,
                            color=line.get_color(), capsize=3)  # fmt: skip
        ax.set_xscale("log")
        ax.set_title(f"{task}, label noise {noise:g}")
        ax.set_xlabel("ρ")
        ax.set_ylabel("accuracy (%): validation —, test --, test seeds (star)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def earlier_invocations(infos: list[dict]) -> list[dict]:
    """Each invocation that made the runs in `infos` (its command, commit, machine), once, earliest first. A lane
    resumes from a copy of the study's file, so the lanes merged back share its history: nested (as files written
    before this function did), it would be copied once per lane at every merge and grow geometrically."""
    seen: dict[str, dict] = {}

    def visit(info: dict) -> None:
        for earlier in [*info.get("history", []), *([info["resumed"]] if "resumed" in info else [])]:
            visit(earlier)
        for earlier in info.get("merged", []):
            visit(earlier)
        own = {k: v for k, v in info.items() if k not in ("history", "resumed", "merged")}
        if own:
            seen.setdefault(json.dumps(own, sort_keys=True), own)

    for info in infos:
        visit(info)
    return list(seen.values())


def hardware() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line]
        cpu = names[0] if names else cpu
    import hashlib
    import subprocess

    def git(*args: str) -> str:
        proc = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return proc.stdout.strip()

    # The hf_sam code a run used: the commit, and a hash of any uncommitted change to the package.
    diff = git("diff", "HEAD", "--", "hf_sam")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "commit": git("rev-parse", "--short", "HEAD"),
        "hf_sam_uncommitted_diff_sha1": hashlib.sha1(diff.encode()).hexdigest()[:12] if diff else None,
    }


def _parse_methods(items: list[str]) -> dict[str, dict]:
    out = {}
    for item in items:
        name, _, spec = item.partition("=")
        try:
            kwargs = json.loads(spec)
        except json.JSONDecodeError as e:
            raise SystemExit(f"--method {item!r}: not NAME=JSON ({e})") from None
        bad = [k for k in kwargs if not k.startswith("sam_") and k not in ("rho_scale", "lora_only")]
        if bad:
            raise SystemExit(f"--method {name}: unknown keys {bad} (use sam_* arguments, rho_scale, lora_only)")
        out[name] = kwargs
    return out


def run_key(record: dict) -> tuple:
    """What identifies a run: task, noise, method, seed and, for tuning runs, phase and rho."""
    return (record["task"], record["noise"], record["method"], record["seed"], record.get("phase"), record.get("rho"))


def _drop_repeated_runs(records: list[dict]) -> list[dict]:
    """Keep the first run of each `run_key`: merged files may share runs (a baseline copied so that
    `--resume` skips it). A repeat whose accuracy differs is reported, since the runs are meant to be deterministic."""
    kept: dict[tuple, dict] = {}
    for record in records:
        key = run_key(record)
        if key not in kept:
            kept[key] = record
        elif record["accuracy"] != kept[key]["accuracy"]:
            first, repeat = kept[key]["accuracy"], record["accuracy"]
            print(f"note: {key} ran twice with accuracy {first} and {repeat}; kept the first")
    return list(kept.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--methods", nargs="+", default=None, help="Method names (default: all that apply).")
    parser.add_argument("--method", action="append", default=[], help="Extra method: NAME='{\"sam_rho\": 0.1}'.")
    parser.add_argument(
        "--seeds",
        nargs="*",
        type=int,
        default=[0, 1, 2],
        help="Seeds of the reported runs (with --tune, the test seeds; none: choose rho and stop).",
    )
    parser.add_argument("--noise", nargs="+", type=float, default=[0.0, 0.4], help="Training label-noise fractions.")
    parser.add_argument("--steps", type=int, default=None, help="Optimizer steps per run (default: per task).")
    parser.add_argument("--weight_noise", nargs="*", type=float, default=[0.05, 0.1, 0.2], help="Relative sigmas.")
    parser.add_argument("--quant", nargs="*", default=list(QUANTIZERS), choices=list(QUANTIZERS))
    parser.add_argument("--noise_draws", type=int, default=2)
    parser.add_argument("--hessian_iters", type=int, default=20)
    parser.add_argument("--sharpness_rho", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="Tiny data and a few steps: a smoke run.")
    parser.add_argument(
        "--tune",
        action="store_true",
        help="Tune rho: each method over its task's grid on --selection_seeds, the best mean validation accuracy "
        "chosen, then --seeds at that rho scored on the test split.",
    )
    parser.add_argument("--selection_seeds", nargs="+", type=int, default=[100, 101])
    parser.add_argument("--grid", nargs="+", type=float, default=None, help="--tune: this rho grid for every method.")
    parser.add_argument(
        "--baseline",
        default=BASELINE,
        help="The method the tables' differences and step-time ratios are against (it runs like any other; with "
        "--merge, compare two methods already run: `--baseline sam`).",
    )
    parser.add_argument("--out_dir", default="outputs/benefit")
    parser.add_argument("--resume", action="store_true", help="Skip runs already in <out_dir>/results.json.")
    parser.add_argument(
        "--merge", nargs="+", default=[], help="Run nothing: summarise the runs of these results.json files together."
    )
    opts = parser.parse_args(argv)
    if not opts.seeds and not opts.tune and not opts.merge:  # without --tune no seeds would run nothing, silently
        parser.error("--seeds: give at least one seed (none is allowed only with --tune: choose rho and stop)")

    import datasets
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(opts.threads)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    methods = dict(METHODS, **_parse_methods(opts.method))
    chosen = opts.methods or list(METHODS)
    unknown = [m for m in chosen if m not in methods]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; known: {list(methods)}")
    if opts.baseline not in methods:
        raise SystemExit(f"--baseline: unknown method {opts.baseline!r}; known: {list(methods)}")
    if BASELINE not in chosen:
        chosen = [BASELINE, *chosen]
    if opts.baseline not in chosen:  # the tables' differences need its runs
        chosen.append(opts.baseline)
    out = Path(opts.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    benefit_tasks.WORKDIR = out / "runs"
    results_path = out / "results.json"
    previous = json.loads(results_path.read_text()) if opts.resume and results_path.exists() else None
    records: list[dict] = previous["runs"] if previous else []
    commands = [json.loads(Path(f).read_text()) for f in opts.merge]
    for merged in commands:
        records += merged["runs"]
    records = _drop_repeated_runs(records)
    done = {run_key(r) for r in records}
    info = {
        "command": " ".join(["python", "benchmarks/bench_benefit.py", *(argv if argv is not None else sys.argv[1:])])
    }
    info.update(hardware())
    history = earlier_invocations([*([previous["info"]] if previous else []), *(m["info"] for m in commands)])
    if history:
        info["history"] = history
    started = time.perf_counter()

    def run(task: Task, noise: float, seed: int, method: str, rho: float | None = None, phase: str | None = None):
        spec = methods[method]
        record = {"task": task.name, "noise": noise, "method": method, "seed": seed, "phase": phase, "rho": rho}
        if run_key(record) in done or (spec is not None and spec.get("lora_only") and not task.lora):
            return
        t0 = time.perf_counter()
        record = run_one(task, method, spec, seed, noise, opts, rho=rho, phase=phase)
        record["cpu"] = info["cpu"]  # step times compare within one machine (`step_time_ratios`)
        records.append(record)
        done.add(run_key(record))
        extra = f" rho={rho:g} val={record['val_accuracy']:.3f}" if rho is not None else ""
        if phase == "select" or "hessian_top" not in record:
            measured = ""
        else:
            measured = (
                f" int4={record.get('int4', math.nan):.3f} lambda={record['hessian_top']:.3g} "
                f"sharp={record['sam_sharpness']:.3g}"
            )
        print(
            f"[{time.perf_counter() - started:7.0f}s] {task.name} noise={noise:g} seed={seed} {method:<9}"
            f"{' ' + phase if phase else ''}{extra} acc={record['accuracy']:.3f}{measured} "
            f"step={record['step_cpu_s']:.3f}s ({time.perf_counter() - t0:.0f}s)",
            flush=True,
        )
        results_path.write_text(json.dumps({"info": info, "runs": records}, indent=1) + "\n")

    for task_name in [] if opts.merge else opts.tasks:
        task = TASKS[task_name]
        for noise in opts.noise:
            if not opts.tune:
                for seed in opts.seeds:
                    for method in chosen:
                        run(task, noise, seed, method)
                continue
            here = [m for m in chosen if task.lora or not (methods[m] or {}).get("lora_only")]
            grids = {m: [None] if m == BASELINE else (opts.grid or task.rho_grid(m)) for m in here}
            untuned = [m for m, grid in grids.items() if not grid]
            if untuned:
                raise SystemExit(f"--tune: no rho grid for {untuned} on {task_name} (pass --grid)")
            for method in here:
                for rho in grids[method]:
                    for seed in opts.selection_seeds:
                        run(task, noise, seed, method, rho, "select")
            best = chosen_rhos(records, task_name, noise)
            for seed in opts.seeds:
                for method in here:
                    run(task, noise, seed, method, best.get(method), "test")
    results_path.write_text(json.dumps({"info": info, "runs": records}, indent=1) + "\n")
    reported = reported_runs(records)
    rows = summarize(reported, opts.baseline)
    info["wall_s"] = time.perf_counter() - started
    (out / "summary.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1) + "\n")
    table = format_table(rows, opts.baseline)
    if any(r.get("phase") for r in records):  # the tuned study
        selection = selection_rows(records)
        info["chosen_rho"] = {
            f"{task} {noise:g}": chosen_rhos(records, task, noise)
            for task, noise in dict.fromkeys((r["task"], r["noise"]) for r in records if r.get("phase"))
        }
        (out / "summary.json").write_text(
            json.dumps({"info": info, "rows": rows, "selection": selection}, indent=1) + "\n"
        )
        table += format_tuned(rows, reported, opts.baseline) + format_selection(selection, records)
        plot_rho_sensitivity(selection, out / "rho_sensitivity.png", reported)
    (out / "table.md").write_text(table)
    if rows:  # a tuned study still in its selection runs has none yet
        plot_pareto(rows, out / "pareto.png", opts.baseline)
    print(table)
    print(f"wrote {results_path}, {out / 'summary.json'}, {out / 'table.md'}, {out / 'pareto.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
