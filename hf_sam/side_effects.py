"""What SAM's perturbed pass must leave as the clean pass left it, besides the weights. No Trainer in here.

A forward-backward pass does more than compute a gradient: it updates module buffers (BatchNorm's running statistics
and `num_batches_tracked`, any custom running statistic), draws from the global random streams (`rng.py`), and a
Trainer subclass records its own bookkeeping in `compute_loss` (TRL's token counts and metrics). SAM runs a second
pass at w + e; for SAM to change the gradient and nothing else, each of these must stand afterwards where the clean
pass alone left it. The semantics follow the JAX reference implementation (google-research/sam), which keeps the
model state of the clean pass and discards the perturbed pass's.

- `save_buffers` / `restore_buffers` copy every buffer of the model away and back (a buffer that the forward
  re-assigned is put back as the original object): one mechanism for any buffer, whatever module owns it. The
  perturbed pass of a micro-batch starts from the buffers its clean pass started from (a module that reads its
  running statistics in training sees the same values in both passes), and after the perturbed passes the buffers
  are put back to where the clean passes left them.
- `snapshot_bookkeeping` / `restore_bookkeeping` do the same for the plain-data attributes of an object (numbers,
  strings, small tensors and containers of them): a Trainer subclass's counters and metric lists.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .perturbation import _group_by_device
from .rng import RNGState, capture_rng_state, restore_rng_state

__all__ = [
    "PassStart",
    "left_alone",
    "restore_bookkeeping",
    "restore_buffers",
    "save_buffers",
    "snapshot_bookkeeping",
]


def save_buffers(owners: Sequence[tuple[nn.Module, str]]) -> list[tuple[nn.Module, str, torch.Tensor, torch.Tensor]]:
    """Copies of the model's buffers, each listed as (module, name); what `restore_buffers` needs."""
    entries = [(m, n, m._buffers[n]) for m, n in owners if m._buffers.get(n) is not None]
    return [(m, n, t, t.detach().clone()) for m, n, t in entries]  # device copies, no host sync


@torch.no_grad()
def restore_buffers(saved: Sequence[tuple[nn.Module, str, torch.Tensor, torch.Tensor]]) -> None:
    """Put every saved buffer back: the same tensor object (a forward may have re-assigned it), the saved values."""
    if not saved:
        return
    for module, name, tensor, _ in saved:
        if module._buffers.get(name) is not tensor:
            module._buffers[name] = tensor
    destinations, sources = [t for _, _, t, _ in saved], [c for _, _, _, c in saved]
    for idx in _group_by_device(destinations, with_dtype=True).values():
        torch._foreach_copy_([destinations[i] for i in idx], [sources[i] for i in idx])


# ---- bookkeeping --------------------------------------------------------------------------------------------------
_SCALARS = (int, float, complex, bool, str, bytes, type(None))
_MAX_ITEMS = 100_000  # a larger plain-data attribute is not bookkeeping (and would cost time to copy)
_MAX_TENSOR_NUMEL = 4096
_NOT_PLAIN = object()


def _copy_plain(value: Any, budget: list[int]) -> Any:
    """A deep copy of `value` if it is plain data within the budget, else `_NOT_PLAIN`."""
    budget[0] -= 1
    if budget[0] < 0:
        return _NOT_PLAIN
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, torch.Tensor):
        if isinstance(value, nn.Parameter) or value.numel() > _MAX_TENSOR_NUMEL or value.requires_grad:
            return _NOT_PLAIN
        budget[0] -= value.numel()
        return value.detach().clone()  # a device copy, no host sync
    if isinstance(value, dict):
        copied = {}
        for k, v in value.items():
            c = _copy_plain(v, budget)
            if c is _NOT_PLAIN or not isinstance(k, _SCALARS):
                return _NOT_PLAIN
            copied[k] = c
        if isinstance(value, collections.defaultdict):
            return collections.defaultdict(value.default_factory, copied)
        return type(value)(copied) if type(value) in (dict, collections.OrderedDict, collections.Counter) else copied
    if isinstance(value, (list, tuple, collections.deque, set, frozenset)):
        items = []
        for v in value:
            c = _copy_plain(v, budget)
            if c is _NOT_PLAIN:
                return _NOT_PLAIN
            items.append(c)
        if isinstance(value, collections.deque):
            return collections.deque(items, maxlen=value.maxlen)
        return type(value)(items) if type(value) in (list, tuple, set, frozenset) else _NOT_PLAIN
    return _NOT_PLAIN


def snapshot_bookkeeping(obj: Any) -> dict[str, tuple[Any, Any]]:
    """Copies of the plain-data attributes of `obj` (counters, metric lists and dicts, small tensors).

    Anything that is not plain data (models, datasets, callbacks, optimizers, SAM's engine) is left out.
    """
    saved = {}
    for name, value in vars(obj).items():
        copied = _copy_plain(value, [_MAX_ITEMS])
        if copied is not _NOT_PLAIN:
            saved[name] = (value, copied)
    return saved


def restore_bookkeeping(obj: Any, saved: dict[str, tuple[Any, Any]]) -> None:
    """Put the attributes saved by `snapshot_bookkeeping` back; containers keep their identity."""
    for name, (original, copied) in saved.items():
        if isinstance(original, dict):
            original.clear()
            original.update(copied)
        elif isinstance(original, (list, collections.deque)):
            original.clear()
            original.extend(copied)
        elif isinstance(original, set):
            original.clear()
            original.update(copied)
        elif isinstance(original, torch.Tensor):
            with torch.no_grad():
                original.copy_(copied)  # an in-place `+=` changed the original object's values
        setattr(obj, name, original)


# ---- what SAM's passes use of all this ----------------------------------------------------------------------------
@dataclass(frozen=True)
class PassStart:
    """What a micro-batch's clean pass started from: its inputs, every random stream and every buffer of the model.
    Its perturbed pass starts from the same (`replay`): the same dropout masks, the same running statistics."""

    inputs: Any
    rng: RNGState
    buffers: list

    @classmethod
    def capture(cls, inputs: Any, owners: Sequence[tuple[nn.Module, str]]) -> PassStart:
        return cls(inputs, capture_rng_state(), save_buffers(owners))

    def replay(self) -> None:
        restore_rng_state(self.rng)
        restore_buffers(self.buffers)


@contextlib.contextmanager
def left_alone(owners: Sequence[tuple[nn.Module, str]], obj: Any) -> Iterator[None]:
    """The block runs, then the model's buffers and the plain-data attributes of `obj` (a Trainer's bookkeeping) are
    put back to where they stood before it, also when it raises."""
    buffers, bookkeeping = save_buffers(owners), snapshot_bookkeeping(obj)
    try:
        yield
    finally:
        restore_buffers(buffers)
        restore_bookkeeping(obj, bookkeeping)
