"""Loss landscapes (Li et al. 2018, arXiv 1712.09913): the loss along lines and planes through the weights.

- `interpolate`: L((1 - a) w_A + a w_B), the straight line between two solutions (a = 0 is `model`, 1 is `other`).
- `random_landscape`: L(w + a d1) (1-D) or L(w + a d1 + b d2) (2-D) along random Gaussian directions, made
  comparable across models by *filter normalisation*: each filter of d (a row, i.e. the slice along dimension 0: an
  output channel of a convolution or linear layer, a token row of an embedding) is rescaled to the norm of the
  matching filter of w, d_i <- d_i ||w_i|| / ||d_i|| (GPT-2's `Conv1D` stores (in, out): its filters are columns).
  1-D parameters (biases, normalisation scales) get a zero direction by default, as in the paper's plots (their
  code's `--xignore biasbn`); `ignore_1d=False` sets the direction of a 1-D parameter to the parameter itself, as
  their code otherwise does. `normalization="layer"` rescales each whole tensor instead of each filter.

In the full space of a LoRA model the base weights move and the rows are scaled to the merged weight W + BA. In the
adapter space, LoRA's B starts at zero, so an untrained adapter's B rows get zero directions (filter normalisation
scales to the weight, and there is none yet).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from ._core import (
    Evaluator,
    LossFn,
    check_choice,
    check_number,
    measured_parameters_and_batches,
    measurement_state,
    prepare_batches,
    progress_bar,
    reference_weights,
    select_parameters,
    set_weights,
)

logger = logging.get_logger(__name__)

__all__ = ["Landscape", "filter_normalized_direction", "interpolate", "random_landscape"]

NORMALIZATIONS = ("filter", "layer")


@dataclass
class Landscape:
    """Losses on a line or a plane through the weights.

    Attributes:
        kind (`str`): `"interpolation"`, `"random_1d"` or `"random_2d"`.
        x (`torch.Tensor`): Coordinates along the first direction (float64, shape `(n,)`).
        y (`torch.Tensor | None`): Coordinates along the second direction (2-D only, shape `(n_y,)`).
        losses (`torch.Tensor`): Loss at each point: shape `(n,)`, or `(n, n_y)` with `losses[i, j]` at
            `(x[i], y[j])`.
        label (`str | None`): A name for plots.
    """

    kind: str
    x: torch.Tensor
    y: torch.Tensor | None
    losses: torch.Tensor
    label: str | None = None


def _coordinates(name: str, span: float | Sequence[float], steps: int) -> torch.Tensor:
    check_number("steps", steps, integer=True, minimum=1)
    if isinstance(span, (int, float)) and not isinstance(span, bool):
        check_number(name, span)
        low, high = -float(span), float(span)
    else:
        try:
            low, high = (float(v) for v in span)
        except (TypeError, ValueError) as err:
            raise ValueError(f"`{name}` must be a positive number s (for [-s, s]) or a pair (low, high).") from err
        if not low < high:
            raise ValueError(f"`{name}` must have low < high; got ({low}, {high}).")
    return torch.linspace(low, high, steps, dtype=torch.float64)


@torch.no_grad()
def filter_normalized_direction(
    weights: Sequence[torch.Tensor],
    generator: torch.Generator,
    *,
    normalization: str = "filter",
    ignore_1d: bool = True,
    filter_dims: Sequence[int] | None = None,
) -> list[torch.Tensor]:
    """A Gaussian direction scaled to `weights` filter by filter (Li et al. 2018), in float32 on the CPU.

    Args:
        weights (`Sequence[torch.Tensor]`): The reference weights (e.g. `reference_weights`), any device.
        generator (`torch.Generator`): A CPU generator (the draw does not depend on the device).
        normalization (`str`, defaults to `"filter"`): `"filter"`: each slice along dimension 0 gets the norm of
            the same slice of the weight; `"layer"`: each tensor gets the norm of its weight.
        ignore_1d (`bool`, defaults to `True`): Zero direction on 1-D (and 0-D) parameters; when False, the
            direction of such a parameter is the parameter itself.
        filter_dims (`Sequence[int]`, *optional*): Per weight, the dimension that indexes filters (output units);
            default 0 (`nn.Linear`, convolutions, embeddings). 1 for GPT-2's `Conv1D`, stored (in, out).

    Returns:
        `list[torch.Tensor]`: the direction, one float32 CPU tensor per weight.
    """
    check_choice("normalization", normalization, NORMALIZATIONS)
    out = []
    for i, w in enumerate(weights):
        d = torch.randn(w.shape, generator=generator, dtype=torch.float32)
        w = w.detach().float().cpu()
        if w.ndim <= 1:
            d = torch.zeros_like(d) if ignore_1d else w.clone()
        elif normalization == "filter":
            dim = filter_dims[i] if filter_dims is not None else 0
            w_rows, d_rows = w.movedim(dim, 0), d.movedim(dim, 0)
            rows_w = w_rows.reshape(w_rows.shape[0], -1).norm(dim=1)
            rows_d = d_rows.reshape(d_rows.shape[0], -1).norm(dim=1)
            factor = torch.where(rows_d > 0, rows_w / rows_d.clamp_min(1e-30), torch.zeros_like(rows_d))
            d = (d_rows * factor.reshape(-1, *([1] * (w.ndim - 1)))).movedim(0, dim).contiguous()
        else:
            d_norm = d.norm()
            d = d * (w.norm() / d_norm) if d_norm > 0 else d
        out.append(d)
    return out


def _filter_dims(model: nn.Module, params: Sequence[nn.Parameter]) -> list[int]:
    """The filter (output-unit) dimension of each parameter: 1 for weights of GPT-2's `Conv1D` (in, out), else 0."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return [0] * len(params)
    transposed = {id(m.weight) for m in model.modules() if isinstance(m, Conv1D)}
    return [1 if id(p) in transposed else 0 for p in params]


