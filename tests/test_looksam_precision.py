"""LookSAM's orthogonal component is computed in the parameters' precision (float64 stays float64), like
`global_norm`."""

from __future__ import annotations

import torch

from hf_sam.variants import looksam_orthogonal_


def _reference(e, sam_grads, rho):
    """g_v = g_s - (g_s . u) u with u = e / rho, in float64 from the formula."""
    u = [v.double() / rho for v in e]
    dot = sum((g.double() * w).sum() for g, w in zip(sam_grads, u))
    return [g.double() - dot * w for g, w in zip(sam_grads, u)]


def test_float64_parameters_keep_float64_precision():
    torch.manual_seed(0)
    rho = 0.05
    g = [torch.randn(300, 200, dtype=torch.float64), torch.randn(1000, dtype=torch.float64)]
    norm = torch.sqrt(sum((t**2).sum() for t in g))
    e = [rho * t / norm for t in g]
    sam_grads = [t + 0.3 * torch.randn_like(t) for t in g]
    want = _reference(e, sam_grads, rho)
    got = [v.clone() for v in e]
    dot = looksam_orthogonal_(got, sam_grads, rho)
    assert dot.dtype == torch.float64
    error = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(got, want))
    assert error < 1e-12, error
    # The control: the same computation with the dot product in float32 (what the code did before) is far off.
    in_float32 = sum(torch.vdot(s.reshape(-1).float(), v.reshape(-1).float()) for s, v in zip(sam_grads, e))
    coarse = [s - (in_float32.double() / rho**2) * v for s, v in zip(sam_grads, e)]
    coarse_error = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(coarse, want))
    assert coarse_error > 1e3 * max(error, 1e-16), coarse_error


def test_float32_parameters_are_unchanged_in_dtype():
    torch.manual_seed(1)
    e = [torch.randn(50) * 0.01]
    sam_grads = [torch.randn(50)]
    got = [e[0].clone()]
    looksam_orthogonal_(got, sam_grads, 0.05)
    assert got[0].dtype == torch.float32
    torch.testing.assert_close(got[0].double(), _reference(e, sam_grads, 0.05)[0], rtol=1e-5, atol=1e-6)
