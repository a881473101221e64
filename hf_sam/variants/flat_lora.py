"""Flat-LoRA (Li, He, Li, Wang, Shang, Huang, ICML 2025, arXiv 2409.14396): random perturbation of the full weight.

Perturb the frozen full weight W under each LoRA adapter with random noise whose rows are scaled to W's rows,

    eps_i ~ N(0, sigma^2 ||W_i||^2 / n I),    n = fan-in,

and take one pass at W + eps (the adapters train as usual). The noise is regenerated from a per-step seed in backward,
so it is never stored and W itself is never written. `rho` is sigma; `rho_schedule="cosine_ramp"` gives the paper's
ramp. Cost: one pass plus two normal draws per adapted weight.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..validation import require
from .base import SAMVariant, StepContext, StepKind

__all__ = ["FlatLoRA", "NoisyLinearFunction", "flat_lora_noise", "flat_lora_seed"]

CITATION = """@inproceedings{li2025flatlora,
    title     = {Flat-LoRA: Low-Rank Adaptation over a Flat Loss Landscape},
    author    = {Tao Li and Zhengbao He and Yujun Li and Yasheng Wang and Lifeng Shang and Xiaolin Huang},
    booktitle = {International Conference on Machine Learning},
    year      = {2025},
    url       = {https://arxiv.org/abs/2409.14396}
}"""


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


def _noisy_linear_forward(layer: nn.Linear, seed: int, sigma: float, x: torch.Tensor) -> torch.Tensor:
    return NoisyLinearFunction.apply(x, layer.weight, layer.bias, seed, sigma)


def flat_lora_layers(model: nn.Module) -> list[nn.Linear]:
    """The frozen `nn.Linear` base layers under the model's LoRA adapters; raises when there is nothing to perturb."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError as err:
        raise ValueError("`method='flat_lora'` (`--sam_method flat_lora`) needs `peft` installed.") from err
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            if type(base) is not nn.Linear:
                raise ValueError(
                    f"`method='flat_lora'` (`--sam_method flat_lora`) perturbs LoRA base weights of `nn.Linear` "
                    f"layers; `{name}` wraps a {type(base).__name__} (quantized or non-linear bases are not "
                    "supported). Use `method='sam'` for this model."
                )
            if base.weight.requires_grad:
                raise ValueError(
                    f"`method='flat_lora'` (`--sam_method flat_lora`) needs frozen LoRA base weights; `{name}` "
                    "has a trainable base weight."
                )
            layers.append(base)
    if not layers:
        raise ValueError(
            "`method='flat_lora'` (`--sam_method flat_lora`) needs a PEFT LoRA model; this model has no LoRA "
            "layer. Wrap it with `peft.get_peft_model(model, LoraConfig(...))` or use `method='sam'`."
        )
    return layers


class FlatLoRA(SAMVariant):
    """One pass at W + eps for every LoRA base weight; eps from a per-step seed, never stored."""

    name = "Flat-LoRA"
    summary = (
        "Flat-LoRA (Li et al. 2025): random perturbation of the frozen full weights under LoRA adapters (one pass, "
        "noise regenerated from a seed, `rho` is the noise scale sigma)."
    )
    citation = CITATION
    fsdp_unsupported = (
        "its noise is drawn per full weight matrix, and FSDP2 gathers the base weights only inside `forward` "
        "(untested here)."
    )

    @classmethod
    def validate(cls, config: Any) -> None:
        require(
            not config.adaptive and config.ascent_fraction == 1.0,
            "`method='flat_lora'` (`--sam_method flat_lora`) draws a random perturbation in one pass: it takes "
            f"no `adaptive` and no `ascent_fraction` < 1, got adaptive={config.adaptive}, "
            f"ascent_fraction={config.ascent_fraction}.",
        )

    def check_setup(self, ctx: StepContext) -> None:
        flat_lora_layers(ctx.model)  # raises now, before training, if there is nothing to perturb

    def step_kind(self, ctx: StepContext, sam_index: int) -> StepKind:
        return StepKind.ONE_PASS

    def one_pass(self, ctx: StepContext, model: Any, inputs: Any, num_items_in_batch: Any, rho: float) -> torch.Tensor:
        """The micro-batch's pass at W + eps; the noise lives in the autograd function, W is never written."""
        with contextlib.ExitStack() as stack:
            for index, layer in enumerate(flat_lora_layers(ctx.model)):
                seed = flat_lora_seed(ctx.seed, ctx.global_step, ctx.micro_index, index)
                layer.forward = functools.partial(_noisy_linear_forward, layer, seed, rho)
                stack.callback(layer.__dict__.pop, "forward", None)  # back to the class's forward
            return ctx.run_pass(model, inputs, num_items_in_batch)