def _evaluate_grid(
    model: nn.Module,
    chosen: list[nn.Parameter],
    batches: Any,
    loss_fn: LossFn | None,
    directions: list[list[torch.Tensor]],
    points: list[tuple[float, ...]],
    desc: str,
    progress: bool,
    w0: list[torch.Tensor],
) -> torch.Tensor:
    with progress_bar(len(points) * len(batches), desc, progress) as bar:
        evaluator = Evaluator(model, chosen, batches, loss_fn, bar)
        losses = []
        for point in points:
            set_weights(chosen, w0, list(zip(point, directions)))
            losses.append(evaluator.loss())
    return torch.tensor(losses, dtype=torch.float64)


def random_landscape(
    model: nn.Module,
    data: Any,
    *,
    dims: int = 1,
    span: float | Sequence[float] = 1.0,
    steps: int = 21,
    seed: int = 0,
    normalization: str = "filter",
    ignore_1d: bool = True,
    space: str = "trainable",
    params: Iterable[nn.Parameter | str] | None = None,
    loss_fn: LossFn | None = None,
    batch_size: int | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    max_batches: int | None = None,
    label: str | None = None,
    progress: bool = True,
) -> Landscape:
    """The loss along one or two filter-normalised random directions through the weights (Li et al. 2018).

    Args:
        model (`nn.Module`): Any model whose forward returns a loss (or use `loss_fn`).
        data (`Any`): A `DataLoader`, an iterable of batches, one batch dict, or a dataset of examples.
        dims (`int`, defaults to `1`): 1 (a curve) or 2 (a surface).
        span (`float | Sequence[float]`, defaults to `1.0`): Coordinates from -span to span, or a pair (low, high).
        steps (`int`, defaults to `21`): Points per axis (2-D: steps x steps evaluations).
        seed (`int`, defaults to `0`): Seed of the local generator for the directions. With the same seed, models
            of the same architecture get the same Gaussian draw (then scaled to each model's weights).
        normalization (`str`, defaults to `"filter"`): `"filter"` or `"layer"`.
        ignore_1d (`bool`, defaults to `True`): Zero direction on biases and normalisation parameters.
        space (`str`, defaults to `"trainable"`): `"trainable"` (adapter space for PEFT) or `"full"`.
        params (`Iterable[nn.Parameter | str]`, *optional*): Explicit parameters or names; overrides `space`.
        loss_fn (`Callable[[nn.Module, Any], torch.Tensor]`, *optional*): Loss of a batch (default: its `.loss`).
        batch_size (`int`, *optional*): Batch size when `data` is a dataset of examples.
        collate_fn (`Callable`, *optional*): Collator when `data` is a dataset of examples.
        max_batches (`int`, *optional*): Use at most this many batches.
        label (`str`, *optional*): Stored in the result, for plots.
        progress (`bool`, defaults to `True`): Show a progress bar.

    Returns:
        `Landscape`: `kind="random_1d"` with losses of shape `(steps,)`, or `"random_2d"` with `(steps, steps)`.
    """
    check_choice("dims", dims, (1, 2))
    check_choice("normalization", normalization, NORMALIZATIONS)
    check_number("seed", seed, integer=True, strict=False)
    x = _coordinates("span", span, steps)
    _, chosen, batches = measured_parameters_and_batches(
        model, data, space=space, params=params, batch_size=batch_size, collate_fn=collate_fn, max_batches=max_batches
    )
    generator = torch.Generator().manual_seed(seed)
    with measurement_state(model, chosen, grad=False, backup=True) as w0:
        refs = reference_weights(model, chosen)
        dims_of = _filter_dims(model, chosen)
        directions = []
        for _ in range(dims):
            d = filter_normalized_direction(
                refs, generator, normalization=normalization, ignore_1d=ignore_1d, filter_dims=dims_of
            )
            directions.append([t.to(p.device, p.dtype) for t, p in zip(d, chosen)])
        del refs
        points = [(float(a),) for a in x] if dims == 1 else [(float(a), float(b)) for a in x for b in x]
        losses = _evaluate_grid(
            model, chosen, batches, loss_fn, directions, points, f"Loss landscape {dims}-D", progress, w0
        )
    if dims == 2:
        return Landscape("random_2d", x, x.clone(), losses.reshape(len(x), len(x)), label)
    return Landscape("random_1d", x, None, losses, label)


