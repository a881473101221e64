"""LookSAM (Liu, Mai, Chen, Hsieh, You, CVPR 2022, arXiv 2203.02714): full SAM every k steps, one pass in between.

On a full SAM step, with clean gradient g and SAM gradient g_s, keep the part of g_s orthogonal to g:

    g_v = g_s - ||g_s|| cos(g, g_s) g/||g|| = g_s - (g_s . u) u,      u = g/||g|| = e/rho

and on the k - 1 steps in between take one pass and step with  g + alpha (||g|| / ||g_v||) g_v.
Cost: 1 + 1/k passes per step. Settings: `looksam_interval` (k, default 5), `looksam_alpha` (alpha, default 0.7).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..perturbation import TensorKeyed, global_norm
from ..validation import check_int, require
from .base import SAMVariant, Setting

__all__ = ["LookSAM", "looksam_add_", "looksam_orthogonal_"]

CITATION = """@inproceedings{liu2022looksam,
    title     = {Towards Efficient and Scalable Sharpness-Aware Minimization},
    author    = {Yong Liu and Siqi Mai and Xiangning Chen and Cho-Jui Hsieh and Yang You},
    booktitle = {IEEE/CVF Conference on Computer Vision and Pattern Recognition},
    year      = {2022},
    url       = {https://arxiv.org/abs/2203.02714}
}"""


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

    def step_kind(self, trainer: Any, sam_index: int) -> str:
        refresh = sam_index % self.config.looksam_interval == 0 or not len(self.cache)
        return "sam" if refresh else "single"

    def single_pass(self, trainer: Any, model: Any, inputs: Any, num_items_in_batch: Any, rho: float) -> torch.Tensor:
        """One pass, then g <- g + alpha (||g||/||g_v||) g_v at the window's end."""
        loss = trainer._sam_parent_training_step(model, inputs, num_items_in_batch)
        if trainer.accelerator.sync_gradients:
            pairs = [
                (p.grad, self.cache[p]) for p in trainer._sam_listing(model) if p.grad is not None and p in self.cache
            ]
            if pairs:
                grads, g_v = zip(*pairs)
                looksam_add_(grads, g_v, self.config.looksam_alpha)
        return loss

    def after_sam_step(self, trainer: Any, params: list[torch.Tensor], e: list[torch.Tensor], rho: float) -> None:
        sam_grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        looksam_orthogonal_(e, sam_grads, rho)  # e becomes g_v
        self.cache = TensorKeyed()
        for p, g_v in zip(params, e):
            self.cache[p] = g_v

    def state_dict(self, names: dict[int, str]) -> dict[str, Any]:
        return {"looksam_cache": {names[id(p)]: g_v for p, g_v in self.cache.items() if id(p) in names}}

    def load_state_dict(self, state: dict[str, Any], params: dict[str, torch.Tensor]) -> None:
        self.cache = TensorKeyed()
        for name, g_v in state.get("looksam_cache", {}).items():
            self.cache[params[name]] = g_v.to(params[name].device)
