"""The setting both DeepSpeed scripts train in: a tiny Llama, its data, the Trainer's arguments, the ZeRO configs.

Imported by `deepspeed_trainer.py` and `deepspeed_probe.py` from their own folder (first on `sys.path` when a script
runs); not `tests/testing_utils.py`, since the DeepSpeed venv has neither pytest nor datasets (the model comes from
`tests/tiny_llama.py`, which needs only transformers). Tiny Llama, fp32, SGD lr 0.5,
global batch 4 (split over the ranks), accumulation 2, 2 steps, sequential data: the setting of the DDP tests.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests folder, for the shared tiny model
from tiny_llama import VOCAB, tiny_llama  # noqa: E402, F401  (tiny_llama is used by the scripts)

LENGTH = 12
LR = 0.5
GLOBAL_BATCH, ACCUMULATION, STEPS = 4, 2, 2
# ZeRO configurations: "2-overlap" is ZeRO-2 with overlapped communication and small buckets (many reductions).
STAGES = {
    "1": {"stage": 1},
    "2": {"stage": 2},
    "2-overlap": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": 500},
}


def dataset() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (GLOBAL_BATCH * ACCUMULATION * STEPS, LENGTH), generator=g)
    return [{"input_ids": x, "labels": x.clone()} for x in ids]


def training_kwargs(output_dir: Path, world_size: int) -> dict:
    """(SAM)TrainingArguments: plain SGD at a constant rate, no clipping, the global batch split over `world_size`."""
    return dict(
        output_dir=str(output_dir),
        use_cpu=True,  # without it, TrainingArguments counts world size 1 on a machine with no accelerator
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        optim="sgd",
        learning_rate=LR,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        train_sampling_strategy="sequential",  # rank r's micro-batch i is the r-th slice of the global micro-batch i
        per_device_train_batch_size=GLOBAL_BATCH // world_size,
        gradient_accumulation_steps=ACCUMULATION,
        max_steps=STEPS,
    )


def deepspeed_config(stage: str) -> dict:
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": STAGES[stage],
        "zero_allow_untested_optimizer": True,  # the Trainer's torch.optim.SGD, as in the reference
        "bf16": {"enabled": "auto"},  # from `bf16=`: bf16 weights, fp32 master weights in ZeRO's partitions
    }


def zero_holds_no_gradient(engine) -> bool:
    """No `.grad`, no `grad_accum`, no reduced partition (private attributes of ZeRO-1/2 in DeepSpeed 0.19.8)."""
    optimizer = engine.optimizer
    params = [p for group in optimizer.bit16_groups for p in group]
    return (
        all(v is None for v in getattr(optimizer, "averaged_gradients", {}).values())
        and all(p.grad is None for p in params)
        and all(getattr(p, "grad_accum", None) is None for p in params)
    )
