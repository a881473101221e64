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
in the error: FSDP1, FSDP with `sync="local"`, FSDP with a variant that says it cannot run there
(`fsdp_unsupported` in its module: LookSAM, Flat-LoRA).

DeepSpeed ZeRO stages 1 and 2 are supported (both sync and accumulation modes, fp32 or bf16; the mechanics are in
`deepspeed_support.py`). Refused, each with its reason in the error: ZeRO stage 0 and 3, optimizer or parameter
offload, fp16 (DeepSpeed's loss scaler), pipeline parallelism, MoE, tensor or sequence parallelism, DeepCompile,
ZenFlow, and every `sam_method` but "sam" and `sam_preconditioner` but "none" (untested there). The DeepSpeed config
is checked when the arguments are built (`deepspeed=`), when the trainer is built (also for `accelerate launch`), and
the engine itself at the first step of every run. To a plain step's collectives under the same ZeRO stage, SAM adds one
all-reduce of the full first-pass gradient per step with "global" and "exact", k with "micro", none with "local".
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
    "DEEPSPEED_ENGINE_UNSUPPORTED",
    "DEEPSPEED_FP16_UNSUPPORTED",
    "DEEPSPEED_OFFLOAD_UNSUPPORTED",
    "DEEPSPEED_PRECONDITIONER_UNSUPPORTED",
    "DEEPSPEED_STAGE_UNSUPPORTED",
    "DEEPSPEED_VARIANT_UNSUPPORTED",
    "deepspeed_config_reason",
    "deepspeed_engine_reason",
    "defers_unsynchronised_gradients",
    "gradient_sync",
    "unsupported_setup_reason",
]

_SUPPORTED = (
    "Supported: single device, DDP and FSDP2 (`fsdp_version: 2`, with `sam_sync='global'`) through `accelerate "
    "launch` or `torchrun`; a `device_map` placement counts as a single device; DeepSpeed with ZeRO stage 1 or 2."
)

# DeepSpeed: what was tested (tests/test_deepspeed.py, DeepSpeed 0.19.8), named in every DeepSpeed refusal.
_DEEPSPEED_SUPPORTED = (
    "Supported with DeepSpeed: ZeRO stage 1 or 2, fp32 or bf16, no offload, `sam_method='sam'` (SAM or ASAM), "
    "through `accelerate launch` or `deepspeed=` in the arguments."
)

DEEPSPEED_STAGE_UNSUPPORTED = {
    0: "SAM does not support DeepSpeed without ZeRO (`zero_optimization.stage` 0): its gradients live in "
    "DeepSpeed's own accumulation buffers, a path not tested with SAM. Use stage 1 (the same replicated weights, "
    f"optimizer states partitioned). {_DEEPSPEED_SUPPORTED}",
    3: "SAM does not support DeepSpeed ZeRO-3 (`zero_optimization.stage` 3): it partitions the weights themselves "
    "and gathers them inside `forward` with hooks on the model's submodules, which also reduce-scatter the gradients "
    "in `backward`, so SAM can neither run its first pass outside the engine nor write the perturbation into the "
    "weights between passes. Use stage 1 or 2, or FSDP2 (`fsdp_version: 2`) for sharded weights. "
    f"{_DEEPSPEED_SUPPORTED}",
}

DEEPSPEED_OFFLOAD_UNSUPPORTED = (
    "SAM does not support DeepSpeed offload (`zero_optimization.{key}.device` {device!r}): offloaded optimizer "
    "steps and parameters were not tested with SAM's deferred step and in-place perturbation. Set the device to "
    f"'none'. {_DEEPSPEED_SUPPORTED}"
)

DEEPSPEED_FP16_UNSUPPORTED = (
    "SAM does not support DeepSpeed fp16 (`fp16.enabled` or `amp.enabled`; `fp16=True` or `--mixed_precision fp16` "
    "set it): DeepSpeed's loss scaler scales the engine's backward, which SAM's first pass runs without, so small "
    f"first-pass gradients could underflow (not tested). Use bf16 (`bf16=True`) or fp32. {_DEEPSPEED_SUPPORTED}"
)

DEEPSPEED_ENGINE_UNSUPPORTED = (
    "SAM does not support DeepSpeed with {what}: SAM's passes were tested on ZeRO-1/2 data parallelism only "
    f"(`DeepSpeedZeroOptimizer`, every rank holding all the weights). {_DEEPSPEED_SUPPORTED}"
)

DEEPSPEED_VARIANT_UNSUPPORTED = (
    "`sam_method={method!r}` is not supported with DeepSpeed: untested there. Use `sam_method='sam'` (SAM or ASAM, "
    "tested under ZeRO-1/2)."
)

