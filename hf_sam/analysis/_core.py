"""Shared machinery of the measurements: data, parameter spaces, the model guard, losses, gradients and HVPs.

Every measurement runs on a fixed list of batches (taken once, so that power iteration and ascent see the same loss
every pass), on a fixed list of parameters (the *space*), inside `measurement_state`, which puts the model in eval
mode and restores weights (by copy), `requires_grad` flags and train/eval flags on exit, whatever happens.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from transformers.utils import logging

from ..perturbation import global_norm, restore_

logger = logging.get_logger(__name__)

Space = Literal["trainable", "full"]
SPACES: tuple[str, ...] = ("trainable", "full")
LossFn = Callable[[nn.Module, Any], torch.Tensor]


# ---- argument checks ---------------------------------------------------------------------------------------------
def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    """Raise a `ValueError` naming `name` unless `value` is one of `choices`."""
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {', '.join(repr(c) for c in choices)}; got {value!r}.")


def check_number(name: str, value: Any, *, integer: bool = False, minimum: float = 0.0, strict: bool = True) -> None:
    """Raise a `ValueError` naming `name` unless `value` is a finite number above (or at) `minimum`."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be {'an integer' if integer else 'a finite number'}; got {value!r}.")
    if value < minimum or (strict and value == minimum):
        raise ValueError(f"`{name}` must be {'>' if strict else '>='} {minimum}; got {value!r}.")


# ---- data ----------------------------------------------------------------------------------------------------------
@dataclass
class Batches:
    """The batches a measurement runs on, with the weight of each batch's loss in the mean (sizes, summing to 1)."""

    batches: list[Any]
    weights: list[float]

    def __len__(self) -> int:
        return len(self.batches)


def batch_size_of(batch: Any) -> int:
    """The number of examples in a batch: the first dimension of its first tensor (1 when it has none)."""
    values: Iterable[Any]
    if isinstance(batch, Mapping):
        values = batch.values()
    elif isinstance(batch, (list, tuple)):
        values = batch
    else:
        values = [batch]
    for v in values:
        if isinstance(v, torch.Tensor) and v.ndim > 0:
            return int(v.shape[0])
    return 1


def _is_example_dataset(data: Any) -> bool:
    if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        return True
    return hasattr(data, "column_names") and hasattr(data, "__getitem__") and hasattr(data, "__len__")


def prepare_batches(
    data: Any,
    *,
    batch_size: int | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    max_batches: int | None = None,
) -> Batches:
    """Take the batches of `data` once, without touching the global RNG.

    Args:
        data (`Any`): A `DataLoader` or any iterable of model-ready batches (dicts of tensors, e.g. with `labels`);
            a single batch (a dict); or a dataset of examples (`datasets.Dataset`, map-style `torch` dataset),
            batched here with `batch_size` and `collate_fn`.
        batch_size (`int`, *optional*): Examples per batch for a dataset of examples (default 8).
        collate_fn (`Callable`, *optional*): Collator for a dataset of examples (default
            `transformers.default_data_collator`).
        max_batches (`int`, *optional*): Use at most this many batches.

    Returns:
        `Batches`: the batches and their weights (batch size over total size).
    """
    if max_batches is not None:
        check_number("max_batches", max_batches, integer=True)
    if batch_size is not None:
        check_number("batch_size", batch_size, integer=True)
    if data is None:
        raise ValueError("`data` is required: a DataLoader, an iterable of batches, a batch dict or a dataset.")
    # Shuffling samplers and random collators draw from the global RNG: fork it so measurements never disturb it.
    with torch.random.fork_rng(devices=[]):
        if isinstance(data, Mapping):
            batches = [data]
        elif isinstance(data, torch.utils.data.DataLoader):
            batches = list(itertools.islice(data, max_batches))
        elif _is_example_dataset(data):
            if collate_fn is None:
                from transformers import default_data_collator

                collate_fn = default_data_collator
            loader = torch.utils.data.DataLoader(
                data, batch_size=batch_size or 8, shuffle=False, collate_fn=collate_fn
            )
            batches = list(itertools.islice(loader, max_batches))
        elif isinstance(data, Iterable):
            batches = list(itertools.islice(iter(data), max_batches))
        else:
            raise TypeError(
                "`data` must be a DataLoader, an iterable of batches, a batch dict or a dataset of examples; got "
                f"{type(data).__name__}."
            )
    if not batches:
        raise ValueError("`data` gave no batches.")
    sizes = [batch_size_of(b) for b in batches]
    total = float(sum(sizes))
    return Batches(batches, [s / total for s in sizes])


