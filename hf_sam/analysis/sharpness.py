"""SAM sharpness: how much the loss rises within the rho-ball, max_{||e|| <= rho} L(w + e) - L(w).

The maximum is approached by normalised, projected gradient ascent. In the plain ball the iterate is e itself; in
the adaptive ball of ASAM (Kwon et al. 2021), ||T^{-1} e|| <= rho with T = |w| + eta elementwise, the ascent runs on
u = T^{-1} e, whose gradient is T g:

    u_0 = 0,   u_{t+1} = P_rho(u_t + s * d_t / ||d_t||),   d_t = g_t (plain) or T g_t (adaptive),   e_t = u_t or T u_t

with P_rho the projection onto the ball ||u|| <= rho and s the step size (default rho). One step gives SAM's (ASAM's)
own perturbation, e = rho g/||g|| (rho T^2 g/||T g||). The reported value is the largest L(w + e_t) - L(w) over the
iterates t = 1..steps: a lower bound on the true maximum, exact for one step of SAM's first-order solution. It can
be negative when the ascent overshoots (rho too large for a very curved loss), which is itself worth knowing.

m-sharpness (Foret et al. 2021; Andriushchenko & Flammarion 2022): each chunk of m examples gets its own
perturbation, and the sharpness is the average over chunks (weighted by chunk size).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from ._core import (
    Batches,
    Evaluator,
    LossFn,
    batch_size_of,
    check_number,
    measured_parameters_and_batches,
    measurement_state,
    norm,
    progress_bar,
    reference_weights,
    set_weights,
    split_batch,
)

logger = logging.get_logger(__name__)

__all__ = ["SharpnessResult", "sam_sharpness"]


@dataclass
class SharpnessResult:
    """The outcome of `sam_sharpness`.

    Attributes:
        sharpness (`float`): max_t L(w + e_t) - L(w) (averaged over chunks for m-sharpness).
        loss (`float`): L(w), the clean loss on the same data.
        perturbed_loss (`float`): L(w) + sharpness.
        rho (`float`): The radius.
        adaptive (`bool`): Whether the ball was ASAM's adaptive one.
        steps (`int`): Ascent steps.
        m (`int | None`): Examples per perturbation (m-sharpness), or None for one perturbation over all the data.
        values (`list[float]`): The sharpness of each chunk (one value without `m`).
    """

    sharpness: float
    loss: float
    perturbed_loss: float
    rho: float
    adaptive: bool
    steps: int
    m: int | None
    values: list[float] = field(default_factory=list)


def _ascent(
    evaluator: Evaluator,
    w0: list[torch.Tensor],
    scale: list[torch.Tensor] | None,
    rho: float,
    steps: int,
    step_size: float,
) -> tuple[float, float]:
    """Projected normalised ascent from w0 on the evaluator's batches; returns (L(w), max_t L(w + e_t)).

    Leaves the parameters at some w + e: the caller restores them.
    """
    params = evaluator.params
    u = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    clean = None
    best = float("-inf")
    for t in range(steps):
        loss, g = evaluator.gradient()
        if t == 0:
            clean = loss
        else:
            best = max(best, loss)
        if scale is not None:
            torch._foreach_mul_(g, scale)  # the gradient w.r.t. u = T^{-1} e is T g
        g_norm = norm(g)
        if not (g_norm > 0 and g_norm < float("inf")):
            logger.info(f"Sharpness ascent stopped at step {t}: the gradient norm is {g_norm}.")
            break
        torch._foreach_add_(u, g, alpha=step_size / g_norm)
        u_norm = norm(u)
        if u_norm > rho:
            torch._foreach_mul_(u, rho / u_norm)
        e = torch._foreach_mul(u, scale) if scale is not None else u
        set_weights(params, w0, [(1.0, [x.to(p.dtype) for x, p in zip(e, params)])])
    best = max(best, evaluator.loss())
    return clean, best


def sam_sharpness(
    model: nn.Module,
    data: Any,
    *,
    rho: float = 0.05,
    adaptive: bool = False,
    eta: float = 0.01,
    steps: int = 1,
    step_size: float | None = None,
    m: int | None = None,
    space: str = "trainable",
    params: Iterable[nn.Parameter | str] | None = None,
    loss_fn: LossFn | None = None,
    batch_size: int | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    max_batches: int | None = None,
    progress: bool = True,
) -> SharpnessResult:
    """SAM sharpness, max_{||e|| <= rho} L(w + e) - L(w), by `steps` projected normalised ascent steps.

    Args:
        model (`nn.Module`): Any model whose forward returns a loss (Hugging Face models with `labels` in the
            batch), or any module with `loss_fn`.
        data (`Any`): A `DataLoader`, an iterable of batches, one batch dict, or a dataset of examples.
        rho (`float`, defaults to `0.05`): Radius of the ball.
        adaptive (`bool`, defaults to `False`): ASAM's ball ||T^{-1} e|| <= rho, T = |w| + eta.
        eta (`float`, defaults to `0.01`): ASAM's offset.
        steps (`int`, defaults to `1`): Ascent steps (1: SAM's own first-order perturbation).
        step_size (`float`, *optional*): Ascent step length (in the ball's own coordinates); defaults to `rho`.
        m (`int`, *optional*): m-sharpness: a separate perturbation per chunk of `m` examples of each batch, averaged.
            Default: one perturbation from the gradient of all the data.
        space (`str`, defaults to `"trainable"`): `"trainable"` (adapter space for PEFT) or `"full"` (all weights,
            the merged weights for LoRA). See `select_parameters`.
        params (`Iterable[nn.Parameter | str]`, *optional*): Explicit parameters or names; overrides `space`.
        loss_fn (`Callable[[nn.Module, Any], torch.Tensor]`, *optional*): Loss of a batch (default: its `.loss`).
        batch_size (`int`, *optional*): Batch size when `data` is a dataset of examples.
        collate_fn (`Callable`, *optional*): Collator when `data` is a dataset of examples.
        max_batches (`int`, *optional*): Use at most this many batches.
        progress (`bool`, defaults to `True`): Show a progress bar.

    Returns:
        `SharpnessResult`: sharpness, clean and perturbed loss, and the per-chunk values.
    """
    check_number("rho", rho)
    check_number("eta", eta, strict=False)
    check_number("steps", steps, integer=True)
    if step_size is not None:
        check_number("step_size", step_size)
    if m is not None:
        check_number("m", m, integer=True)
    if not isinstance(adaptive, bool):
        raise ValueError(f"`adaptive` must be a bool; got {adaptive!r}.")
    _, chosen, batches = measured_parameters_and_batches(
        model, data, space=space, params=params, batch_size=batch_size, collate_fn=collate_fn, max_batches=max_batches
    )
    groups: list[tuple[Batches, float]] = [(batches, 1.0)]
    if m is not None:  # each chunk of m examples is its own loss, with its own perturbation
        groups = []
        for batch, weight in zip(batches.batches, batches.weights):
            chunks = split_batch(batch, m)
            sizes = [batch_size_of(c) for c in chunks]
            groups += [(Batches([c], [1.0]), weight * s / sum(sizes)) for c, s in zip(chunks, sizes)]
    values, cleans, weights = [], [], []
    with (
        progress_bar(sum(len(g) for g, _ in groups) * (steps + 1), "SAM sharpness", progress) as bar,
        measurement_state(model, chosen, grad=True, backup=True) as w0,
    ):
        scale = None
        if adaptive:
            scale = [r.abs().add_(eta).to(p.device) for r, p in zip(reference_weights(model, chosen), chosen)]
        for group, weight in groups:
            evaluator = Evaluator(model, chosen, group, loss_fn, bar)
            clean, best = _ascent(evaluator, w0, scale, rho, steps, rho if step_size is None else step_size)
            set_weights(chosen, w0, [])
            values.append(best - clean)
            cleans.append(clean)
            weights.append(weight)
    total = sum(weights)
    sharpness = sum(v * w for v, w in zip(values, weights)) / total
    loss = sum(c * w for c, w in zip(cleans, weights)) / total
    return SharpnessResult(sharpness, loss, loss + sharpness, float(rho), adaptive, steps, m, values)
