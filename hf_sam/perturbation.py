"""The SAM math: gradient norm, perturbation, exact restore. No Trainer in here.

SAM (Foret et al. 2021, arXiv 2010.01412) minimises max_{||e|| <= rho} L(w + e) with the first-order solution

    e = rho * g / ||g||                       g = grad L(w), ||.|| the global L2 norm over all perturbed tensors

and steps the optimizer with grad L(w + e), evaluated at w + e but applied at w. ASAM (Kwon et al. 2021,
arXiv 2102.11600) makes the ball adaptive with T = |w| + eta (elementwise):

    e = rho * T^2 g / ||T g||

Everything here works in place on lists of tensors with `torch._foreach_*` kernels: the gradient buffer becomes e
and the parameter becomes w + e, so the only extra memory is one copy of w, which `restore_` copies back bit for bit
(subtracting e would drift in bf16/fp16). The step never reads a value back to the host: a zero or non-finite norm
turns into a zero scale on the device. The normalised perturbation does not depend on a constant factor of g, so
GradScaler-scaled gradients give the same e as unscaled ones and are never unscaled here.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "TensorKeyed",
    "WeightBackup",
    "global_norm",
    "move_along_",
    "perturb_",
    "perturb_along_",
    "restore_",
    "scale_to",
]


def _group_by_device(tensors: Sequence[torch.Tensor], with_dtype: bool = False) -> dict[Any, list[int]]:
    # foreach kernels and scalar tensors must share a device: model-parallel placements spread parameters out.
    # Groups keep first-seen order, so every process sums in the same order.
    # DTensor shards and plain tensors cannot share a foreach kernel either (a partly sharded model, e.g. FSDP2's
    # ignored modules): the key's last item keeps them apart.
    groups: dict[Any, list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        groups[((t.device, t.dtype) if with_dtype else t.device, hasattr(t, "to_local"))].append(i)
    return groups


def _local(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    # FSDP2 (DTensor): most `_foreach_*` ops have no sharding rule, so the in-place work runs on the local shards,
    # which alias the DTensors' storage. Only the norm needs the mesh, and `global_norm` reduces it there.
    return [t.to_local() if hasattr(t, "to_local") else t for t in tensors]


def global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all `tensors` together, in float32, as a 0-dim tensor on the first tensor's device.

    Args:
        tensors (`Sequence[torch.Tensor]`): Tensors on any devices and dtypes, plain or `DTensor` shards.

    Returns:
        `torch.Tensor`: sqrt(sum_i ||t_i||^2), computed in float32 (float64 when a tensor is float64) so that fp16
        (and GradScaler-scaled) values do not overflow. Sharded `DTensor` norms are reduced across their mesh (FSDP2).
    """
    if not tensors:
        raise ValueError("global_norm needs at least one tensor.")
    home = tensors[0].device
    squares = []
    for ((_, dtype), _), idx in _group_by_device(tensors, with_dtype=True).items():
        norms = torch._foreach_norm([tensors[i] for i in idx], 2, dtype=torch.promote_types(dtype, torch.float32))
        squared = torch.stack(norms).square().sum()  # float32, or float64 for float64 tensors
        if hasattr(squared, "full_tensor"):  # DTensor: a partial sum over shards, reduced across the mesh
            squared = squared.full_tensor()
        squares.append(squared.to(home))
    dtype = torch.float64 if any(s.dtype == torch.float64 for s in squares) else torch.float32
    return torch.stack([s.to(dtype) for s in squares]).sum().sqrt()


