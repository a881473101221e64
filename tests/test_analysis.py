"""hf_sam.analysis against known answers: quadratics, least squares, an explicit Hessian; the model left untouched."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from testing_utils import base_args, lm_dataset, tiny_llama, tiny_llama_config
from torch import nn

from hf_sam.analysis import (
    SharpnessCallback,
    filter_normalized_direction,
    hessian_eigenvalues,
    hessian_trace,
    interpolate,
    random_landscape,
    sam_sharpness,
    select_parameters,
)
from hf_sam.analysis._core import reference_weights

# ---- closed-form models ------------------------------------------------------------------------------------------


class Quadratic(nn.Module):
    """L(w) = 1/2 w^T A w, float64, the batch is ignored (it only carries a size)."""

    def __init__(self, a: torch.Tensor, w: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("a", a)
        self.w = nn.Parameter(w.clone())

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": 0.5 * self.w @ self.a @ self.w}


def spd(eigenvalues: list[float], seed: int = 0) -> torch.Tensor:
    """Q diag(eigenvalues) Q^T with a random orthogonal Q."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T


DUMMY = [{"x": torch.zeros(4, 1)}]  # one batch of four (the quadratic ignores it)
EIGS = [4.0, 2.5, 1.0, 0.5, 0.2, 0.1]


def one_step_sharpness(a: torch.Tensor, w: torch.Tensor, e: torch.Tensor) -> float:
    return float(e @ a @ w + 0.5 * e @ a @ e)


def test_quadratic_eigenvalues_trace_exact():
    a = spd(EIGS)
    model = Quadratic(a, torch.ones(6, dtype=torch.float64))
    eig = hessian_eigenvalues(model, DUMMY, k=3, max_iter=500, tol=1e-7, progress=False)
    assert eig.eigenvalues == pytest.approx(EIGS[:3], rel=1e-5)
    assert all(eig.converged)
    # A diagonal Hessian: Rademacher v gives v^T A v = tr(A) exactly, for every sample.
    diag = Quadratic(torch.diag(torch.tensor(EIGS, dtype=torch.float64)), torch.ones(6, dtype=torch.float64))
    tr = hessian_trace(diag, DUMMY, samples=3, progress=False)
    assert tr.trace == pytest.approx(sum(EIGS), rel=1e-6)
    assert tr.std_error == pytest.approx(0.0, abs=1e-5)


def test_hutchinson_converges_on_dense_quadratic():
    a = spd(EIGS, seed=3)
    model = Quadratic(a, torch.ones(6, dtype=torch.float64))
    tr = hessian_trace(model, DUMMY, samples=2000, seed=1, progress=False)
    exact = float(torch.trace(a))
    assert abs(tr.trace - exact) < 4 * tr.std_error
    assert tr.trace == pytest.approx(exact, rel=0.05)
    assert tr.std_error < 0.05 * exact


def test_negative_curvature_is_found_by_magnitude():
    eigs = [-3.0, 2.0, 1.0]
    model = Quadratic(spd(eigs, seed=2), torch.ones(3, dtype=torch.float64))
    eig = hessian_eigenvalues(model, DUMMY, k=2, max_iter=500, tol=1e-7, progress=False)
    assert eig.eigenvalues == pytest.approx([-3.0, 2.0], rel=1e-5)


def test_near_tie_of_opposite_signs_is_not_reported_converged():
    # |l1| ~ |l2| with opposite signs: the estimate barely moves, but v is no eigenvector (the residual says so).
    model = Quadratic(spd([3.0, -2.999, 1.0], seed=6), torch.ones(3, dtype=torch.float64))
    eig = hessian_eigenvalues(model, DUMMY, max_iter=30, tol=1e-3, progress=False)
    assert not eig.converged[0] and eig.iterations[0] == 30


