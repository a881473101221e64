"""`SharpnessCallback`: sharpness and Hessian measures at evaluation time, logged next to the other eval metrics."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn
from transformers import TrainerCallback
from transformers.utils import logging

from ._core import LossFn, check_choice, check_number, prepare_batches
from .hessian import hessian_eigenvalues, hessian_trace
from .sharpness import sam_sharpness

logger = logging.get_logger(__name__)

__all__ = ["MEASURES", "SharpnessCallback"]

MEASURES = ("sharpness", "hessian_eigenvalue", "hessian_trace")


class SharpnessCallback(TrainerCallback):
    """Measures sharpness at each evaluation and adds it to the evaluation metrics.

    After `Trainer.evaluate` (at every `eval_strategy` point, or a direct call) the chosen measures run on
    `data` (default: the batches of the evaluation that just ran, up to `max_batches`), and the values join the
    metrics with the evaluation's prefix: `eval_sharpness`, `eval_hessian_eigenvalue` (or `eval_hessian_eigenvalue_1`,
    `_2`, ... for `top_k` > 1) and `eval_hessian_trace`. They appear in the dict `evaluate()` returns (so
    `metric_for_best_model="eval_sharpness"` works, with `greater_is_better=False`) and in that evaluation's entry of
    `trainer.state.log_history`. Reporting integrations (TensorBoard, W&B, ...) receive the evaluation logs before
    `on_evaluate`, and a callback is not handed the Trainer: add the callback with `callback.attach(trainer)` (instead
    of `callbacks=[...]`) and the values are also sent to them, as a log of their own at the same step.

    The model is measured in eval mode and left exactly as it was (weights, `requires_grad`, train/eval flags); the
    global RNG is not touched. Each process measures its own batches (no collective).

    Args:
        data (`Any`, *optional*): What to measure on: a `DataLoader`, an iterable of batches or a dataset of examples.
            Default: the Trainer's evaluation dataloader of the evaluation that just ran.
        measures (`Iterable[str]`, defaults to `("sharpness",)`): Any of `"sharpness"`, `"hessian_eigenvalue"`,
            `"hessian_trace"`.
        rho (`float`, defaults to `0.05`): Sharpness radius.
        adaptive (`bool`, defaults to `False`): ASAM's adaptive ball for sharpness.
        eta (`float`, defaults to `0.01`): ASAM's offset.
        steps (`int`, defaults to `1`): Sharpness ascent steps.
        m (`int`, *optional*): m-sharpness chunk size.
        top_k (`int`, defaults to `1`): Hessian eigenvalues.
        max_iter (`int`, defaults to `20`): Power iterations per eigenvalue at most.
        tol (`float`, defaults to `1e-3`): Power-iteration relative tolerance.
        trace_samples (`int`, defaults to `10`): Hutchinson samples.
        space (`str`, defaults to `"trainable"`): `"trainable"` (adapter space for PEFT) or `"full"`.
        loss_fn (`Callable`, *optional*): Loss of a batch; default `model(**batch).loss`.
        batch_size (`int`, *optional*): Batch size when `data` is a dataset of examples.
        collate_fn (`Callable`, *optional*): Collator when `data` is a dataset of examples.
        max_batches (`int`, *optional*, defaults to `8`): Batches measured (None: all).
        seed (`int`, defaults to `0`): Seed for the Hessian measures' random vectors.
        progress (`bool`, defaults to `False`): Progress bars.
    """

    def __init__(
        self,
        data: Any = None,
        measures: Iterable[str] = ("sharpness",),
        *,
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.01,
        steps: int = 1,
        m: int | None = None,
        top_k: int = 1,
        max_iter: int = 20,
        tol: float = 1e-3,
        trace_samples: int = 10,
        space: str = "trainable",
        loss_fn: LossFn | None = None,
        batch_size: int | None = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        max_batches: int | None = 8,
        seed: int = 0,
        progress: bool = False,
    ) -> None:
        measures = (measures,) if isinstance(measures, str) else tuple(measures)
        if not measures:
            raise ValueError(f"`measures` must name at least one of {MEASURES}.")
        for name in measures:
            check_choice("measures", name, MEASURES)
        check_choice("space", space, ("trainable", "full"))
        check_number("rho", rho)
        check_number("steps", steps, integer=True)
        check_number("top_k", top_k, integer=True)
        check_number("max_iter", max_iter, integer=True)
        check_number("trace_samples", trace_samples, integer=True)
        if m is not None:
            check_number("m", m, integer=True)
        if max_batches is not None:
            check_number("max_batches", max_batches, integer=True)
        self.data = data
        self.measures = measures
        self.sharpness_kwargs = dict(rho=rho, adaptive=adaptive, eta=eta, steps=steps, m=m)
        self.eigen_kwargs = dict(k=top_k, max_iter=max_iter, tol=tol, seed=seed)
        self.trace_kwargs = dict(samples=trace_samples, seed=seed)
        self.common = dict(space=space, loss_fn=loss_fn, progress=progress)
        self.batch_size = batch_size
        self.collate_fn = collate_fn
        self.max_batches = max_batches
        self._trainer: weakref.ref | None = None

    def attach(self, trainer: Any) -> SharpnessCallback:
        """Add this callback to `trainer` and send its values to the trainer's reporting integrations too.

        Args:
            trainer (`transformers.Trainer`): The trainer to measure at each evaluation.

        Returns:
            `SharpnessCallback`: this callback.
        """
        self._trainer = weakref.ref(trainer)
        trainer.add_callback(self)
        return self

    def measure(self, model: nn.Module, data: Any) -> dict[str, float]:
        """Run the chosen measures on `model` and `data`; returns metric names (without prefix) and values."""
        batches = prepare_batches(
            data, batch_size=self.batch_size, collate_fn=self.collate_fn, max_batches=self.max_batches
        ).batches
        out: dict[str, float] = {}
        if "sharpness" in self.measures:
            out["sharpness"] = sam_sharpness(model, batches, **self.sharpness_kwargs, **self.common).sharpness
        if "hessian_eigenvalue" in self.measures:
            values = hessian_eigenvalues(model, batches, **self.eigen_kwargs, **self.common).eigenvalues
            if len(values) == 1:
                out["hessian_eigenvalue"] = values[0]
            else:
                out.update({f"hessian_eigenvalue_{i + 1}": v for i, v in enumerate(values)})
        if "hessian_trace" in self.measures:
            out["hessian_trace"] = hessian_trace(model, batches, **self.trace_kwargs, **self.common).trace
        return out

    def on_evaluate(self, args, state, control, model=None, metrics=None, eval_dataloader=None, **kwargs):
        """Measure, then add `{prefix}_<measure>` to `metrics` and to the evaluation's `log_history` entry."""
        if model is None or metrics is None:
            return
        data = self.data if self.data is not None else eval_dataloader
        if data is None:
            logger.warning("SharpnessCallback: no `data` and no evaluation dataloader; nothing measured.")
            return
        prefix = next((k[: -len("_runtime")] for k in metrics if k.endswith("_runtime")), "eval")
        values = {f"{prefix}_{k}": v for k, v in self.measure(model, data).items()}
        metrics.update(values)
        for entry in reversed(state.log_history):
            if entry.get("step") == state.global_step and any(k.startswith(f"{prefix}_") for k in entry):
                entry.update(values)
                break
        else:
            state.log_history.append({**values, "step": state.global_step})
        trainer = self._trainer() if self._trainer is not None else None
        if trainer is not None:  # the integrations' `on_log` (TensorBoard, W&B, ...), without a new history entry
            trainer.control = trainer.callback_handler.on_log(args, state, control, dict(values))
        logger.info(f"Sharpness measures at step {state.global_step}: {values}")
