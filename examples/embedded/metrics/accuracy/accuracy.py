"""Accuracy: the fraction of predictions equal to their references (an `evaluate` metric script).

Shipped with the examples (`examples/embedded/`) and loaded by path, so no Hub access is needed:
`evaluate.load(embedded.metric_path("accuracy"))`. Same inputs and output as the Hub's `accuracy` metric.
"""

from __future__ import annotations

import datasets
import evaluate

_DESCRIPTION = "Accuracy = (number of predictions equal to their reference) / (number of predictions)."

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): Predicted labels.
    references (`list` of `int`): Ground-truth labels.
    normalize (`bool`, defaults to `True`): Return the fraction; `False` returns the count of correct predictions.
    sample_weight (`list` of `float`, *optional*): Weight of each prediction.

Returns:
    accuracy (`float`): In [0, 1] (or the count, with `normalize=False`).

Examples:
    >>> accuracy = evaluate.load("path/to/accuracy.py")
    >>> accuracy.compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'accuracy': 0.6666666666666666}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    """Accuracy of label predictions."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(
        self,
        predictions: list[int],
        references: list[int],
        normalize: bool = True,
        sample_weight: list[float] | None = None,
    ) -> dict[str, float]:
        if len(predictions) == 0:
            raise ValueError("`predictions` is empty: accuracy needs at least one prediction.")
        weights = sample_weight if sample_weight is not None else [1.0] * len(predictions)
        if len(weights) != len(predictions):
            raise ValueError(f"`sample_weight` has {len(weights)} entries for {len(predictions)} predictions.")
        correct = sum(w for p, r, w in zip(predictions, references, weights) if p == r)
        return {"accuracy": float(correct / sum(weights) if normalize else correct)}
