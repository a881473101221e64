"""DeepSpeed ZeRO-1/2 on CPU: a prototype of SAM on DeepSpeed's engine, checked against single-process hf_sam.

Not a test (CI installs no DeepSpeed) and not part of hf_sam: a standalone demonstration of the mechanics that SAM
under ZeRO-1/2 would need, written for docs/distributed.md ("DeepSpeed: what was tried on CPU"). hf_sam itself
refuses DeepSpeed; this script does not touch that.

The prototype (`DeepSpeedSAMTrainer`, `sam_accumulation="exact"`) keeps DeepSpeed out of the first pass and defers
the engine's step past the restore:

1. First pass, every micro-batch: the Trainer's own `training_step` on the *unwrapped* module (`engine.module`), so
   the engine's forward registers no backward hooks, with `accelerator.backward` swapped for `torch.autograd.grad`,
   which neither fills `.grad` nor runs the AccumulateGrad nodes that ZeRO's reduction hooks hang on. The gradient
   accumulates in a buffer of SAM's own: DeepSpeed's partitions, `micro_steps` and boundary never see the pass.
2. At the window's last micro-batch: all-reduce that buffer over the data-parallel group (`sam_sync="global"`; none
   for `"local"`), then `hf_sam.perturbation.perturb_` on the replicated model parameters (views into ZeRO's flat
   bit16 buffers; ZeRO-1/2 keep a full copy of the weights on every rank), with a copy of w.
3. Second pass through the normal Trainer path (engine forward, `engine.backward`), with Accelerate's
   `DeepSpeedEngineWrapper.backward` replaced for the duration: the boundary is set by SAM (False, ..., True) and
   `engine.step()` is *not* called.
4. Restore w by copy, then `engine.step()`: clipping, the optimizer step on the SAM gradient held in ZeRO's
   partitions, the fp32 master -> bit16 copy and all-gather, zero grad, LR scheduler.

Runs (each in its own `torchrun --nproc_per_node 2`), for each ZeRO configuration in `STAGES` (1, 2, and 2 with
overlapped communication and small buckets):

- `plain`: the plain Trainer under DeepSpeed (the baseline error of DeepSpeed against one process).
- `sam-global`: the prototype with the all-reduced gradient; the DDP bar: equal to one process on the same batch.
- `plain-resume`, `sam-global-resume`: resumed from the checkpoint the run above wrote after step 1; compared bit for
  bit with the uninterrupted run.
- `sam-local`: the prototype with each rank's own gradient: a control that must differ from the reference.
- `plain-bf16`, `sam-global-bf16`: the same in bf16 (bf16 weights, fp32 master weights in ZeRO's partitions).
- `naive`: hf_sam's `SAMTrainer` with its DeepSpeed refusal bypassed, to show what it would silently compute.

The references run in this process without DeepSpeed: the plain Trainer and hf_sam's `SAMTrainer`, one process with
the whole global batch. Tiny Llama, fp32, SGD lr 0.5, rho 0.5, global batch 4 (2 per rank), accumulation 2, 2 steps,
sequential data. Each row reports the error relative to the update against its reference, whether the ranks ended
bit-identical and, for the prototype, per-step checks (ZeRO held no gradient before the second pass, bit-exact
restore, ||e|| = rho). About 8 minutes on 2 CPU cores (24 launches).

Usage (in a venv with deepspeed, e.g. /work/venvs/deepspeed; see docs/distributed.md):
    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 python tests/dist_scripts/deepspeed_probe.py OUT [--stages 1 2] [--runs ...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
from _deepspeed_setup import STAGES, dataset, deepspeed_config, tiny_llama, training_kwargs, zero_holds_no_gradient

RHO = 0.5
RUNS = (
    "plain",
    "plain-resume",
    "sam-global",
    "sam-global-resume",
    "sam-local",
    "plain-bf16",
    "sam-global-bf16",
    "naive",
)


# ---- comparing weights ---------------------------------------------------------------------------------------------
def state_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().clone() for k, v in model.named_parameters()}


def relative_error(got: dict, want: dict, start: dict) -> float:
    """||w_got - w_want|| / ||w_want - w_0|| over all parameters: the error relative to the size of the update."""
    diff = sum(float((got[k] - want[k]).double().square().sum()) for k in want)
    update = sum(float((want[k] - start[k]).double().square().sum()) for k in want)
    return (diff / update) ** 0.5


# ---- the prototype --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def first_pass_backward(accelerator, params: list[torch.Tensor], grads: list[torch.Tensor | None]):
    """Inside: `accelerator.backward(loss)` adds d loss / d params into `grads`, out of DeepSpeed's sight."""

    def backward(loss, **kwargs):
        # autograd.grad fills no .grad and runs no AccumulateGrad node: ZeRO's post-accumulate hooks stay silent.
        new = torch.autograd.grad(loss, params, allow_unused=True)
        for i, g in enumerate(new):
            if g is not None:
                grads[i] = g if grads[i] is None else grads[i].add_(g)

    accelerator.backward = backward  # the instance attribute shadows the method
    try:
        yield
    finally:
        del accelerator.backward


