"""The one-line mixin `class X(SAMMixin, TRLTrainer)` keeps every TRL trainer's own metrics to the clean pass.

With `sam_rho` -> 0 each logs what the plain TRL trainer logs, token counts included.
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from testing_utils import dpo_dataset, sft_dataset, tiny_llama, tiny_policy, tiny_tokenizer, train_logs, trl_sgd_args

trl = pytest.importorskip("trl")

from transformers import LlamaForSequenceClassification  # noqa: E402

from hf_sam import SAMConfig, SAMMixin  # noqa: E402

TINY_RHO = 1e-12


def kto_dataset(n: int = 8) -> Dataset:
    rows = sft_dataset(n).to_list()
    return Dataset.from_list([{**r, "label": i % 2 == 0} for i, r in enumerate(rows)])


def reward_model():
    torch.manual_seed(0)
    config = tiny_llama(0).config
    config.num_labels, config.pad_token_id, config.eos_token_id = 1, 0, 1
    return LlamaForSequenceClassification(config).float()


def orpo_classes():
    orpo = pytest.importorskip("trl.experimental.orpo")
    return orpo.ORPOTrainer, orpo.ORPOConfig


CASES = {  # name: (trainer class, config class, model factory, dataset factory)
    "sft": lambda: (trl.SFTTrainer, trl.SFTConfig, tiny_policy, sft_dataset),
    "dpo": lambda: (trl.DPOTrainer, trl.DPOConfig, tiny_policy, dpo_dataset),
    "reward": lambda: (trl.RewardTrainer, trl.RewardConfig, reward_model, dpo_dataset),
    "kto": lambda: (trl.KTOTrainer, trl.KTOConfig, tiny_policy, kto_dataset),
    "orpo": lambda: (*orpo_classes(), tiny_policy, dpo_dataset),
}
TIMING = {"train_runtime", "train_samples_per_second", "train_steps_per_second"}


@pytest.mark.parametrize("name", list(CASES))
def test_one_line_mixin_logs_what_the_plain_trl_trainer_logs(tmp_path, name):
    trainer_cls, config_cls, make_model, make_data = CASES[name]()
    kwargs = trl_sgd_args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2)
    if name == "kto":
        kwargs["per_device_train_batch_size"] = 4  # KTO needs more than one example per micro-batch for its KL term
    data, tokenizer = make_data(), tiny_tokenizer()

    def run(cls, **extra):
        if name in ("dpo", "kto"):  # a reference model of its own: TRL would load one by name from the Hub
            extra["ref_model"] = tiny_policy(1)
        trainer = cls(
            model=make_model(), args=config_cls(**kwargs), train_dataset=data, processing_class=tokenizer, **extra
        )
        trainer.train()
        return train_logs(trainer)

    plain = run(trainer_cls)
    sam = run(type(f"SAM{trainer_cls.__name__}", (SAMMixin, trainer_cls), {}), sam_config=SAMConfig(rho=TINY_RHO))
    assert len(sam) == len(plain) == 2
    for p, s in zip(plain, sam):
        assert {"sam_perturbed_loss", "sam_sharpness"} <= set(s)
        assert set(p) - TIMING <= set(s)
        for key in set(p) - TIMING:
            assert s[key] == pytest.approx(p[key], rel=1e-5, abs=1e-6), key
        if "num_tokens" in p:
            assert s["num_tokens"] == p["num_tokens"]


def test_trl_model_cards_name_sam(tmp_path):
    from hf_sam.trl import SAMSFTConfig, SAMSFTTrainer

    args = SAMSFTConfig(**trl_sgd_args(tmp_path), sam_rho=0.1, sam_method="looksam")
    trainer = SAMSFTTrainer(
        model=tiny_policy(), args=args, train_dataset=sft_dataset(), processing_class=tiny_tokenizer()
    )
    trainer.create_model_card(model_name="tiny")
    card = (tmp_path / "README.md").read_text()
    assert "## Sharpness-Aware Minimization" in card and "LookSAM" in card
    assert "- sam_rho: 0.1" in card and "- sam_method: looksam" in card and "liu2022looksam" in card
    mixed = type("SAMDPO", (SAMMixin, trl.DPOTrainer), {})
    dpo = mixed(
        model=tiny_policy(), ref_model=tiny_policy(1), args=trl.DPOConfig(**trl_sgd_args(tmp_path / "dpo")),
        train_dataset=dpo_dataset(), processing_class=tiny_tokenizer(), sam_config=SAMConfig(rho=0.2),
    )  # fmt: skip
    dpo.create_model_card()
    card = (tmp_path / "dpo" / "README.md").read_text()
    assert "- sam_rho: 0.2" in card and "foret2021sharpnessaware" in card and "DPO" in card


def test_enable_sam_on_sft_trainer_equals_the_class_level_mixin(tmp_path):
    from hf_sam import enable_sam
    from hf_sam.trl import SAMSFTTrainer

    kwargs = trl_sgd_args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2)
    data, tokenizer, config = sft_dataset(), tiny_tokenizer(), SAMConfig(rho=0.1)
    built = trl.SFTTrainer(
        model=tiny_policy(), args=trl.SFTConfig(**kwargs), train_dataset=data, processing_class=tokenizer
    )
    enabled = enable_sam(built, config)
    mixed = SAMSFTTrainer(
        model=tiny_policy(), args=trl.SFTConfig(**kwargs), train_dataset=data, processing_class=tokenizer,
        sam_config=config,
    )  # fmt: skip
    enabled.train()
    mixed.train()
    assert enabled is built and isinstance(enabled, trl.SFTTrainer)
    for p, q in zip(enabled.model.parameters(), mixed.model.parameters()):
        assert torch.equal(p, q)
    for a, b in zip(train_logs(enabled), train_logs(mixed), strict=True):
        assert {k: v for k, v in a.items() if k not in TIMING} == {k: v for k, v in b.items() if k not in TIMING}
