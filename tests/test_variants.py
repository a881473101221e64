"""SAM's variants against references written from their papers' formulas."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from references import reference_sam_sgd, sam_perturbation, window_loss, windows_of
from testing_utils import (
    ForwardCounter,
    assert_updates_close,
    base_args,
    lm_dataset,
    sgd_args,
    tiny_llama,
    trainable_state,
)
from torch.func import grad

from hf_sam import SAMConfig, SAMTrainer, SAMTrainingArguments
from hf_sam.schedules import sam_step_index, scheduled_rho
from hf_sam.variants import (
    NoisyLinearFunction,
    flat_lora_noise,
    flat_lora_seed,
    looksam_add_,
    looksam_orthogonal_,
)


def run_trainer(tmp_path, model, data, steps, batch=4, accumulation_steps=1, **sam):
    args = SAMTrainingArguments(
        **sgd_args(tmp_path, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation_steps),
        max_steps=steps,
        **sam,
    )
    trainer = SAMTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    return trainer


def sgd_step(params, g, lr=0.5):
    return {k: params[k] - lr * g[k] for k in params}


def loss_grad(model, params, micro_batches):
    n_items = sum(ids[:, 1:].numel() for ids in micro_batches)
    return grad(lambda p: window_loss(model, p, micro_batches, n_items))(params)


def flat(d):
    return torch.cat([v.reshape(-1) for v in d.values()])


# ---- LookSAM ---------------------------------------------------------------------------------------------------
def test_looksam_orthogonal_component_matches_the_formula():
    g = torch.tensor([3.0, 4.0, 0.0], dtype=torch.float64)
    g_s = torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64)
    rho = 0.1
    e = [(rho * g / g.norm()).clone()]
    looksam_orthogonal_(e, [g_s], rho)
    cos = torch.dot(g, g_s) / (g.norm() * g_s.norm())
    expected = g_s - g_s.norm() * cos * g / g.norm()  # Liu et al. 2022, eq. for g_v
    torch.testing.assert_close(e[0], expected)
    assert abs(float(torch.dot(e[0], g))) < 1e-12


def test_looksam_add_matches_the_formula():
    g = [torch.tensor([1.0, -2.0]), torch.tensor([2.0])]
    g_v = [torch.tensor([0.5, 0.5]), torch.tensor([-1.0])]
    expected = [x.clone() for x in g]
    g_norm, v_norm = math.sqrt(9.0), math.sqrt(1.5)
    for x, v in zip(expected, g_v):
        x += 0.7 * g_norm / v_norm * v
    looksam_add_(g, g_v, 0.7)
    for got, want in zip(g, expected):
        torch.testing.assert_close(got, want)


def reference_looksam(model, windows, lr, rho, k, alpha):
    params = trainable_state(model)
    g_v = None
    for step, micro in enumerate(windows):
        g = loss_grad(model, params, micro)
        if step % k == 0:
            e = sam_perturbation(params, g, rho, False, 0.0)
            g_s = loss_grad(model, {n: params[n] + e[n] for n in params}, micro)
            u = flat(g) / flat(g).norm()
            cos_term = torch.dot(flat(g_s), u)
            g_v = {n: g_s[n] - cos_term * g[n] / flat(g).norm() for n in params}
            update = g_s
        else:  # one pass: g + alpha ||g|| / ||g_v|| g_v, the gradient is NOT doubled
            scale = alpha * flat(g).norm() / flat(g_v).norm()
            update = {n: g[n] + scale * g_v[n] for n in params}
        params = sgd_step(params, update, lr)
    return params


def test_looksam_update_and_cost(tmp_path):
    model = tiny_llama().double()
    reference_model = copy.deepcopy(model)
    start = trainable_state(model)
    data = lm_dataset(n=4)
    counter = ForwardCounter(model)
    run_trainer(tmp_path, model, data, steps=5, sam_method="looksam", sam_looksam_interval=3, sam_looksam_alpha=0.7)
    assert counter.count == 2 + 1 + 1 + 2 + 1  # full SAM at steps 0 and 3, one pass in between
    want = reference_looksam(reference_model, windows_of(data, 4, 1, 5), lr=0.5, rho=0.05, k=3, alpha=0.7)
    assert_updates_close(start, trainable_state(model), want)


# ---- schedules -------------------------------------------------------------------------------------------------
def test_sam_step_index():
    assert [sam_step_index(s, 10, 0.0, 1) for s in range(3)] == [0, 1, 2]
    assert [sam_step_index(s, 10, 0.7, 1) for s in range(10)] == [None] * 7 + [0, 1, 2]
    assert [sam_step_index(s, 10, 0.0, 3) for s in range(7)] == [0, None, None, 1, None, None, 2]


def test_late_and_periodic_sam_take_plain_steps_in_between(tmp_path):
    model = tiny_llama().double()
    reference_model = copy.deepcopy(model)
    start = trainable_state(model)
    data = lm_dataset(n=4)
    counter = ForwardCounter(model)
    run_trainer(tmp_path, model, data, steps=6, sam_start_fraction=0.3, sam_interval=2)
    sam_steps = {2, 4}  # from ceil(0.3 * 6) = 2 on, every 2nd
    assert counter.count == 6 + len(sam_steps)
    params = trainable_state(reference_model)
    for step, micro in enumerate(windows_of(data, 4, 1, 6)):
        if step in sam_steps:
            params = reference_sam_sgd_from(reference_model, params, micro, rho=0.05)
        else:
            params = sgd_step(params, loss_grad(reference_model, params, micro))
    assert_updates_close(start, trainable_state(model), params)


def reference_sam_sgd_from(model, params, micro, rho, lr=0.5):
    g = loss_grad(model, params, micro)
    e = sam_perturbation(params, g, rho, False, 0.0)
    return sgd_step(params, loss_grad(model, {n: params[n] + e[n] for n in params}, micro), lr)


def test_scheduled_rho_formulas():
    assert scheduled_rho("constant", 0.1, 0.0, 0.3, 1.0, 0.5) == 0.1
    assert scheduled_rho("lr", 0.1, 0.02, 0.5, 1.0, 0.9) == pytest.approx(0.02 + 0.08 * 0.5)
    assert scheduled_rho("cosine_ramp", 0.1, 0.0, 1.0, 1.0, 0.0) == 0.0
    assert scheduled_rho("cosine_ramp", 0.1, 0.0, 1.0, 1.0, 0.5) == pytest.approx(0.05)
    assert scheduled_rho("cosine_ramp", 0.1, 0.0, 1.0, 1.0, 1.0) == pytest.approx(0.1)


def test_rho_follows_the_learning_rate(tmp_path):
    model = tiny_llama().double()
    reference_model = copy.deepcopy(model)
    start = trainable_state(model)
    data = lm_dataset(n=4)
    args = SAMTrainingArguments(
        **{**sgd_args(tmp_path, per_device_train_batch_size=4), "lr_scheduler_type": "linear"},
        max_steps=4,
        sam_rho=0.2,
        sam_rho_min=0.05,
        sam_rho_schedule="lr",
    )
    trainer = SAMTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    rhos = [0.05 + 0.15 * h["learning_rate"] / 0.5 for h in logs]
    assert [h["sam_rho"] for h in logs] == pytest.approx(rhos)
    params = trainable_state(reference_model)
    for h, rho, micro in zip(logs, rhos, windows_of(data, 4, 1, 4)):
        params = reference_sam_sgd_from(reference_model, params, micro, rho=rho, lr=h["learning_rate"])
    assert_updates_close(start, trainable_state(model), params)


# ---- partial-batch ascent --------------------------------------------------------------------------------------
def test_ascent_on_a_fraction_of_the_batch(tmp_path):
    model = tiny_llama().double()
    reference_model = copy.deepcopy(model)
    start = trainable_state(model)
    data = lm_dataset(n=8)
    counter = ForwardCounter(model)
    run_trainer(tmp_path, model, data, steps=2, batch=8, sam_ascent_fraction=0.25, sam_rho=0.1)
    assert counter.count == 4
    params = trainable_state(reference_model)
    for (micro,) in windows_of(data, 8, 1, 2):
        g = loss_grad(reference_model, params, [micro[:2]])  # e from the first 2 of 8 examples (Bahri et al.)
        e = sam_perturbation(params, g, 0.1, False, 0.0)
        params = sgd_step(params, loss_grad(reference_model, {n: params[n] + e[n] for n in params}, [micro]))
    assert_updates_close(start, trainable_state(model), params)


# ---- Flat-LoRA -------------------------------------------------------------------------------------------------
def test_flat_lora_noise_is_row_scaled_and_seeded():
    torch.manual_seed(0)
    weight = torch.randn(4, 20_000) * torch.tensor([[0.1], [1.0], [3.0], [0.0]])
    noise = flat_lora_noise(weight, seed=7, sigma=0.05)
    expected_std = 0.05 * weight.norm(dim=1) / math.sqrt(weight.shape[1])
    torch.testing.assert_close(noise.std(dim=1), expected_std, rtol=0.03, atol=1e-12)
    assert torch.equal(noise, flat_lora_noise(weight, seed=7, sigma=0.05))
    assert not torch.equal(noise, flat_lora_noise(weight, seed=8, sigma=0.05))
    state = torch.get_rng_state()
    flat_lora_noise(weight, seed=9, sigma=0.05)
    assert torch.equal(state, torch.get_rng_state())  # a private generator: the global stream is untouched


def test_noisy_linear_gradient_matches_autograd():
    torch.manual_seed(0)
    weight, bias = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    y = NoisyLinearFunction.apply(x, weight, bias, 11, 0.3)
    (gx,) = torch.autograd.grad(y.square().sum(), x)
    x2 = x.detach().clone().requires_grad_()
    y2 = F.linear(x2, weight + flat_lora_noise(weight, 11, 0.3), bias)
    (gx2,) = torch.autograd.grad(y2.square().sum(), x2)
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(gx, gx2)


def lora_model(double=True):
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    base = base.double() if double else base
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return model


def test_flat_lora_one_pass_at_noisy_base_weights(tmp_path):
    model = lora_model()
    reference_model = copy.deepcopy(model)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    start = trainable_state(model)
    data = lm_dataset(n=4)
    counter = ForwardCounter(model)
    run_trainer(tmp_path, model, data, steps=2, sam_method="flat_lora", sam_rho=0.5)
    assert counter.count == 2  # one pass per step
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), n  # the base weights are never written
    # Reference: the LoRA gradient at W + eps for every LoRA base weight, eps regenerated from the documented seed.
    bases = [n for n, _ in reference_model.named_parameters() if n.endswith("q_proj.base_layer.weight")]
    params = trainable_state(reference_model)
    fixed = {n: p.detach() for n, p in reference_model.named_parameters() if not p.requires_grad}
    for step, micro in enumerate(windows_of(data, 4, 1, 2)):
        noisy = dict(fixed)
        for layer, name in enumerate(bases):
            noisy[name] = fixed[name] + flat_lora_noise(fixed[name], flat_lora_seed(0, step, 0, layer), 0.5)
        n_items = sum(ids[:, 1:].numel() for ids in micro)
        g = grad(lambda p: window_loss(reference_model, {**noisy, **p}, micro, n_items))(params)  # noqa: B023
        params = sgd_step(params, g)
    assert_updates_close(start, trainable_state(model), params)
    plain = reference_sam_sgd(copy.deepcopy(reference_model), windows_of(data, 4, 1, 2), lr=0.5, rho=1e-12)
    with pytest.raises(AssertionError):
        assert_updates_close(start, trainable_state(model), plain, rtol=1e-3)


def test_flat_lora_needs_lora_layers(tmp_path):
    args = SAMTrainingArguments(**base_args(tmp_path), sam_method="flat_lora")
    with pytest.raises(ValueError, match="needs a PEFT LoRA model"):
        SAMTrainer(model=tiny_llama(), args=args, train_dataset=lm_dataset())


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"method": "looksam", "sync": "local"}, "`method='looksam'`.*needs.*`sync='global'`"),
        ({"method": "looksam", "adaptive": True}, "`method='looksam'`.*needs `adaptive=False`"),
        ({"method": "flat_lora", "ascent_fraction": 0.5}, "`method='flat_lora'`.*no `ascent_fraction` < 1"),
        ({"rho": 0.1, "rho_min": 0.2}, r"`rho_min` \(`--sam_rho_min`\) must be <= `rho`"),
        ({"looksam_interval": 0}, r"`looksam_interval` \(`--sam_looksam_interval`\) must be an integer >= 1"),
        ({"interval": 1.5}, r"`interval` \(`--sam_interval`\) must be an integer >= 1"),
        ({"start_fraction": 1.0}, r"`start_fraction` \(`--sam_start_fraction`\) must be a number in \[0, 1\)"),
        ({"ascent_fraction": 0.0}, r"`ascent_fraction` \(`--sam_ascent_fraction`\) must be a number in \(0, 1\]"),
        ({"rho_schedule": "step"}, "`rho_schedule`.*must be one of 'constant', 'lr', 'cosine_ramp'"),
        ({"method": "gsam"}, "`method`.*must be one of 'sam', 'looksam', 'flat_lora'"),
    ],
)
def test_variant_settings_are_validated(settings, message):
    with pytest.raises(ValueError, match=message):
        SAMConfig(**settings)