def to_device(batch: Any, device: torch.device) -> Any:
    """Move the tensors of a (nested) batch to `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def split_batch(batch: Any, m: int) -> list[Any]:
    """Split a dict batch into chunks of at most `m` examples (tensors whose first dimension is the batch size)."""
    if not isinstance(batch, Mapping):
        raise ValueError(f"`m` (m-sharpness) needs dict batches to split; got a {type(batch).__name__}.")
    size = batch_size_of(batch)
    chunks = []
    for start in range(0, size, m):
        chunk = {}
        for k, v in batch.items():
            if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == size:
                chunk[k] = v[start : start + m]
            else:
                chunk[k] = v
        chunks.append(chunk)
    return chunks


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (where inputs go)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """`model(**batch).loss`: the Hugging Face convention (the batch carries `labels`)."""
    if isinstance(batch, Mapping):
        out = model(**batch)
    elif isinstance(batch, (list, tuple)):
        out = model(*batch)
    else:
        out = model(batch)
    if isinstance(out, torch.Tensor):
        loss = out
    elif isinstance(out, Mapping):
        loss = out.get("loss")
    else:
        loss = getattr(out, "loss", None)
    if loss is None:
        raise ValueError(
            "The model returned no loss: the batches need `labels`, or pass `loss_fn(model, batch) -> Tensor`."
        )
    if loss.ndim != 0:
        raise ValueError(f"The loss must be a scalar; got shape {tuple(loss.shape)}. Pass a `loss_fn` that reduces.")
    return loss


# ---- parameter spaces --------------------------------------------------------------------------------------------
def _adapter_param_ids(model: nn.Module) -> set[int]:
    """Ids of PEFT adapter parameters (LoRA A/B, DoRA magnitudes, ...): they re-parametrise base weights."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # no peft: no adapters
        return set()
    ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            for name in module.adapter_layer_names:
                sub = getattr(module, name, None)
                if isinstance(sub, nn.Module):
                    ids.update(id(p) for p in sub.parameters())
    return ids


def select_parameters(
    model: nn.Module, space: str = "trainable", params: Iterable[nn.Parameter | str] | None = None
) -> tuple[list[str], list[nn.Parameter]]:
    """The parameters a measurement perturbs, with their names.

    Args:
        model (`nn.Module`): The model.
        space (`str`, defaults to `"trainable"`): `"trainable"`: the parameters with `requires_grad=True` (for a
            PEFT model, the adapter space: LoRA A/B and `modules_to_save`). `"full"`: every floating-point
            parameter except PEFT adapter parameters, selected regardless of `requires_grad`; for LoRA this is
            the space of the merged weights, since perturbing the base weight W by e gives W + e + BA.
        params (`Iterable[nn.Parameter | str]`, *optional*): Explicit parameters (or their names); overrides `space`.

    Returns:
        `tuple[list[str], list[nn.Parameter]]`: names and parameters, in `named_parameters` order.
    """
    check_choice("space", space, SPACES)
    named = list(model.named_parameters())
    if params is not None:
        wanted = list(params)
        by_name = dict(named)
        ids = set()
        for p in wanted:
            if isinstance(p, str):
                if p not in by_name:
                    raise ValueError(f"`params`: the model has no parameter named {p!r}.")
                ids.add(id(by_name[p]))
            elif isinstance(p, torch.Tensor):
                ids.add(id(p))
            else:
                raise ValueError(f"`params` must hold parameters or parameter names; got a {type(p).__name__}.")
        chosen = [(n, p) for n, p in named if id(p) in ids]
        if len(chosen) != len(ids):
            raise ValueError("`params` holds tensors that are not parameters of `model`.")
    elif space == "trainable":
        chosen = [(n, p) for n, p in named if p.requires_grad]
        if not chosen:
            raise ValueError(
                "`space='trainable'` found no parameter with `requires_grad=True`; use `space='full'` to measure in "
                "the full weight space, or pass `params`."
            )
    else:
        adapters = _adapter_param_ids(model)
        chosen = [(n, p) for n, p in named if p.is_floating_point() and id(p) not in adapters]
    bad = [(n, p.dtype) for n, p in chosen if not p.is_floating_point()]
    if bad:
        raise ValueError(f"`params`: only floating-point parameters can be perturbed; {bad[0][0]!r} is {bad[0][1]}.")
    if not chosen:
        raise ValueError("No parameters to measure: `params` is empty.")
    return [n for n, _ in chosen], [p for _, p in chosen]


