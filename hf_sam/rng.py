"""Fork and rewind the random number generators, so that SAM's second pass sees the first pass's dropout masks.

A state covers the CPU generator and every generator of the accelerator in use (CUDA, XPU, MPS, NPU, ...). Capturing
a state copies a few bytes of generator state; it does not synchronise with the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["RNGState", "capture_rng_state", "restore_rng_state"]


def _accelerator_module():
    accelerator = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
    if accelerator is None:
        return None
    module = torch.get_device_module(accelerator.type)
    return module if hasattr(module, "get_rng_state") else None


@dataclass(frozen=True)
class RNGState:
    """The states of the CPU generator and of the accelerator's generators (one per device)."""

    cpu: torch.Tensor
    accelerator: tuple[torch.Tensor, ...] = ()


def capture_rng_state() -> RNGState:
    """Return the current state of the CPU generator and of every generator of the accelerator."""
    module = _accelerator_module()
    if module is None or (hasattr(module, "is_initialized") and not module.is_initialized()):
        return RNGState(torch.get_rng_state())  # no device work yet: its generators cannot have been used
    if hasattr(module, "get_rng_state_all"):
        return RNGState(torch.get_rng_state(), tuple(module.get_rng_state_all()))
    return RNGState(torch.get_rng_state(), (module.get_rng_state(),))


def restore_rng_state(state: RNGState) -> None:
    """Set the generators back to `state`."""
    torch.set_rng_state(state.cpu)
    if not state.accelerator:
        return
    module = _accelerator_module()
    if hasattr(module, "set_rng_state_all"):
        module.set_rng_state_all(list(state.accelerator))
    else:
        module.set_rng_state(state.accelerator[0])
