"""Sharpness measurement without training: SAM sharpness, Hessian spectrum, loss landscapes, a Trainer callback.

Every measurement works on any model whose forward returns a loss (Hugging Face models with `labels` in the batch,
or any module with a `loss_fn`), on a `DataLoader`, an iterable of model-ready batches or a dataset of examples. It
runs in eval mode (no dropout) on a fixed list of batches, draws random vectors from a local, seeded
`torch.Generator` (the global RNG is never touched), shows a tqdm progress bar (`progress=False` hides it), and
leaves the model exactly as it found it: weights restored by copy, `requires_grad` and train/eval flags restored,
even on error.

`space` chooses the parameters: `"trainable"` (those with `requires_grad`, i.e. the adapter space of a PEFT model)
or `"full"` (all weights, regardless of `requires_grad`; for LoRA the base weights, which is the space of the merged
weights W + BA). `params` names them explicitly.
"""

from ._core import Batches, default_loss, prepare_batches, select_parameters
from .callback import MEASURES, SharpnessCallback
from .hessian import HessianEigenResult, HessianTraceResult, hessian_eigenvalues, hessian_trace
from .landscape import Landscape, filter_normalized_direction, interpolate, random_landscape
from .plot import plot_landscapes
from .sharpness import SharpnessResult, sam_sharpness

__all__ = [
    "MEASURES",
    "Batches",
    "HessianEigenResult",
    "HessianTraceResult",
    "Landscape",
    "SharpnessCallback",
    "SharpnessResult",
    "default_loss",
    "filter_normalized_direction",
    "hessian_eigenvalues",
    "hessian_trace",
    "interpolate",
    "plot_landscapes",
    "prepare_batches",
    "random_landscape",
    "sam_sharpness",
    "select_parameters",
]
