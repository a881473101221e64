"""SAMTrainer under DeepSpeed ZeRO-1/2 (launched by `tests/test_deepspeed.py`, in a venv with DeepSpeed; gloo on CPU).

Trains a tiny Llama with the plain Trainer and with `SAMTrainer` in each `sam_sync` x `sam_accumulation`
combination, ASAM, bf16, and resumed from a checkpoint, on one fixed global batch per step (sequential sampler: rank
r's micro-batch i is the r-th slice of the single-process micro-batch i). Each rank saves, per run, its final
weights, the `sam_*`/loss logs, the collectives of each optimizer step by phase (counted at `torch.distributed`,
which DeepSpeed's communication calls at run time) and per-step checks of SAM's DeepSpeed path (ZeRO held no
gradient when the second pass began; the weights were restored bit for bit before the engine's step).

Modes:
    torchrun --nproc_per_node 2 deepspeed_trainer.py OUT --stages 1 2 [--refusals]
    torchrun --nproc_per_node 2 deepspeed_trainer.py OUT --stages --ddp-runs local-exact    # DDP, no DeepSpeed
    accelerate launch --config_file ... deepspeed_trainer.py OUT --accelerate  # the DeepSpeed config comes from there
    python deepspeed_trainer.py OUT --reference                             # one process without DeepSpeed

Tiny Llama, SGD lr 0.5, rho 0.5, global batch 4 (2 per rank), accumulation 2, 2 steps: the setting of the DDP tests.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, for hf_sam

from _deepspeed_setup import (  # noqa: E402
    STAGES,
    dataset,
    deepspeed_config,
    tiny_llama,
    training_kwargs,
    zero_holds_no_gradient,
)
from _process_group import end_process_group  # noqa: E402
from transformers import Trainer, TrainerCallback  # noqa: E402

from hf_sam import SAMMixin, SAMTrainingArguments  # noqa: E402

RUNS = {  # name: SAMTrainingArguments overrides; None for the plain Trainer. "-resume": from checkpoint-1 of the run
    "plain": None,
    "global-exact": dict(sam_sync="global", sam_accumulation="exact"),
    "global-micro": dict(sam_sync="global", sam_accumulation="micro"),
    "local-exact": dict(sam_sync="local", sam_accumulation="exact"),
    "local-micro": dict(sam_sync="local", sam_accumulation="micro"),
    "asam-global-exact": dict(sam_sync="global", sam_accumulation="exact", sam_adaptive=True),
    # Gradient clipping active (the norm is about 0.6): DeepSpeed clips the SAM gradient in its step.
    "global-exact-clip": dict(sam_sync="global", sam_accumulation="exact", max_grad_norm=0.1),
    # SAM on every other step (a plain engine step in between).
    "interval": dict(sam_sync="global", sam_accumulation="exact", sam_interval=2),
    # The perturbation from the leading half of each per-device micro-batch: per device, so compared with DDP.
    "ascent-fraction": dict(sam_sync="global", sam_accumulation="exact", sam_ascent_fraction=0.5),
    "global-exact-resume": dict(sam_sync="global", sam_accumulation="exact"),
    "global-micro-resume": dict(sam_sync="global", sam_accumulation="micro"),
    "plain-bf16": dict(bf16=True),
    "global-exact-bf16": dict(sam_sync="global", sam_accumulation="exact", bf16=True),
}
CHECKPOINTED = ("global-exact", "global-micro")  # their checkpoint-1 is what the "-resume" runs start from
REFERENCE_RUNS = (
    "plain",
    "global-exact",
    "global-micro",
    "local-exact",
    "local-micro",
    "asam-global-exact",
    "interval",
    "global-exact-clip",
)
COLLECTIVES = (
    "all_reduce",
    "all_reduce_coalesced",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "all_gather",
    "all_gather_into_tensor",
    "broadcast",
    "all_to_all_single",
)


# ---- counting collectives by phase ----------------------------------------------------------------------------------
class CollectiveCounter:
    """Counts calls of `torch.distributed` collectives, by phase, between `on_step_begin` and `on_step_end`."""

    def __init__(self) -> None:
        self.phase = "outside"
        self.armed = False
        self.current: dict[str, dict[str, int]] = {}
        for name in COLLECTIVES:
            original = getattr(torch.distributed, name, None)
            if original is not None:
                setattr(torch.distributed, name, self._counting(name, original))

    def _counting(self, name, original):
        def counted(*args, **kwargs):
            if self.armed:
                ops = self.current.setdefault(self.phase, {})
                ops[name] = ops.get(name, 0) + 1
            return original(*args, **kwargs)

        return counted

    @contextlib.contextmanager
    def in_phase(self, phase: str):
        previous, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = previous


COUNTER = CollectiveCounter()


class StepCollectives(TrainerCallback):
    def __init__(self) -> None:
        self.per_step: list[dict[str, dict[str, int]]] = []

    def on_step_begin(self, args, state, control, **kwargs):
        COUNTER.current, COUNTER.armed, COUNTER.phase = {}, True, "sam"  # outside the passes: SAM's own work

    def on_step_end(self, args, state, control, **kwargs):
        COUNTER.armed = False
        self.per_step.append(COUNTER.current)


class PassRecorder(Trainer):
    """Sits between `SAMMixin` and `Trainer`: every pass goes through here and is labelled for the counter."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        phase = "plain"
        if isinstance(self, SAMMixin):
            phase = "perturbed" if self.sam_in_perturbed_pass else "clean"
        with COUNTER.in_phase(phase):
            return super().training_step(model, inputs, num_items_in_batch)


