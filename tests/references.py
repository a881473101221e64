"""Float64 references the trainer is compared with step by step: SAM / ASAM with SGD (Foret et al. 2021, Kwon et al.
2021) and SAM with AdamW, its direction optionally Adam-preconditioned. Written from the papers' formulas with
`torch.func`; no hf_sam code.

A reference takes the model (for its structure and frozen parameters) and the micro-batches each optimizer step sees
(`windows_of`), and returns the final trainable parameters, to compare with `testing_utils.assert_updates_close`.
References used by one file only (Friendly SAM, Momentum-SAM, Functional-SAM, TRL's losses) live in that file.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad

BETAS, EPS, LR = (0.9, 0.999), 1e-8, 1e-2  # the AdamW of the references (testing_utils.adam_args trains with it)


def windows_of(dataset, batch_size, accumulation_steps, steps):
    """The micro-batches a sequential sampler feeds, grouped per optimizer step."""
    ids = torch.tensor(dataset["input_ids"])
    micro = list(ids.split(batch_size))
    out, i = [], 0
    for _ in range(steps):
        window = []
        for _ in range(accumulation_steps):
            window.append(micro[i % len(micro)])
            i += 1
        out.append(window)
    return out


def window_loss(model, params, micro_batches, n_items):
    """Causal-LM loss of a gradient-accumulation window: summed token cross-entropy / tokens in the window."""
    total = 0.0
    for ids in micro_batches:
        logits = functional_call(model, params, (ids,)).logits.float()  # as the model's own loss does
        total = total + F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
    return total / n_items


def flat_norm(d):
    """The 2-norm of a dict of tensors taken as one vector."""
    return torch.sqrt(sum((v**2).sum() for v in d.values()))


def sam_perturbation(params, g, rho, adaptive, eta):
    if adaptive:  # e = rho T^2 g / ||T g||, T = |w| + eta
        t = {k: params[k].abs() + eta for k in g}
        norm = torch.sqrt(sum(((t[k] * g[k]) ** 2).sum() for k in g))
        return {k: rho * t[k] ** 2 * g[k] / norm for k in g}
    norm = torch.sqrt(sum((g[k] ** 2).sum() for k in g))  # e = rho g / ||g||
    return {k: rho * g[k] / norm for k in g}


def reference_sam_sgd(model, windows, lr, rho, adaptive=False, eta=0.01, accumulation="exact", clip=None):
    """Run SAM with SGD over `windows` (a list of lists of micro-batches); return the final trainable params."""
    params = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    frozen = {k: v.detach() for k, v in model.named_parameters() if not v.requires_grad}

    def loss(p, micro, n):
        return window_loss(model, {**frozen, **p}, micro, n)

    for micro_batches in windows:
        n_items = sum(ids[:, 1:].numel() for ids in micro_batches)
        groups = [micro_batches] if accumulation == "exact" else [[m] for m in micro_batches]
        sam_grad = {k: torch.zeros_like(v) for k, v in params.items()}
        for group in groups:  # "micro": one perturbation per micro-batch (m-sharpness)
            g = grad(loss)(params, group, n_items)
            e = sam_perturbation(params, g, rho, adaptive, eta)
            g_sam = grad(loss)({k: params[k] + e[k] for k in params}, group, n_items)
            sam_grad = {k: sam_grad[k] + g_sam[k] for k in params}
        if clip is not None:  # torch.nn.utils.clip_grad_norm_ semantics
            total = torch.sqrt(sum((v**2).sum() for v in sam_grad.values()))
            coef = torch.clamp(clip / (total + 1e-6), max=1.0)
            sam_grad = {k: v * coef for k, v in sam_grad.items()}
        params = {k: params[k] - lr * sam_grad[k] for k in params}
    return params


def reference_sam_adamw(model, windows, rho, preconditioned):
    """AdamW (no weight decay) stepping with grad L(w + e); e = rho d/||d||, d = g / (sqrt(v_hat) + eps) from the
    optimizer's state before this step (d = g when there is none yet), or d = g for plain SAM."""
    params = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    m = {k: torch.zeros_like(v) for k, v in params.items()}
    v = {k: torch.zeros_like(p) for k, p in params.items()}

    def loss(p, micro, n):
        return window_loss(model, p, micro, n)

    for t, micro_batches in enumerate(windows, start=1):
        n_items = sum(ids[:, 1:].numel() for ids in micro_batches)
        g = grad(loss)(params, micro_batches, n_items)
        if preconditioned and t > 1:
            bc2 = 1 - BETAS[1] ** (t - 1)
            d = {k: g[k] / ((v[k] / bc2).sqrt() + EPS) for k in g}
        else:
            d = g
        norm = torch.sqrt(sum((d[k] ** 2).sum() for k in d))
        g_sam = grad(loss)({k: params[k] + rho * d[k] / norm for k in params}, micro_batches, n_items)
        for k in params:
            m[k] = BETAS[0] * m[k] + (1 - BETAS[0]) * g_sam[k]
            v[k] = BETAS[1] * v[k] + (1 - BETAS[1]) * g_sam[k] ** 2
            m_hat, v_hat = m[k] / (1 - BETAS[0] ** t), v[k] / (1 - BETAS[1] ** t)
            params[k] = params[k] - LR * m_hat / (v_hat.sqrt() + EPS)
    return params
