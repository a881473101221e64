"""`SAMMixin` on `Seq2SeqTrainer`: with rho -> 0 a tiny T5 trains, logs and generates as under the plain trainer.

The T5 is built from a config (no download) and keeps T5's default dropout of 0.1, so the two passes of each SAM step
must also share their dropout masks. Evaluation runs during training and after it with `predict_with_generate=True`:
SAM changes the training step only, so the generated tokens and the evaluation loss are the plain trainer's.
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from testing_utils import assert_updates_close, sgd_args, trainable_state
from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, T5Config, T5ForConditionalGeneration

from hf_sam import SAMConfig, SAMMixin

VOCAB = 48
TINY_RHO = 1e-8


class SAMSeq2SeqTrainer(SAMMixin, Seq2SeqTrainer):
    pass


def tiny_t5() -> T5ForConditionalGeneration:
    config = T5Config(
        vocab_size=VOCAB,
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        dropout_rate=0.1,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    torch.manual_seed(0)
    return T5ForConditionalGeneration(config).float()


def copy_task(n: int, seed: int) -> Dataset:
    """Source: 6 random tokens then EOS; target: the first 3 of them then EOS."""
    g = torch.Generator().manual_seed(seed)
    source = torch.randint(2, VOCAB, (n, 6), generator=g)
    eos = torch.ones(n, 1, dtype=torch.long)
    return Dataset.from_dict(
        {
            "input_ids": torch.cat([source, eos], 1).tolist(),
            "attention_mask": torch.ones(n, 7, dtype=torch.long).tolist(),
            "labels": torch.cat([source[:, :3], eos], 1).tolist(),
        }
    )


def run(tmp_path, sam_config: SAMConfig | None):
    """Train 4 steps of 2 micro-batches of 2 (SGD), evaluating with generation every 2 steps; then predict."""
    kwargs = sgd_args(
        tmp_path,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=4,
        learning_rate=0.1,
        eval_strategy="steps",
        eval_steps=2,
        per_device_eval_batch_size=4,
        predict_with_generate=True,
        generation_max_length=6,
        generation_num_beams=1,
    )
    model = tiny_t5()
    start = trainable_state(model)
    common = dict(
        model=model,
        args=Seq2SeqTrainingArguments(**kwargs),
        train_dataset=copy_task(16, seed=1),
        eval_dataset=copy_task(8, seed=2),
    )
    trainer = Seq2SeqTrainer(**common) if sam_config is None else SAMSeq2SeqTrainer(**common, sam_config=sam_config)
    trainer.train()
    prediction = trainer.predict(copy_task(8, seed=3))
    return trainer, start, prediction


def losses(trainer, key: str) -> list[float]:
    return [h[key] for h in trainer.state.log_history if key in h]


def test_tiny_rho_reproduces_the_plain_seq2seq_trainer(tmp_path):
    plain, start, plain_prediction = run(tmp_path / "plain", None)
    sam, sam_start, sam_prediction = run(tmp_path / "sam", SAMConfig(rho=TINY_RHO))
    assert all(torch.equal(sam_start[k], start[k]) for k in start)
    # Training: the same updates (relative to their size) and the same logged loss at every step.
    assert_updates_close(start, trainable_state(sam.model), trainable_state(plain.model), rtol=1e-5)
    plain_loss, sam_loss = losses(plain, "loss"), losses(sam, "loss")
    assert len(plain_loss) == len(sam_loss) == 4
    assert sam_loss[0] == plain_loss[0]  # the first clean pass is the plain one, bit for bit
    assert sam_loss == pytest.approx(plain_loss, rel=1e-6)
    sharpness = losses(sam, "sam_sharpness")
    assert len(sharpness) == 4 and all(abs(s) < 1e-5 for s in sharpness)  # SAM did run, at a tiny radius
    assert not losses(plain, "sam_sharpness")
    # Evaluation with generation, during training (steps 2 and 4) and after it: the plain trainer's.
    plain_eval, sam_eval = losses(plain, "eval_loss"), losses(sam, "eval_loss")
    assert len(plain_eval) == len(sam_eval) == 2
    assert sam_eval == pytest.approx(plain_eval, rel=1e-6)
    eval_keys = [{k for h in t.state.log_history if "eval_loss" in h for k in h} for t in (plain, sam)]
    assert eval_keys[0] == eval_keys[1]  # no SAM metric in the evaluation logs
    assert plain_prediction.predictions.shape == sam_prediction.predictions.shape
    assert plain_prediction.predictions.shape[1] > 2  # it generated tokens, not just the start token
    assert (plain_prediction.predictions == sam_prediction.predictions).all()
    assert sam_prediction.metrics["test_loss"] == pytest.approx(plain_prediction.metrics["test_loss"], rel=1e-6)


def test_a_real_radius_trains_differently(tmp_path):
    """The control: the comparison above tells SAM from the plain trainer once rho is not tiny."""
    plain, start, _ = run(tmp_path / "plain", None)
    sam, _, _ = run(tmp_path / "sam", SAMConfig(rho=0.5))
    assert all(s > 1e-3 for s in losses(sam, "sam_sharpness"))
    with pytest.raises(AssertionError):
        assert_updates_close(start, trainable_state(sam.model), trainable_state(plain.model), rtol=1e-2)
    assert losses(sam, "loss")[0] == losses(plain, "loss")[0]  # the same first clean pass ...
    assert losses(sam, "loss")[1:] != pytest.approx(losses(plain, "loss")[1:], rel=1e-3)  # ... then other weights


def test_the_comparison_sees_the_dropout_masks(tmp_path, monkeypatch):
    """Control for the dropout: when SAM's perturbed pass does not rewind torch's generator (so it draws other masks),
    a tiny radius no longer reproduces the plain trainer."""
    plain, start, _ = run(tmp_path / "plain", None)
    monkeypatch.setattr(torch, "set_rng_state", lambda state: None)
    sam, _, _ = run(tmp_path / "sam", SAMConfig(rho=TINY_RHO))
    with pytest.raises(AssertionError):
        assert_updates_close(start, trainable_state(sam.model), trainable_state(plain.model), rtol=1e-2)
