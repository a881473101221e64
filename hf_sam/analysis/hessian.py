"""The Hessian of the loss, seen through Hessian-vector products (double backward; PyHessian, arXiv 1912.07145).

- Top eigenvalues by power iteration: v <- H v / ||H v||, the Rayleigh quotient v^T H v converges to the eigenvalue of
  largest magnitude. It has converged when it changes by at most `tol` (relative) and the residual ||H v - l v|| is
  at most sqrt(tol) |l|. Further eigenvalues by deflation: each iterate is projected off the eigenvectors already
  found, so the iteration runs on the orthogonal complement (for a symmetric H this is H - sum_j l_j v_j v_j^T).
- Trace by Hutchinson's estimator: tr(H) = E[v^T H v] for Rademacher v (entries +-1), averaged over samples, with its
  standard error.

H is the Hessian of the weighted mean loss over the batches (weights: batch sizes), w.r.t. the chosen parameters.
Vectors are float32 and drawn on the CPU from a local `torch.Generator`, so results do not depend on the device and
the global RNG is never touched.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from ._core import (
    Evaluator,
    LossFn,
    check_number,
    dot,
    measured_parameters_and_batches,
    measurement_state,
    norm,
    progress_bar,
)

logger = logging.get_logger(__name__)

__all__ = ["HessianEigenResult", "HessianTraceResult", "hessian_eigenvalues", "hessian_trace"]


@dataclass
class HessianEigenResult:
    """The outcome of `hessian_eigenvalues`.

    Attributes:
        eigenvalues (`list[float]`): Eigenvalues by decreasing magnitude (signed).
        iterations (`list[int]`): Power iterations (each one Hessian-vector product over the data) per eigenvalue.
        converged (`list[bool]`): Whether each met the tolerance within `max_iter`.
        eigenvectors (`list[list[torch.Tensor]] | None`): Unit eigenvectors (float32, shaped like the parameters),
            when asked for.
    """

    eigenvalues: list[float]
    iterations: list[int]
    converged: list[bool]
    eigenvectors: list[list[torch.Tensor]] | None = field(default=None, repr=False)


@dataclass
class HessianTraceResult:
    """The outcome of `hessian_trace`.

    Attributes:
        trace (`float`): Hutchinson's estimate of tr(H).
        std_error (`float`): Its standard error (sample standard deviation / sqrt(samples)); nan for one sample.
        samples (`int`): Rademacher vectors used.
        values (`list[float]`): The individual v^T H v.
    """

    trace: float
    std_error: float
    samples: int
    values: list[float] = field(default_factory=list)


def _gaussian(params: list[nn.Parameter], generator: torch.Generator) -> list[torch.Tensor]:
    return [torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.device) for p in params]


def _rademacher(params: list[nn.Parameter], generator: torch.Generator) -> list[torch.Tensor]:
    out = []
    for p in params:
        bits = torch.randint(0, 2, p.shape, generator=generator, dtype=torch.int8)
        out.append((bits.to(torch.float32) * 2 - 1).to(p.device))
    return out


def _project_out(v: list[torch.Tensor], basis: list[list[torch.Tensor]]) -> None:
    for b in basis:
        torch._foreach_add_(v, b, alpha=-dot(v, b))


def hessian_eigenvalues(
    model: nn.Module,
    data: Any,
    *,
    k: int = 1,
    max_iter: int = 100,
    tol: float = 1e-3,
    seed: int = 0,
    return_eigenvectors: bool = False,
    space: str = "trainable",
    params: Iterable[nn.Parameter | str] | None = None,
    loss_fn: LossFn | None = None,
    batch_size: int | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    max_batches: int | None = None,
    progress: bool = True,
) -> HessianEigenResult:
    """The `k` eigenvalues of largest magnitude of the loss Hessian, by power iteration with deflation.

    Args:
        model (`nn.Module`): Any model whose forward returns a loss (or use `loss_fn`).
        data (`Any`): A `DataLoader`, an iterable of batches, one batch dict, or a dataset of examples.
        k (`int`, defaults to `1`): How many eigenvalues.
        max_iter (`int`, defaults to `100`): Power iterations per eigenvalue at most.
        tol (`float`, defaults to `1e-3`): Stop when the eigenvalue estimate changes by at most `tol` relative and the
            residual ||H v - l v|| is at most sqrt(`tol`) |l|.
        seed (`int`, defaults to `0`): Seed of the local generator for the starting vectors.
        return_eigenvectors (`bool`, defaults to `False`): Keep the eigenvectors in the result.
        space (`str`, defaults to `"trainable"`): `"trainable"` (adapter space for PEFT) or `"full"`.
        params (`Iterable[nn.Parameter | str]`, *optional*): Explicit parameters or names; overrides `space`.
        loss_fn (`Callable[[nn.Module, Any], torch.Tensor]`, *optional*): Loss of a batch (default: its `.loss`).
        batch_size (`int`, *optional*): Batch size when `data` is a dataset of examples.
        collate_fn (`Callable`, *optional*): Collator when `data` is a dataset of examples.
        max_batches (`int`, *optional*): Use at most this many batches.
        progress (`bool`, defaults to `True`): Show a progress bar.

    Returns:
        `HessianEigenResult`: eigenvalues, iteration counts, convergence flags (and eigenvectors).
    """
    check_number("k", k, integer=True)
    check_number("max_iter", max_iter, integer=True)
    check_number("tol", tol, strict=False)
    check_number("seed", seed, integer=True, strict=False)
    _, chosen, batches = measured_parameters_and_batches(
        model, data, space=space, params=params, batch_size=batch_size, collate_fn=collate_fn, max_batches=max_batches
    )
    size = sum(p.numel() for p in chosen)
    if k > size:
        raise ValueError(f"`k` must be at most the number of parameters measured ({size}); got {k}.")
    generator = torch.Generator().manual_seed(seed)
    eigenvalues, iterations, converged, vectors = [], [], [], []
    with (
        progress_bar(k * max_iter * len(batches), "Hessian eigenvalues", progress) as bar,
        measurement_state(model, chosen, grad=True, backup=False),
    ):
        evaluator = Evaluator(model, chosen, batches, loss_fn, bar)
        for index in range(k):
            v = _gaussian(chosen, generator)
            _project_out(v, vectors)
            torch._foreach_div_(v, norm(v))
            value, done, it = 0.0, False, 0
            for it in range(1, max_iter + 1):  # noqa: B007 - `it` is reported
                hv = evaluator.hvp([v], 1)[0]
                _project_out(hv, vectors)
                new = dot(hv, v)  # Rayleigh quotient of the unit vector v (v is orthogonal to `vectors`)
                residual = norm(torch._foreach_add(hv, v, alpha=-new))  # ||H v - new v||
                hv_norm = norm(hv)
                if not math.isfinite(hv_norm):
                    raise FloatingPointError(f"The Hessian-vector product is not finite (eigenvalue {index}).")
                if hv_norm == 0.0:  # v is in the null space: the remaining spectrum is 0 here
                    value, done = new, True
                    break
                torch._foreach_div_(hv, hv_norm)
                v = hv
                # Converged: the estimate has settled and v is an eigenvector to the matching accuracy (the
                # eigenvalue error is of order residual^2 / gap). The residual test catches a stall between two
                # eigenvalues of nearly equal magnitude, where the estimate moves slowly but v is no eigenvector.
                settled = abs(new - value) <= tol * max(abs(value), 1e-12)
                if it > 1 and settled and residual <= math.sqrt(tol) * max(abs(new), 1e-12):
                    value, done = new, True
                    break
                value = new
                bar.set_postfix_str(f"lambda_{index + 1}={value:.4g}")
            bar.update((max_iter - it) * len(batches))
            if not done:
                logger.warning(f"Hessian eigenvalue {index + 1} did not reach tol={tol} in {max_iter} iterations.")
            eigenvalues.append(value)
            iterations.append(it)
            converged.append(done)
            vectors.append(v)
    # Deflation finds them in decreasing magnitude only up to the tolerance: when two magnitudes nearly tie, the
    # first run can stop early on the smaller one. Report them sorted.
    order = sorted(range(k), key=lambda i: -abs(eigenvalues[i]))
    return HessianEigenResult(
        [eigenvalues[i] for i in order],
        [iterations[i] for i in order],
        [converged[i] for i in order],
        [vectors[i] for i in order] if return_eigenvectors else None,
    )


def hessian_trace(
    model: nn.Module,
    data: Any,
    *,
    samples: int = 100,
    seed: int = 0,
    space: str = "trainable",
    params: Iterable[nn.Parameter | str] | None = None,
    loss_fn: LossFn | None = None,
    batch_size: int | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    max_batches: int | None = None,
    progress: bool = True,
) -> HessianTraceResult:
    """Hutchinson's estimate of the loss Hessian's trace, E[v^T H v] over Rademacher vectors v.

    Each batch builds its gradient graph once and runs all `samples` Hessian-vector products on it; vector i is the
    same on every batch (it is regenerated from its own seed, so the vectors are never held all at once).

    Args:
        model (`nn.Module`): Any model whose forward returns a loss (or use `loss_fn`).
        data (`Any`): A `DataLoader`, an iterable of batches, one batch dict, or a dataset of examples.
        samples (`int`, defaults to `100`): Rademacher vectors.
        seed (`int`, defaults to `0`): Seed of the local generator.
        space (`str`, defaults to `"trainable"`): `"trainable"` (adapter space for PEFT) or `"full"`.
        params (`Iterable[nn.Parameter | str]`, *optional*): Explicit parameters or names; overrides `space`.
        loss_fn (`Callable[[nn.Module, Any], torch.Tensor]`, *optional*): Loss of a batch (default: its `.loss`).
        batch_size (`int`, *optional*): Batch size when `data` is a dataset of examples.
        collate_fn (`Callable`, *optional*): Collator when `data` is a dataset of examples.
        max_batches (`int`, *optional*): Use at most this many batches.
        progress (`bool`, defaults to `True`): Show a progress bar.

    Returns:
        `HessianTraceResult`: the estimate, its standard error and the individual samples.
    """
    check_number("samples", samples, integer=True)
    check_number("seed", seed, integer=True, strict=False)
    _, chosen, batches = measured_parameters_and_batches(
        model, data, space=space, params=params, batch_size=batch_size, collate_fn=collate_fn, max_batches=max_batches
    )
    seeds = torch.randint(0, 2**62, (samples,), generator=torch.Generator().manual_seed(seed)).tolist()

    def vector(i: int) -> list[torch.Tensor]:
        return _rademacher(chosen, torch.Generator().manual_seed(seeds[i]))

    with (
        progress_bar(len(batches), "Hessian trace", progress) as bar,
        measurement_state(model, chosen, grad=True, backup=False),
    ):
        forms = Evaluator(model, chosen, batches, loss_fn, bar).hvp(vector, samples)
    trace = float(forms.mean())
    std_error = float(forms.std() / math.sqrt(samples)) if samples > 1 else float("nan")
    return HessianTraceResult(trace, std_error, samples, forms.tolist())