def test_one_step_sharpness_closed_form_plain_and_adaptive():
    a = spd(EIGS, seed=1)
    w = torch.linspace(-1.0, 1.5, 6, dtype=torch.float64)
    model = Quadratic(a, w)
    rho, eta = 0.1, 0.01
    g = a @ w
    res = sam_sharpness(model, DUMMY, rho=rho, progress=False)
    expected = rho * float(g.norm()) + 0.5 * rho**2 * float(g @ a @ g) / float(g @ g)
    assert res.sharpness == pytest.approx(expected, rel=1e-6)
    assert res.loss == pytest.approx(float(0.5 * w @ a @ w), rel=1e-12)
    assert res.perturbed_loss == pytest.approx(res.loss + res.sharpness)
    # ASAM: e = rho T^2 g / ||T g||, T = |w| + eta.
    t = w.abs() + eta
    e = rho * t**2 * g / (t * g).norm()
    res = sam_sharpness(model, DUMMY, rho=rho, adaptive=True, eta=eta, progress=False)
    assert res.sharpness == pytest.approx(one_step_sharpness(a, w, e), rel=1e-6)


def test_multi_step_ascent_reaches_the_max_over_the_ball():
    # 2-D: the exact max of e^T g + 1/2 e^T A e over ||e|| <= rho (on the circle, A is PSD) by brute force.
    a = spd([3.0, 0.2], seed=4)
    vecs = torch.linalg.eigh(a).eigenvectors
    w = 0.5 * vecs[:, 0] + 0.05 * vecs[:, 1]  # the gradient points mostly along the flat direction
    rho = 0.5
    theta = torch.linspace(0, 2 * math.pi, 200_001, dtype=torch.float64)
    e = rho * torch.stack([theta.cos(), theta.sin()], dim=1)
    g = a @ w
    exact = float((e @ g + 0.5 * ((e @ a) * e).sum(1)).max())
    model = Quadratic(a, w)
    one = sam_sharpness(model, DUMMY, rho=rho, progress=False).sharpness
    many = sam_sharpness(model, DUMMY, rho=rho, steps=40, progress=False).sharpness
    assert one < exact - 0.05  # one step is far from the max here ...
    assert many == pytest.approx(exact, rel=1e-4)  # ... the projected ascent gets there
    assert many <= rho * float(g.norm()) + 0.5 * rho**2 * 3.0 + 1e-9  # and under the bound rho||g|| + rho^2 l/2


def test_sharpness_along_top_eigenvector_is_the_limit():
    # w on the top eigenvector: one step is the exact max, rho ||g|| + rho^2 lambda_max / 2.
    a = spd(EIGS, seed=5)
    vals, vecs = torch.linalg.eigh(a)
    w = 0.7 * vecs[:, -1]
    rho = 0.2
    res = sam_sharpness(Quadratic(a, w), DUMMY, rho=rho, steps=5, progress=False)
    assert res.sharpness == pytest.approx(rho * float((a @ w).norm()) + 0.5 * rho**2 * float(vals[-1]), rel=1e-6)


# ---- least squares -----------------------------------------------------------------------------------------------


def least_squares(sizes=(8, 8, 4), d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(sizes), d, generator=g, dtype=torch.float64)
    y = torch.randn(sum(sizes), generator=g, dtype=torch.float64)
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, d, generator=g, dtype=torch.float64))
    batches, start = [], 0
    for s in sizes:
        batches.append({"x": x[start : start + s], "y": y[start : start + s]})
        start += s

    def loss_fn(m, batch):
        return 0.5 * ((m(batch["x"]).squeeze(-1) - batch["y"]) ** 2).mean()

    return model, batches, loss_fn, x, y


def test_least_squares_hessian_is_xtx_over_n():
    model, batches, loss_fn, x, _ = least_squares()
    h = x.T @ x / len(x)  # unequal batches: the size-weighted mean of batch losses is the full-data loss
    exact = torch.linalg.eigvalsh(h).flip(0)
    eig = hessian_eigenvalues(model, batches, loss_fn=loss_fn, k=2, max_iter=1000, tol=1e-7, progress=False)
    assert eig.eigenvalues == pytest.approx(exact[:2].tolist(), rel=1e-5)
    tr = hessian_trace(model, batches, loss_fn=loss_fn, samples=1500, progress=False)
    assert tr.trace == pytest.approx(float(torch.trace(h)), rel=0.05)
    assert abs(tr.trace - float(torch.trace(h))) < 4 * tr.std_error


