"""Property-based tests of the SAM math (hypothesis): random shapes, dtypes, radii and gradients.

- SAM: ||e|| = rho. ASAM: ||T^-1 e|| = rho with T = |w| + eta (the adaptive norm).
- `restore_` brings every weight back bit for bit, whatever e did to it.
- A zero gradient, or one with a NaN or an infinity anywhere, gives e = 0 exactly and leaves the weights untouched.
"""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from hf_sam.perturbation import WeightBackup, global_norm, perturb_, restore_

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# Relative tolerance of ||e|| (or ||T^-1 e||) against rho: e is stored in the weight's dtype, so each element carries
# that dtype's rounding (bf16: 2^-9, fp16: 2^-12), a few times over for ASAM (T, T g, T^2 g); the norm and rho / norm
# are float32 (float64 inputs included).
RTOL = {
    (torch.float64, False): 1e-6,
    (torch.float32, False): 1e-5,
    (torch.float16, False): 2e-3,
    (torch.bfloat16, False): 1e-2,
    (torch.float64, True): 1e-6,
    (torch.float32, True): 1e-5,
    (torch.float16, True): 5e-3,
    (torch.bfloat16, True): 3e-2,
}
INT_VIEW = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}
SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)


@st.composite
def problems(draw):
    """Weights with gradients: 1-4 tensors of random shapes and dtypes, values of random scales."""
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    shapes = draw(st.lists(st.lists(st.integers(1, 5), min_size=0, max_size=3), min_size=1, max_size=4))
    dtypes = draw(st.lists(st.sampled_from(DTYPES), min_size=len(shapes), max_size=len(shapes)))
    grad_scale = draw(st.sampled_from([1e-2, 1.0, 1e2]))
    params = []
    for shape, dtype in zip(shapes, dtypes):
        p = nn.Parameter(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype))
        p.grad = (torch.randn(shape, generator=g, dtype=torch.float64) * grad_scale).to(dtype)
        params.append(p)
    return params


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().view(INT_VIEW[t.dtype])


def rtol_for(params, adaptive: bool) -> float:
    return max(RTOL[(p.dtype, adaptive)] for p in params)


@SETTINGS
@given(
    params=problems(),
    rho=st.floats(1e-3, 2.0),
    adaptive=st.booleans(),
    eta=st.sampled_from([0.01, 0.1, 1.0]),
)
def test_perturbation_norm_is_rho_and_restore_is_exact(params, rho, adaptive, eta):
    w = [bits(p) for p in params]
    w_exact = [p.detach().double().clone() for p in params]
    g_exact = [p.grad.double().clone() for p in params]
    backups = WeightBackup().buffers_for(params)
    norm, skipped = perturb_(params, backups, rho, adaptive=adaptive, eta=eta)
    assert not skipped
    e = [p.grad.double() for p in params]
    if adaptive:
        t = [wi.abs() + eta for wi in w_exact]
        measured = math.sqrt(sum(((ei / ti) ** 2).sum().item() for ei, ti in zip(e, t)))
        want_norm = math.sqrt(sum(((ti * gi) ** 2).sum().item() for ti, gi in zip(t, g_exact)))
    else:
        measured = math.sqrt(sum((ei**2).sum().item() for ei in e))
        want_norm = math.sqrt(sum((gi**2).sum().item() for gi in g_exact))
    rtol = rtol_for(params, adaptive)
    assert math.isclose(measured, rho, rel_tol=rtol), (measured, rho)
    assert math.isclose(norm.item(), want_norm, rel_tol=rtol), (norm.item(), want_norm)
    # The weights moved to w + e (up to the rounding of the addition in their dtype), and `backups` hold w exactly.
    for p, wi, ei, b in zip(params, w_exact, e, backups):
        torch.testing.assert_close(
            p.detach().double(), wi + ei, rtol=rtol, atol=rtol * (ei.abs().max().item() + 1e-30)
        )
        assert torch.equal(bits(b), bits(wi.to(p.dtype)))
    restore_(params, backups)
    for p, wi in zip(params, w):
        assert torch.equal(bits(p), wi)


@SETTINGS
@given(params=problems(), rho=st.floats(1e-3, 2.0), adaptive=st.booleans(), data=st.data())
def test_zero_or_non_finite_gradient_gives_no_perturbation(params, rho, adaptive, data):
    bad = data.draw(st.sampled_from(["zero", "nan", "inf", "-inf"]))
    with torch.no_grad():
        if bad == "zero":
            for p in params:
                p.grad.zero_()
        else:  # one element of one tensor
            target = params[data.draw(st.integers(0, len(params) - 1))].grad.view(-1)
            target[data.draw(st.integers(0, target.numel() - 1))] = float(bad)
    w = [bits(p) for p in params]
    backups = WeightBackup().buffers_for(params)
    norm, skipped = perturb_(params, backups, rho, adaptive=adaptive)
    assert skipped
    assert (norm == 0) if bad == "zero" else not torch.isfinite(norm)
    for p, wi in zip(params, w):
        assert torch.equal(bits(p), wi)  # w + 0, bit for bit
        assert torch.equal(p.grad, torch.zeros_like(p.grad)) and torch.isfinite(p.grad).all()  # e = 0 exactly
    restore_(params, backups)
    assert all(torch.equal(bits(p), wi) for p, wi in zip(params, w))


@SETTINGS
@given(params=problems(), factor=st.sampled_from([2.0**-4, 0.5, 4.0, 64.0]))
def test_sam_perturbation_ignores_a_constant_gradient_scale(params, factor):
    # GradScaler multiplies every gradient by a power of two; e must not change (up to the norm's rounding).
    scaled = [nn.Parameter(p.detach().clone()) for p in params]
    for p, q in zip(params, scaled):
        q.grad = p.grad * factor
    perturb_(params, WeightBackup().buffers_for(params), 0.1)
    perturb_(scaled, WeightBackup().buffers_for(scaled), 0.1)
    rtol = rtol_for(params, adaptive=False)
    for p, q in zip(params, scaled):
        torch.testing.assert_close(q.grad.double(), p.grad.double(), rtol=rtol, atol=rtol * 0.1)


@SETTINGS
@given(params=problems())
def test_global_norm_is_the_float64_norm(params):
    grads = [p.grad for p in params]
    want = math.sqrt(sum((g.double() ** 2).sum().item() for g in grads))
    got = global_norm(grads)
    # float32 accumulation for every dtype up to float32 (fp16 cannot overflow), float64 when a tensor is float64
    assert got.dtype == (torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32)
    assert math.isclose(got.item(), want, rel_tol=2e-6)
