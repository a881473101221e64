"""SAMTrainer with FSDP2 on CPU (launched by `tests/test_distributed.py` with `torchrun`, 2 gloo processes).

Accelerate 1.15 turns FSDP on only for accelerator devices; on CPU its state says MULTI_CPU and the Trainer would
wrap the model in DDP. This script switches the (shared) Accelerate state to FSDP with an FSDP2 plugin after the
Trainer is built, so that `trainer.train()` shards the model with Accelerate's own `fsdp2_prepare_model`
(`fully_shard` per decoder layer, DTensor parameters and gradients) and runs its FSDP2 code paths (`no_sync`,
gradient clipping) with gloo. Everything else is the ordinary Trainer and SAMMixin.

It trains the runs of `ddp_trainer.py` named on the command line (same arguments, so the single-process results of
that script are the reference) and saves the unsharded final weights. It also builds SAM trainers with an FSDP plugin
in the state *before* construction and records the refusals (FSDP1, `sam_sync="local"`).

Usage: torchrun --nproc_per_node 2 fsdp2_trainer.py OUT_DIR
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests folder, for the shared tiny model
from _process_group import end_process_group  # noqa: E402
from ddp_trainer import training_arguments  # noqa: E402
from testing_utils import lm_dataset, tiny_llama  # noqa: E402
from transformers import Trainer  # noqa: E402

from hf_sam import SAMTrainer  # noqa: E402

GLOBAL_BATCH, ACCUMULATION_STEPS, STEPS = 4, 2, 2
RUNS = ["plain", "global-exact", "global-micro"]


def fsdp_plugin(version: int) -> FullyShardedDataParallelPlugin:
    return FullyShardedDataParallelPlugin(
        fsdp_version=version,
        reshard_after_forward=True if version == 2 else "FULL_SHARD",
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
    )


def build(name: str, out: Path, world_size: int, plugin: FullyShardedDataParallelPlugin | None):
    args = training_arguments(name, out, world_size, GLOBAL_BATCH, ACCUMULATION_STEPS, STEPS)  # resets the state
    if plugin is not None:  # initialise the state the Trainer's Accelerator reuses, with the plugin in it
        Accelerator(cpu=True)
        AcceleratorState._shared_state["fsdp_plugin"] = plugin
    cls = Trainer if name == "plain" else SAMTrainer
    return cls(
        model=tiny_llama(seed=0),
        args=args,
        train_dataset=lm_dataset(n=GLOBAL_BATCH * ACCUMULATION_STEPS * STEPS, seed=1),
    )


def train_fsdp2(name: str, out: Path, world_size: int) -> None:
    trainer = build(name, out, world_size, plugin=None)
    # Switch the shared state to FSDP2 (what `accelerate launch` with fsdp2.yaml sets up on GPUs).
    AcceleratorState._shared_state["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["fsdp_plugin"] = fsdp_plugin(2)
    trainer.is_fsdp_enabled = True
    assert trainer.accelerator.is_fsdp2
    trainer.train()
    params = list(trainer.model_wrapped.parameters())
    state = {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
        for k, v in trainer.model.state_dict().items()
    }
    if trainer.args.process_index == 0:
        torch.save(
            {
                "state": state,
                "wrapped": type(trainer.model_wrapped).__name__,
                "dtensor_params": all(isinstance(p, DTensor) for p in params),
                "world_size": world_size,
            },
            out / f"fsdp2-{name}.pt",
        )


def refusals(out: Path, world_size: int) -> dict[str, str | None]:
    cases = {
        "fsdp1": ("global-exact", 1),
        "fsdp2-local": ("local-exact", 2),
        "fsdp2-micro-ga2": ("global-micro", 2),  # accepted: every perturbed pass synchronises
        "fsdp2-global-exact": ("global-exact", 2),  # accepted
    }
    messages = {}
    for case, (name, version) in cases.items():
        try:
            build(name, out, world_size, plugin=fsdp_plugin(version))
            messages[case] = None
        except ValueError as err:
            messages[case] = str(err)
    return messages


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    world_size = int(os.environ["WORLD_SIZE"])
    for name in RUNS:
        train_fsdp2(name, out, world_size)
    messages = refusals(out, world_size)
    if int(os.environ["RANK"]) == 0:
        (out / "refusals.json").write_text(json.dumps(messages, indent=1))
    end_process_group()


if __name__ == "__main__":
    main()