def test_m_sharpness_is_the_mean_of_per_example_closed_forms():
    # m = 1: L_i = 1/2 (x_i.w - y_i)^2, g_i = r_i x_i, H_i = x_i x_i^T,
    # so sharpness_i = rho |r_i| ||x_i|| + rho^2 ||x_i||^2 / 2.
    model, batches, loss_fn, x, y = least_squares()
    rho = 0.05
    r = x @ model.weight.detach()[0] - y
    per_example = rho * r.abs() * x.norm(dim=1) + 0.5 * rho**2 * x.norm(dim=1) ** 2
    res = sam_sharpness(model, batches, rho=rho, m=1, loss_fn=loss_fn, progress=False)
    assert len(res.values) == len(x)
    assert res.values == pytest.approx(per_example.tolist(), rel=1e-6)
    assert res.sharpness == pytest.approx(float(per_example.mean()), rel=1e-6)
    # m = None: one perturbation from the full gradient, L(w + e) - L(w) = rho ||g|| + rho^2 g^T H g / (2 ||g||^2).
    g = x.T @ r / len(x)
    h = x.T @ x / len(x)
    full = sam_sharpness(model, batches, rho=rho, loss_fn=loss_fn, progress=False)
    assert full.sharpness == pytest.approx(rho * float(g.norm()) + 0.5 * rho**2 * float(g @ h @ g / (g @ g)), rel=1e-6)
    assert full.sharpness < res.sharpness  # smaller m, sharper (per-example gradients are larger)


# ---- a small network against its explicit Hessian ----------------------------------------------------------------


def test_power_iteration_matches_explicit_hessian_of_small_network():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (16,), generator=g)
    batches = [{"x": x[:8], "y": y[:8]}, {"x": x[8:], "y": y[8:]}]

    def loss_fn(m, batch):
        return nn.functional.cross_entropy(m(batch["x"]), batch["y"])

    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    def full_loss(flat):
        tensors, i = {}, 0
        for n, s in zip(names, shapes):
            tensors[n] = flat[i : i + s.numel()].reshape(s)
            i += s.numel()
        out = torch.func.functional_call(net, tensors, (x,))
        return nn.functional.cross_entropy(out, y)

    h = torch.autograd.functional.hessian(full_loss, flat0)
    vals = torch.linalg.eigvalsh(h)
    by_magnitude = vals[vals.abs().argsort(descending=True)]
    eig = hessian_eigenvalues(net, batches, loss_fn=loss_fn, k=2, max_iter=2000, tol=1e-7, progress=False)
    assert eig.eigenvalues == pytest.approx(by_magnitude[:2].tolist(), rel=1e-4)
    assert all(eig.converged) and max(eig.iterations) < 200
    tr = hessian_trace(net, batches, loss_fn=loss_fn, samples=400, progress=False)
    assert abs(tr.trace - float(torch.trace(h))) < 4 * tr.std_error + 1e-6


# ---- landscapes ----------------------------------------------------------------------------------------------------


def test_filter_normalization():
    w = [torch.randn(4, 3), torch.zeros(2, 5), torch.randn(3), torch.randn(2, 3, 2)]
    w[1][0] = 1.0  # one non-zero row
    d = filter_normalized_direction(w, torch.Generator().manual_seed(0))
    assert torch.allclose(d[0].norm(dim=1), w[0].norm(dim=1), rtol=1e-5)
    assert torch.allclose(d[1].norm(dim=1), w[1].norm(dim=1), rtol=1e-5)  # zero rows stay zero
    assert torch.equal(d[2], torch.zeros(3))  # 1-D: zero by default
    assert torch.allclose(d[3].reshape(2, -1).norm(dim=1), w[3].reshape(2, -1).norm(dim=1), rtol=1e-5)
    kept = filter_normalized_direction(w, torch.Generator().manual_seed(0), ignore_1d=False)
    assert torch.equal(kept[2], w[2])
    cols = filter_normalized_direction(w[:1], torch.Generator().manual_seed(0), filter_dims=[1])  # Conv1D: (in, out)
    assert torch.allclose(cols[0].norm(dim=0), w[0].norm(dim=0), rtol=1e-5)
    layer = filter_normalized_direction(w, torch.Generator().manual_seed(0), normalization="layer")
    assert float(layer[0].norm()) == pytest.approx(float(w[0].norm()), rel=1e-5)


