"""When SAM runs and how far it looks: step schedules, rho schedules and partial-batch ascent. No Trainer in here.

These combine with every method (`sam_method`), so they are part of the step plan rather than variants:

- Late-phase SAM (Zhou et al. 2024, arXiv 2410.10373): plain steps first, SAM from `start_fraction` of training on.
- Periodic SAM: SAM on every `interval`-th step only.
- rho schedules: constant; following the learning rate between rho_min and rho (GSAM, Zhuang et al. 2022,
  arXiv 2203.08065); or a half-cosine ramp from rho_min to rho (Flat-LoRA's sigma schedule).
- Partial-batch ascent (Bahri, Mobahi, Tay 2022, arXiv 2110.08529): the perturbation from a leading fraction of each
  micro-batch.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["leading_fraction", "sam_step_index", "scheduled_rho"]


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


def leading_fraction(inputs: dict[str, Any], fraction: float) -> tuple[dict[str, Any], float]:
    """The first ceil(fraction * batch) examples of every batched tensor, and the kept share of the batch."""
    sizes = {v.shape[0] for v in inputs.values() if isinstance(v, torch.Tensor) and v.dim() > 0}
    if len(sizes) != 1:
        return inputs, 1.0  # no single batch dimension to slice: ascend on the whole micro-batch
    (batch,) = sizes
    keep = max(1, math.ceil(batch * fraction))
    sliced = {k: v[:keep] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in inputs.items()}
    return sliced, keep / batch