DEEPSPEED_PRECONDITIONER_UNSUPPORTED = (
    "`sam_preconditioner='adam'` is not supported with DeepSpeed: it reads Adam's second moments per whole "
    "parameter, and ZeRO partitions the optimizer state. Use `sam_preconditioner='none'`."
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


def _enabled(value: Any, auto: bool) -> bool:
    return bool(auto) if value == "auto" else bool(value)


def deepspeed_config_reason(config: dict, sam_config: Any, fp16: bool = False) -> str | None:
    """Why SAM refuses this DeepSpeed config (a dict as in `ds_config.json`), or `None`; without importing DeepSpeed.

    Args:
        config (`dict`): The DeepSpeed config.
        sam_config (`SAMConfig`): The SAM settings.
        fp16 (`bool`): What a `"auto"` value of `fp16.enabled` stands for (`TrainingArguments.fp16`).
    """
    zero = config.get("zero_optimization") or {}
    stage = zero.get("stage", 0)
    stage = int(stage) if str(stage).isdigit() else stage
    if stage not in (1, 2):
        return DEEPSPEED_STAGE_UNSUPPORTED.get(stage, DEEPSPEED_STAGE_UNSUPPORTED[3])
    for key in ("offload_optimizer", "offload_param"):
        device = (zero.get(key) or {}).get("device", "none")
        if device not in (None, "none"):
            return DEEPSPEED_OFFLOAD_UNSUPPORTED.format(key=key, device=device)
    if _enabled((config.get("fp16") or {}).get("enabled", False), fp16) or (config.get("amp") or {}).get("enabled"):
        return DEEPSPEED_FP16_UNSUPPORTED
    what = None
    if zero.get("zenflow"):
        what = "ZenFlow (`zero_optimization.zenflow`)"
    elif (config.get("compile") or {}).get("deepcompile"):
        what = "DeepCompile (`compile.deepcompile`)"
    elif int((config.get("tensor_parallel") or {}).get("autotp_size", 1) or 1) > 1:
        what = "tensor parallelism (`tensor_parallel.autotp_size` > 1)"
    elif int(config.get("sequence_parallel_size", 1) or 1) > 1:
        what = "sequence parallelism (`sequence_parallel_size` > 1)"
    elif config.get("pipeline"):
        what = "pipeline parallelism (`pipeline`)"
    if what is not None:
        return DEEPSPEED_ENGINE_UNSUPPORTED.format(what=what)
    if sam_config.method != "sam":
        return DEEPSPEED_VARIANT_UNSUPPORTED.format(method=sam_config.method)
    if sam_config.preconditioner != "none":
        return DEEPSPEED_PRECONDITIONER_UNSUPPORTED
    return None


def deepspeed_engine_reason(engine: Any) -> str | None:
    """Why SAM refuses this prepared `DeepSpeedEngine`, or `None`: checked at the first step of every run, since an
    engine can differ from its config (a `PipelineModule`, MoE layers, a client optimizer, process groups).

    Besides public engine methods it reads the engine's undocumented attributes `pipeline_parallelism`,
    `has_moe_layers`, `dp_world_size` and `zenflow` (DeepSpeed 0.19.8; docs/concepts.md lists them), and requires the
    optimizer wrapper SAM was tested with, `DeepSpeedZeroOptimizer`, whatever those attributes say.
    """
    stage = engine.zero_optimization_stage()
    if stage not in (1, 2):
        return DEEPSPEED_STAGE_UNSUPPORTED.get(stage, DEEPSPEED_STAGE_UNSUPPORTED[3])
    for key in ("offload_optimizer", "offload_param"):
        offload = getattr(engine, f"zero_{key}")()
        device = getattr(getattr(offload, "device", None), "value", getattr(offload, "device", None))
        if device not in (None, "none"):
            return DEEPSPEED_OFFLOAD_UNSUPPORTED.format(key=key, device=device)
    if engine.fp16_enabled() or getattr(engine, "amp_enabled", lambda: False)():
        return DEEPSPEED_FP16_UNSUPPORTED
    world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    what = None
    if getattr(engine, "pipeline_parallelism", False):
        what = "pipeline parallelism (a `PipelineModule`)"
    elif getattr(engine, "has_moe_layers", False):
        what = "MoE layers"
    elif getattr(engine, "dp_world_size", world_size) != world_size:
        what = f"a data-parallel group of {engine.dp_world_size} of the {world_size} processes (model parallelism)"
    elif getattr(engine, "is_deepcompile_enabled", lambda: False)():
        what = "DeepCompile"
    elif getattr(engine, "zenflow", False):
        what = "ZenFlow"
    elif type(engine.optimizer).__name__ != "DeepSpeedZeroOptimizer":
        what = f"the optimizer wrapper `{type(engine.optimizer).__name__}`"
    return None if what is None else DEEPSPEED_ENGINE_UNSUPPORTED.format(what=what)


def unsupported_setup_reason(trainer: Any) -> str | None:
    """Why SAM cannot run with this Trainer's distributed setup, or `None` when it can.

    Args:
        trainer: A Trainer with a `sam_config`, after `Trainer.__init__` (it reads `is_deepspeed_enabled` and the
            Accelerator's DeepSpeed and FSDP plugins).

    Returns:
        `str | None`: the message of the `ValueError` that the mixin raises at construction.
    """
    if getattr(trainer, "is_deepspeed_enabled", False):
        # The config as Accelerate's plugin holds it: from `deepspeed=` in the arguments or from `accelerate launch`.
        plugin = getattr(getattr(trainer.accelerator, "state", None), "deepspeed_plugin", None)
        config = getattr(plugin, "deepspeed_config", None) or {}
        return deepspeed_config_reason(config, trainer.sam_config, fp16=bool(getattr(trainer.args, "fp16", False)))
    version = _fsdp_version(trainer)
    if version is None:
        return None
    if version < 2:
        return FSDP1_UNSUPPORTED
    sam_config = trainer.sam_config
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