def test_landscape_shapes_center_and_quadratic_profile():
    model = tiny_llama()
    data = lm_dataset(4, length=8)
    clean = sam_sharpness(model, data, batch_size=4, progress=False).loss
    one = random_landscape(model, data, batch_size=4, steps=5, span=0.5, progress=False)
    assert one.kind == "random_1d" and one.losses.shape == (5,) and one.y is None
    assert one.x.tolist() == pytest.approx([-0.5, -0.25, 0.0, 0.25, 0.5])
    assert float(one.losses[2]) == pytest.approx(clean, abs=1e-6)  # the centre is the model itself
    two = random_landscape(model, data, batch_size=4, dims=2, steps=3, span=(-0.2, 0.2), progress=False)
    assert two.kind == "random_2d" and two.losses.shape == (3, 3)
    assert float(two.losses[1, 1]) == pytest.approx(clean, abs=1e-6)
    again = random_landscape(model, data, batch_size=4, dims=2, steps=3, span=(-0.2, 0.2), progress=False)
    assert torch.equal(two.losses, again.losses)  # seeded
    other = random_landscape(model, data, batch_size=4, dims=2, steps=3, span=(-0.2, 0.2), seed=1, progress=False)
    assert not torch.equal(two.losses, other.losses)
    # A quadratic along a direction is a parabola: L(w + a d) exactly quadratic in a.
    a = spd([2.0, 1.0, 0.5])
    quad = Quadratic(a, torch.tensor([[1.0, -1.0, 0.5]], dtype=torch.float64).reshape(3))
    # 1-D parameters get zero directions by default; keep them to move at all.
    ls = random_landscape(quad, DUMMY, steps=5, ignore_1d=False, progress=False)
    w = quad.w.detach()
    expected = [float(0.5 * (w + t * w) @ a @ (w + t * w)) for t in ls.x.tolist()]  # the 1-D direction is w itself
    assert ls.losses.tolist() == pytest.approx(expected, rel=1e-9)


def test_interpolation_endpoints():
    a, b = tiny_llama(seed=0), tiny_llama(seed=1)
    data = lm_dataset(4, length=8)
    ls = interpolate(a, b, data, batch_size=4, steps=3, progress=False)
    assert ls.kind == "interpolation" and ls.losses.shape == (3,)
    loss_a = sam_sharpness(a, data, batch_size=4, progress=False).loss
    loss_b = sam_sharpness(b, data, batch_size=4, progress=False).loss
    assert float(ls.losses[0]) == pytest.approx(loss_a, abs=1e-6)
    assert float(ls.losses[-1]) == pytest.approx(loss_b, abs=1e-4)
    from_state_dict = interpolate(a, b.state_dict(), data, batch_size=4, steps=3, progress=False)
    assert torch.equal(ls.losses, from_state_dict.losses)
    with pytest.raises(ValueError, match="`other` lacks"):
        interpolate(a, {"nope": torch.zeros(1)}, data, batch_size=4, progress=False)


# ---- the model is never modified; the global RNG is never touched -------------------------------------------------


def snapshot(model: nn.Module):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [p.requires_grad for p in model.parameters()],
        [m.training for m in model.modules()],
        [None if p.grad is None else p.grad.clone() for p in model.parameters()],
    )


def assert_same(model: nn.Module, snap) -> None:
    state, flags, modes, grads = snap
    now = model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in state.items())  # bit for bit
    assert [p.requires_grad for p in model.parameters()] == flags
    assert [m.training for m in model.modules()] == modes
    for p, g in zip(model.parameters(), grads):
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)


def test_model_untouched_and_global_rng_untouched():
    model = tiny_llama(attention_dropout=0.5)
    model.train()
    model.model.layers[0].mlp.eval()  # mixed flags must come back as they were
    model.lm_head.weight.requires_grad_(False)
    model.model.norm.weight.grad = torch.full_like(model.model.norm.weight, 3.0)
    data = lm_dataset(8, length=8)
    loader = torch.utils.data.DataLoader(data.with_format("torch"), batch_size=4, shuffle=True)  # draws from the RNG
    other = tiny_llama(seed=3)
    snap = snapshot(model)
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    sam_sharpness(model, loader, steps=2, adaptive=True, progress=False)
    sam_sharpness(model, loader, m=2, space="full", progress=False)
    hessian_eigenvalues(model, loader, max_iter=2, progress=False)
    hessian_trace(model, loader, samples=2, progress=False)
    random_landscape(model, loader, dims=2, steps=2, progress=False)
    interpolate(model, other, loader, steps=2, progress=False)
    assert torch.equal(torch.get_rng_state(), rng)
    assert_same(model, snap)
    # Sharpness runs without dropout: two runs agree exactly, whatever the model's mode was.
    first = sam_sharpness(model, loader, progress=False)
    assert sam_sharpness(model, loader, progress=False) == first
    assert_same(model, snap)