class SAMPassRecorder(SAMMixin, PassRecorder):
    pass


def instrument_deepspeed_sam(checks: dict[str, list]) -> None:
    """Wrap `DeepSpeedSync` to check, at every perturbation, that ZeRO held no gradient (exact mode), and before every
    engine step that the weights were restored bit for bit; phases for the counter."""
    from hf_sam.deepspeed_support import DeepSpeedSync

    load, step = DeepSpeedSync.load_gradient, DeepSpeedSync.step
    before: list[torch.Tensor] = []

    def load_gradient(self, all_reduce):
        checks["zero_untouched"].append(zero_holds_no_gradient(self.engine))
        before[:] = [p.detach().clone() for p in self.module.parameters()]
        return load(self, all_reduce)

    def checked_step(self):
        checks["restored_bit_exact"].append(all(torch.equal(p, w) for p, w in zip(self.module.parameters(), before)))
        with COUNTER.in_phase("step"):
            return step(self)

    DeepSpeedSync.load_gradient, DeepSpeedSync.step = load_gradient, checked_step


def instrument_plain_engine_step() -> None:
    """The plain Trainer steps inside Accelerate's backward: label that step for the counter too."""
    from accelerate.utils.deepspeed import DeepSpeedEngineWrapper

    original = DeepSpeedEngineWrapper.backward

    def backward(self, loss, sync_gradients=True, **kwargs):
        step = self.engine.step

        def labelled_step(*a, **k):
            with COUNTER.in_phase("step"):
                return step(*a, **k)

        self.engine.step = labelled_step
        try:
            return original(self, loss, sync_gradients=sync_gradients, **kwargs)
        finally:
            del self.engine.step

    DeepSpeedEngineWrapper.backward = backward


# ---- one run --------------------------------------------------------------------------------------------------------
def run(name: str, out: Path, stage: str | None, world_size: int) -> None:
    """One run; `stage`: a key of STAGES, "accelerate" (DeepSpeed from the launcher), "ddp" or None (no DeepSpeed)."""
    overrides = dict(RUNS[name] or {})
    bf16 = overrides.pop("bf16", False)
    base = name.removesuffix("-resume")
    tag = f"{stage or 'ref'}-{name}"
    kwargs = training_kwargs(out / f"trainer-{stage or 'ref'}-{base}", world_size)
    kwargs["bf16"] = bf16
    if stage in STAGES:
        kwargs["deepspeed"] = deepspeed_config(stage)
    if name in CHECKPOINTED:
        kwargs.update(save_strategy="steps", save_steps=1)
    resume = str(out / f"trainer-{stage or 'ref'}-{base}" / "checkpoint-1") if name.endswith("-resume") else None
    if overrides:
        kwargs.update(sam_rho=0.5, **overrides)
    cls = SAMPassRecorder if RUNS[name] is not None and name != "plain-bf16" else PassRecorder
    collectives = StepCollectives()
    CHECKS.update(zero_untouched=[], restored_bit_exact=[])
    trainer = cls(
        model=tiny_llama(),
        args=SAMTrainingArguments(**kwargs),
        train_dataset=dataset(),
        callbacks=[collectives],
    )
    trainer.train(resume_from_checkpoint=resume)
    engine = trainer.model_wrapped
    deepspeed = stage in STAGES or stage == "accelerate"
    rank = trainer.args.process_index
    torch.save(
        {
            "state": {k: v.detach().float().clone() for k, v in trainer.model.named_parameters()},
            "dtype": str(next(trainer.model.parameters()).dtype),
            "world_size": world_size,
            "engine": type(engine).__name__,
            "zero_stage": engine.zero_optimization_stage() if deepspeed else None,
            "zero_optimizer": type(engine.optimizer).__name__ if deepspeed else None,
            "collectives": collectives.per_step,
            "checks": {k: list(v) for k, v in CHECKS.items()},
            "logs": [h for h in trainer.state.log_history if "loss" in h],
        },
        out / f"{tag}.rank{rank}.pt",
    )