@torch.no_grad()
def perturb_(
    params: Sequence[torch.Tensor],
    backups: Sequence[torch.Tensor],
    rho: float,
    adaptive: bool = False,
    eta: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move `params` from w to w + e in place; their `.grad` becomes e. `backups` receive an exact copy of w.

    Args:
        params (`Sequence[torch.Tensor]`): The parameters to perturb, each with a `.grad` from the first pass.
        backups (`Sequence[torch.Tensor]`): Buffers of the same shapes and dtypes, overwritten with w.
        rho (`float`): Neighbourhood radius.
        adaptive (`bool`, defaults to `False`): ASAM: e = rho T^2 g / ||T g||, T = |w| + eta.
        eta (`float`, defaults to `0.01`): ASAM's offset.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: the norm that normalised e (||g||, or ||T g|| for ASAM) and a 0-dim
        bool, True when the step was skipped (e = 0) because that norm was zero or not finite.
    """
    grads = [p.grad for p in params]
    norm_grads = grads  # DTensor views (FSDP2) for the cross-shard norm; everything else acts on local shards
    params, grads, backups = _local(params), _local(grads), _local(backups)
    torch._foreach_copy_(backups, params)
    if adaptive:
        # Borrow the parameters as scratch for T = |w| + eta (w is safe in `backups`): no temporaries.
        torch._foreach_abs_(params)
        torch._foreach_add_(params, eta)
        torch._foreach_mul_(grads, params)  # grads <- T g
    norm = global_norm(norm_grads)
    ok = torch.isfinite(norm) & (norm > 0)
    scale = torch.where(ok, rho / norm, torch.zeros_like(norm))  # rho / ||(T) g||, or 0 to skip the step
    if adaptive:
        torch._foreach_mul_(grads, params)  # grads <- T^2 g
        torch._foreach_copy_(params, backups)  # params <- w
    for (device, _), idx in _group_by_device(params).items():
        device_grads = [grads[i] for i in idx]
        torch._foreach_mul_(device_grads, scale.to(device))  # grads <- e
        # A skipped step has 0 * inf = nan where g was not finite; e must be exactly 0 there, without a host sync.
        for g in device_grads:
            torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)
        torch._foreach_add_([params[i] for i in idx], device_grads)  # params <- w + e
    return norm, ~ok


def scale_to(directions: Sequence[torch.Tensor], rho: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The factor rho / ||d|| that scales the directions d to length |rho| (0 when ||d|| is zero or not finite).

    Returns:
        `tuple[torch.Tensor, torch.Tensor, torch.Tensor]`: the factor, ||d|| and a 0-dim bool, True when the move is
        skipped; on the device, nothing read back to the host.
    """
    norm = global_norm(directions)
    ok = torch.isfinite(norm) & (norm > 0)
    return torch.where(ok, rho / norm, torch.zeros_like(norm)), norm, ~ok


@torch.no_grad()
def move_along_(
    params: Sequence[torch.Tensor],
    directions: Sequence[torch.Tensor],
    backups: Sequence[torch.Tensor],
    scale: torch.Tensor,
) -> None:
    """Move `params` from w to w + scale d in place, along directions d that are left untouched; `backups` receive
    an exact copy of w, for `restore_`. The scaled direction is formed one tensor at a time, so the only temporary is
    the size of one parameter. A failure part-way puts every parameter back: never half moved."""
    params, directions, backups = _local(params), _local(directions), _local(backups)
    torch._foreach_copy_(backups, params)
    try:
        for p, d in zip(params, directions):
            step = d.mul(scale.to(d.device))
            torch.nan_to_num_(step, nan=0.0, posinf=0.0, neginf=0.0)  # a skipped move adds exactly 0
            p.add_(step)
    except BaseException:
        torch._foreach_copy_(params, backups)
        raise


@torch.no_grad()
def perturb_along_(
    params: Sequence[torch.Tensor],
    directions: Sequence[torch.Tensor],
    backups: Sequence[torch.Tensor],
    rho: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move `params` from w to w + rho d/||d|| in place (`scale_to`, then `move_along_`).

    For perturbations that do not come from `.grad` (Momentum-SAM perturbs along the optimizer's momentum with a
    negative `rho`).

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: ||d|| and a 0-dim bool, True when the step was skipped (w unchanged)
        because ||d|| was zero or not finite.
    """
    scale, norm, skipped = scale_to(directions, rho)
    move_along_(params, directions, backups, scale)
    return norm, skipped


@torch.no_grad()
def restore_(params: Sequence[torch.Tensor], backups: Sequence[torch.Tensor]) -> None:
    """Copy w back from `backups` into `params`, bit for bit."""
    torch._foreach_copy_(_local(params), _local(backups))


class TensorKeyed:
    """A dict keyed by tensor identity that holds its keys weakly: an entry goes when its tensor goes.

    SAM's per-parameter state (weight backups, LookSAM's cache) must not keep a model alive after the Trainer replaced
    it (`model_init` in a hyperparameter search). `weakref.WeakKeyDictionary` cannot hold tensors: it compares keys
    with `==`, which is elementwise for tensors.
    """

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref, Any]] = {}

    def _forget(self, key: int, ref: weakref.ref) -> None:
        entry = self._entries.get(key)
        if entry is not None and entry[0] is ref:
            del self._entries[key]

    def get(self, tensor: torch.Tensor, default: Any = None) -> Any:
        entry = self._entries.get(id(tensor))
        return entry[1] if entry is not None and entry[0]() is tensor else default

    def __contains__(self, tensor: torch.Tensor) -> bool:
        entry = self._entries.get(id(tensor))
        return entry is not None and entry[0]() is tensor

    def __getitem__(self, tensor: torch.Tensor) -> Any:
        if tensor not in self:
            raise KeyError(f"tensor of shape {tuple(tensor.shape)}")
        return self._entries[id(tensor)][1]

    def __setitem__(self, tensor: torch.Tensor, value: Any) -> None:
        key = id(tensor)
        self._entries[key] = (weakref.ref(tensor, lambda ref, key=key: self._forget(key, ref)), value)

    def __len__(self) -> int:
        return len(self._entries)

    def items(self) -> list[tuple[torch.Tensor, Any]]:
        """The live (tensor, value) pairs."""
        return [(t, v) for ref, v in self._entries.values() if (t := ref()) is not None]


class WeightBackup:
    """Persistent buffers that hold w during the second pass, reused across steps (no per-step allocation).

    One buffer per parameter ever perturbed, so a parameter set that varies between steps (mixture-of-experts
    routing, layers unfrozen by a callback) reallocates nothing after the first time. The buffers of the parameters
    first seen together are views of one block per device and dtype: one allocation instead of hundreds under LoRA,
    and no small chunks left scattered over the allocator's heap. Parameters are held weakly: a buffer goes with
    its parameter (a block, with the last of its parameters).
    """

    def __init__(self) -> None:
        self._buffers = TensorKeyed()

    def buffers_for(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Return one buffer per parameter of `params`, in order."""

        def fits(p: torch.Tensor) -> bool:
            buffer = self._buffers.get(p)
            return buffer is not None and buffer.shape == p.shape and buffer.dtype == p.dtype

        missing = list({id(p): p for p in params if not fits(p)}.values())
        flat = [p for p in missing if p.is_contiguous() and not hasattr(p, "to_local")]
        for p in missing:  # DTensor shards and non-contiguous layouts: a buffer of their own, like them
            if not (p.is_contiguous() and not hasattr(p, "to_local")):
                self._buffers[p] = torch.empty_like(p)
        for idx in _group_by_device(flat, with_dtype=True).values():
            group = [flat[i] for i in idx]
            block = torch.empty(sum(p.numel() for p in group), dtype=group[0].dtype, device=group[0].device)
            for p, view in zip(group, block.split([p.numel() for p in group])):
                self._buffers[p] = view.view(p.shape)
        return [self._buffers[p] for p in params]