def test_model_restored_after_an_error_mid_measurement():
    model = tiny_llama()
    data = lm_dataset(4, length=8)
    snap = snapshot(model)
    calls = {"n": 0}

    def failing(m, batch):
        calls["n"] += 1
        if calls["n"] == 3:  # after the weights were perturbed
            raise RuntimeError("boom")
        return m(**batch).loss

    for fn in (
        lambda: sam_sharpness(model, data, batch_size=2, steps=3, loss_fn=failing, progress=False),
        lambda: random_landscape(model, data, batch_size=2, steps=3, loss_fn=failing, progress=False),
    ):
        calls["n"] = 0
        with pytest.raises(RuntimeError, match="boom"):
            fn()
        assert_same(model, snap)


def test_bad_arguments_fail_before_touching_the_model():
    model = tiny_llama()
    data = lm_dataset(4, length=8)
    snap = snapshot(model)
    with pytest.raises(ValueError, match="`rho` must be > 0"):
        sam_sharpness(model, data, rho=-1.0)
    with pytest.raises(ValueError, match="`space` must be one of 'trainable', 'full'"):
        sam_sharpness(model, data, space="adapters")
    with pytest.raises(ValueError, match="`dims` must be one of 1, 2"):
        random_landscape(model, data, dims=3)
    with pytest.raises(ValueError, match="`normalization` must be one of 'filter', 'layer'"):
        random_landscape(model, data, normalization="none")
    with pytest.raises(ValueError, match="`k` must be at most"):
        hessian_eigenvalues(Quadratic(torch.eye(2, dtype=torch.float64), torch.ones(2)), DUMMY, k=3)
    with pytest.raises(ValueError, match="`samples` must be an integer"):
        hessian_trace(model, data, samples=2.5)
    with pytest.raises(ValueError, match="`measures` must be one of"):
        SharpnessCallback(measures=("flatness",))
    with pytest.raises(ValueError, match="no loss"):
        sam_sharpness(model, [{"input_ids": torch.zeros(2, 4, dtype=torch.long)}], progress=False)
    assert_same(model, snap)


# ---- LoRA: adapter space and full (merged-weight) space -----------------------------------------------------------


def lora_model(seed: int = 0):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(seed)
    return peft.get_peft_model(tiny_llama(seed=seed), config)


def test_lora_spaces():
    model = lora_model()
    names, _ = select_parameters(model, "trainable")
    assert names and all("lora_" in n for n in names)
    full_names, full = select_parameters(model, "full")
    assert not any("lora_" in n for n in full_names)
    assert any(n.endswith("q_proj.base_layer.weight") for n in full_names)
    # Filter normalisation and ASAM scale to the merged weight W + BA in the full space.
    merged = copy.deepcopy(model).merge_and_unload()
    refs = dict(zip(full_names, reference_weights(model, full)))
    q = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"
    assert torch.allclose(refs[q], merged.model.layers[0].self_attn.q_proj.weight, atol=1e-6)
    assert not torch.allclose(refs[q], model.get_parameter(q))
    # The full space of the adapter model is the weight space of the merged model: same landscape, same sharpness.
    data = lm_dataset(4, length=8)
    snap = snapshot(model)
    ls_adapter = random_landscape(model, data, batch_size=4, steps=3, space="full", progress=False)
    ls_merged = random_landscape(merged, data, batch_size=4, steps=3, space="full", progress=False)
    assert torch.allclose(ls_adapter.losses, ls_merged.losses, atol=1e-5)
    s_adapter = sam_sharpness(model, data, batch_size=4, space="full", progress=False).sharpness
    s_merged = sam_sharpness(merged, data, batch_size=4, space="full", progress=False).sharpness
    assert s_adapter == pytest.approx(s_merged, rel=1e-3)
    trainable = sam_sharpness(model, data, batch_size=4, progress=False).sharpness
    assert trainable != pytest.approx(s_adapter)
    full_eig = hessian_eigenvalues(model, data, batch_size=4, space="full", max_iter=3, progress=False).eigenvalues
    merged_eig = hessian_eigenvalues(merged, data, batch_size=4, space="full", max_iter=3, progress=False).eigenvalues
    assert full_eig == pytest.approx(merged_eig, rel=1e-3)  # same space, same seed, same vectors
    assert math.isfinite(hessian_trace(model, data, batch_size=4, samples=2, progress=False).trace)
    assert_same(model, snap)  # base weights perturbed without requires_grad, then restored with their flags