class _Boundary:
    value = False


@contextlib.contextmanager
def deferred_engine_step(accelerator):
    """Inside: Accelerate's DeepSpeed backward runs `engine.backward` at SAM's boundary, and never `engine.step()`."""
    wrapper = accelerator.deepspeed_engine_wrapped
    engine = wrapper.engine
    boundary = _Boundary()

    def backward(loss, sync_gradients=True, **kwargs):
        engine.set_gradient_accumulation_boundary(is_boundary=boundary.value)
        engine.backward(loss, **kwargs)

    wrapper.backward = backward
    try:
        yield boundary
    finally:
        del wrapper.backward


def sam_trainer_class():
    from transformers import Trainer

    from hf_sam.perturbation import WeightBackup, global_norm, perturb_, restore_
    from hf_sam.rng import capture_rng_state, restore_rng_state

    class DeepSpeedSAMTrainer(Trainer):
        """SAM (`accumulation="exact"`) on DeepSpeed ZeRO-1/2 through Accelerate; see the module docstring."""

        def __init__(self, *args, sam_rho: float, sam_sync: str, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.sam_rho, self.sam_sync = sam_rho, sam_sync
            self._stash: list = []
            self._grads: list | None = None
            self._backup = WeightBackup()
            self.diagnostics: dict[str, list] = {
                "untouched_before_second_pass": [],
                "restore_bit_exact": [],
                "perturbation_norm": [],
                "grad_norm": [],
            }

        def training_step(self, model, inputs, num_items_in_batch=None):
            engine = model  # the DeepSpeedEngine: `model_wrapped` under DeepSpeed
            params = [p for p in engine.module.parameters() if p.requires_grad]
            if not self._stash:
                self._grads = [None] * len(params)
            self._stash.append((inputs, capture_rng_state()))
            with first_pass_backward(self.accelerator, params, self._grads):
                clean_loss = super().training_step(engine.module, inputs, num_items_in_batch)
            if not self.accelerator.sync_gradients:
                return clean_loss
            stash, self._stash = self._stash, []
            grads, self._grads = self._grads, None
            self.diagnostics["untouched_before_second_pass"].append(zero_holds_no_gradient(engine))

            kept = [i for i, g in enumerate(grads) if g is not None]
            params_k, grads_k = [params[i] for i in kept], [grads[i] for i in kept]
            if self.sam_sync == "global":
                # One flat all-reduce, as DDP would; e is scale-invariant, the mean keeps the logged norm meaningful.
                flat = torch._utils._flatten_dense_tensors(grads_k)
                torch.distributed.all_reduce(flat)
                flat /= torch.distributed.get_world_size()
                for g, reduced in zip(grads_k, torch._utils._unflatten_dense_tensors(flat, grads_k)):
                    g.copy_(reduced)
            self.diagnostics["grad_norm"].append(float(global_norm(grads_k)))
            w = [p.detach().clone() for p in params_k]  # for the bit-exactness check only
            for p, g in zip(params_k, grads_k):
                p.grad = g
            backups = self._backup.buffers_for(params_k)
            perturb_(params_k, backups, self.sam_rho)
            self.diagnostics["perturbation_norm"].append(float(global_norm([p.grad for p in params_k])))
            for p in params:
                p.grad = None  # e lived in .grad; ZeRO's hooks expect none at the second pass
            try:
                with deferred_engine_step(self.accelerator) as boundary:
                    for i, (micro_inputs, rng) in enumerate(stash):
                        restore_rng_state(rng)
                        boundary.value = i == len(stash) - 1
                        super().training_step(engine, micro_inputs, num_items_in_batch)
            finally:
                restore_(params_k, backups)
            self.diagnostics["restore_bit_exact"].append(all(torch.equal(p, x) for p, x in zip(params_k, w)))
            engine.step()  # on the SAM gradient in ZeRO's partitions, at w
            return clean_loss

    return DeepSpeedSAMTrainer


def naive_trainer_class():
    """hf_sam's SAMTrainer with the refusal bypassed (this process only): what it would do under DeepSpeed."""
    import hf_sam.engine
    from hf_sam import SAMTrainer

    hf_sam.engine.unsupported_setup_reason = lambda trainer, sam_config: None
    return SAMTrainer


# ---- one run on one rank (under torchrun) ---------------------------------------------------------------------------
def _base_run(run: str) -> str:
    return run.removesuffix("-resume").removesuffix("-bf16")


def worker(out: Path, stage: str, run: str) -> None:
    from transformers import Trainer, TrainingArguments

    from hf_sam import SAMConfig

    torch.set_num_threads(1)
    world_size = int(os.environ["WORLD_SIZE"])
    kwargs = training_kwargs(out / f"trainer-{stage}-{run}", world_size)
    kwargs.update(deepspeed=deepspeed_config(stage), bf16=run.endswith("-bf16"))
    base = _base_run(run)
    resume_from = None
    if run in ("plain", "sam-global"):  # checkpoints at every step, for the resume runs
        kwargs.update(save_strategy="steps", save_steps=1)
    if run.endswith("-resume"):
        resume_from = str(out / f"trainer-{stage}-{base}" / "checkpoint-1")
    model = tiny_llama()
    start = state_of(model)
    if base == "plain":
        trainer = Trainer(model=model, args=TrainingArguments(**kwargs), train_dataset=dataset())
    elif base == "naive":
        # Plain TrainingArguments: SAMTrainingArguments refuses `deepspeed=` itself, before the Trainer is built.
        args = TrainingArguments(**kwargs)
        trainer = naive_trainer_class()(model=model, args=args, train_dataset=dataset(), sam_config=SAMConfig(rho=RHO))
    else:
        cls = sam_trainer_class()
        sync = base.split("-")[1]
        trainer = cls(
            model=model, args=TrainingArguments(**kwargs), train_dataset=dataset(), sam_rho=RHO, sam_sync=sync
        )
    t0 = time.perf_counter()
    error = None
    try:
        trainer.train(resume_from_checkpoint=resume_from)
    except Exception as err:  # the naive run may fail: that is a result too
        where = traceback.extract_tb(err.__traceback__)
        frames = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in where[-4:]]
        error = f"{type(err).__name__}: {err} (at {' <- '.join(reversed(frames))})"
    seconds = time.perf_counter() - t0
    engine = trainer.model_wrapped
    rank = trainer.args.process_index
    torch.save(
        {
            "start": start,
            "state": state_of(trainer.model),
            "error": error,
            "seconds": seconds,
            "backend": torch.distributed.get_backend(),
            "engine": type(engine).__name__,
            "zero_config": STAGES[stage],
            "zero_optimizer": type(getattr(engine, "optimizer", None)).__name__,
            "dtype": str(next(trainer.model.parameters()).dtype),
            "global_steps": getattr(engine, "global_steps", None),
            "diagnostics": getattr(trainer, "diagnostics", None),
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        },
        out / f"{stage}-{run}.rank{rank}.pt",
    )
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()  # a clean exit: without it gloo aborted at exit once in three runs


