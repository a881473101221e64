"""Friendly SAM (Li, Zhou, He, Cheng, Huang, CVPR 2024, arXiv 2403.12350): perturb along the batch-specific noise.

SAM's perturbation direction g = grad L_B(w) is the full gradient plus the batch's stochastic noise; the paper finds
the full-gradient part harmful and removes an estimate of it, an exponential moving average m of past gradients:

    d_t = g_t - sigma m_{t-1}               e_t = rho d_t / ||d_t||
    m_t = lambda m_{t-1} + (1 - lambda) g_t

and steps with grad L_B(w + e_t) at w, as SAM does (two passes). Settings: `friendly_sigma` (sigma, default 1.0),
`friendly_lambda` (lambda, default 0.95, the default of the authors' `train.py`).

Pinned from the authors' code (nblt/F-SAM, `utils.py`, `FriendlySAM.first_step`): g is the clean gradient of the
first pass (the EMA never sees the perturbed gradient); d subtracts the EMA *before* this step's update (m_{t-1});
the first step has no EMA yet: it sets m_1 = g_1 (not (1 - lambda) g_1 from m_0 = 0) and perturbs along g_1 itself,
per parameter (a parameter first seen later starts its EMA then). The code divides by ||d|| + 1e-12; here a zero or
non-finite norm skips the perturbation, as for SAM. With gradient accumulation, `sam_accumulation="exact"` gives one
g (and one EMA update) per optimizer step from the whole window; `"micro"` one per micro-batch, as the authors'
`train_gradacc.py` does. Steps without SAM (`sam_interval`, `sam_start_fraction`) do not update the EMA. Extra
memory: m, one copy of the trainable parameters, saved in `sam_state.pt` so that a resumed run continues bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch

from ..perturbation import TensorKeyed
from ..validation import check_fraction, check_number, require
from .base import SAMVariant, Setting

__all__ = ["FriendlySAM", "friendly_direction_"]

CITATION = """@inproceedings{li2024friendly,
    title     = {Friendly Sharpness-Aware Minimization},
    author    = {Tao Li and Pan Zhou and Zhengbao He and Xinwen Cheng and Xiaolin Huang},
    booktitle = {IEEE/CVF Conference on Computer Vision and Pattern Recognition},
    year      = {2024},
    url       = {https://arxiv.org/abs/2403.12350}
}"""


@torch.no_grad()
def friendly_direction_(grads: list[torch.Tensor], emas: list[torch.Tensor], sigma: float, lam: float) -> None:
    """grads <- g - sigma m and m <- lambda m + (1 - lambda) g, in place, without temporaries.

    With d = g - sigma m the new average is lambda m + (1 - lambda)(d + sigma m) = (lambda + (1 - lambda) sigma) m
    + (1 - lambda) d: the same value, formed from d after g is overwritten.
    """
    torch._foreach_sub_(grads, emas, alpha=sigma)  # grads <- d
    torch._foreach_mul_(emas, lam + (1 - lam) * sigma)
    torch._foreach_add_(emas, grads, alpha=1 - lam)  # emas <- lambda m + (1 - lambda) g


class FriendlySAM(SAMVariant):
    """SAM whose perturbation direction is g - sigma m, m an EMA of the clean gradients."""

    name = "Friendly SAM"
    summary = (
        "Friendly SAM (Li et al. 2024): two passes; the perturbation follows g - `friendly_sigma` m, m an EMA "
        "(`friendly_lambda`) of past clean gradients, i.e. the batch's gradient noise rather than the full gradient."
    )
    citation = CITATION
    settings = {
        "friendly_sigma": Setting(
            1.0,
            "Friendly SAM: weight sigma of the gradient average subtracted from the gradient. Must be a finite number "
            ">= 0.",
            lambda n, v: check_number(n, v, allow_zero=True),
        ),
        "friendly_lambda": Setting(
            0.95,
            "Friendly SAM: decay lambda of the gradient EMA. Must be a number in [0, 1).",
            lambda n, v: check_fraction(n, v, low_open=False),
        ),
    }
    fsdp_unsupported = "its gradient average is kept per whole tensor, and FSDP2 holds shards (untested here)."

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.ema = TensorKeyed()  # parameter -> m, held weakly

    def check_setup(self, trainer: Any) -> None:
        super().check_setup(trainer)
        require(
            getattr(trainer.accelerator, "scaler", None) is None,
            "`method='friendly'` (`--sam_method friendly`) keeps an average of the gradients across steps, and fp16 "
            "mixed precision (`fp16=True`) scales them by GradScaler's changing loss scale. Use `bf16=True` or fp32, "
            "or `method='sam'`.",
        )

    def direction_(self, trainer: Any, params: list[torch.Tensor]) -> None:
        """`.grad` (g) becomes g - sigma m_{t-1}; m moves to lambda m_{t-1} + (1 - lambda) g."""
        grads, emas = [], []
        for p in params:
            m = self.ema.get(p)
            if m is None or m.shape != p.grad.shape:  # the first step of this parameter: m = g, direction g
                self.ema[p] = p.grad.detach().clone()
            else:
                grads.append(p.grad)
                emas.append(m)
        if grads:
            friendly_direction_(grads, emas, self.config.friendly_sigma, self.config.friendly_lambda)

    def state_dict(self, names: dict[int, str]) -> dict[str, Any]:
        return {"friendly_ema": {names[id(p)]: m for p, m in self.ema.items() if id(p) in names}}

    def load_state_dict(self, state: dict[str, Any], params: dict[str, torch.Tensor]) -> None:
        self.ema = TensorKeyed()
        for name, m in state.get("friendly_ema", {}).items():
            if name in params:
                self.ema[params[name]] = m.to(params[name].device)
