"""Shared fixtures: tiny models built from configs and tiny datasets, offline."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from tiny_llama import VOCAB, tiny_llama, tiny_llama_config  # noqa: E402, F401  (re-exported to the tests)

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


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


def assert_tiny_rho_reproduces_the_plain_trainer(tmp_path, sam_method: str) -> None:
    """rho -> 0: SAM with `sam_method` takes the plain Trainer's steps (AdamW, 4 steps of 2 micro-batches of 2)."""
    from transformers import Trainer, TrainingArguments

    from hf_sam import SAMTrainer, SAMTrainingArguments

    data = lm_dataset(n=8)
    plain, sam = tiny_llama(), tiny_llama()
    kwargs = base_args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=4)
    kwargs.update(learning_rate=1e-2, optim="adamw_torch")
    Trainer(model=plain, args=TrainingArguments(**kwargs), train_dataset=data).train()
    args = SAMTrainingArguments(**kwargs, sam_rho=1e-9, sam_method=sam_method)
    SAMTrainer(model=sam, args=args, train_dataset=data).train()
    for (name, p), q in zip(plain.named_parameters(), sam.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)


def assert_learning_rate_zero_never_changes_the_weights(training_kwargs: dict, sam_method: str) -> None:
    """The perturbation is undone by copy: with lr = 0 every weight ends bit for bit where it started (3 steps at
    rho = 0.5 with `training_kwargs`, the (SAM)TrainingArguments of the optimizer `sam_method` needs)."""
    from hf_sam import SAMTrainer, SAMTrainingArguments

    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = SAMTrainingArguments(**training_kwargs, max_steps=3, sam_rho=0.5, sam_method=sam_method)
    args.learning_rate = 0.0
    SAMTrainer(model=model, args=args, train_dataset=lm_dataset(8)).train()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def load_benchmark_script(name: str) -> ModuleType:
    """Import `benchmarks/<name>.py` (a script, not a package) as the module `name`."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _few_threads():
    # Two cores, shared: keep each test on one thread so timings and reductions are steady.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
