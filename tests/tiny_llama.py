"""The tiny Llama every test trains: one definition, needing only torch and transformers.

Imported by `testing_utils.py` (the tests, main venv), by the DeepSpeed scripts in `dist_scripts/` (torchrun in the
DeepSpeed venv, which has neither pytest nor datasets) and by `scripts/tiny_llm.py` (the framework venvs), each with
this folder put on `sys.path`.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 48


def tiny_llama_config(**overrides) -> LlamaConfig:
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).float()
