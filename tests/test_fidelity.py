"""SAM changes the gradient and nothing else: buffers, random streams, search trials, models, callbacks, cards.

Each behaviour is checked with `sam_rho` -> 0 against the plain Trainer, and each check has a control that shows it
can fail (the mechanism switched off, or the old behaviour reproduced).
"""

from __future__ import annotations

import gc
import random
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from testing_utils import BatchNormRegressor, base_args, lm_dataset, regression_data, sgd_args, tiny_llama
from torch import nn
from transformers import Trainer, TrainingArguments

from hf_sam import SAMConfig, SAMMixin, SAMTrainer, SAMTrainingArguments, enable_sam

TINY_RHO = 1e-12


# ---- models with state besides their weights (BatchNormRegressor: testing_utils, shared with ddp_batchnorm.py) ------
class NumpyMasked(nn.Module):
    """Masks its input with NumPy (as SpecAugment does) and drops a layer with Python's `random` (LayerDrop)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.inp, self.hidden, self.out = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 1)
        self.draws: list[tuple[float, float]] = []

    def forward(self, x, labels):
        mask = torch.from_numpy(np.random.rand(*x.shape) > 0.3).to(x.dtype)
        skip = random.random() < 0.5
        self.draws.append((float(mask.sum()), skip))
        h = torch.relu(self.inp(x * mask))
        if not skip:
            h = torch.relu(self.hidden(h))
        return {"loss": F.mse_loss(self.out(h).squeeze(-1), labels)}


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_states_close(got: dict, want: dict, rtol: float = 1e-5) -> None:
    assert got.keys() == want.keys()
    for k in want:
        if want[k].is_floating_point():
            torch.testing.assert_close(got[k], want[k], rtol=rtol, atol=1e-7, msg=k)
        else:
            assert torch.equal(got[k], want[k]), k


def train_pair(tmp_path, make_model, sam_overrides: dict, **overrides):
    """The plain Trainer and SAMTrainer on the same model, data and seed; returns both trained models."""
    kwargs = sgd_args(tmp_path, per_device_train_batch_size=4, max_steps=4, learning_rate=0.1, **overrides)
    plain_model, sam_model = make_model(), make_model()
    Trainer(model=plain_model, args=TrainingArguments(**kwargs), train_dataset=regression_data()).train()
    args = SAMTrainingArguments(**kwargs, **sam_overrides)
    SAMTrainer(model=sam_model, args=args, train_dataset=regression_data()).train()
    return plain_model, sam_model


# ---- 1. buffers -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("accumulation", ["exact", "micro"])
@pytest.mark.parametrize("steps", [1, 2])
def test_buffers_are_left_as_the_clean_pass_leaves_them(tmp_path, accumulation, steps):
    overrides = dict(gradient_accumulation_steps=steps)
    plain, sam = train_pair(
        tmp_path, BatchNormRegressor, dict(sam_rho=TINY_RHO, sam_accumulation=accumulation), **overrides
    )
    assert int(plain.bn.num_batches_tracked) == 4 * steps
    assert_states_close(state_of(sam), state_of(plain))  # weights and every buffer
    # A real radius: the buffers are still updated once per micro-batch, by the clean pass.
    _, sam = train_pair(tmp_path, BatchNormRegressor, dict(sam_rho=0.5, sam_accumulation=accumulation), **overrides)
    assert int(sam.bn.num_batches_tracked) == int(sam.stat.count) == 4 * steps


def test_buffer_check_fails_without_the_restore(tmp_path, monkeypatch):
    monkeypatch.setattr("hf_sam.side_effects.restore_buffers", lambda saved: None)
    plain, sam = train_pair(tmp_path, BatchNormRegressor, dict(sam_rho=TINY_RHO))
    assert int(sam.bn.num_batches_tracked) == 2 * int(plain.bn.num_batches_tracked)
    with pytest.raises(AssertionError):
        assert_states_close(state_of(sam), state_of(plain))


def test_resnet_with_batchnorm_trains_as_the_plain_trainer(tmp_path):
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(
        num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3
    )

    def make():
        torch.manual_seed(0)
        return ResNetForImageClassification(config)

    g = torch.Generator().manual_seed(0)
    data = Dataset.from_dict(
        {"pixel_values": torch.randn(16, 1, 16, 16, generator=g).tolist(), "labels": (torch.arange(16) % 3).tolist()}
    )
    kwargs = sgd_args(tmp_path, per_device_train_batch_size=4, max_steps=3, learning_rate=0.1)
    plain, sam = make(), make()
    Trainer(model=plain, args=TrainingArguments(**kwargs), train_dataset=data).train()
    SAMTrainer(model=sam, args=SAMTrainingArguments(**kwargs, sam_rho=TINY_RHO), train_dataset=data).train()
    assert_states_close(state_of(sam), state_of(plain))


# ---- 2. random streams outside torch --------------------------------------------------------------------------------
@pytest.mark.parametrize("accumulation", ["exact", "micro"])
def test_numpy_and_python_random_draws_are_shared_by_both_passes(tmp_path, accumulation):
    overrides = dict(gradient_accumulation_steps=2)
    streams = {}

    def make():
        return NumpyMasked()

    kwargs = sgd_args(tmp_path, per_device_train_batch_size=4, max_steps=3, learning_rate=0.1, **overrides)
    plain, sam = make(), make()
    Trainer(model=plain, args=TrainingArguments(**kwargs), train_dataset=regression_data()).train()
    streams["plain"] = (np.random.get_state()[1].copy(), random.getstate())
    args = SAMTrainingArguments(**kwargs, sam_rho=0.5, sam_accumulation=accumulation)
    SAMTrainer(model=sam, args=args, train_dataset=regression_data()).train()
    streams["sam"] = (np.random.get_state()[1].copy(), random.getstate())
    # Every clean draw is drawn again, identically, by its perturbed pass; no other draw happens.
    assert sorted(sam.draws) == sorted(plain.draws + plain.draws)
    per_step = 2 * 2  # two micro-batches, two passes each
    for step in range(3):
        window = sam.draws[step * per_step : (step + 1) * per_step]
        clean = plain.draws[step * 2 : (step + 1) * 2]
        assert window == (clean + clean if accumulation == "exact" else [clean[0], clean[0], clean[1], clean[1]])
    # Afterwards every global stream stands where the plain run left it.
    assert np.array_equal(streams["sam"][0], streams["plain"][0]) and streams["sam"][1] == streams["plain"][1]


def test_numpy_masked_model_trains_as_the_plain_trainer(tmp_path, monkeypatch):
    plain, sam = train_pair(tmp_path, NumpyMasked, dict(sam_rho=TINY_RHO), gradient_accumulation_steps=2)
    assert_states_close(state_of(sam), state_of(plain))
    # Control: without the NumPy and Python states in the fork, the passes see different masks.
    from hf_sam import rng

    monkeypatch.setattr(rng.np.random, "set_state", lambda state: None)
    monkeypatch.setattr(rng.random, "setstate", lambda state: None)
    plain, sam = train_pair(tmp_path, NumpyMasked, dict(sam_rho=TINY_RHO), gradient_accumulation_steps=2)
    assert sorted(sam.draws) != sorted(plain.draws + plain.draws)


def test_wav2vec2_spec_augment_trains_as_the_plain_trainer(tmp_path):
    from transformers import Wav2Vec2Config, Wav2Vec2ForSequenceClassification

    config = Wav2Vec2Config(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, conv_dim=(8, 8),
        conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2,
        mask_time_prob=0.5, mask_time_length=2, num_labels=2, classifier_proj_size=8, layerdrop=0.0,
        hidden_dropout=0.1, feat_proj_dropout=0.0,
    )  # fmt: skip
    assert config.apply_spec_augment

    def make():
        torch.manual_seed(0)
        return Wav2Vec2ForSequenceClassification(config)

    g = torch.Generator().manual_seed(0)
    data = Dataset.from_dict({"input_values": torch.randn(8, 400, generator=g).tolist(), "labels": [0, 1] * 4})
    kwargs = sgd_args(tmp_path, per_device_train_batch_size=4, max_steps=2, learning_rate=0.1)
    plain, sam = make(), make()
    Trainer(model=plain, args=TrainingArguments(**kwargs), train_dataset=data).train()
    SAMTrainer(model=sam, args=SAMTrainingArguments(**kwargs, sam_rho=TINY_RHO), train_dataset=data).train()
    assert_states_close(state_of(sam), state_of(plain))


# ---- 3. hyperparameter search ---------------------------------------------------------------------------------------
def _search_trainer(tmp_path, sam_rho=0.05):
    args = SAMTrainingArguments(
        **sgd_args(tmp_path, per_device_train_batch_size=4, max_steps=2, learning_rate=0.5), sam_rho=sam_rho
    )
    return SAMTrainer(
        model_init=lambda: tiny_llama(), args=args, train_dataset=lm_dataset(8), eval_dataset=lm_dataset(4, seed=5)
    )


def test_hyperparameter_search_trains_each_trial_with_its_rho(tmp_path):
    optuna = pytest.importorskip("optuna")
    rhos = [0.01, 0.5]
    eval_loss = {}
    for rho in rhos:  # each radius on its own, as the search should run it
        trainer = _search_trainer(tmp_path / str(rho), sam_rho=rho)
        trainer.train()
        eval_loss[rho] = trainer.evaluate()["eval_loss"]
    assert abs(eval_loss[0.01] - eval_loss[0.5]) > 1e-4  # the radius matters: the search can tell them apart
    searched = _search_trainer(tmp_path / "search")
    best = searched.hyperparameter_search(
        hp_space=lambda trial: {"sam_rho": trial.suggest_categorical("sam_rho", rhos)},
        backend="optuna",
        n_trials=2,
        direction="minimize",
        sampler=optuna.samplers.GridSampler({"sam_rho": rhos}),
    )
    want = min(rhos, key=eval_loss.get)
    assert best.hyperparameters["sam_rho"] == want
    assert best.objective == pytest.approx(eval_loss[want], rel=1e-6)


def test_search_trial_with_a_bad_rho_fails_before_any_update(tmp_path):
    pytest.importorskip("optuna")
    trainer = _search_trainer(tmp_path)
    with pytest.raises(ValueError, match=r"`rho` \(`--sam_rho`\) must be a finite number > 0, got -1.0"):
        trainer.hyperparameter_search(
            hp_space=lambda trial: {"sam_rho": -1.0}, backend="optuna", n_trials=1, direction="minimize"
        )
    fresh = tiny_llama()
    assert trainer.state.global_step == 0
    assert all(torch.equal(p, q) for p, q in zip(trainer.model.parameters(), fresh.parameters()))


def test_explicit_sam_config_wins_over_args(tmp_path):
    args = SAMTrainingArguments(**sgd_args(tmp_path, max_steps=1), sam_rho=0.05)
    trainer = SAMTrainer(model=tiny_llama(), args=args, train_dataset=lm_dataset(4), sam_config=SAMConfig(rho=0.3))
    args.sam_rho = 0.9
    trainer.train()
    assert trainer.sam_config.rho == 0.3


# ---- 4. model_init --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("trainer_cls", [Trainer, SAMTrainer])
def test_replaced_models_are_freed(tmp_path, trainer_cls):
    refs = []

    def model_init():
        model = tiny_llama()
        refs.append(weakref.ref(model))
        return model

    args_cls = SAMTrainingArguments if trainer_cls is SAMTrainer else TrainingArguments
    args = args_cls(**sgd_args(tmp_path, per_device_train_batch_size=4, max_steps=2))
    trainer = trainer_cls(model_init=model_init, args=args, train_dataset=lm_dataset(8))
    for _ in range(3):
        trainer.train()
    gc.collect()
    assert [r() is not None for r in refs] == [False] * (len(refs) - 1) + [True]
    if trainer_cls is SAMTrainer:  # the weight backups are the live model's only
        assert len(trainer._sam.backup._buffers) == len([p for p in trainer.model.parameters() if p.requires_grad])


# ---- 8. the Trainer's observable surface ----------------------------------------------------------------------------
def test_callback_list_is_the_plain_trainers(tmp_path):
    kwargs = base_args(tmp_path)
    plain = Trainer(model=tiny_llama(), args=TrainingArguments(**kwargs))
    sam = SAMTrainer(model=tiny_llama(), args=SAMTrainingArguments(**kwargs))
    assert [type(c) for c in sam.callback_handler.callbacks] == [type(c) for c in plain.callback_handler.callbacks]


def test_auto_find_batch_size_retry_starts_sam_afresh(tmp_path):
    # Per-run state is reset without a callback: a second `train()` on the same trainer starts a clean window.
    args = SAMTrainingArguments(**sgd_args(tmp_path, per_device_train_batch_size=4, max_steps=2, logging_steps=1))
    trainer = SAMTrainer(model=tiny_llama(), args=args, train_dataset=lm_dataset(8))
    trainer.train()
    first = [h["sam_sharpness"] for h in trainer.state.log_history if "sam_sharpness" in h]
    trainer2 = SAMTrainer(model=tiny_llama(), args=args, train_dataset=lm_dataset(8))
    trainer2._sam.metrics.step_clean = torch.tensor(5.0)  # left over from an interrupted run
    trainer2.train()
    assert [h["sam_sharpness"] for h in trainer2.state.log_history if "sam_sharpness" in h] == first


# ---- 7. model cards -------------------------------------------------------------------------------------------------
def test_model_card_names_sam_its_settings_and_paper(tmp_path):
    args = SAMTrainingArguments(**base_args(tmp_path), sam_rho=1.0, sam_adaptive=True, sam_accumulation="micro")
    trainer = SAMTrainer(model=tiny_llama(), args=args)
    trainer.create_model_card(model_name="tiny")
    card = (tmp_path / "README.md").read_text()
    hyperparameters = card.split("### Training hyperparameters")[1].split("###")[0]
    for line in ("- sam_method: ASAM", "- sam_rho: 1.0", "- sam_adaptive: True", "- sam_accumulation: micro"):
        assert line in hyperparameters
    assert "sam_eta" not in card  # defaults are not listed
    assert "## Sharpness-Aware Minimization" in card and "foret2021sharpnessaware" in card and "kwon2021asam" in card
    assert "- hf_sam" in card.split("---")[1]  # a tag in the card's metadata
    # A plain Trainer's card says none of it: the check can fail.
    Trainer(model=tiny_llama(), args=TrainingArguments(**base_args(tmp_path / "plain"))).create_model_card()
    assert "Sharpness" not in (tmp_path / "plain" / "README.md").read_text()


# ---- 6. trainers that generate inside training_step -----------------------------------------------------------------
@pytest.mark.parametrize("name", ["GRPOTrainer", "RLOOTrainer"])
def test_generating_trainers_are_refused_at_construction(name):
    trl = pytest.importorskip("trl")
    base = getattr(trl, name)
    mixed = type(f"SAM{name}", (SAMMixin, base), {})
    with pytest.raises(ValueError, match=rf"SAM does not support `SAM{name}`: it generates completions .*Supported:"):
        mixed(model=None, args=None)
    with pytest.raises(ValueError, match=rf"SAM does not support `{name}`"):
        enable_sam(object.__new__(base))


# ---- enable_sam -----------------------------------------------------------------------------------------------------
def test_enable_sam_equals_the_class_level_mixin(tmp_path):
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    for trainer_cls, args_cls in ((Trainer, TrainingArguments), (Seq2SeqTrainer, Seq2SeqTrainingArguments)):
        kwargs = sgd_args(tmp_path, per_device_train_batch_size=4, max_steps=2, gradient_accumulation_steps=2)
        config = SAMConfig(rho=0.1)
        enabled = enable_sam(
            trainer_cls(model=tiny_llama(), args=args_cls(**kwargs), train_dataset=lm_dataset(8)), config
        )
        assert isinstance(enabled, trainer_cls) and isinstance(enabled, SAMMixin)
        mixed_cls = type("Mixed", (SAMMixin, trainer_cls), {})
        mixed = mixed_cls(model=tiny_llama(), args=args_cls(**kwargs), train_dataset=lm_dataset(8), sam_config=config)
        plain = trainer_cls(model=tiny_llama(), args=args_cls(**kwargs), train_dataset=lm_dataset(8))
        for t in (enabled, mixed, plain):
            t.train()
        for p, q, _r in zip(enabled.model.parameters(), mixed.model.parameters(), plain.model.parameters()):
            assert torch.equal(p, q)
        assert any(not torch.allclose(p, r) for p, r in zip(enabled.model.parameters(), plain.model.parameters()))
        assert "sam_sharpness" in enabled.state.log_history[0]


def test_enable_sam_validates_before_changing_the_trainer(tmp_path):
    trainer = Trainer(model=tiny_llama(), args=TrainingArguments(**base_args(tmp_path, optim="lomo")))
    with pytest.raises(ValueError, match="updates the weights inside `backward`"):
        enable_sam(trainer)
    assert type(trainer) is Trainer
    sam = enable_sam(Trainer(model=tiny_llama(), args=TrainingArguments(**base_args(tmp_path))))
    with pytest.raises(ValueError, match="already trains with SAM"):
        enable_sam(sam)
    with pytest.raises(TypeError, match="`sam_config` must be a `SAMConfig`"):
        enable_sam(Trainer(model=tiny_llama(), args=TrainingArguments(**base_args(tmp_path))), {"rho": 0.1})
