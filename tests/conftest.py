"""Shared fixtures: tiny models built from configs and tiny datasets, offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

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


def lm_dataset(n: int = 8, length: int = 12, seed: int = 1) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, length), generator=g)
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def base_args(tmp_path, **overrides) -> dict:
    """Keyword arguments for (SAM)TrainingArguments: CPU, no saving, no reporting, deterministic."""
    kwargs = dict(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
    )
    kwargs.update(overrides)
    return kwargs


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def assert_updates_close(start, got, want, rtol=1e-5):
    """Compare the weight changes (not the weights, which a tiny step would make trivially close)."""
    for k in want:
        delta_got, delta_want = got[k] - start[k], want[k] - start[k]
        scale = delta_want.abs().max().clamp_min(1e-12)
        assert ((delta_got - delta_want).abs().max() / scale) < rtol, k


def sgd_args(tmp_path, **overrides) -> dict:
    """Plain SGD at a constant learning rate, no clipping, sequential data: the setting of the reference tests."""
    return base_args(
        tmp_path,
        **{
            "optim": "sgd",
            "learning_rate": 0.5,
            "lr_scheduler_type": "constant",
            "weight_decay": 0.0,
            "max_grad_norm": 0.0,
            "train_sampling_strategy": "sequential",
            **overrides,
        },
    )


@pytest.fixture(autouse=True)
def _few_threads():
    # Two cores, shared: keep each test on one thread so timings and reductions are steady.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
