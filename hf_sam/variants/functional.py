"""Functional-SAM (Singh, Mobahi, Agarwala, Dauphin, ICML 2025, arXiv 2502.02407): keep SAM's functional path only.

With F(w) the model's logits and L(w) = l(F(w)), SAM's gradient at the perturbed weights splits by the chain rule:

    grad L(w + e) = J_F(w + e)^T  dl/dF(w + e)
                  = J_F(w + e)^T  dl/dF(w)   +   J_F(w + e)^T [dl/dF(w + e) - dl/dF(w)]
                    functional path              logit path

The paper finds the logit path dominating (and hurting) SAM on language models, and steps with the functional path
alone:

    e = rho g / ||g||,   g = grad L(w)                  (as SAM; Adam-preconditioned with `preconditioner="adam"`)
    update direction  = J_F(w + e)^T dl/dF(w)           (Jacobian at w + e, loss gradient from the clean pass)

Here, through autograd hooks where the gradient reaches the logits: the clean pass keeps the gradient that reaches
its logits in the Trainer's own backward (dl/dF(w), with the Trainer's loss scaling, one per micro-batch, in order),
and the perturbed pass replaces the gradient that reaches its logits by that one, so that its backward computes
J_F(w + e)^T dl/dF(w). The perturbed loss itself is unchanged (logged as `sam_perturbed_loss`); a loss term that
does not go through the logits (a MoE router loss) keeps its plain gradient at w + e.

Cost: SAM's two passes, plus dl/dF of each micro-batch held from its clean to its perturbed pass: batch x sequence x
vocabulary values (SmolLM2-135M, batch 2 x 128 tokens: 48 MiB in float32, 24 MiB with
`functional_grad_dtype="bfloat16"`). With `accumulation="exact"` the k micro-batches of a window are all held at
once before their perturbed passes; with `"micro"` one. TRL's fused LM head never builds the logits: during SAM
passes it is swapped for the plain head (the full logits, as the method needs them).
"""

from __future__ import annotations

import contextlib
import functools
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..validation import require
from .base import SAMVariant, Setting, StepContext, StepKind

__all__ = ["CITATION", "FunctionalSAM"]

# Also the paper of preconditioned SAM (`sam_preconditioner="adam"`, `hf_sam/preconditioned.py`).
CITATION = """@inproceedings{singh2025functionalsam,
    title     = {Avoiding spurious sharpness minimization broadens applicability of SAM},
    author    = {Sidak Pal Singh and Hossein Mobahi and Atish Agarwala and Yann Dauphin},
    booktitle = {International Conference on Machine Learning},
    year      = {2025},
    url       = {https://arxiv.org/abs/2502.02407}
}"""

GRAD_DTYPES = ("logits", "bfloat16")


def _no_logits_error(model: torch.nn.Module, output: Any) -> ValueError:
    what = f"keys {', '.join(output.keys())}" if isinstance(output, dict) else f"a {type(output).__name__}"
    return ValueError(
        "`method='functional'` (`--sam_method functional`) needs the model's logits, and the forward of "
        f"{type(model).__name__} returned no `logits` that require grad ({what}). A loss fused into the forward "
        "(Liger kernels, `use_liger_kernel=True`) or a model without logits cannot run Functional-SAM; use "
        "`method='sam'`."
    )


def _fused_temperature(forward: Callable) -> float:
    """The temperature of TRL's fused LM head (`add_fused_lm_head`) behind `forward`'s wrappers; 1.0 if not found."""
    for _ in range(8):
        function = getattr(forward, "__func__", forward)
        code = getattr(function, "__code__", None)
        if code is not None and "fused_lm_head" in code.co_varnames and "temperature" in code.co_freevars:
            return function.__closure__[code.co_freevars.index("temperature")].cell_contents
        forward = getattr(function, "__wrapped__", None) or getattr(function, "model_forward", None)
        if forward is None:
            break
    return 1.0


def _fused_output(forward: Callable, temperature: float, *args: Any, **kwargs: Any) -> tuple[Any, torch.Tensor]:
    """Answer `model(..., fused_lm_head=True)` (TRL's fused LM head, which never builds the logits) from the logits
    of the plain forward: the fields of TRL's `FusedCausalLMOutput`, and the logits they differentiate through."""
    from trl.trainer.utils import FusedCausalLMOutput

    labels, shift_labels = kwargs.pop("labels", None), kwargs.pop("shift_labels", None)
    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    out = forward(*args, **{**kwargs, "use_cache": False})  # no labels: the model computes no loss of its own
    if shift_labels is None:
        logits, labels = out.logits[:, :-1], labels[:, 1:]
    else:
        logits, labels = out.logits, shift_labels
    labels = labels.to(logits.device)
    mask = labels != -100
    z = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    logp = torch.log_softmax(z, dim=-1)
    log_probs = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1).masked_fill(~mask, 0)
    with torch.no_grad():
        entropy = -(logp.exp() * logp).sum(-1).masked_fill(~mask, 0)
        log_sum_sq_probs = torch.logsumexp(2 * logp, dim=-1).masked_fill(~mask, 0)
        mean_logits = z.mean(-1).masked_fill(~mask, 0)
        is_top1 = (z.argmax(-1) == labels) & mask
    loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
    output = FusedCausalLMOutput(
        loss=loss, log_probs=log_probs, entropy=entropy, log_sum_sq_probs=log_sum_sq_probs, mean_logits=mean_logits,
        is_top1=is_top1, label_mask=mask, aux_loss=getattr(out, "aux_loss", None),
    )  # fmt: skip
    return output, out.logits


