"""Train a tiny model with SAMTrainer, optionally resuming from a checkpoint; save the final weights.

Used by tests/test_resume.py in fresh processes: python resume_run.py OUT_DIR MAX_STEPS [RESUME_CHECKPOINT] [SAM_JSON]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
from testing_utils import base_args, lm_dataset, tiny_llama  # noqa: E402

from hf_sam import SAMTrainer, SAMTrainingArguments  # noqa: E402


def main() -> None:
    out_dir, max_steps = sys.argv[1], int(sys.argv[2])
    resume = sys.argv[3] if len(sys.argv) > 3 and sys.argv[3] != "-" else None
    sam = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
    torch.set_num_threads(1)
    model = tiny_llama(attention_dropout=0.1)  # dropout on: the RNG state must resume too
    args = SAMTrainingArguments(
        **{
            **base_args(out_dir, per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-2),
            "save_strategy": "steps",
            "save_steps": 2,
        },
        max_steps=max_steps,
        **sam,
    )
    trainer = SAMTrainer(model=model, args=args, train_dataset=lm_dataset(n=16))
    trainer.train(resume_from_checkpoint=resume)
    torch.save(model.state_dict(), Path(out_dir) / "final.pt")


if __name__ == "__main__":
    main()