def measured_parameters_and_batches(
    model: nn.Module,
    data: Any,
    *,
    space: str,
    params: Iterable[nn.Parameter | str] | None,
    batch_size: int | None,
    collate_fn: Callable[[list[Any]], Any] | None,
    max_batches: int | None,
) -> tuple[list[str], list[nn.Parameter], Batches]:
    """What a measurement runs on: the parameters' names, the parameters (`select_parameters`) and the batches
    (`prepare_batches`). The parameters are chosen first, so that a bad `space` or `params` fails before any data
    is read."""
    names, chosen = select_parameters(model, space, params)
    batches = prepare_batches(data, batch_size=batch_size, collate_fn=collate_fn, max_batches=max_batches)
    return names, chosen, batches


@torch.no_grad()
def reference_weights(model: nn.Module, params: Sequence[nn.Parameter]) -> list[torch.Tensor]:
    """The weights that scale directions (filter normalisation) and ASAM's T, in float32.

    A parameter's own value, except for an unmerged LoRA base weight in the full space: there the effective
    (merged) weight W + sum of the active adapters' deltas, since that is the weight the model computes with.
    """
    refs = {id(p): p.detach().float() for p in params}
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return [refs[id(p)] for p in params]
    for module in model.modules():
        if not isinstance(module, LoraLayer) or getattr(module, "merged", False):
            continue
        weight = getattr(module.get_base_layer(), "weight", None)
        if weight is None or id(weight) not in refs:
            continue
        merged = weight.detach().float().clone()
        for name in module.active_adapters:
            if name in module.lora_A or name in module.lora_embedding_A:
                delta = module.get_delta_weight(name)
                if delta.shape == merged.shape:
                    merged += delta.float()
        refs[id(weight)] = merged
    return [refs[id(p)] for p in params]


# ---- the guard -----------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def measurement_state(
    model: nn.Module, params: Sequence[nn.Parameter], *, grad: bool, backup: bool
) -> Iterator[list[torch.Tensor] | None]:
    """Eval mode (no dropout); `requires_grad` on exactly `params` when `grad`; an exact copy of `params` when
    `backup`. On exit, whatever happens: weights copied back bit for bit, `requires_grad` and every module's
    `training` flag restored.

    Yields:
        `list[torch.Tensor] | None`: the copies of w (read-only for the caller), or None without `backup`.
    """
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    copies = [p.detach().clone() for p in params] if backup else None
    try:
        model.eval()
        if grad:
            chosen = {id(p) for p in params}
            for p, _ in flags:
                p.requires_grad_(id(p) in chosen)
        yield copies
    finally:
        if copies is not None:
            restore_(params, copies)
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode


@contextlib.contextmanager
def double_backward_kernels() -> Iterator[None]:
    """Scaled-dot-product attention on the math kernel: the fused kernels have no double backward."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        yield
        return
    with sdpa_kernel([SDPBackend.MATH]):
        yield


# ---- progress ------------------------------------------------------------------------------------------------------
class _NoBar:
    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int | None, desc: str, enabled: bool) -> Any:
    """A tqdm bar (`tqdm.auto`), or a silent stand-in when `enabled` is False or tqdm is missing; either closes on
    leaving a `with` block."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm ships with transformers
        return _NoBar()
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


