"""Preconditioned SAM (Singh, Mobahi, Agarwala, Dauphin, ICML 2025, arXiv 2502.02407; also Zhang, Li, Giannakis 2025,
arXiv 2501.06603): perturb along the optimizer's preconditioned gradient.

With Adam's diagonal preconditioner P = sqrt(v_hat) + eps, v_hat = v / (1 - beta2^t) its bias-corrected second-moment
estimate, the perturbation is

    e = rho * P^{-1} g / ||P^{-1} g||

so that the ascent step is taken in the geometry the optimizer descends in. Not a variant of its own: a direction
that `sam_method="sam"` and `"functional"` take with `sam_preconditioner="adam"` (`SAMVariant.direction_`). Before
the optimizer's first step there is no second moment yet: that step perturbs along g itself (plain SAM), as a
parameter without optimizer state does later.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers.training_args import OptimizerNames

__all__ = ["ADAM_OPTIMIZERS", "adam_precondition_", "adam_preconditioner_refusal"]

# `optim` values whose optimizer keeps Adam's `exp_avg_sq` per parameter, in full precision.
ADAM_OPTIMIZERS = tuple(
    OptimizerNames(name)
    for name in ("adamw_torch", "adamw_torch_fused", "adamw_torch_xla", "adamw_torch_npu_fused")
    if name in OptimizerNames._value2member_map_
)


def adam_preconditioner_refusal(optimizer: Any, optim: Any) -> str | None:
    """Why there is no Adam second moment to precondition with, or `None`.

    Args:
        optimizer: The built optimizer (possibly wrapped by Accelerate), or `None` before it is built.
        optim: `TrainingArguments.optim`, the optimizer that will be built.
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate wraps the optimizer
    if inner is not None:
        if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            return None
        what = f"the optimizer {type(inner).__name__}"
    elif optim in ADAM_OPTIMIZERS:
        return None
    else:
        what = f"`optim={getattr(optim, 'value', optim)!r}`"
    names = ", ".join(repr(o.value) for o in ADAM_OPTIMIZERS)
    return (
        "`preconditioner='adam'` (`--sam_preconditioner adam`) divides the perturbation by Adam's second-moment "
        f"estimate, which {what} does not keep. Use `optim` in {names} (or pass a `torch.optim.Adam`/`AdamW`), or "
        "`preconditioner='none'`."
    )


@torch.no_grad()
def adam_precondition_(grads: Sequence[torch.Tensor], params: Sequence[torch.Tensor], optimizer: Any) -> None:
    """grads <- g / (sqrt(v / (1 - beta2^t)) + eps), in place, from the Adam state of each parameter.

    A parameter without state (before the first optimizer step) keeps g. One tensor at a time: the temporary is the
    size of one parameter, not of all of them.
    """
    inner = getattr(optimizer, "optimizer", optimizer)
    group_of = {id(p): group for group in inner.param_groups for p in group["params"]}
    for g, p in zip(grads, params):
        state = inner.state.get(p)
        if not state or "exp_avg_sq" not in state or id(p) not in group_of:
            continue
        group = group_of[id(p)]
        beta2, eps = group["betas"][1], group["eps"]
        step = state["step"]
        v = state["exp_avg_sq"]
        v, g_local = (v.to_local() if hasattr(v, "to_local") else v), (g.to_local() if hasattr(g, "to_local") else g)
        # Bias correction on the device when the step count lives there (capturable/fused Adam): no host sync.
        correction = 1 - beta2 ** (step.to(v.device, torch.float32) if isinstance(step, torch.Tensor) else step)
        denom = (v / correction).sqrt_().add_(eps)
        g_local.div_(denom.to(g_local.dtype))
