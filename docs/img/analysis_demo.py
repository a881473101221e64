"""Make the plots in docs/analysis.md: AdamW and SAM on a tiny word-level Llama (CPU, about a minute in all).

    python docs/img/analysis_demo.py /tmp/demo
    hf-sam sharpness /tmp/demo/adamw /tmp/demo/sam --labels AdamW SAM --data /tmp/demo/eval.jsonl --hessian --trace
    hf-sam landscape /tmp/demo/adamw /tmp/demo/sam --labels AdamW SAM --data /tmp/demo/eval.jsonl \
        --out docs/img/landscape-1d.png
    hf-sam landscape /tmp/demo/adamw /tmp/demo/sam --labels AdamW SAM --data /tmp/demo/eval.jsonl \
        --dims 2 --steps 13 --out docs/img/landscape-2d.png
    hf-sam landscape /tmp/demo/adamw /tmp/demo/sam --labels AdamW SAM --data /tmp/demo/eval.jsonl \
        --interpolate --span-beyond 0.25 --out docs/img/interpolation.png
"""

from __future__ import annotations

import json
import os
import random
import sys

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    DataCollatorForLanguageModeling,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
)

from hf_sam import SAMTrainer, SAMTrainingArguments

SUBJECTS = ["the cat", "the dog", "a bird", "my friend", "the teacher", "a child", "the farmer", "our neighbour"]
VERBS = ["sees", "likes", "finds", "paints", "follows", "carries", "feeds", "watches"]
OBJECTS = ["the ball", "a red apple", "the old boat", "a small house", "the blue kite", "a green hat", "the tall tree"]
PLACES = ["in the park", "at home", "by the river", "on the hill", "near the school", "under the bridge"]


def main(out: str) -> None:
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(1)
    rng = random.Random(0)

    def sentence() -> str:
        return " ".join(rng.choice(part) for part in (SUBJECTS, VERBS, OBJECTS, PLACES))

    train, held_out = [sentence() for _ in range(96)], [sentence() for _ in range(64)]
    words = sorted({w for s in train + held_out for w in s.split()})
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{w: i + 3 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]"
    )
    with open(os.path.join(out, "eval.jsonl"), "w") as f:
        f.writelines(json.dumps({"text": s}) + "\n" for s in held_out)
    data = Dataset.from_dict({"text": train}).map(
        lambda b: tokenizer(b["text"]), batched=True, remove_columns=["text"]
    )
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    common = dict(
        per_device_train_batch_size=16, num_train_epochs=60, learning_rate=3e-3, lr_scheduler_type="constant",
        weight_decay=0.0, use_cpu=True, report_to=[], save_strategy="no", logging_steps=50, seed=0,
    )  # fmt: skip
    for name in ("adamw", "sam"):
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0, bos_token_id=None, eos_token_id=2,
            tie_word_embeddings=False,
        )  # fmt: skip
        model = LlamaForCausalLM(config)
        path = os.path.join(out, name)
        if name == "adamw":
            args = TrainingArguments(output_dir=path, **common)
            trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collator)
        else:
            args = SAMTrainingArguments(output_dir=path, sam_rho=0.1, **common)
            trainer = SAMTrainer(model=model, args=args, train_dataset=data, data_collator=collator)
        trainer.train()
        trainer.save_model(path)
        tokenizer.save_pretrained(path)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "demo")
