"""hf_sam: Sharpness-Aware Minimization for the Hugging Face Trainer."""

from .analysis import SharpnessCallback
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
