"""Distributed concerns of SAM: which gradient synchronisation each pass needs, and what is refused.

Under data parallelism the all-reduce of gradients happens in `backward`, on the micro-batch whose backward runs with
synchronisation enabled. SAM decides per pass: with `sync="global"` the first pass's gradient is all-reduced before
the perturbation; with `sync="local"` the first pass (forward and backward) runs without synchronisation, and each
process perturbs with its own gradient. The second pass always synchronises on its last micro-batch, like a plain
step.

Gradient all-reduce rounds per optimizer step under DDP, with k = `gradient_accumulation_steps` (plain Trainer: 1):

| | `accumulation="exact"` | `accumulation="micro"` |
|---|---|---|
| `"global"` | 2 | k + 1 |
| `"local"` | 1 | 1 |

FSDP2 (`fully_shard`) is supported with `sync="global"`; its gradients are `DTensor` shards, the norm is reduced
across the mesh (`perturbation.global_norm`) and the perturbation and the restore act on the local shards. With
`accumulation="micro"` and gradient accumulation under FSDP2 every perturbed pass synchronises (2k reduce-scatters per
step instead of k + 1), because FSDP2 keeps unsynchronised gradients inside the wrapper. Refused, each with its reason
in the error: FSDP1, FSDP with `sync="local"`, FSDP with a variant that says it cannot run there (`fsdp_unsupported`
in its module: LookSAM, Flat-LoRA, Functional-SAM, Momentum-SAM and Friendly SAM).

`GradientSync` is the step engine's gradient-synchronisation strategy: this module's for one device, DDP and FSDP2;
DeepSpeed ZeRO-1/2 has its own (`deepspeed_support.DeepSpeedSync`, where everything DeepSpeed lives).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from .variants import VARIANTS

logger = logging.get_logger(__name__)

__all__ = [
    "FSDP1_UNSUPPORTED",
    "FSDP_LOCAL_UNSUPPORTED",
    "FSDP_VARIANT_UNSUPPORTED",
    "GradientSync",
    "defers_unsynchronised_gradients",
    "gradient_sync",
    "unsupported_setup_reason",
]

_SUPPORTED = (
    "Supported: single device, DDP and FSDP2 (`fsdp_version: 2`, with `sam_sync='global'`) through `accelerate "
    "launch` or `torchrun`; a `device_map` placement counts as a single device; DeepSpeed with ZeRO stage 1 or 2."
)

FSDP1_UNSUPPORTED = (
    "SAM does not support FSDP1 (`fsdp_version: 1`): its flat-parameter shards are plain tensors, so each process "
    f"would normalise the perturbation by its own shard's gradient norm. Set `fsdp_version: 2`. {_SUPPORTED}"
)

FSDP_LOCAL_UNSUPPORTED = (
    "`sam_sync='local'` cannot work with FSDP: the weights are sharded across processes, so there is no per-process "
    "copy to perturb with a per-process gradient, and FSDP2 without gradient synchronisation leaves the sharded "
    "`.grad` empty (the unsynchronised gradient would leak into the second pass). Use `sam_sync='global'`."
)

FSDP_VARIANT_UNSUPPORTED = (
    "`sam_method={method!r}` is not supported with FSDP: {why} Use `sam_method='sam'` (SAM or ASAM, tested under "
    "FSDP2)."
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
        # DDP reads the flag in `forward` (to prepare its reducer), hence forward and backward inside the context.
        previous = model.require_backward_grad_sync
        model.require_backward_grad_sync = enabled
        try:
            yield
        finally:
            model.require_backward_grad_sync = previous
        return
    if not torch.distributed.is_initialized():  # before the module scan: it costs milliseconds on large models
        yield
        return
    fsdp_modules = [m for m in model.modules() if hasattr(m, "set_requires_gradient_sync")]
    if not fsdp_modules:
        yield
        return
    # Every FSDP module by itself: the root is not always one (a model sharded only in some sub-modules).
    for module in fsdp_modules:
        module.set_requires_gradient_sync(enabled, recurse=False)
    try:
        yield
    finally:
        # The Trainer wraps every micro-batch but the last in `no_sync`; sync is on again by its next backward.
        for module in fsdp_modules:
            module.set_requires_gradient_sync(True, recurse=False)


def defers_unsynchronised_gradients(model: nn.Module) -> bool:
    """Whether a backward without synchronisation leaves its gradient inside the wrapper instead of in `.grad`.

    True for FSDP2: the unsharded gradient waits in FSDP and is reduced together with the next synchronising
    backward's. SAM's `accumulation="micro"` then synchronises every perturbed pass, so that the next micro-batch's
    clean gradient (the one it perturbs with) is its own. DDP accumulates in `.grad`, which SAM sets aside.

    Args:
        model (`nn.Module`): The model as the Trainer passes it to `training_step`.
    """
    if not torch.distributed.is_initialized():
        return False
    return any(hasattr(m, "set_requires_gradient_sync") for m in model.modules())


def _fsdp_version(trainer: Any) -> int | None:
    """The FSDP version the Trainer's Accelerator shards with, or `None` without FSDP."""
    accelerator = getattr(trainer, "accelerator", None)
    plugin = getattr(getattr(accelerator, "state", None), "fsdp_plugin", None)
    if plugin is None:
        return None
    return int(getattr(plugin, "fsdp_version", 1) or 1)