@contextlib.contextmanager
def _captured_logits(model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """The logits (those that require grad) of every forward of `model` inside the block, in order.

    TRL's fused LM head is answered from the plain head meanwhile (`_fused_output`): the method needs the logits.
    """
    captured: list[torch.Tensor] = []
    previous, inner = model.__dict__.get("forward"), model.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        if kwargs.pop("fused_lm_head", False):
            output, logits = _fused_output(inner, _fused_temperature(inner), *args, **kwargs)
        else:
            output = inner(*args, **kwargs)
            logits = output.get("logits") if isinstance(output, dict) else None
        if not isinstance(logits, torch.Tensor):
            raise _no_logits_error(model, output)
        if logits.requires_grad:
            captured.append(logits)
        return output

    model.forward = forward
    try:
        yield captured
    finally:
        if previous is None:
            del model.__dict__["forward"]
        else:
            model.__dict__["forward"] = previous


def _gradient_slot(logits: torch.Tensor) -> tuple[Any, int]:
    """The autograd node and output index at which dl/dlogits arrives. Accelerate's mixed precision returns a float32
    copy of the logits that the model's own loss does not use: step back over such copies to the logits themselves."""
    node, index = logits.grad_fn, logits.output_nr
    while node is not None and type(node).__name__ == "ToCopyBackward0":
        node, index = node.next_functions[0]
    return node, index


class FunctionalSAM(SAMVariant):
    """SAM's perturbation; the perturbed pass backpropagates the clean pass's dl/dlogits through the logits at w+e."""

    name = "Functional-SAM"
    summary = (
        "Functional-SAM (Singh et al. 2025): SAM's perturbation, but the update is J_F(w+e)^T dL/dF(w), the "
        "Jacobian of the logits at the perturbed weights times the loss gradient w.r.t. the logits of the clean pass "
        "(no 'logit path'); two passes, dL/dF kept per micro-batch (batch x sequence x vocabulary)."
    )
    citation = CITATION
    settings = {
        "functional_grad_dtype": Setting(
            "logits",
            "Functional-SAM: dtype in which dL/dlogits is kept between a micro-batch's clean and perturbed passes "
            "(batch x sequence x vocabulary values each). 'logits': the logits' own dtype (exact); 'bfloat16': half "
            "the memory of float32 logits.",
            choices=GRAD_DTYPES,
        ),
    }
    fsdp_unsupported = "it rewrites the gradient that reaches the logits inside the backward, untested under FSDP2."

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.pending: deque[list[torch.Tensor | None]] = deque()  # dl/dF per clean pass, oldest first
        self.peak_bytes = 0  # the most bytes of dl/dF held at once (for the docs' memory figure)

    @classmethod
    def validate(cls, config: Any) -> None:
        require(
            config.ascent_fraction == 1.0,
            "`method='functional'` (`--sam_method functional`) reuses the clean pass's dL/dlogits in the perturbed "
            "pass, so both passes need the same examples: it takes no `ascent_fraction` < 1, got "
            f"ascent_fraction={config.ascent_fraction}.",
        )

    def begin_step(self, ctx: StepContext) -> None:
        self.pending.clear()  # nothing of an earlier step is still needed (one that raised may have left some)

    def compute_loss(self, ctx: StepContext, parent: Callable, model: Any, inputs: Any, *args: Any, **kwargs: Any):
        perturbed = ctx.in_perturbed_pass
        clean = not perturbed and ctx.kind is StepKind.TWO_PASS and torch.is_grad_enabled() and ctx.training
        if not (clean or perturbed):  # a plain step, evaluation
            return parent(model, inputs, *args, **kwargs)
        base = ctx.unwrap(model)
        base = base.get_base_model() if hasattr(base, "get_base_model") else base  # PEFT: the transformers model
        with _captured_logits(base) as captured:
            result = parent(model, inputs, *args, **kwargs)
        slots = [_gradient_slot(logits) for logits in captured]
        if clean:
            kept: list[torch.Tensor | None] = [None] * len(slots)
            self.pending.append(kept)
            for i, (node, index) in enumerate(slots):
                node.register_prehook(functools.partial(self._keep, kept, i, index))
            return result
        kept = self.pending.popleft() if self.pending else []
        if len(kept) != len(slots) or any(g is None for g in kept):
            raise RuntimeError(
                "Functional-SAM: the perturbed pass found no matching dL/dlogits from the clean pass (the loss does "
                "not depend on the logits the model returned, or the two passes called the model differently)."
            )
        for (node, index), grad, logits in zip(slots, kept, captured):
            if grad.shape != logits.shape:
                raise RuntimeError(
                    f"Functional-SAM: the perturbed pass's logits {tuple(logits.shape)} differ from the clean "
                    f"pass's {tuple(grad.shape)}: the two passes must see the same micro-batch."
                )
            node.register_prehook(functools.partial(_replace, grad, index))
        return result

    def _keep(self, kept: list[torch.Tensor | None], i: int, index: int, grads: tuple) -> None:
        """Clean pass: keep the gradient that reaches the logits (dl/dF(w), scaled as the Trainer scales the loss)."""
        grad = grads[index]
        if grad is None:  # no gradient reached the logits: the perturbed pass will say so
            return
        dtype = grad.dtype if self.config.functional_grad_dtype == "logits" else torch.bfloat16
        kept[i] = grad.detach().to(dtype)
        held = sum(g.numel() * g.element_size() for k in self.pending for g in k if g is not None)
        self.peak_bytes = max(self.peak_bytes, held)


def _replace(clean_grad: torch.Tensor, index: int, grads: tuple) -> tuple:
    """Perturbed pass: the gradient that reaches the logits at w + e becomes the clean pass's."""
    return tuple(
        (clean_grad if g is None else clean_grad.to(g.dtype)) if i == index else g for i, g in enumerate(grads)
    )
