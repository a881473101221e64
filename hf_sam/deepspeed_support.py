"""SAM on DeepSpeed ZeRO stages 1 and 2, driven by the Trainer through Accelerate.

Under DeepSpeed, `accelerator.backward(loss)` is Accelerate's `DeepSpeedEngineWrapper.backward`: it sets the engine's
accumulation boundary from `sync_gradients`, calls `engine.backward(loss)` and, at the boundary, `engine.step()`
(clipping, optimizer step, zero grad, LR schedule). ZeRO-1/2 also move the reduced gradients out of `.grad` into flat
per-rank partitions, from hooks on the parameters' gradient accumulation. SAM therefore keeps DeepSpeed out of its
first pass and moves the engine's step after the restore (`DeepSpeedSAM`; the mixin in `trainer.py` drives it):

1. First pass, each micro-batch: the Trainer's own `training_step` on the unwrapped module (`engine.module`: the
   engine's forward would hook its output) with `accelerator.backward` replaced, for that call, by
   `torch.autograd.grad`, which fills no `.grad` and runs no AccumulateGrad node, so ZeRO's reduction hooks, its
   partitions, `micro_steps` and the boundary never see the pass. The gradient accumulates in a buffer of SAM's own.
2. When SAM perturbs (the window's last micro-batch with `accumulation="exact"`, every micro-batch with "micro"):
   one flat all-reduce (mean) of that buffer per dtype over the process group with `sync="global"`, none with
   "local"; the result is put in `.grad` of the module's parameters, where the mixin perturbs as on one device.
   ZeRO-1/2 keep the bit16 weights replicated on every rank (views into flat buffers); the fp32 master partitions
   are not touched.
3. Second pass through the normal path (engine forward, `engine.backward` with its hooks and reductions), with
   Accelerate's wrapper `backward` replaced on the instance: it sets the boundary SAM chooses (only the window's last
   micro-batch) and calls `engine.backward`, never `engine.step()`.
4. The mixin restores w bit for bit, then calls `DeepSpeedSAM.step()`: `engine.step()` on the SAM gradient.

Nothing here imports DeepSpeed. Attributes used besides DeepSpeed's public engine methods (`module`, `backward`,
`step`, `set_gradient_accumulation_boundary`, `zero_grad`) and Accelerate's public `Accelerator.backward` (shadowed
by an instance attribute during the first pass): `Accelerator.deepspeed_engine_wrapped` (Accelerate, undocumented;
its `backward` is shadowed on the instance during the second pass). docs/concepts.md lists them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from transformers.utils import logging

from .distributed import deepspeed_engine_reason

logger = logging.get_logger(__name__)

__all__ = ["DeepSpeedSAM", "deepspeed_sam_for"]


class DeepSpeedSAM:
    """SAM's two passes on a DeepSpeed ZeRO-1/2 engine prepared by Accelerate (see the module docstring).

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

        `accumulation_boundary` sets the boundary for each backward; the mixin calls `step()` after the restore.
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
        """Empty the first pass's buffer (at each new accumulation window: one cut short leaves nothing behind)."""
        self._params, self._grads = None, []

    def discard_gradients(self) -> None:
        """After a failed second pass: no half-accumulated SAM gradient may reach the optimizer."""
        self.reset()
        self.engine.optimizer.zero_grad(set_to_none=True)
        self.engine.zero_grad()


def deepspeed_sam_for(trainer: Any) -> DeepSpeedSAM:
    """The `DeepSpeedSAM` of a Trainer whose `train()` has prepared a DeepSpeed engine (`trainer.model_wrapped`).

    Raises:
        `ValueError`: when the engine is outside what SAM supports (`distributed.deepspeed_engine_reason`).
    """
    engine = trainer.model_wrapped
    reason = deepspeed_engine_reason(engine)
    if reason is not None:
        raise ValueError(reason)
    logger.info(
        f"SAM on DeepSpeed ZeRO-{engine.zero_optimization_stage()}: first pass outside the engine, its gradient "
        f"all-reduced by SAM ({trainer.sam_config.sync!r}), the engine's step deferred past the restore."
    )
    return DeepSpeedSAM(trainer.accelerator, engine)
