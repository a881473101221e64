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
g (and one EMA update) per optimizer step from the whole window; `"micro"` one per micro-batch (the authors'
`train_gradacc.py`, branch `grad_accumulate`, also updates the average once per micro-batch; unlike it, each
micro-batch's perturbation is undone before the next micro-batch's clean pass, and the SAM gradients accumulate as
the Trainer accumulates any gradient). Steps without SAM (`sam_interval`, `sam_start_fraction`) do not update the EMA.

The average follows the transaction rule: a step's updates go to a staged copy that becomes the average only when the
step completes, so a step that is interrupted or raises leaves it as it was; and a clean gradient that is not finite
leaves it unchanged (its perturbation is skipped too), decided on the device. Extra memory: m and its staged copy,
two copies of the trainable parameters; m is saved in `sam_state.pt` so that a resumed run continues bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch

from ..perturbation import TensorKeyed, global_norm
from ..validation import check_fraction, check_number, require
from .base import SAMVariant, Setting, StateError, StepContext, fitting_entries

__all__ = ["FriendlySAM", "friendly_direction_"]

CITATION = """@inproceedings{li2024friendly,
    title     = {Friendly Sharpness-Aware Minimization},
    author    = {Tao Li and Pan Zhou and Zhengbao He and Xinwen Cheng and Xiaolin Huang},
    booktitle = {IEEE/CVF Conference on Computer Vision and Pattern Recognition},
    year      = {2024},
    url       = {https://arxiv.org/abs/2403.12350}
}"""


@torch.no_grad()
def friendly_direction_(
    grads: list[torch.Tensor],
    emas: list[torch.Tensor],
    sigma: float,
    lam: float,
    present: list[torch.Tensor] | None = None,
) -> None:
    """grads <- g - sigma m and m <- lambda m + (1 - lambda) g, in place.

    Args:
        grads: The clean gradients g, overwritten with the directions d.
        emas: The averages m, updated in place.
        sigma, lam: sigma and lambda.
        present: Per parameter, a 0-dim bool on the device: whether it has an average yet. Where it has none, m must
            be zero: the direction is g itself and the average becomes g (the authors' first step). Defaults to all.

    When some g is not finite, no average changes and `present` stays as it was (d is then not finite: the
    perturbation is skipped). Decided on the device, without reading anything back.
    """
    finite = torch.isfinite(global_norm(grads))
    torch._foreach_sub_(grads, emas, alpha=sigma)  # d = g - sigma m (= g where m is still 0)
    for i, (d, m) in enumerate(zip(grads, emas)):
        # m_t = lambda m + (1 - lambda) g = (lambda + (1 - lambda) sigma) m + (1 - lambda) d, formed from d
        updated = torch.add(m * (lam + (1 - lam) * sigma), d, alpha=1 - lam)
        if present is not None:
            updated = torch.where(present[i], updated, d)
            present[i].logical_or_(finite)
        m.copy_(torch.where(finite.to(m.device), updated, m))


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
        # parameter -> [[m, present], [m, present]], the committed pair at `self._committed`, the other one staged
        self._slots = TensorKeyed()
        self._committed = TensorKeyed()  # parameter -> 0 or 1
        self._staged: dict[int, torch.Tensor] | None = None  # id -> parameter whose staged pair this step holds

    def check_setup(self, ctx: StepContext) -> None:
        super().check_setup(ctx)
        require(
            not ctx.loss_scaled,
            "`method='friendly'` (`--sam_method friendly`) keeps an average of the gradients across steps, and fp16 "
            "mixed precision (`fp16=True`) scales them by GradScaler's changing loss scale. Use `bf16=True` or fp32, "
            "or `method='sam'`.",
        )

    def begin_step(self, ctx: StepContext) -> None:
        self._staged = None  # what an unfinished step staged is dropped

    def _stage(self, params: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """This step's (m, present) for each parameter: at the step's first use a copy of the committed ones (zero and
        absent for a parameter seen for the first time), in buffers kept from step to step."""
        staged = {} if self._staged is None else self._staged
        new = [p for p in params if id(p) not in staged]
        sources, targets = [], []
        for p in new:
            slot = self._slots.get(p)
            if slot is None or slot[0][0].shape != p.grad.shape:
                zero = torch.zeros_like(p.grad)
                absent = torch.zeros((), dtype=torch.bool, device=p.grad.device)
                slot = [[zero, absent], [zero.clone(), absent.clone()]]
                self._slots[p] = slot
                self._committed[p] = 0
            c = self._committed[p]
            sources += slot[c]
            targets += slot[1 - c]
        if sources:
            torch._foreach_copy_(targets, sources)
        staged.update((id(p), p) for p in new)
        self._staged = staged
        pairs = [self._slots[p][1 - self._committed[p]] for p in params]
        return [m for m, _ in pairs], [present for _, present in pairs]

    def direction_(self, ctx: StepContext, params: list[torch.Tensor]) -> None:
        """`.grad` (g) becomes g - sigma m_{t-1}; the staged m moves to lambda m_{t-1} + (1 - lambda) g."""
        emas, present = self._stage(params)
        friendly_direction_(
            [p.grad for p in params], emas, self.config.friendly_sigma, self.config.friendly_lambda, present
        )

    def commit(self, ctx: StepContext) -> None:
        for p in (self._staged or {}).values():
            self._committed[p] = 1 - self._committed[p]
        self._staged = None

    def _averages(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(parameter, m, present) of the committed averages."""
        return [(p, *slot[self._committed[p]]) for p, slot in self._slots.items()]

    def state_dict(self, names: dict[int, str]) -> dict[str, Any]:
        # A parameter whose average is not there yet (its first gradient was not finite) is saved as absent.
        return {
            "friendly_ema": {names[id(p)]: m for p, m, _ in self._averages() if id(p) in names},
            "friendly_present": {names[id(p)]: present for p, _, present in self._averages() if id(p) in names},
        }

    def load_state_dict(self, state: dict[str, Any], params: dict[str, torch.Tensor]) -> list[str]:
        fits, misfits = fitting_entries(state, "friendly_ema", params, "Friendly SAM's average")
        present = state.get("friendly_present", {})
        if not isinstance(present, dict):
            raise StateError("`friendly_present` is not a mapping of parameter names to booleans")
        self._slots, self._committed, self._staged = TensorKeyed(), TensorKeyed(), None
        for name, (p, m) in fits.items():  # each parameter's average stands alone: a misfit starts afresh by itself
            m = m.to(device=p.device, dtype=p.dtype)
            has = torch.as_tensor(present.get(name, True), dtype=torch.bool, device=p.device).reshape(())
            self._slots[p] = [[m, has], [m.clone(), has.clone()]]
            self._committed[p] = 0
        return misfits
