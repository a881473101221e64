"""Distributed concerns of SAM: which gradient synchronisation each pass needs, and what is refused.

Under data parallelism the all-reduce of gradients happens in `backward`, on the micro-batch whose backward runs with
synchronisation enabled. SAM decides per pass: with `sync="global"` the first pass's gradient is all-reduced before
the perturbation; with `sync="local"` the first pass (forward and backward) runs without synchronisation, and each
process perturbs with its own gradient. The second pass always synchronises on its last micro-batch, like a plain
step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["DEEPSPEED_UNSUPPORTED", "gradient_sync", "unsupported_setup_reason"]

DEEPSPEED_UNSUPPORTED = (
    "SAM does not support DeepSpeed (`deepspeed` is set): its engine steps the optimizer inside `backward` and "
    "ZeRO-2/3 hide `.grad`, so the second SAM pass cannot run. Supported: single device, DDP and FSDP through "
    "`accelerate launch` or `torchrun`."
)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Run the forward and backward inside this context with gradient all-reduce on or off.

    Unlike `accelerator.no_sync`, this can also turn synchronisation *on* inside the Trainer's own `no_sync` (SAM's
    first pass under `sync="global"` with `accumulation="micro"` needs the all-reduced micro-batch gradient).

    Args:
        model (`nn.Module`): The model as the Trainer passes it to `training_step` (possibly wrapped in DDP or FSDP2).
        enabled (`bool`): Whether the backward inside the context all-reduces gradients.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        previous = model.require_backward_grad_sync
        model.require_backward_grad_sync = enabled
        try:
            yield
        finally:
            model.require_backward_grad_sync = previous
        return
    fsdp_modules = [m for m in model.modules() if hasattr(m, "set_requires_gradient_sync")]
    if not fsdp_modules or not torch.distributed.is_initialized():
        yield
        return
    fsdp_modules[0].set_requires_gradient_sync(enabled)  # recurses into the sub-modules
    try:
        yield
    finally:
        # The Trainer wraps every micro-batch but the last in `no_sync`; sync is on again by its next backward.
        fsdp_modules[0].set_requires_gradient_sync(True)


def unsupported_setup_reason(trainer) -> str | None:
    """Why SAM cannot run with this Trainer's distributed setup, or `None` when it can."""
    if getattr(trainer, "is_deepspeed_enabled", False):
        return DEEPSPEED_UNSUPPORTED
    return None