# ---- the Trainer callback ------------------------------------------------------------------------------------------


def test_callback_logs_eval_metrics(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_llama()
    callback = SharpnessCallback(
        measures=("sharpness", "hessian_eigenvalue", "hessian_trace"), max_iter=3, trace_samples=2, max_batches=1
    )
    args = TrainingArguments(
        **base_args(tmp_path, max_steps=2, per_device_train_batch_size=2, eval_strategy="steps", eval_steps=2)
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=lm_dataset(4), eval_dataset=lm_dataset(4, seed=2), callbacks=[callback]
    )
    trainer.train()
    entry = next(e for e in trainer.state.log_history if "eval_loss" in e)
    assert entry["step"] == 2
    for key in ("eval_sharpness", "eval_hessian_eigenvalue", "eval_hessian_trace"):
        assert math.isfinite(entry[key])
    metrics = trainer.evaluate(metric_key_prefix="test")
    assert {"test_sharpness", "test_hessian_eigenvalue", "test_hessian_trace"} <= set(metrics)
    assert trainer.state.log_history[-1]["test_sharpness"] == metrics["test_sharpness"]
    # The same numbers as the function on the same batches.
    batches = list(trainer.get_eval_dataloader())[:1]
    assert metrics["test_sharpness"] == pytest.approx(sam_sharpness(model, batches, progress=False).sharpness)


def test_attached_callback_reaches_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        **{
            **base_args(tmp_path, max_steps=2, per_device_train_batch_size=2, eval_strategy="steps", eval_steps=2),
            "report_to": ["tensorboard"],
        }
    )
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=lm_dataset(4), eval_dataset=lm_dataset(4, seed=2))
    callback = SharpnessCallback(max_batches=1).attach(trainer)
    assert callback in trainer.callback_handler.callbacks
    trainer.train()
    tags = set()
    for run in tmp_path.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(run.parent))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    assert {"eval/loss", "eval/sharpness"} <= tags


# ---- the command line ----------------------------------------------------------------------------------------------


