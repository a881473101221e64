"""SAM with TRL's SFTTrainer and DPOTrainer: tiny Llama, a WordLevel tokenizer built here, local data, offline."""

from __future__ import annotations

import copy
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from testing_utils import (
    TRL_METRICS,
    assert_updates_close,
    base_args,
    dpo_dataset,
    sft_dataset,
    tiny_policy,
    tiny_tokenizer,
    train_logs,
    trainable_state,
    trl_sgd_args,
)
from torch.func import functional_call, grad

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")

from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer  # noqa: E402

from hf_sam import SAMConfig, SAMMixin  # noqa: E402
from hf_sam.trl import SAMDPOConfig, SAMDPOTrainer, SAMSFTConfig, SAMSFTTrainer  # noqa: E402


def sam_sgd_reference(params, loss_of_params, batches, lr, rho):
    """SAM with SGD written from the formulas: e = rho g / ||g||, w <- w - lr grad L(w + e)."""
    for batch in batches:
        g = grad(loss_of_params)(params, batch)
        norm = torch.sqrt(sum((v**2).sum() for v in g.values()))
        g_sam = grad(loss_of_params)({k: params[k] + rho * g[k] / norm for k in params}, batch)
        params = {k: params[k] - lr * g_sam[k] for k in params}
    return params


# ---------------------------------------------------------------------------------------------------------------
# SFT


def completion_only_loss(model, frozen):
    def loss(params, batch):
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        logits = functional_call(model, {**frozen, **params}, (), inputs).logits
        labels = batch["labels"][:, 1:]
        return (
            F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
            / (labels != -100).sum()
        )

    return loss


def test_sft_update_is_sam_on_the_completion_only_loss(tmp_path):
    model = tiny_policy().double()
    reference = copy.deepcopy(model)
    start = trainable_state(model)
    args = SAMSFTConfig(**trl_sgd_args(tmp_path, per_device_train_batch_size=4, max_steps=2), sam_rho=0.05)
    trainer = SAMSFTTrainer(model=model, args=args, train_dataset=sft_dataset(), processing_class=tiny_tokenizer())
    batches = list(trainer.get_train_dataloader())[:2]
    assert all((b["labels"][:, 0] == -100).all() for b in batches)  # the prompts are masked out of the loss
    trainer.train()
    frozen = {k: v.detach() for k, v in reference.named_parameters() if not v.requires_grad}
    want = sam_sgd_reference(start, completion_only_loss(reference, frozen), batches, lr=0.5, rho=0.05)
    assert_updates_close(start, trainable_state(model), want)
    # The comparison tells the completion-only loss from the loss on every token.
    every_token = [{**b, "labels": b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)} for b in batches]
    other = sam_sgd_reference(start, completion_only_loss(reference, frozen), every_token, lr=0.5, rho=0.05)
    with pytest.raises(AssertionError):
        assert_updates_close(start, trainable_state(model), other, rtol=1e-3)


@pytest.mark.parametrize("accumulation", ["exact", "micro"])
def test_sft_metrics_are_the_clean_pass_ones(tmp_path, accumulation, monkeypatch):
    data, tokenizer = sft_dataset(), tiny_tokenizer()
    kwargs = trl_sgd_args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2)
    plain = SFTTrainer(model=tiny_policy(), args=SFTConfig(**kwargs), train_dataset=data, processing_class=tokenizer)
    plain.train()
    args = SAMSFTConfig(**kwargs, sam_accumulation=accumulation)
    sam = SAMSFTTrainer(model=tiny_policy(), args=args, train_dataset=data, processing_class=tokenizer)
    sam.train()
    plain_logs, sam_logs = train_logs(plain), train_logs(sam)
    assert len(sam_logs) == len(plain_logs) == 2
    for p, s in zip(plain_logs, sam_logs):
        assert {"sam_perturbed_loss", "sam_sharpness", "sam_grad_norm", "sam_skipped"} <= set(s)
        assert s["num_tokens"] == p["num_tokens"]  # each token counted once, not once per pass
        assert s["sam_skipped"] == 0.0
    # Step 1 runs its clean pass at the same weights as the plain run: TRL's averages match to rounding.
    for key in TRL_METRICS + ("loss",):
        assert sam_logs[0][key] == pytest.approx(plain_logs[0][key], rel=1e-6), key
    assert sam_logs[0]["sam_perturbed_loss"] > sam_logs[0]["loss"]

    # The README's one-line mixin keeps TRL's bookkeeping too (in general, not by class name); without the restore
    # of the trainer's plain-data attributes the perturbed pass is counted as well: the check can fail.
    class OneLine(SAMMixin, SFTTrainer):
        pass

    def one_line_run():
        trainer = OneLine(
            model=tiny_policy(), args=SFTConfig(**kwargs), train_dataset=data, processing_class=tokenizer,
            sam_config=SAMConfig(accumulation=accumulation),
        )  # fmt: skip
        trainer.train()
        return train_logs(trainer)

    assert [log["num_tokens"] for log in one_line_run()] == [log["num_tokens"] for log in plain_logs]
    monkeypatch.setattr("hf_sam.side_effects.restore_bookkeeping", lambda obj, saved: None)
    assert one_line_run()[-1]["num_tokens"] == 2 * plain_logs[-1]["num_tokens"]


