"""Functional-SAM (`sam_method="functional"`) against the formula of Singh et al. 2025, written here with torch.func.

Reference (float64): e = rho g/||g|| from the clean gradient g (Adam-preconditioned with `sam_preconditioner="adam"`),
and the update direction J_F(w + e)^T dL/dF(w): the vector-Jacobian product of the logits at w + e with the cotangent
dL/dlogits taken at w. No hf_sam code is used.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from references import BETAS, EPS, LR, reference_sam_sgd, windows_of
from testing_utils import (
    TRL_METRICS,
    VOCAB,
    adam_args,
    assert_updates_close,
    base_args,
    lm_dataset,
    resume_run,
    sft_dataset,
    sgd_args,
    tiny_llama,
    tiny_llama_config,
    tiny_policy,
    tiny_tokenizer,
    train_logs,
    trainable_state,
    trl_sgd_args,
)
from torch.func import functional_call, grad, vjp
from transformers import LlamaForSequenceClassification, Trainer, TrainingArguments

from hf_sam import SAMConfig, SAMTrainer, SAMTrainingArguments

# ---------------------------------------------------------------------------------------------------------------
# Reference


def causal_lm_loss(logits, batch, n_items):
    """Summed next-token cross-entropy / tokens of the window (as the model's loss, which upcasts to float32)."""
    labels = batch["labels"][:, 1:]
    z = logits[:, :-1].float()
    return F.cross_entropy(z.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum") / n_items


def causal_lm_items(batch):
    return (batch["labels"][:, 1:] != -100).sum()


def classification_loss(logits, batch, n_items):
    return F.cross_entropy(logits, batch["labels"], reduction="sum") / n_items


def classification_items(batch):
    return batch["labels"].numel()


def sgd_step(lr):
    def step(params, direction, t):
        return {k: params[k] - lr * direction[k] for k in params}

    return step


class AdamW:
    """AdamW without weight decay, and its preconditioner g / (sqrt(v_hat) + eps) from the state before a step."""

    def __init__(self, params):
        self.m = {k: torch.zeros_like(v) for k, v in params.items()}
        self.v = {k: torch.zeros_like(v) for k, v in params.items()}

    def precondition(self, g, t):
        if t == 1:  # no second moment yet: plain SAM's direction
            return g
        bc2 = 1 - BETAS[1] ** (t - 1)
        return {k: g[k] / ((self.v[k] / bc2).sqrt() + EPS) for k in g}

    def step(self, params, direction, t):
        out = {}
        for k in params:
            self.m[k] = BETAS[0] * self.m[k] + (1 - BETAS[0]) * direction[k]
            self.v[k] = BETAS[1] * self.v[k] + (1 - BETAS[1]) * direction[k] ** 2
            m_hat, v_hat = self.m[k] / (1 - BETAS[0] ** t), self.v[k] / (1 - BETAS[1] ** t)
            out[k] = params[k] - LR * m_hat / (v_hat.sqrt() + EPS)
        return out


def reference_functional_sam(
    model, windows, rho, loss_of_logits, items, step, accumulation="exact", precondition=None
):  # fmt: skip
    """Functional-SAM over `windows` (lists of micro-batches, dicts with `labels`); returns the trainable params."""
    params = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    frozen = {k: v.detach() for k, v in model.named_parameters() if not v.requires_grad}

    def logits(p, batch):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return functional_call(model, {**frozen, **p}, (), inputs).logits

    def loss(p, group, n):
        return sum(loss_of_logits(logits(p, b), b, n) for b in group)

    for t, window in enumerate(windows, start=1):
        n_items = sum(items(b) for b in window)
        groups = [window] if accumulation == "exact" else [[b] for b in window]
        direction = {k: torch.zeros_like(v) for k, v in params.items()}
        for group in groups:  # "micro": a perturbation per micro-batch
            g = grad(loss)(params, group, n_items)
            d = precondition(g, t) if precondition is not None else g
            norm = torch.sqrt(sum((d[k] ** 2).sum() for k in d))
            perturbed = {k: params[k] + rho * d[k] / norm for k in params}
            for b in group:
                clean_logits = logits(params, b)
                dl_dF = grad(lambda z, b=b, n=n_items: loss_of_logits(z, b, n))(clean_logits)  # at w
                _, pullback = vjp(lambda p, b=b: logits(p, b), perturbed)  # J_F at w + e
                (jtg,) = pullback(dl_dF)
                direction = {k: direction[k] + jtg[k] for k in params}
        params = step(params, direction, t)
    return params


def lm_windows(data, batch_size, accumulation_steps, steps):
    return [
        [{"input_ids": ids, "labels": ids} for ids in w]
        for w in windows_of(data, batch_size, accumulation_steps, steps)
    ]


# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("accumulation", ["exact", "micro"])
def test_update_matches_the_formula(tmp_path, accumulation):
    model = tiny_llama().double()
    reference = copy.deepcopy(model)
    start, data = trainable_state(model), lm_dataset(8)
    args = SAMTrainingArguments(
        **sgd_args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3),
        sam_rho=0.1, sam_method="functional", sam_accumulation=accumulation,
    )  # fmt: skip
    trainer = SAMTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    windows = lm_windows(data, 2, 2, 3)
    want = reference_functional_sam(
        reference, windows, 0.1, causal_lm_loss, causal_lm_items, sgd_step(0.5), accumulation=accumulation
    )
    assert_updates_close(start, trainable_state(model), want)
    # Control: plain SAM (with the logit path) is another update on this problem.
    plain_sam = reference_sam_sgd(
        reference, windows_of(data, 2, 2, 3), lr=0.5, rho=0.1, accumulation=accumulation
    )  # fmt: skip
    with pytest.raises(AssertionError):
        assert_updates_close(start, trainable_state(model), plain_sam, rtol=1e-3)
    # The perturbed loss is still logged, and no dL/dF is left behind (the variant keeps nothing across steps).
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3 and all(h["sam_perturbed_loss"] > 0 for h in logs)
    assert not trainer._sam.variant.pending and trainer._sam.variant.state_dict({}) == {}
    # exact: the two micro-batches' dL/dF are held together (2 x 2 x 12 x 48 float64 values); micro: one at a time.
    per_micro_batch = 2 * 12 * VOCAB * 8
    assert trainer._sam.variant.peak_bytes == per_micro_batch * (2 if accumulation == "exact" else 1)


def test_bfloat16_storage_is_close_but_not_exact(tmp_path):
    data = lm_dataset(8)
    runs = {}
    for dtype in ("logits", "bfloat16"):
        model = tiny_llama().double()
        start = trainable_state(model)
        args = SAMTrainingArguments(
            **sgd_args(tmp_path, per_device_train_batch_size=4, max_steps=2),
            sam_rho=0.1, sam_method="functional", sam_functional_grad_dtype=dtype,
        )  # fmt: skip
        trainer = SAMTrainer(model=model, args=args, train_dataset=data)
        trainer.train()
        runs[dtype] = trainable_state(model)
    assert trainer._sam.variant.peak_bytes == 4 * 12 * VOCAB * 2
    assert_updates_close(start, runs["bfloat16"], runs["logits"], rtol=1e-2)
    with pytest.raises(AssertionError):
        assert_updates_close(start, runs["bfloat16"], runs["logits"], rtol=1e-5)


def test_bf16_autocast(tmp_path):
    """Accelerate's bf16 autocast returns a float32 copy of the bf16 logits; dL/dF is taken at the logits themselves
    (without stepping back over the copy no gradient would reach the hook and the perturbed pass would raise)."""
    data, runs = lm_dataset(8), {}
    for precision in ({}, {"bf16": True}):
        model = tiny_llama()
        start = trainable_state(model)
        args = SAMTrainingArguments(
            **sgd_args(tmp_path, per_device_train_batch_size=4, max_steps=2, **precision),
            sam_rho=0.1, sam_method="functional",
        )  # fmt: skip
        trainer = SAMTrainer(model=model, args=args, train_dataset=data)
        trainer.train()
        runs[bool(precision)] = trainable_state(model)
    assert "forward" in model.__dict__  # Accelerate's autocast wrapper
    assert trainer._sam.variant.peak_bytes == 4 * 12 * VOCAB * 2  # bf16 values
    assert_updates_close(start, runs[True], runs[False], rtol=5e-2)  # bf16 rounding of the float32 run


def test_with_adam_preconditioner(tmp_path):
    model = tiny_llama().double()
    reference = copy.deepcopy(model)
    start, data = trainable_state(model), lm_dataset(8)
    args = SAMTrainingArguments(
        **adam_args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3),
        sam_rho=0.05, sam_method="functional", sam_preconditioner="adam",
    )  # fmt: skip
    SAMTrainer(model=model, args=args, train_dataset=data).train()
    windows = lm_windows(data, 2, 2, 3)
    adam = AdamW(start)
    want = reference_functional_sam(
        reference, windows, 0.05, causal_lm_loss, causal_lm_items, adam.step, precondition=adam.precondition
    )
    assert_updates_close(start, trainable_state(model), want)
    # Control: the unpreconditioned perturbation gives another update.
    adam = AdamW(start)
    plain = reference_functional_sam(reference, windows, 0.05, causal_lm_loss, causal_lm_items, adam.step)
    with pytest.raises(AssertionError):
        assert_updates_close(start, trainable_state(model), plain, rtol=1e-3)