def unsupported_setup_reason(trainer: Any, sam_config: Any) -> str | None:
    """Why SAM cannot run with this Trainer's distributed setup, or `None` when it can.

    Args:
        trainer: A Trainer after `Trainer.__init__` (it reads `is_deepspeed_enabled` and the Accelerator's DeepSpeed
            and FSDP plugins).
        sam_config (`SAMConfig`): The SAM settings.

    Returns:
        `str | None`: the message of the `ValueError` that SAM raises at construction.
    """
    if getattr(trainer, "is_deepspeed_enabled", False):
        from .deepspeed_support import deepspeed_setup_reason

        return deepspeed_setup_reason(trainer, sam_config)
    version = _fsdp_version(trainer)
    if version is None:
        return None
    if version < 2:
        return FSDP1_UNSUPPORTED
    if sam_config.sync == "local":
        return FSDP_LOCAL_UNSUPPORTED
    why = VARIANTS[sam_config.method].fsdp_unsupported
    if why is not None:
        return FSDP_VARIANT_UNSUPPORTED.format(method=sam_config.method, why=why)
    if sam_config.accumulation == "micro" and trainer.args.gradient_accumulation_steps > 1:
        logger.info(
            "FSDP2 with `sam_accumulation='micro'` and gradient accumulation: every perturbed pass synchronises "
            "(2 reduce-scatters per micro-batch), since FSDP2 holds unsynchronised gradients inside the wrapper."
        )
    return None


class GradientSync:
    """How SAM's passes meet gradient synchronisation: one device, DDP and FSDP2 (DeepSpeed: `DeepSpeedSync`).

    The step engine calls these, and nothing else, around its passes:

    - `clean_pass(model, params, synchronise)`: the context of a clean pass; yields the model to run it on.
      `synchronise`: whether its backward all-reduces (the last micro-batch of a step with `sync="global"`).
    - `gradient_ready(all_reduce)`: the clean gradient is complete; afterwards it is in `.grad` (reduced if asked).
    - `perturbed_passes()`: the context of a step's perturbed passes.
    - `perturbed_pass(model, last, micro)`: the context of one perturbed pass; `last`: the step's last backward
      (it synchronises), `micro`: `accumulation="micro"`.
    - `step()`: after the restore (the optimizer step, where the strategy owns it); `discard(model)`: after a failed
      perturbed pass, no half-accumulated gradient may reach the optimizer; `reset()`: a new optimizer step.
    """

    @contextlib.contextmanager
    def clean_pass(self, model: nn.Module, params: list[torch.Tensor], synchronise: bool) -> Iterator[nn.Module]:
        # Micro-batches before a step's last are already inside the Trainer's `no_sync`.
        with gradient_sync(model, enabled=synchronise):
            yield model

    def gradient_ready(self, all_reduce: bool) -> None:
        """DDP and FSDP2 all-reduce inside the backward (`clean_pass`): nothing left to do."""

    def perturbed_passes(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def perturbed_pass(self, model: nn.Module, last: bool, micro: bool) -> contextlib.AbstractContextManager:
        # FSDP2 keeps an unsynchronised gradient inside FSDP, where the next micro-batch's (synchronised) clean pass
        # would reduce it together with its own: in "micro" mode every perturbed pass synchronises there.
        return gradient_sync(model, enabled=last or (micro and defers_unsynchronised_gradients(model)))

    def step(self) -> None:
        """The Trainer steps the optimizer itself, after `training_step` returns."""

    def discard(self, model: nn.Module) -> None:
        model.zero_grad(set_to_none=True)

    def reset(self) -> None:
        """Nothing is kept between passes."""