def save_tiny_checkpoint(path, seed=0):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [
        "the",
        "a",
        "cat",
        "dog",
        "sat",
        "ran",
        "on",
        "mat",
        "fast",
        "slow",
        "red",
        "blue",
        "big",
        "small",
        "sun",
        "moon",
    ]
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")
    model = tiny_llama(seed=seed, pad_token_id=0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


def test_cli_sharpness_landscape_and_adapter(tmp_path, capsys):
    from hf_sam.cli import main

    a, b = tmp_path / "run-a", tmp_path / "run-b"
    save_tiny_checkpoint(a, seed=0)
    save_tiny_checkpoint(b, seed=1)
    data = tmp_path / "eval.jsonl"
    lines = ["the cat sat on the mat", "a dog ran fast", "the red sun", "big blue moon on a small mat"]
    data.write_text("\n".join(json.dumps({"text": t}) for t in lines))
    out_json = tmp_path / "s.json"
    flags = ["--data", str(data), "--batch-size", "2", "--no-progress"]
    assert main(["sharpness", str(a), str(b), *flags, "--hessian", "--max-iter", "3", "--json", str(out_json)]) == 0
    printed = capsys.readouterr().out
    assert "run-a" in printed and "run-b" in printed and "sharpness (rho=0.05" in printed and "λ_max" in printed
    rows = json.loads(out_json.read_text())
    assert [r["model"] for r in rows] == ["run-a", "run-b"] and all(r["sharpness"] > 0 for r in rows)

    png = tmp_path / "landscape.png"
    assert main(["landscape", str(a), str(b), *flags, "--steps", "3", "--relative", "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    png2 = tmp_path / "surface.png"
    assert main(["landscape", str(a), *flags, "--dims", "2", "--steps", "3", "--out", str(png2)]) == 0
    assert png2.stat().st_size > 1000
    png3 = tmp_path / "line.png"
    assert main(["landscape", str(a), str(b), *flags, "--interpolate", "--steps", "3", "--out", str(png3)]) == 0
    assert "run-a → run-b" in capsys.readouterr().out

    # A PEFT adapter directory on the first checkpoint; prompt/completion data.
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(a)
    adapter = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    adapter.save_pretrained(tmp_path / "adapter")
    pc = tmp_path / "pc.csv"
    pc.write_text("prompt,completion\nthe cat,sat on the mat\na dog,ran fast\n")
    assert main(["sharpness", str(tmp_path / "adapter"), "--data", str(pc), "--no-progress"]) == 0
    assert "adapter" in capsys.readouterr().out
    line = ["landscape", str(tmp_path / "adapter"), str(a), "--interpolate", "--steps", "3", "--out", str(png3)]
    assert main([*line, "--data", str(pc), "--no-progress"]) == 0
    assert "merged weights" in capsys.readouterr().out  # adapter vs plain checkpoint: the merged weights W + BA

    # Prompt/completion through a chat template: the loss counts the assistant turn only.
    from transformers import AutoTokenizer

    from hf_sam.cli import tokenize_examples

    tokenizer = AutoTokenizer.from_pretrained(a)
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} [EOS] {% endfor %}"
        "{% if add_generation_prompt %}assistant {% endif %}"
    )
    tokenizer.save_pretrained(a)
    (batch,) = tokenize_examples(
        [{"prompt": "the cat", "completion": "sat on the mat"}], tokenizer, task="causal-lm", chat_template=True,
        system_prompt="be brief",
    )  # fmt: skip
    head = tokenizer.apply_chat_template(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat"}],
        add_generation_prompt=True,
        tokenize=True,
    )
    head = head["input_ids"] if isinstance(head, dict) or hasattr(head, "keys") else head
    answer = tokenizer("sat on the mat [EOS]", add_special_tokens=False)["input_ids"]
    labels = batch["labels"][0].tolist()
    assert labels == [-100] * len(head) + answer
    assert main(["sharpness", str(a), "--data", str(pc), "--chat-template", "--no-progress"]) == 0
    # docs/analysis.md's showcase: sft_lora.py's predictions.jsonl, its reference answers as the completions
    record = {"prompt": "the cat", "reference": "sat on the mat", "prediction": "mat"}
    chat = {"chat_template": True, "system_prompt": "be brief"}
    (batch,) = tokenize_examples([record], tokenizer, task="causal-lm", completion_field="reference", **chat)
    assert batch["labels"][0].tolist() == labels
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text(json.dumps(record) + "\n")
    argv = ["sharpness", str(a), "--data", str(predictions), "--chat-template", "--no-progress"]
    assert main([*argv, "--completion-field", "reference"]) == 0
    assert main(argv) == 2 and "'completion'" in capsys.readouterr().err  # without the flag: no completion field
    assert main(["sharpness", str(a), "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "--data: no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"body": "x"}))
    assert main(["sharpness", str(a), "--data", str(bad)]) == 2
    assert "'text'" in capsys.readouterr().err


def test_cli_sequence_classification(tmp_path, capsys):
    from transformers import LlamaForSequenceClassification

    from hf_sam.cli import main

    path = tmp_path / "clf"
    save_tiny_checkpoint(path)  # the tokenizer; the weights are replaced by a classifier's
    torch.manual_seed(0)
    LlamaForSequenceClassification(tiny_llama_config(num_labels=2, pad_token_id=0)).save_pretrained(path)
    data = tmp_path / "clf.csv"
    data.write_text("text,label\nthe cat sat,0\na dog ran fast,1\nthe red sun,0\nbig blue moon,1\n")
    assert main(["sharpness", str(path), "--data", str(data), "--no-progress", "--trace", "--trace-samples", "2"]) == 0
    assert "clf" in capsys.readouterr().out


def test_import_stays_light():
    import subprocess
    import sys

    import hf_sam
    import hf_sam.analysis

    assert hf_sam.SharpnessCallback is hf_sam.analysis.SharpnessCallback
    code = "import sys, hf_sam, hf_sam.analysis; assert 'matplotlib' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