def test_sft_lora_trains_the_adapters_only(tmp_path):
    model = peft.get_peft_model(
        tiny_policy(), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    )
    frozen = {k: v.detach().clone() for k, v in model.named_parameters() if not v.requires_grad}
    adapters = trainable_state(model)
    assert adapters and all("lora_" in k for k in adapters)
    args = SAMSFTConfig(
        **trl_sgd_args(tmp_path, per_device_train_batch_size=4, max_steps=3, learning_rate=0.1), sam_rho=0.1
    )
    trainer = SAMSFTTrainer(model=model, args=args, train_dataset=sft_dataset(), processing_class=tiny_tokenizer())
    trainer.train()
    for k, v in model.named_parameters():
        if not v.requires_grad:
            assert torch.equal(v, frozen[k]), k
    changed = [k for k, v in trainable_state(model).items() if not torch.equal(v, adapters[k])]
    assert any("lora_A" in k for k in changed) and any("lora_B" in k for k in changed)
    logs = train_logs(trainer)
    assert len(logs) == 3 and all(h["sam_skipped"] == 0.0 and h["sam_grad_norm"] > 0 for h in logs)


def test_sam_sft_config_parses_and_validates(tmp_path):
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(SAMSFTConfig).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--use_cpu", "--sam_rho", "0.1", "--sam_adaptive", "--max_length", "64"]
    )
    assert isinstance(args, SFTConfig) and args.max_length == 64
    assert args.to_sam_config() == SAMConfig(rho=0.1, adaptive=True)
    with pytest.raises(ValueError, match=r"`rho` \(`--sam_rho`\) must be a finite number > 0, got -1.0"):
        SAMSFTConfig(**base_args(tmp_path), sam_rho=-1.0)
    with pytest.raises(ValueError, match=r"`sync` \(`--sam_sync`\) must be one of 'global', 'local'"):
        SAMDPOConfig(**base_args(tmp_path), sam_sync="never")


def test_import_hf_sam_does_not_need_trl():
    code = (
        "import sys; sys.modules['trl'] = None\n"  # makes `import trl` fail
        "import hf_sam\n"
        "try:\n    import hf_sam.trl\nexcept ImportError as e:\n    print('ImportError:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert "ImportError: `hf_sam.trl` needs TRL: `pip install trl`" in out.stdout


# ---------------------------------------------------------------------------------------------------------------
# DPO


def dpo_loss(policy, frozen, ref_model, beta):
    def completion_logps(logits, batch):
        ids, mask = batch["input_ids"][:, 1:], batch["completion_mask"][:, 1:]
        token_logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        return (token_logps * mask).sum(1).chunk(2)  # batch is [chosen, rejected]

    def loss(params, batch):
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        chosen, rejected = completion_logps(functional_call(policy, {**frozen, **params}, (), inputs).logits, batch)
        with torch.no_grad():
            ref_chosen, ref_rejected = completion_logps(ref_model(**inputs).logits, batch)
        return -F.logsigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected))).mean()

    return loss