def interpolate(
    model: nn.Module,
    other: nn.Module | Mapping[str, torch.Tensor],
    data: Any,
    *,
    span: Sequence[float] = (0.0, 1.0),
    steps: int = 21,
    space: str = "trainable",
    params: Iterable[nn.Parameter | str] | None = None,
    loss_fn: LossFn | None = None,
    batch_size: int | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    max_batches: int | None = None,
    label: str | None = None,
    progress: bool = True,
) -> Landscape:
    """The loss on the line through two checkpoints: L(w_A + a (w_B - w_A)), evaluated with `model`'s forward.

    Only the measured parameters move; the others keep `model`'s values. For two LoRA models, the adapter space
    (`space="trainable"`) interpolates A and B matrices; to interpolate the merged weights W + BA, merge both first
    (`merge_and_unload()`) and use `space="full"` (the full space of an unmerged LoRA model moves base weights and
    keeps `model`'s adapters). `hf-sam landscape --interpolate` does this for adapter directories.

    Args:
        model (`nn.Module`): The model at a = 0 (w_A); its weights are moved and restored exactly.
        other (`nn.Module | Mapping[str, torch.Tensor]`): The checkpoint at a = 1 (w_B): a model of the same
            architecture or a state dict with the same parameter names (only the measured parameters are read).
        data (`Any`): A `DataLoader`, an iterable of batches, one batch dict, or a dataset of examples.
        span (`Sequence[float]`, defaults to `(0.0, 1.0)`): The range of a, e.g. `(-0.5, 1.5)` to look beyond both.
        steps (`int`, defaults to `21`): Points.
        space (`str`, defaults to `"trainable"`): `"trainable"` (adapter space for PEFT) or `"full"`.
        params (`Iterable[nn.Parameter | str]`, *optional*): Explicit parameters or names; overrides `space`.
        loss_fn (`Callable[[nn.Module, Any], torch.Tensor]`, *optional*): Loss of a batch (default: its `.loss`).
        batch_size (`int`, *optional*): Batch size when `data` is a dataset of examples.
        collate_fn (`Callable`, *optional*): Collator when `data` is a dataset of examples.
        max_batches (`int`, *optional*): Use at most this many batches.
        label (`str`, *optional*): Stored in the result, for plots.
        progress (`bool`, defaults to `True`): Show a progress bar.

    Returns:
        `Landscape`: `kind="interpolation"`, losses of shape `(steps,)`.
    """
    if isinstance(span, (int, float)):
        raise ValueError(f"`span` must be a pair (low, high) for `interpolate`, e.g. (0.0, 1.0); got {span!r}.")
    x = _coordinates("span", span, steps)
    # Not `measured_parameters_and_batches`: `other` is checked against the parameters before any data is read.
    names, chosen = select_parameters(model, space, params)
    if isinstance(other, nn.Module):
        target = dict(other.named_parameters())
    elif isinstance(other, Mapping):
        target = other
    else:
        raise ValueError(f"`other` must be a model or a state dict; got {type(other).__name__}.")
    missing = [n for n in names if n not in target]
    if missing:
        raise ValueError(
            f"`other` lacks {len(missing)} of the {len(names)} measured parameters, e.g. {missing[:3]}; it must have "
            "the same architecture (and the same PEFT wrapping) as `model`."
        )
    for n, p in zip(names, chosen):
        if tuple(target[n].shape) != tuple(p.shape):
            raise ValueError(f"`other`: {n!r} has shape {tuple(target[n].shape)}, `model` has {tuple(p.shape)}.")
    batches = prepare_batches(data, batch_size=batch_size, collate_fn=collate_fn, max_batches=max_batches)
    with measurement_state(model, chosen, grad=False, backup=True) as w0:
        with torch.no_grad():
            direction = [
                target[n].detach().to(p.device, torch.float32).sub(w.float()).to(p.dtype)
                for n, p, w in zip(names, chosen, w0)
            ]
        losses = _evaluate_grid(
            model, chosen, batches, loss_fn, [direction], [(float(a),) for a in x], "Interpolation", progress, w0
        )
    return Landscape("interpolation", x, None, losses, label)