# ---- losses, gradients, Hessian-vector products ---------------------------------------------------------------
class Evaluator:
    """Mean loss, gradient and Hessian-vector products of `loss_fn` over `batches`, w.r.t. `params`."""

    def __init__(
        self, model: nn.Module, params: Sequence[nn.Parameter], batches: Batches, loss_fn: LossFn | None, bar: Any
    ) -> None:
        self.model = model
        self.params = list(params)
        self.batches = batches
        self.loss_fn = loss_fn or default_loss
        self.device = model_device(model)
        self.bar = bar

    def _loss(self, batch: Any) -> torch.Tensor:
        return self.loss_fn(self.model, to_device(batch, self.device))

    @torch.no_grad()
    def loss(self) -> float:
        """The weighted mean loss over the batches at the current weights."""
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for batch, w in zip(self.batches.batches, self.batches.weights):
            total += self._loss(batch).detach().double().to(self.device) * w
            self.bar.update()
        return float(total)

    def gradient(self) -> tuple[float, list[torch.Tensor]]:
        """The weighted mean loss and its gradient (float32) at the current weights; `.grad` is not touched."""
        grads = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for batch, w in zip(self.batches.batches, self.batches.weights):
            with torch.enable_grad():
                loss = self._loss(batch)
                gs = torch.autograd.grad(loss, self.params, allow_unused=True)
            pairs = [(acc, g) for acc, g in zip(grads, gs) if g is not None]
            if pairs:
                torch._foreach_add_([a for a, _ in pairs], [g.float() for _, g in pairs], alpha=w)
            total += loss.detach().double().to(self.device) * w
            self.bar.update()
        return float(total), grads

    def hvp(self, vectors: Sequence[Sequence[torch.Tensor]] | Callable[[int], list[torch.Tensor]], count: int) -> list:
        """Hessian-vector products H v for `count` vectors, by double backward, one graph per batch.

        Args:
            vectors: The vectors (lists of float32 tensors shaped like `params`), or a function that makes vector
                number i (called once per batch: vectors never need to be held all at once).
            count (`int`): How many vectors.

        Returns:
            `list`: with a list `vectors`, the products (float32 lists) in order; with a function, the quadratic
            forms v_i^T H v_i as a float64 tensor of shape (count,) and no products.
        """
        make = vectors if callable(vectors) else None
        products = None if make else [[torch.zeros_like(v) for v in vec] for vec in vectors]
        forms = torch.zeros(count, dtype=torch.float64)
        for batch, w in zip(self.batches.batches, self.batches.weights):
            with torch.enable_grad(), double_backward_kernels():
                loss = self._loss(batch)
                gs = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
            live = [i for i, g in enumerate(gs) if g is not None and g.requires_grad]
            for k in range(count):
                vec = make(k) if make else vectors[k]
                if not live:  # the loss is linear in every parameter here: H = 0 on this batch
                    continue
                with torch.enable_grad():
                    home = gs[live[0]].device
                    inner = sum(
                        (gs[i] * vec[i].to(gs[i].device, gs[i].dtype)).sum(dtype=torch.float32).to(home) for i in live
                    )
                    hv = torch.autograd.grad(
                        inner, [self.params[i] for i in live], retain_graph=k < count - 1, allow_unused=True
                    )
                if make:
                    pairs = [(h, vec[i]) for i, h in zip(live, hv) if h is not None]
                    forms[k] += w * dot([h for h, _ in pairs], [v for _, v in pairs])
                else:
                    for i, h in zip(live, hv):
                        if h is not None:
                            products[k][i].add_(h.float(), alpha=w)
            del gs
            self.bar.update()
        return forms if make else products


# ---- vector helpers (lists of tensors) ---------------------------------------------------------------------------
def dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """Sum of elementwise products of two tensor lists, as a Python float (one host sync per device)."""
    per_device: dict[torch.device, list[torch.Tensor]] = {}
    for x, y in zip(a, b):
        value = torch.vdot(x.reshape(-1).float(), y.reshape(-1).to(x.device).float())
        per_device.setdefault(value.device, []).append(value)
    return float(sum(float(torch.stack(values).double().sum()) for values in per_device.values()))


def norm(a: Sequence[torch.Tensor]) -> float:
    """The global L2 norm of a tensor list (hf_sam.perturbation.global_norm), as a Python float."""
    return float(global_norm(a))


@torch.no_grad()
def set_weights(
    params: Sequence[torch.Tensor], base: Sequence[torch.Tensor], steps: Sequence[tuple[float, Sequence[torch.Tensor]]]
) -> None:
    """params <- base + sum_j c_j d_j, in place (foreach kernels; each d_j in the parameters' dtypes)."""
    torch._foreach_copy_(list(params), list(base))
    for c, d in steps:
        if c != 0.0:
            torch._foreach_add_(list(params), list(d), alpha=c)