def test_dpo_update_is_sam_against_an_unperturbed_reference(tmp_path):
    policy, ref_model = tiny_policy(0).double(), tiny_policy(1).double()
    reference_policy = copy.deepcopy(policy)
    ref_before = {k: v.clone() for k, v in ref_model.state_dict().items()}
    start = trainable_state(policy)
    args = SAMDPOConfig(**trl_sgd_args(tmp_path, per_device_train_batch_size=4, max_steps=2, beta=0.5), sam_rho=0.1)
    trainer = SAMDPOTrainer(
        model=policy, ref_model=ref_model, args=args, train_dataset=dpo_dataset(), processing_class=tiny_tokenizer()
    )
    ref_logps = []
    hook = ref_model.register_forward_hook(
        lambda module, inputs, out: ref_logps.append(out.log_probs.detach().clone())
    )
    batches = list(trainer.get_train_dataloader())[:2]
    trainer.train()
    hook.remove()
    # Two passes per step, each with one reference forward; both passes of a step see the same reference.
    assert len(ref_logps) == 4
    assert torch.equal(ref_logps[0], ref_logps[1]) and torch.equal(ref_logps[2], ref_logps[3])
    assert all(torch.equal(v, ref_before[k]) for k, v in ref_model.state_dict().items())
    # The update is SAM's on the DPO loss (reference log-probs held fixed), written from the formulas.
    frozen_ref = copy.deepcopy(ref_model)
    want = sam_sgd_reference(start, dpo_loss(reference_policy, {}, frozen_ref, beta=0.5), batches, lr=0.5, rho=0.1)
    assert_updates_close(start, trainable_state(policy), want)
    # It can tell: a "reference" that moves with the perturbed policy gives another update.
    moving = sam_sgd_reference(start, dpo_loss(reference_policy, {}, reference_policy, beta=0.5), batches, 0.5, 0.1)
    with pytest.raises(AssertionError):
        assert_updates_close(start, trainable_state(policy), moving, rtol=1e-3)


def test_dpo_metrics_are_the_clean_pass_ones(tmp_path):
    data, tokenizer = dpo_dataset(), tiny_tokenizer()
    kwargs = trl_sgd_args(tmp_path, per_device_train_batch_size=4, max_steps=2, learning_rate=0.05)
    plain = DPOTrainer(
        model=tiny_policy(0), ref_model=tiny_policy(1), args=DPOConfig(**kwargs), train_dataset=data,
        processing_class=tokenizer,
    )  # fmt: skip
    plain.train()
    sam = SAMDPOTrainer(
        model=tiny_policy(0), ref_model=tiny_policy(1), args=SAMDPOConfig(**kwargs), train_dataset=data,
        processing_class=tokenizer,
    )  # fmt: skip
    sam.train()
    plain_logs, sam_logs = train_logs(plain), train_logs(sam)
    assert [s["num_tokens"] for s in sam_logs] == [p["num_tokens"] for p in plain_logs]
    for key in ("loss", "entropy", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen"):
        assert sam_logs[0][key] == pytest.approx(plain_logs[0][key], rel=1e-5, abs=1e-7), key
    assert all({"sam_perturbed_loss", "sam_sharpness"} <= set(s) for s in sam_logs)


def test_dpo_with_precomputed_reference_log_probs_gives_the_same_update(tmp_path):
    data, tokenizer = dpo_dataset(), tiny_tokenizer()
    kwargs = trl_sgd_args(tmp_path, per_device_train_batch_size=4, max_steps=2, learning_rate=0.05)
    results = []
    for precompute in (False, True):
        policy = tiny_policy(0)
        args = SAMDPOConfig(**kwargs, precompute_ref_log_probs=precompute, sam_rho=0.1)
        trainer = SAMDPOTrainer(
            model=policy, ref_model=tiny_policy(1), args=args, train_dataset=data, processing_class=tokenizer
        )
        trainer.train()
        results.append(trainable_state(policy))
    for k in results[0]:
        torch.testing.assert_close(results[1][k], results[0][k], rtol=1e-5, atol=1e-7)


def test_dpo_lora_reference_is_the_unperturbed_base(tmp_path):
    # With PEFT and no `ref_model`, the reference is the policy with its adapters disabled. LoRA B starts at 0, so at
    # step 1 the policy equals the reference: the clean loss is log 2 exactly. The perturbed pass moves the adapters
    # only; a reference that followed them would leave the perturbed loss at log 2 too (sharpness 0).
    model = peft.get_peft_model(
        tiny_policy(), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    )
    args = SAMDPOConfig(
        **trl_sgd_args(tmp_path, per_device_train_batch_size=4, max_steps=2, learning_rate=0.1), sam_rho=0.5
    )
    trainer = SAMDPOTrainer(model=model, args=args, train_dataset=dpo_dataset(), processing_class=tiny_tokenizer())
    assert trainer.ref_model is None
    # The base and any frozen reference copy of the adapter (TRL may add one) must come out bit for bit.
    frozen = {k: v.detach().clone() for k, v in model.named_parameters() if not v.requires_grad}
    adapters = trainable_state(model)
    assert adapters and all("lora_" in k for k in adapters)
    trainer.train()
    first = train_logs(trainer)[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["sam_sharpness"] > 1e-4
    for k, v in model.named_parameters():
        if not v.requires_grad:
            assert torch.equal(v, frozen[k]), k
    assert any(not torch.equal(v, adapters[k]) for k, v in trainable_state(model).items())