# ---- the driver -----------------------------------------------------------------------------------------------------
def references(out: Path) -> dict[str, dict]:
    """The single-process runs without DeepSpeed: the plain Trainer and hf_sam's SAMTrainer."""
    from transformers import Trainer, TrainingArguments

    from hf_sam import SAMTrainer, SAMTrainingArguments

    torch.set_num_threads(1)
    results = {}
    for name in ("plain", "sam"):
        kwargs = training_kwargs(out / f"reference-{name}", world_size=1)
        model = tiny_llama()
        start = state_of(model)
        if name == "plain":
            trainer = Trainer(model=model, args=TrainingArguments(**kwargs), train_dataset=dataset())
        else:
            args = SAMTrainingArguments(**kwargs, sam_rho=RHO)
            trainer = SAMTrainer(model=model, args=args, train_dataset=dataset())
        t0 = time.perf_counter()
        trainer.train()
        results[name] = {
            "start": start,
            "state": state_of(model),
            "seconds": time.perf_counter() - t0,
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        }
    return results


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path, stage: int, run: str, nproc: int) -> tuple[int, float, str]:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={_free_port()}",
        os.path.abspath(__file__),
        str(out),
        "--worker",
        f"--probe-stage={stage}",
        f"--probe-run={run}",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("DS_ACCELERATOR", "cpu")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    return proc.returncode, time.perf_counter() - t0, proc.stdout + proc.stderr


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=RUNS)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--probe-stage", help=argparse.SUPPRESS)
    parser.add_argument("--probe-run", help=argparse.SUPPRESS)
    a = parser.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    if a.worker:
        worker(a.out, a.probe_stage, a.probe_run)
        return 0

    import deepspeed
    import transformers

    print(
        f"torch {torch.__version__}, deepspeed {deepspeed.__version__}, transformers {transformers.__version__}, "
        f"DS_ACCELERATOR={os.environ.get('DS_ACCELERATOR', 'cpu (set by this script)')}"
    )
    refs = references(a.out)
    print("references (1 process, no DeepSpeed): " + ", ".join(f"{k} {v['seconds']:.1f} s" for k, v in refs.items()))
    rows = []
    finals: dict[tuple[str, str], dict] = {}
    for stage in a.stages:
        for run in a.runs:
            rc, seconds, log = launch(a.out, stage, run, a.nproc)
            row = {"stage": stage, "run": run, "rc": rc, "launch_s": round(seconds, 1)}
            if rc != 0:
                (a.out / f"{stage}-{run}.log").write_text(log)
                row["error"] = log.strip().splitlines()[-1][:300] if log.strip() else "no output"
                rows.append(row)
                print(json.dumps(row))
                continue
            ranks = [torch.load(a.out / f"{stage}-{run}.rank{r}.pt", weights_only=False) for r in range(a.nproc)]
            r0 = ranks[0]
            finals[stage, run] = r0["state"]
            ref = refs["plain" if _base_run(run) == "plain" else "sam"]
            row.update(
                backend=r0["backend"],
                engine=r0["engine"],
                zero_config=r0["zero_config"],
                zero_optimizer=r0["zero_optimizer"],
                dtype=r0["dtype"],
                global_steps=r0["global_steps"],
                train_s=round(r0["seconds"], 2),
                error=r0["error"],
                ranks_bit_identical=all(
                    torch.equal(r["state"][k], r0["state"][k]) for r in ranks[1:] for k in r0["state"]
                ),
                rel_error_vs_reference=relative_error(r0["state"], ref["state"], ref["start"]),
                losses=r0["losses"],
                reference_losses=ref["losses"],
            )
            if run.endswith("-resume") and (stage, _base_run(run)) in finals:
                uninterrupted = finals[stage, _base_run(run)]
                row["bit_identical_to_uninterrupted"] = all(
                    torch.equal(r0["state"][k], v) for k, v in uninterrupted.items()
                )
            if r0["diagnostics"]:
                row["diagnostics"] = r0["diagnostics"]
            rows.append(row)
            print(json.dumps(row))
    (a.out / "results.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