def test_sequence_classification(tmp_path):
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(tiny_llama_config(num_labels=3, pad_token_id=0)).double()
    reference = copy.deepcopy(model)
    start = trainable_state(model)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB, (8, 10), generator=g)  # no padding token: the last token is pooled
    labels = torch.randint(0, 3, (8,), generator=g)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})
    args = SAMTrainingArguments(
        **sgd_args(tmp_path, per_device_train_batch_size=4, max_steps=2), sam_rho=0.2, sam_method="functional"
    )
    SAMTrainer(model=model, args=args, train_dataset=data).train()
    # One micro-batch per step: the classification loss is a per-micro-batch mean (no `num_items_in_batch`).
    windows = [[{"input_ids": ids[i : i + 4], "labels": labels[i : i + 4]}] for i in (0, 4)]
    want = reference_functional_sam(reference, windows, 0.2, classification_loss, classification_items, sgd_step(0.5))
    assert_updates_close(start, trainable_state(model), want)


def test_lora_adapters_only(tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(
        r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    model = peft.get_peft_model(tiny_llama(), config).double()
    reference = copy.deepcopy(model)
    frozen = {k: v.detach().clone() for k, v in model.named_parameters() if not v.requires_grad}
    start, data = trainable_state(model), lm_dataset(8)
    assert start and all("lora_" in k for k in start)
    args = SAMTrainingArguments(
        **sgd_args(tmp_path, per_device_train_batch_size=4, max_steps=2), sam_rho=0.1, sam_method="functional"
    )
    SAMTrainer(model=model, args=args, train_dataset=data).train()
    want = reference_functional_sam(
        reference, lm_windows(data, 4, 1, 2), 0.1, causal_lm_loss, causal_lm_items, sgd_step(0.5)
    )
    assert_updates_close(start, trainable_state(model), want)
    for k, v in model.named_parameters():
        if not v.requires_grad:
            assert torch.equal(v, frozen[k]), k


def test_rho_to_zero_is_the_plain_trainer(tmp_path):
    data = lm_dataset(8)
    kwargs = sgd_args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3)
    plain = tiny_llama().double()
    start = trainable_state(plain)
    Trainer(model=plain, args=TrainingArguments(**kwargs), train_dataset=data).train()
    sam = tiny_llama().double()
    args = SAMTrainingArguments(**kwargs, sam_rho=1e-12, sam_method="functional")
    SAMTrainer(model=sam, args=args, train_dataset=data).train()
    assert_updates_close(start, trainable_state(sam), trainable_state(plain))


def test_plain_steps_and_evaluation_keep_nothing(tmp_path):
    """Steps without SAM (`sam_interval=2`) and evaluation run the parent's loss untouched."""
    data = lm_dataset(8)
    args = SAMTrainingArguments(
        **sgd_args(tmp_path, per_device_train_batch_size=4, max_steps=3, eval_strategy="steps", eval_steps=1),
        sam_method="functional", sam_interval=2,
    )  # fmt: skip
    trainer = SAMTrainer(model=tiny_llama(), args=args, train_dataset=data, eval_dataset=data)
    trainer.train()
    assert not trainer._sam.variant.pending
    assert [h["sam_skipped"] for h in trainer.state.log_history if "sam_skipped" in h] == [0.0, 0.0]


def test_refusals(tmp_path):
    with pytest.raises(ValueError, match=r"`method='functional'` .* takes no `ascent_fraction` < 1"):
        SAMConfig(method="functional", ascent_fraction=0.5)
    with pytest.raises(ValueError, match=r"`functional_grad_dtype` .* must be one of 'logits', 'bfloat16'"):
        SAMConfig(functional_grad_dtype="float16")

    class LossOnly(torch.nn.Module):  # a loss that is no function of returned logits (as a fused loss)
        def __init__(self):
            super().__init__()
            self.inner = tiny_llama()

        def forward(self, input_ids, labels=None, **kwargs):
            return {"loss": self.inner(input_ids=input_ids, labels=labels).loss}

    args = SAMTrainingArguments(**base_args(tmp_path, max_steps=1), sam_method="functional")
    trainer = SAMTrainer(model=LossOnly(), args=args, train_dataset=lm_dataset(4))
    with pytest.raises(
        ValueError,
        match=r"needs the model's logits, and the forward of LossOnly returned no `logits` .* \(keys loss\)",
    ):
        trainer.train()


def test_resume_is_bit_identical(tmp_path):
    """Functional-SAM keeps no state across steps (dL/dF lives within one step): a resumed run needs none."""
    sam = {"sam_method": "functional"}
    full = resume_run(tmp_path / "full", 4, None, sam)
    resumed = resume_run(tmp_path / "resumed", 4, str(tmp_path / "full" / "checkpoint-2"), sam)
    for name, value in full.items():
        assert torch.equal(resumed[name], value), name


def test_trl_sft(tmp_path):
    """TRL's SFTTrainer scores with a fused LM head that never builds the logits; SAM passes use the plain head."""
    pytest.importorskip("trl")
    from trl import SFTConfig, SFTTrainer

    from hf_sam.trl import SAMSFTConfig, SAMSFTTrainer

    model = tiny_policy().double()
    reference = copy.deepcopy(model)
    start, data, tokenizer = trainable_state(model), sft_dataset(), tiny_tokenizer()
    kwargs = trl_sgd_args(tmp_path, per_device_train_batch_size=4, max_steps=2)
    trainer = SAMSFTTrainer(
        model=model, args=SAMSFTConfig(**kwargs, sam_rho=0.1, sam_method="functional"), train_dataset=data,
        processing_class=tokenizer,
    )  # fmt: skip
    batches = list(trainer.get_train_dataloader())[:2]
    assert all((b["labels"][:, 0] == -100).all() for b in batches)  # completion-only loss
    trainer.train()
    windows = [[{k: b[k] for k in ("input_ids", "attention_mask", "labels")}] for b in batches]
    want = reference_functional_sam(reference, windows, 0.1, causal_lm_loss, causal_lm_items, sgd_step(0.5))
    assert_updates_close(start, trainable_state(model), want)
    plain_sam = reference_functional_sam(reference, windows, 1e-12, causal_lm_loss, causal_lm_items, sgd_step(0.5))
    with pytest.raises(AssertionError):
        assert_updates_close(start, trainable_state(model), plain_sam, rtol=1e-3)
    # TRL's metrics from the plain head match its fused head's at the same weights (step 1), counted once.
    plain = SFTTrainer(model=tiny_policy().double(), args=SFTConfig(**kwargs), train_dataset=data,
                       processing_class=tokenizer)  # fmt: skip
    plain.train()
    sam_logs, plain_logs = train_logs(trainer), train_logs(plain)
    for key in TRL_METRICS + ("loss",):
        assert sam_logs[0][key] == pytest.approx(plain_logs[0][key], rel=1e-6), key
    assert [h["num_tokens"] for h in sam_logs] == [h["num_tokens"] for h in plain_logs]
    # The fused head is back after each pass.
    assert "fused_lm_head" in model.__dict__["forward"].__func__.__code__.co_varnames
