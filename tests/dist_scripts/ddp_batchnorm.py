"""BatchNorm under DDP with SAMTrainer (launched by `tests/test_distributed.py` with `torchrun`, gloo on CPU).

Trains the BatchNorm regressor of `testing_utils.py` (BatchNorm and a custom running statistic; `test_fidelity.py`
trains it in one process) with the plain Trainer and with SAMTrainer (rho -> 0 and rho = 0.5, `exact` and `micro`
accumulation, gradient accumulation 2), and saves each rank's final `state_dict` (weights and buffers). DDP
broadcasts rank 0's buffers at every forward. `SyncBatchNorm` cannot run here: DDP refuses it with CPU modules
("SyncBatchNorm layers only work with GPU modules").

Usage: torchrun --nproc_per_node 2 ddp_batchnorm.py OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests folder
from _process_group import end_process_group  # noqa: E402
from testing_utils import BatchNormRegressor, regression_data, sgd_args  # noqa: E402

from hf_sam import SAMTrainer, SAMTrainingArguments  # noqa: E402

RUNS = {  # name: SAM overrides; None for the plain Trainer
    "plain": None,
    "tiny-exact": dict(sam_rho=1e-12, sam_accumulation="exact"),
    "tiny-micro": dict(sam_rho=1e-12, sam_accumulation="micro"),
    "sam-exact": dict(sam_rho=0.5, sam_accumulation="exact"),
    "sam-micro": dict(sam_rho=0.5, sam_accumulation="micro"),
}


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    for name, sam in RUNS.items():
        kwargs = sgd_args(
            out / name, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=3, learning_rate=0.1
        )
        model = BatchNormRegressor()
        if sam is None:
            trainer = Trainer(model=model, args=TrainingArguments(**kwargs), train_dataset=regression_data(32))
        else:
            args = SAMTrainingArguments(**kwargs, **sam)
            trainer = SAMTrainer(model=model, args=args, train_dataset=regression_data(32))
        trainer.train()
        state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        torch.save(state, out / f"{name}.rank{trainer.args.process_index}.pt")
    end_process_group()


if __name__ == "__main__":
    main()
