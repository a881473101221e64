"""LookSAM (Liu, Mai, Chen, Hsieh, You, CVPR 2022, arXiv 2203.02714): full SAM every k steps, one pass in between.

On a full SAM step, with clean gradient g and SAM gradient g_s, keep the part of g_s orthogonal to g:

    g_v = g_s - ||g_s|| cos(g, g_s) g/||g|| = g_s - (g_s . u) u,      u = g/||g|| = e/rho

and on the k - 1 steps in between take one pass and step with  g + alpha (||g|| / ||g_v||) g_v.
Cost: 1 + 1/k passes per step. Settings: `looksam_interval` (k, default 5), `looksam_alpha` (alpha, default 0.7).

The cache follows the transaction rule: a full step's g_v is staged and replaces the cache only when the step
completes; a step whose perturbation was skipped (a clean gradient that is not finite) or whose g_v is not finite
keeps the previous cache, decided on the device. Before the first valid g_v the cache is zero, and a one-pass step
adds nothing: the host, which picks between one and two passes, cannot see a skip without a synchronisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..perturbation import TensorKeyed, global_norm
from ..validation import check_int, require
from .base import SAMVariant, Setting, StepContext, StepKind, fitting_entries

__all__ = ["LookSAM", "looksam_add_", "looksam_orthogonal_"]

CITATION = """@inproceedings{liu2022looksam,
    title     = {Towards Efficient and Scalable Sharpness-Aware Minimization},
    author    = {Yong Liu and Siqi Mai and Xiangning Chen and Cho-Jui Hsieh and Yang You},
    booktitle = {IEEE/CVF Conference on Computer Vision and Pattern Recognition},
    year      = {2022},
    url       = {https://arxiv.org/abs/2203.02714}
}"""


@torch.no_grad()
def looksam_orthogonal_(e: Sequence[torch.Tensor], sam_grads: Sequence[torch.Tensor], rho: float) -> torch.Tensor:
    """Turn the perturbation `e` (= rho g/||g||) into g_v = g_s - (g_s . u) u with u = e/rho, in place.

    Args:
        e (`Sequence[torch.Tensor]`): The perturbation of the full SAM step; overwritten with g_v.
        sam_grads (`Sequence[torch.Tensor]`): The SAM gradient g_s of the same step.
        rho (`float`): The radius that `e` was scaled to (a skipped step has e = 0, and then g_v = g_s).

    Returns:
        `torch.Tensor`: g_s . e, in float32 or, for float64 tensors, float64 (as `global_norm`): the caller can tell a
        non-finite g_v from it.
    """
    parts = []
    for g, v in zip(sam_grads, e):
        dtype = torch.promote_types(g.dtype, torch.float32)  # float64 stays float64: the parameters' precision
        parts.append(torch.vdot(g.reshape(-1).to(dtype), v.reshape(-1).to(dtype)).to(e[0].device))
    common = torch.float64 if any(d.dtype == torch.float64 for d in parts) else torch.float32
    dot = torch.stack([d.to(common) for d in parts]).sum()
    coef = -dot / rho**2  # (g_s . u) u = (g_s . e) e / rho^2
    for v, g in zip(e, sam_grads):
        v.mul_(coef.to(v.device, v.dtype)).add_(g)
    return dot


@torch.no_grad()
def looksam_add_(grads: Sequence[torch.Tensor], g_v: Sequence[torch.Tensor], alpha: float) -> None:
    """grads <- g + alpha (||g|| / ||g_v||) g_v, in place; nothing is added when ||g_v|| is zero or not finite."""
    g_norm, v_norm = global_norm(grads), global_norm(g_v)
    ok = torch.isfinite(v_norm) & (v_norm > 0)
    scale = torch.where(ok, alpha * g_norm / v_norm, torch.zeros_like(v_norm))
    for g, v in zip(grads, g_v):
        g.addcmul_(v, scale.to(g.device, g.dtype))


class LookSAM(SAMVariant):
    """Full SAM every `looksam_interval` steps; in between one pass plus the cached orthogonal component."""

    name = "LookSAM"
    summary = (
        "LookSAM (Liu et al. 2022): full SAM every `looksam_interval` steps, one pass in between that reuses the "
        "cached component of the SAM gradient orthogonal to the gradient."
    )
    citation = CITATION
    settings = {
        "looksam_interval": Setting(
            5, "LookSAM: steps between full SAM steps (k). Must be an integer >= 1.", lambda n, v: check_int(n, v, 1)
        ),
        "looksam_alpha": Setting(
            0.7, "LookSAM: weight of the reused orthogonal component. Must be a finite number >= 0."
        ),
    }
    fsdp_unsupported = (
        "its cached gradient component and its dot products act on whole tensors, and FSDP2 holds shards."
    )
    keeps_perturbation = True

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.cache = TensorKeyed()  # parameter -> g_v, held weakly
        self._staged: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # this step's (parameter, g_v)

    @classmethod
    def validate(cls, config: Any) -> None:
        # The cached component lives on every process and is added to the synchronised gradient: it must be the same
        # everywhere, and it is defined for the plain SAM direction of the whole batch.
        require(
            not config.adaptive
            and config.accumulation == "exact"
            and config.sync == "global"
            and config.interval == 1,
            "`method='looksam'` (`--sam_method looksam`) needs `adaptive=False`, `accumulation='exact'`, "
            f"`sync='global'` and `interval=1`, got adaptive={config.adaptive}, "
            f"accumulation={config.accumulation!r}, sync={config.sync!r}, interval={config.interval}.",
        )

    def step_kind(self, ctx: StepContext, sam_index: int) -> StepKind:
        refresh = sam_index % self.config.looksam_interval == 0 or not len(self.cache)
        return StepKind.TWO_PASS if refresh else StepKind.ONE_PASS

    def begin_step(self, ctx: StepContext) -> None:
        self._staged = None

    def one_pass(self, ctx: StepContext, model: Any, inputs: Any, num_items_in_batch: Any, rho: float) -> torch.Tensor:
        """One pass, then g <- g + alpha (||g||/||g_v||) g_v at the step's last micro-batch."""
        loss = ctx.run_pass(model, inputs, num_items_in_batch)
        if ctx.is_last_micro_batch:
            pairs = [(p.grad, self.cache[p]) for p in ctx.trainable(model) if p.grad is not None and p in self.cache]
            if pairs:
                grads, g_v = zip(*pairs)
                looksam_add_(grads, g_v, self.config.looksam_alpha)
        return loss

    def after_perturbed_pass(
        self, ctx: StepContext, params: list[torch.Tensor], e: list[torch.Tensor], rho: float, skipped: torch.Tensor
    ) -> None:
        if not params:
            return
        sam_grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        dot = looksam_orthogonal_(e, sam_grads, rho)  # e becomes g_v
        valid = ~skipped.to(dot.device) & torch.isfinite(dot)
        for p, g_v in zip(params, e):
            previous = self.cache.get(p)
            keep = previous if previous is not None and previous.shape == g_v.shape else torch.zeros_like(g_v)
            torch.where(valid.to(g_v.device), g_v, keep, out=g_v)
        self._staged = list(zip(params, e))

    def commit(self, ctx: StepContext) -> None:
        if self._staged is not None:
            self.cache = TensorKeyed()
            for p, g_v in self._staged:
                self.cache[p] = g_v
        self._staged = None

    def state_dict(self, names: dict[int, str]) -> dict[str, Any]:
        return {"looksam_cache": {names[id(p)]: g_v for p, g_v in self.cache.items() if id(p) in names}}

    def load_state_dict(self, state: dict[str, Any], params: dict[str, torch.Tensor]) -> list[str]:
        fits, misfits = fitting_entries(state, "looksam_cache", params, "LookSAM's cached component")
        self.cache, self._staged = TensorKeyed(), None
        if misfits:  # g_v is one direction over all parameters: a part of it is not the step's component
            return [*misfits, "LookSAM's cache is started afresh (its next step is a full SAM step)"]
        for p, g_v in fits.values():
            self.cache[p] = g_v.to(device=p.device, dtype=p.dtype)
        return []
