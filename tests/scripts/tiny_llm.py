"""Write a tiny Llama checkpoint with a word-level tokenizer and an Alpaca-format JSONL dataset, all offline.

For the framework end-to-end tests (Axolotl, LLaMA-Factory), run with the framework venv's python:
`python tests/scripts/tiny_llm.py OUT_DIR` writes OUT_DIR/model (config, safetensors, tokenizer) and
OUT_DIR/data/train.jsonl (+ LLaMA-Factory's dataset_info.json).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests folder, for the shared tiny model
from tiny_llama import tiny_llama  # noqa: E402

WORDS = ["apple", "river", "stone", "cloud", "green", "quiet", "north", "seven"]
WORDS += ["tiger", "lamp", "paper", "window", "silver", "garden", "orange", "music"]
# Words of the Alpaca and LLaMA-Factory prompt templates, so that prompts do not collapse into <unk>.
TEMPLATE_TEXT = (
    "Below is an instruction that describes a task . Write a response that appropriately completes the request . "
    "### Instruction : ### Input : ### Response : Human : Assistant : System : User : reverse the words"
)
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]


def examples(n: int = 32, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.sample(WORDS, 4)
        rows.append({"instruction": "reverse the words", "input": " ".join(words), "output": " ".join(words[::-1])})
    return rows


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for word in WORDS + TEMPLATE_TEXT.split():
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def main(out: Path) -> None:
    tok = tokenizer()
    model = tiny_llama(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    with open(data / "train.jsonl", "w") as f:
        for row in examples():
            f.write(json.dumps(row) + "\n")
    info = {"tiny_alpaca": {"file_name": "train.jsonl"}}  # LLaMA-Factory's default columns are Alpaca's
    (data / "dataset_info.json").write_text(json.dumps(info))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
