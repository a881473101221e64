"""Everything DeepSpeed: what SAM refuses there, and how its passes run on ZeRO stages 1 and 2 (`DeepSpeedSync`).

Refused, each with its reason in the error: ZeRO stage 0 and 3, optimizer or parameter offload, fp16 (DeepSpeed's loss
scaler), pipeline parallelism, MoE, tensor or sequence parallelism, DeepCompile, ZenFlow, and every `sam_method` but
"sam" and `sam_preconditioner` but "none" (untested there). The config is checked when the arguments are built
(`deepspeed=`), when the trainer is built (also for `accelerate launch`), and the engine itself at the first step of
every run. To a plain step's collectives under the same ZeRO stage, SAM adds one all-reduce of the full first-pass
gradient per step with "global" and "exact", k with "micro", none with "local".

SAM on ZeRO-1/2, driven by the Trainer through Accelerate:

Under DeepSpeed, `accelerator.backward(loss)` is Accelerate's `DeepSpeedEngineWrapper.backward`: it sets the engine's
accumulation boundary from `sync_gradients`, calls `engine.backward(loss)` and, at the boundary, `engine.step()`
(clipping, optimizer step, zero grad, LR schedule). ZeRO-1/2 also move the reduced gradients out of `.grad` into flat
per-rank partitions, from hooks on the parameters' gradient accumulation. SAM therefore keeps DeepSpeed out of its
first pass and moves the engine's step after the restore (`DeepSpeedSync`, the step engine's gradient-synchronisation
strategy under DeepSpeed; `hf_sam/engine.py` drives it):

1. First pass, each micro-batch: the Trainer's own `training_step` on the unwrapped module (`engine.module`: the
   engine's forward would hook its output) with `accelerator.backward` replaced, for that call, by
   `torch.autograd.grad`, which fills no `.grad` and runs no AccumulateGrad node, so ZeRO's reduction hooks, its
   partitions, `micro_steps` and the boundary never see the pass. The gradient accumulates in a buffer of SAM's own.
2. When SAM perturbs (the window's last micro-batch with `accumulation="exact"`, every micro-batch with "micro"):
   one flat all-reduce (mean) of that buffer per dtype over the process group with `sync="global"`, none with
   "local"; the result is put in `.grad` of the module's parameters, where the engine perturbs as on one device.
   ZeRO-1/2 keep the bit16 weights replicated on every rank (views into flat buffers); the fp32 master partitions
   are not touched.
3. Second pass through the normal path (engine forward, `engine.backward` with its hooks and reductions), with
   Accelerate's wrapper `backward` replaced on the instance: it sets the boundary SAM chooses (only the window's last
   micro-batch) and calls `engine.backward`, never `engine.step()`.
4. The engine restores w bit for bit, then calls `DeepSpeedSync.step()`: `engine.step()` on the SAM gradient.

Nothing here imports DeepSpeed. Attributes used besides DeepSpeed's public engine methods (`module`, `backward`,
`step`, `set_gradient_accumulation_boundary`, `zero_grad`) and Accelerate's public `Accelerator.backward` (shadowed
by an instance attribute during the first pass): `Accelerator.deepspeed_engine_wrapped` (Accelerate, undocumented;
its `backward` is shadowed on the instance during the second pass). docs/concepts.md lists them.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from transformers.utils import logging

from .distributed import GradientSync

logger = logging.get_logger(__name__)

__all__ = [
    "DEEPSPEED_ENGINE_UNSUPPORTED",
    "DEEPSPEED_FP16_UNSUPPORTED",
    "DEEPSPEED_OFFLOAD_UNSUPPORTED",
    "DEEPSPEED_PRECONDITIONER_UNSUPPORTED",
    "DEEPSPEED_STAGE_UNSUPPORTED",
    "DEEPSPEED_VARIANT_UNSUPPORTED",
    "DeepSpeedSync",
    "deepspeed_arguments_reason",
    "deepspeed_config",
    "deepspeed_config_reason",
    "deepspeed_engine_reason",
    "deepspeed_setup_reason",
    "deepspeed_sync_for",
]

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


def deepspeed_config(value: object) -> dict | None:
    """The DeepSpeed config that `TrainingArguments(deepspeed=...)` names (a dict, a JSON file or a base64-encoded
    JSON string, as Accelerate's `HfDeepSpeedConfig` reads it), or `None` (unset, or for transformers to reject)."""
    if not value:
        return None
    if isinstance(value, dict):
        return value
    try:
        if os.path.isfile(str(value)):
            with open(str(value), encoding="utf-8") as f:
                return json.load(f)
        return json.loads(base64.urlsafe_b64decode(str(value)).decode("utf-8"))
    except (OSError, ValueError):
        return None


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


def deepspeed_setup_reason(trainer: Any, sam_config: Any) -> str | None:
    """Why SAM refuses the DeepSpeed config of a constructed Trainer (from `deepspeed=` in the arguments or from
    `accelerate launch`, as Accelerate's plugin holds it), or `None`."""
    plugin = getattr(getattr(trainer.accelerator, "state", None), "deepspeed_plugin", None)
    config = getattr(plugin, "deepspeed_config", None) or {}
    return deepspeed_config_reason(config, sam_config, fp16=bool(getattr(trainer.args, "fp16", False)))


def deepspeed_arguments_reason(value: object, sam_config: Any, fp16: bool) -> str | None:
    """Why SAM refuses the DeepSpeed config that `TrainingArguments(deepspeed=value)` names, or `None`; without
    importing DeepSpeed, when the arguments are built (the trainer checks again, and the engine)."""
    config = deepspeed_config(value)
    return None if config is None else deepspeed_config_reason(config, sam_config, fp16=fp16)


class DeepSpeedSync(GradientSync):
    """SAM's passes on a DeepSpeed ZeRO-1/2 engine prepared by Accelerate (see the module docstring).

    Args:
        accelerator: The Trainer's `Accelerator`, after `train()` prepared the engine.
        engine: The `DeepSpeedEngine` (`trainer.model_wrapped`).
    """

    def __init__(self, accelerator: Any, engine: Any) -> None:
        self.accelerator = accelerator
        self.engine = engine
        self.module = engine.module  # what the first pass runs on
        self._params: list[torch.Tensor] | None = None
        self._grads: list[torch.Tensor | None] = []
        self._boundary = False

    @contextlib.contextmanager
    def clean_pass(self, model: Any, params: Sequence[torch.Tensor], synchronise: bool) -> Iterator[Any]:
        """The clean pass runs on the engine's module, its gradient into SAM's buffer (`first_pass`); the all-reduce
        comes with `gradient_ready`, so `synchronise` has nothing to do here."""
        with self.first_pass(params):
            yield self.module

    def gradient_ready(self, all_reduce: bool) -> None:
        self.load_gradient(all_reduce)

    def perturbed_passes(self) -> contextlib.AbstractContextManager:
        return self.deferred_step()

    def perturbed_pass(self, model: Any, last: bool, micro: bool) -> contextlib.AbstractContextManager:
        return self.accumulation_boundary(model, enabled=last)

    def discard(self, model: Any) -> None:
        self.discard_gradients()

    @contextlib.contextmanager
    def first_pass(self, params: Sequence[torch.Tensor]) -> Iterator[None]:
        """Inside: `accelerator.backward(loss)` adds d loss / d `params` into SAM's buffer, out of DeepSpeed's sight.

        The buffer accumulates over the calls until `load_gradient`; `params` must be the same list each time.
        """
        if self._params is None:
            self._params = list(params)
            self._grads = [None] * len(self._params)
        params, grads = self._params, self._grads

        def backward(loss: torch.Tensor, **kwargs: Any) -> None:
            # `scale_wrt_gas=False` from the Trainer: it divides the loss by the accumulation steps itself, as without
            # DeepSpeed. autograd.grad fills no .grad and runs no AccumulateGrad node: ZeRO's hooks stay silent.
            for i, g in enumerate(torch.autograd.grad(loss, params, allow_unused=True)):
                if g is not None:
                    grads[i] = g if grads[i] is None else grads[i].add_(g)

        self.accelerator.backward = backward  # the instance attribute shadows `Accelerator.backward`
        try:
            yield
        finally:
            del self.accelerator.backward

    @torch.no_grad()
    def load_gradient(self, all_reduce: bool) -> None:
        """Put the first pass's gradient into the parameters' `.grad` (averaged over the processes if `all_reduce`).

        One flat all-reduce per dtype (one in practice). Parameters without a gradient keep `.grad` as it is (None
        under ZeRO-1/2), so the mixin does not perturb them. The buffer is emptied.
        """
        params, grads = self._params or [], self._grads
        self._params, self._grads = None, []
        kept = [(p, g) for p, g in zip(params, grads) if g is not None]
        world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        if all_reduce and world_size > 1 and kept:
            by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
            for _, g in kept:
                by_dtype.setdefault(g.dtype, []).append(g)
            for group in by_dtype.values():
                flat = torch.cat([g.reshape(-1) for g in group])
                torch.distributed.all_reduce(flat)
                flat.div_(world_size)
                for g, reduced in zip(group, flat.split([g.numel() for g in group])):
                    g.copy_(reduced.view_as(g))
        for p, g in kept:
            p.grad = g

    @contextlib.contextmanager
    def deferred_step(self) -> Iterator[None]:
        """Inside: Accelerate's DeepSpeed backward runs `engine.backward` at SAM's boundary and never `engine.step()`.

        `accumulation_boundary` sets the boundary for each backward; the engine calls `step()` after the restore.
        """
        wrapper = self.accelerator.deepspeed_engine_wrapped  # Accelerate, undocumented: see the module docstring
        engine = self.engine

        def backward(loss: torch.Tensor, sync_gradients: bool = True, **kwargs: Any) -> None:
            engine.set_gradient_accumulation_boundary(is_boundary=self._boundary)
            engine.backward(loss, **kwargs)

        wrapper.backward = backward  # the instance attribute shadows `DeepSpeedEngineWrapper.backward`
        try:
            yield
        finally:
            del wrapper.backward
            self._boundary = False

    @contextlib.contextmanager
    def accumulation_boundary(self, model: Any, enabled: bool) -> Iterator[None]:
        """The engine's accumulation boundary for the backward inside (`gradient_sync`'s counterpart under DeepSpeed:
        ZeRO reduces and the step may follow only at the boundary)."""
        self._boundary = enabled
        try:
            yield
        finally:
            self._boundary = False

    def step(self) -> None:
        """The optimizer step that Accelerate's backward would have run at the boundary, now at the restored w."""
        self.engine.step()

    def reset(self) -> None:
        """Empty the first pass's buffer (at each new optimizer step: one cut short leaves nothing behind)."""
        self._params, self._grads = None, []

    def discard_gradients(self) -> None:
        """After a failed second pass: no half-accumulated SAM gradient may reach the optimizer."""
        self.reset()
        self.engine.optimizer.zero_grad(set_to_none=True)
        self.engine.zero_grad()


def deepspeed_sync_for(trainer: Any) -> DeepSpeedSync:
    """The `DeepSpeedSync` of a Trainer whose `train()` has prepared a DeepSpeed engine (`trainer.model_wrapped`).

    Raises:
        `ValueError`: when the engine is outside what SAM supports (`distributed.deepspeed_engine_reason`).
    """
    engine = trainer.model_wrapped
    reason = deepspeed_engine_reason(engine)
    if reason is not None:
        raise ValueError(reason)
    logger.info(
        f"SAM on DeepSpeed ZeRO-{engine.zero_optimization_stage()}: first pass outside the engine, its gradient "
        f"all-reduced by SAM, the engine's step deferred past the restore."
    )
    return DeepSpeedSync(trainer.accelerator, engine)