CHECKS: dict[str, list] = {"zero_untouched": [], "restored_bit_exact": []}


# ---- refusals through the real Trainer ------------------------------------------------------------------------------
REFUSALS = {  # name: (DeepSpeed config or "env:STAGE" for `accelerate launch`'s variables, SAMConfig kwargs)
    "zero1": ({"zero_optimization": {"stage": 1}}, {}),
    "zero2": ({"zero_optimization": {"stage": 2}}, {}),
    "zero2-local-micro": ({"zero_optimization": {"stage": 2}}, {"sync": "local", "accumulation": "micro"}),
    "zero0": ({"zero_optimization": {"stage": 0}}, {}),
    "zero3": ({"zero_optimization": {"stage": 3}}, {}),
    "zero3-accelerate": ("env:3", {}),
    "offload": ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, {}),
    "fp16": ({"zero_optimization": {"stage": 2}, "fp16": {"enabled": True}}, {}),
    "looksam": ({"zero_optimization": {"stage": 2}}, {"method": "looksam"}),
}


def refusals(out: Path, world_size: int) -> None:
    """Build a SAMTrainer for each setup of `REFUSALS` (plain `TrainingArguments`, so the trainer's own check runs)
    and record the `ValueError` it raised (None: accepted); `SAMTrainingArguments(deepspeed=ZeRO-3)` too."""
    from transformers import TrainingArguments

    from hf_sam import SAMConfig, SAMTrainer

    kwargs = dict(output_dir=str(out / "refusals"), use_cpu=True, report_to=[], per_device_train_batch_size=1)
    results = {}
    for name, (config, sam) in REFUSALS.items():
        environ = dict(os.environ)
        if isinstance(config, str):  # what `accelerate launch --use_deepspeed --zero_stage 3` sets
            os.environ.update(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_ZERO_STAGE=config[4:])
            args = TrainingArguments(**kwargs)
        else:
            base = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}
            args = TrainingArguments(**kwargs, deepspeed={**base, **config})
        try:
            SAMTrainer(model=tiny_llama(), args=args, train_dataset=dataset(), sam_config=SAMConfig(**sam))
            results[name] = None
        except ValueError as error:
            results[name] = str(error)
        os.environ.clear()
        os.environ.update(environ)
        reset_accelerate_state()
    try:
        SAMTrainingArguments(**kwargs, deepspeed={"zero_optimization": {"stage": 3}})
        results["zero3-sam-arguments"] = None
    except ValueError as error:
        results["zero3-sam-arguments"] = str(error)
    if int(os.environ.get("RANK", "0")) == 0:
        (out / "refusals.json").write_text(json.dumps(results, indent=1))


def reset_accelerate_state() -> None:
    """Between two runs in one process: a new Trainer builds a new Accelerator with its own DeepSpeed plugin."""
    from accelerate.state import AcceleratorState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    AcceleratorState._reset_state(reset_partial_state=False)  # keeps the process group


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--stages", nargs="*", default=["1", "2"], choices=list(STAGES))
    parser.add_argument("--runs", nargs="*", default=None)
    parser.add_argument("--reference", action="store_true", help="one process, no DeepSpeed")
    parser.add_argument("--accelerate", action="store_true", help="DeepSpeed from `accelerate launch`'s config")
    parser.add_argument("--refusals", action="store_true", help="also build the setups of REFUSALS")
    parser.add_argument(
        "--ddp-runs", nargs="*", default=[], help="runs under DDP (no DeepSpeed; use --stages with none)"
    )
    a = parser.parse_args()
    torch.set_num_threads(1)
    a.out.mkdir(parents=True, exist_ok=True)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if a.reference:
        for name in a.runs or REFERENCE_RUNS:
            run(name, a.out, None, world_size)
        return
    # The wrappers check what the real classes do and label the phases; they change no result.
    instrument_deepspeed_sam(CHECKS)
    instrument_plain_engine_step()
    if a.accelerate:
        for name in a.runs or ["global-exact"]:
            run(name, a.out, "accelerate", world_size)
    else:
        for stage in a.stages:
            for name in a.runs or list(RUNS):
                run(name, a.out, stage, world_size)
                reset_accelerate_state()
    # Without DeepSpeed: DDP, for `sam_sync="local"`. In a launch of its own: after a DeepSpeed run, Accelerate's
    # process state and environment would build DeepSpeed again.
    for name in a.ddp_runs:
        run(name, a.out, "ddp", world_size)
        reset_accelerate_state()
    if a.refusals:
        refusals(a.out, world_size)
    end_process_group()  # a clean exit: without it gloo aborted at exit once in three runs


if __name__ == "__main__":
    main()
