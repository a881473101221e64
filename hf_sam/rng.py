"""Fork and rewind the random number generators, so that SAM's second pass sees the first pass's random draws.

A state covers every global stream a forward pass may draw from: torch's CPU generator, every generator of the
accelerator in use (CUDA, XPU, MPS, NPU, ...), NumPy's global generator (Wav2Vec2/HuBERT/WavLM draw their SpecAugment
masks from it) and Python's `random` (some LayerDrop implementations). Capturing a state copies a few kilobytes of
generator state on the host; it does not synchronise with the device.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
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
    """The states of torch's CPU and accelerator generators, NumPy's global generator and Python's `random`."""

    cpu: torch.Tensor
    accelerator: tuple[torch.Tensor, ...] = ()
    numpy: Any = None
    python: Any = None


def capture_rng_state() -> RNGState:
    """Return the current state of every global random stream."""
    others = {"numpy": np.random.get_state(), "python": random.getstate()}
    module = _accelerator_module()
    if module is None or (hasattr(module, "is_initialized") and not module.is_initialized()):
        return RNGState(torch.get_rng_state(), **others)  # no device work yet: its generators cannot have been used
    if hasattr(module, "get_rng_state_all"):
        return RNGState(torch.get_rng_state(), tuple(module.get_rng_state_all()), **others)
    return RNGState(torch.get_rng_state(), (module.get_rng_state(),), **others)


def restore_rng_state(state: RNGState) -> None:
    """Set every generator back to `state`."""
    torch.set_rng_state(state.cpu)
    if state.numpy is not None:
        np.random.set_state(state.numpy)
    if state.python is not None:
        random.setstate(state.python)
    if not state.accelerator:
        return
    module = _accelerator_module()
    if hasattr(module, "set_rng_state_all"):
        module.set_rng_state_all(list(state.accelerator))
    else:
        module.set_rng_state(state.accelerator[0])
