"""The math of SAM's cheaper variants and schedules. No Trainer in here (see `perturbation.py` for SAM itself).

- LookSAM (Liu et al. 2022, arXiv 2203.02714). On a full SAM step with clean gradient g and SAM gradient g_s keep the
  part of g_s orthogonal to g,

      g_v = g_s - ||g_s|| cos(g, g_s) g/||g|| = g_s - (g_s . u) u,      u = g/||g|| = e/rho,

  and on the k-1 steps in between take one pass and use  g + alpha (||g|| / ||g_v||) g_v.
- Flat-LoRA (Li et al. 2025, arXiv 2409.14396). Perturb the frozen full weight W under a LoRA adapter with random
  noise whose rows are scaled to W's rows, eps_i ~ N(0, sigma^2 ||W_i||^2 / n I), n = fan-in. The noise is
  regenerated from a seed in backward, so it is never stored and W itself is never written.
- rho schedules: constant; following the learning rate between rho_min and rho (GSAM, Zhuang et al. 2022,
  arXiv 2203.08065); or a half-cosine ramp from rho_min to rho (Flat-LoRA's sigma schedule).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .perturbation import global_norm

__all__ = [
    "NoisyLinearFunction",
    "flat_lora_noise",
    "flat_lora_seed",
    "looksam_add_",
    "looksam_orthogonal_",
    "sam_step_index",
    "scheduled_rho",
]


# ---- LookSAM ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def looksam_orthogonal_(e: Sequence[torch.Tensor], sam_grads: Sequence[torch.Tensor], rho: float) -> None:
    """Turn the perturbation `e` (= rho g/||g||) into g_v = g_s - (g_s . u) u with u = e/rho, in place.

    Args:
        e (`Sequence[torch.Tensor]`): The perturbation of the full SAM step; overwritten with g_v.
        sam_grads (`Sequence[torch.Tensor]`): The SAM gradient g_s of the same step.
        rho (`float`): The radius that `e` was scaled to (a skipped step has e = 0, and then g_v = g_s).
    """
    dot = torch.stack([torch.vdot(g.reshape(-1).float(), v.reshape(-1).float()) for g, v in zip(sam_grads, e)]).sum()
    coef = -dot / rho**2  # (g_s . u) u = (g_s . e) e / rho^2
    for v, g in zip(e, sam_grads):
        v.mul_(coef.to(v.device)).add_(g)


@torch.no_grad()
def looksam_add_(grads: Sequence[torch.Tensor], g_v: Sequence[torch.Tensor], alpha: float) -> None:
    """grads <- g + alpha (||g|| / ||g_v||) g_v, in place; nothing is added when ||g_v|| is zero or not finite."""
    g_norm, v_norm = global_norm(grads), global_norm(g_v)
    ok = torch.isfinite(v_norm) & (v_norm > 0)
    scale = torch.where(ok, alpha * g_norm / v_norm, torch.zeros_like(v_norm))
    for g, v in zip(grads, g_v):
        g.addcmul_(v, scale.to(g.device, g.dtype))


# ---- Flat-LoRA -------------------------------------------------------------------------------------------------
def flat_lora_noise(weight: torch.Tensor, seed: int, sigma: float) -> torch.Tensor:
    """Random perturbation of a 2-D weight with rows scaled to the weight's rows: sigma ||W_i|| / sqrt(n) z_i.

    Args:
        weight (`torch.Tensor`): The frozen weight W (out_features x in_features).
        seed (`int`): Seed of the generator; the same seed gives the same noise.
        sigma (`float`): Relative noise scale.

    Returns:
        `torch.Tensor`: The noise, in W's dtype and on W's device.
    """
    generator = torch.Generator(device=weight.device).manual_seed(seed)
    z = torch.randn(weight.shape, generator=generator, device=weight.device, dtype=torch.float32)
    row_scale = weight.detach().float().norm(dim=1, keepdim=True) * (sigma / math.sqrt(weight.shape[1]))
    return (z * row_scale).to(weight.dtype)


def flat_lora_seed(seed: int, step: int, micro_batch: int, layer: int) -> int:
    """The noise seed of one layer on one micro-batch of one optimizer step: reproducible, resumable, distinct."""
    return (((seed * 1_000_003 + step) * 1_009 + micro_batch) * 7_919 + layer) % (2**63 - 1)


class NoisyLinearFunction(torch.autograd.Function):
    """y = x (W + eps)^T + b for a frozen W, with eps regenerated from its seed in backward (never stored)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, seed: int, sigma: float):
        ctx.save_for_backward(weight)
        ctx.seed, ctx.sigma, ctx.x_dtype = seed, sigma, x.dtype
        noisy = weight + flat_lora_noise(weight, seed, sigma)
        return F.linear(x, noisy, bias)  # autocast, if on, casts as for any linear

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (weight,) = ctx.saved_tensors
        noisy = weight + flat_lora_noise(weight, ctx.seed, ctx.sigma)
        grad_x = grad_out.matmul(noisy.to(grad_out.dtype)).to(ctx.x_dtype)
        return grad_x, None, None, None, None


# ---- Schedules -------------------------------------------------------------------------------------------------
def scheduled_rho(
    schedule: str, rho: float, rho_min: float, learning_rate: float, base_learning_rate: float, progress: float
) -> float:
    """The radius for this step.

    Args:
        schedule (`str`): `"constant"`, `"lr"` (rho_min + (rho - rho_min) lr/lr_0) or `"cosine_ramp"`
            (rho_min + (rho - rho_min)(1 - cos(pi progress))/2).
        rho (`float`): The radius (the top of a schedule).
        rho_min (`float`): The bottom of a schedule.
        learning_rate (`float`): The learning rate of this step.
        base_learning_rate (`float`): The configured (peak) learning rate lr_0.
        progress (`float`): Fraction of training done, in [0, 1].
    """
    if schedule == "constant":
        return rho
    if schedule == "lr":
        ratio = learning_rate / base_learning_rate if base_learning_rate > 0 else 1.0
        return rho_min + (rho - rho_min) * min(max(ratio, 0.0), 1.0)
    if schedule == "cosine_ramp":
        return rho_min + (rho - rho_min) * (1 - math.cos(math.pi * min(max(progress, 0.0), 1.0))) / 2
    raise ValueError(f"`rho_schedule` must be one of 'constant', 'lr', 'cosine_ramp', got {schedule!r}.")


def sam_step_index(step: int, max_steps: int, start_fraction: float, interval: int) -> int | None:
    """Which SAM step optimizer step `step` (0-based) is, or `None` for a plain step.

    SAM runs from `start_fraction` of `max_steps` on (late-phase SAM), on every `interval`-th step.
    """
    start = math.ceil(start_fraction * max_steps)
    if step < start or (step - start) % interval:
        return None
    return (step - start) // interval
