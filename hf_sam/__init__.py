"""hf_sam: Sharpness-Aware Minimization for the Hugging Face Trainer.

`import hf_sam` loads the trainer, its configuration and the variants; the analysis tools (`hf_sam.analysis`, whose
`SharpnessCallback` is also reachable here) load on first use.
"""

from .config import SAMArguments, SAMConfig, SAMTrainingArguments
from .trainer import SAMMixin, SAMTrainer, enable_sam

__version__ = "0.1.0"

__all__ = [
    "SAMArguments",
    "SAMConfig",
    "SAMMixin",
    "SAMTrainer",
    "SAMTrainingArguments",
    "SharpnessCallback",
    "__version__",
    "enable_sam",
]


def __getattr__(name: str):
    if name == "SharpnessCallback":  # analysis tools stay out of the import path of the trainer
        from .analysis import SharpnessCallback

        return SharpnessCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
