"""Unit tests of the SAM math (hf_sam.perturbation) against per-tensor references written from the papers."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch

from hf_sam.perturbation import WeightBackup, global_norm, perturb_, restore_


def make_params(dtype=torch.float32, seed=0, shapes=((3, 4), (5,), (2, 2, 2))):
    g = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=g).to(dtype))
        p.grad = torch.randn(shape, generator=g).to(dtype)
        params.append(p)
    return params


def reference_e(weights, grads, rho, adaptive=False, eta=0.01):
    """e from the formulas, in float64: SAM rho g/||g||; ASAM rho T^2 g/||T g||, T = |w| + eta."""
    w = [x.double() for x in weights]
    g = [x.double() for x in grads]
    if adaptive:
        t = [wi.abs() + eta for wi in w]
        tg = [ti * gi for ti, gi in zip(t, g)]
        norm = math.sqrt(sum(float((x**2).sum()) for x in tg))
        return [rho * ti * ti * gi / norm for ti, gi in zip(t, g)]
    norm = math.sqrt(sum(float((x**2).sum()) for x in g))
    return [rho * gi / norm for gi in g]


@pytest.mark.parametrize("adaptive", [False, True])
def test_perturbation_matches_formula(adaptive):
    params = make_params()
    w = [p.detach().clone() for p in params]
    grads = [p.grad.clone() for p in params]
    backups = WeightBackup().buffers_for(params)
    norm, skipped = perturb_(params, backups, rho=0.05, adaptive=adaptive, eta=0.01)
    expected = reference_e(w, grads, 0.05, adaptive, 0.01)
    for p, wi, ei in zip(params, w, expected):
        torch.testing.assert_close(p.grad.double(), ei, rtol=1e-5, atol=1e-9)  # .grad now holds e
        torch.testing.assert_close(p.detach().double(), wi.double() + ei, rtol=1e-6, atol=1e-6)
    assert not skipped
    # The perturbation has norm rho in its own geometry: ||e|| (SAM) or ||T^-1 e|| (ASAM).
    if adaptive:
        scaled = [ei / (wi.double().abs() + 0.01) for ei, wi in zip(expected, w)]
        assert math.isclose(float(global_norm(scaled)), 0.05, rel_tol=1e-5)
    else:
        assert math.isclose(float(global_norm([p.grad for p in params])), 0.05, rel_tol=1e-5)
    restore_(params, backups)
    for p, wi in zip(params, w):
        assert torch.equal(p.detach(), wi)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("adaptive", [False, True])
def test_restore_is_bit_exact(dtype, adaptive):
    params = make_params(dtype=dtype, seed=3)
    w = [p.detach().clone() for p in params]
    backups = WeightBackup().buffers_for(params)
    perturb_(params, backups, rho=0.3, adaptive=adaptive)
    assert any(not torch.equal(p.detach(), wi) for p, wi in zip(params, w))
    restore_(params, backups)
    for p, wi in zip(params, w):
        assert p.dtype == dtype
        assert torch.equal(p.detach(), wi)


def test_subtraction_would_drift_in_bf16():
    """Why restore copies: w + e - e is not w in bf16 (the pitfall this module avoids)."""
    params = make_params(dtype=torch.bfloat16, seed=4, shapes=((64, 64),))
    w = params[0].detach().clone()
    backups = WeightBackup().buffers_for(params)
    perturb_(params, backups, rho=0.5)
    assert not torch.equal(params[0].detach() - params[0].grad, w)


@pytest.mark.parametrize("bad", [0.0, float("inf"), float("nan")])
def test_zero_or_nonfinite_norm_skips_without_nan(bad):
    params = make_params(seed=5)
    w = [p.detach().clone() for p in params]
    if bad == 0.0:
        for p in params:
            p.grad.zero_()
    else:
        params[1].grad[2] = bad
    backups = WeightBackup().buffers_for(params)
    norm, skipped = perturb_(params, backups, rho=0.05)
    assert bool(skipped)
    for p, wi in zip(params, w):
        assert torch.isfinite(p).all()
        assert torch.equal(p.detach(), wi)  # e = 0 exactly: the second pass runs at w


def test_gradscaler_scaled_gradients_give_the_same_perturbation():
    """fp16 training scales gradients by S; e = rho g/||g|| is invariant to S, so no unscale_ is needed."""
    params = make_params(seed=6)
    scaled = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, q in zip(params, scaled):
        q.grad = p.grad * 2.0**16
    perturb_(params, WeightBackup().buffers_for(params), rho=0.05)
    perturb_(scaled, WeightBackup().buffers_for(scaled), rho=0.05)
    for p, q in zip(params, scaled):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)


def test_global_norm_is_float32_and_does_not_overflow_fp16():
    big = [torch.full((100,), 60000.0, dtype=torch.float16), torch.full((3,), 1.0, dtype=torch.float16)]
    norm = global_norm(big)
    assert norm.dtype == torch.float32
    assert math.isclose(float(norm), math.sqrt(100 * 60000.0**2 + 3), rel_tol=1e-4)


def test_weight_backup_reuses_buffers_and_follows_the_parameter_set():
    params = make_params()
    backup = WeightBackup()
    first = backup.buffers_for(params)
    assert all(a is b for a, b in zip(first, backup.buffers_for(params)))
    subset = backup.buffers_for(params[1:])
    assert all(a is b for a, b in zip(first[1:], subset))


def test_math_module_has_no_trainer_dependency():
    tree = ast.parse(Path(__file__).parents[1].joinpath("hf_sam", "perturbation.py").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not any(name.startswith(("transformers", "accelerate", "hf_sam")) for name in imported), imported
