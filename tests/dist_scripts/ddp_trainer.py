"""SAMTrainer under DDP (launched by `tests/test_distributed.py` with `torchrun`, gloo on CPU).

Trains the same tiny Llama with the plain Trainer and with SAMTrainer in every `sam_sync` x `sam_accumulation`
combination on one fixed global batch per step (a sequential sampler: rank r's micro-batch i is the r-th slice of
the single-process micro-batch i). Each rank saves, per run, its final weights and, for each call of the Trainer's
`training_step` (one SAM pass), the gradient all-reduce rounds it triggered (counted by a DDP comm hook) and DDP's
buffer broadcasts.

Usage: torchrun --nproc_per_node N ddp_trainer.py OUT_DIR [--global-batch 4] [--accumulation-steps 2] [--steps 2]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from transformers import Trainer, TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests folder, for the shared tiny model
from _process_group import end_process_group  # noqa: E402
from testing_utils import base_args, lm_dataset, tiny_llama  # noqa: E402

from hf_sam import SAMMixin, SAMTrainingArguments  # noqa: E402

RUNS = {  # name: SAMTrainingArguments overrides; None for the plain Trainer
    "plain": None,
    "global-exact": dict(sam_sync="global", sam_accumulation="exact"),
    "global-micro": dict(sam_sync="global", sam_accumulation="micro"),
    "local-exact": dict(sam_sync="local", sam_accumulation="exact"),
    "local-micro": dict(sam_sync="local", sam_accumulation="micro"),
    # DDP broadcasts module buffers (here the rotary `inv_freq`) at every forward unless told not to.
    "local-exact-no-buffer-broadcast": dict(sam_sync="local", sam_accumulation="exact", ddp_broadcast_buffers=False),
    # The Trainer's default (seeded) random sampler instead of the sequential one.
    "global-exact-random": dict(sam_sync="global", sam_accumulation="exact", train_sampling_strategy="random"),
    # Functional-SAM: its hooks on the logits under DDP.
    "functional-exact": dict(sam_method="functional", sam_accumulation="exact"),
    "functional-micro": dict(sam_method="functional", sam_accumulation="micro"),
}


class BroadcastCounter:
    """Counts DDP's forward-time buffer broadcasts (every DDP instance broadcasts through this method)."""

    def __init__(self) -> None:
        self.calls = 0
        original = torch.nn.parallel.DistributedDataParallel._distributed_broadcast_coalesced

        def counting_broadcast(ddp, *args, **kwargs):
            self.calls += 1
            return original(ddp, *args, **kwargs)

        torch.nn.parallel.DistributedDataParallel._distributed_broadcast_coalesced = counting_broadcast


BROADCASTS = BroadcastCounter()


class AllReduceCounter:
    """Counts gradient all-reduce rounds (one per backward that synchronises) through a DDP comm hook."""

    def __init__(self) -> None:
        self.rounds = 0

    def hook(self):
        """A comm hook that all-reduces as `allreduce_hook` does and counts rounds."""

        def counting_allreduce_hook(state, bucket):
            if bucket.is_last():  # a round may span several buckets; each round has exactly one last bucket
                self.rounds += 1
            return allreduce_hook(state, bucket)

        return counting_allreduce_hook


class PassLog:
    """Per pass: the gradient all-reduce rounds and the buffer broadcasts it triggered."""

    def __init__(self) -> None:
        self.rounds: list[int] = []
        self.broadcasts: list[int] = []


class PassRecorder(Trainer):
    """Sits between `SAMMixin` and `Trainer`: every SAM pass goes through here; records its all-reduce rounds."""

    def __init__(self, *args, counter: AllReduceCounter, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.counter = counter
        # Kept in an object, not in plain list attributes: SAMMixin puts a trainer's plain-data attributes back
        # after the perturbed pass (a subclass's bookkeeping is the clean pass's), which would drop its records.
        self.passes = PassLog()

    def training_step(self, model, inputs, num_items_in_batch=None):
        rounds, broadcasts = self.counter.rounds, BROADCASTS.calls
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.passes.rounds.append(self.counter.rounds - rounds)
        self.passes.broadcasts.append(BROADCASTS.calls - broadcasts)
        return loss


class SAMPassRecorder(SAMMixin, PassRecorder):
    pass


class RegisterHook(TrainerCallback):
    """Registers the counting comm hook on the DDP-wrapped model once the Trainer has wrapped it."""

    def __init__(self, trainer_ref: list, counter: AllReduceCounter) -> None:
        self.trainer_ref = trainer_ref
        self.counter = counter

    def on_train_begin(self, args, state, control, **kwargs):
        wrapped = self.trainer_ref[0].model_wrapped
        if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
            wrapped.register_comm_hook(state=None, hook=self.counter.hook())


def training_arguments(
    name: str, out: Path, world_size: int, global_batch: int, accumulation_steps: int, steps: int
) -> SAMTrainingArguments:
    """The arguments of run `name`: per-device batch global_batch / world_size, sequential data, SGD."""
    sam = RUNS[name]
    kwargs = base_args(
        out / f"trainer-{name}",
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        max_steps=steps,
        per_device_train_batch_size=global_batch // world_size,
        gradient_accumulation_steps=accumulation_steps,
        train_sampling_strategy="sequential",  # the same global batch for every world size
        logging_steps=steps,
    )
    if sam is not None:
        kwargs.update(sam_rho=0.5, **sam)
    return SAMTrainingArguments(**kwargs)


def run(name: str, out: Path, world_size: int, global_batch: int, accumulation_steps: int, steps: int) -> None:
    sam = RUNS[name]
    args = training_arguments(name, out, world_size, global_batch, accumulation_steps, steps)
    counter = AllReduceCounter()
    holder: list = []
    cls = PassRecorder if sam is None else SAMPassRecorder
    trainer = cls(
        model=tiny_llama(seed=0),
        args=args,
        train_dataset=lm_dataset(n=global_batch * accumulation_steps * steps, seed=1),
        counter=counter,
        callbacks=[RegisterHook(holder, counter)],
    )
    holder.append(trainer)
    trainer.train()
    state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    rank = trainer.args.process_index
    torch.save(
        {
            "state": state,
            "rounds_per_pass": trainer.passes.rounds,
            "broadcasts_per_pass": trainer.passes.broadcasts,
            "world_size": world_size,
        },
        out / f"{name}.rank{rank}.pt",
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--accumulation-steps", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--runs", nargs="*", default=list(RUNS))
    a = parser.parse_args()
    torch.set_num_threads(1)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    a.out.mkdir(parents=True, exist_ok=True)
    for name in a.runs:
        run(name, a.out, world_size, a.global_batch, a.accumulation_steps, a.steps)
    end_process_group()


if __name__ == "__main__":
    main()
