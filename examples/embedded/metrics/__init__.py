"""`evaluate` metric scripts shipped inside the package, loaded by path so that nothing is fetched from the Hub.

Example:
    ```python
    import evaluate
    from embedded import metric_path

    accuracy = evaluate.load(metric_path("accuracy"))
    accuracy.compute(predictions=[0, 1], references=[0, 0])  # {"accuracy": 0.5}
    ```
"""

from __future__ import annotations

from pathlib import Path

METRICS = ("accuracy", "exact_match")


def metric_path(name: str) -> str:
    """Return the path of the metric script `name`, for `evaluate.load`.

    Args:
        name (`str`): One of `"accuracy"` and `"exact_match"`.

    Returns:
        `str`: The path of the script (`.../metrics/<name>/<name>.py`).

    Raises:
        `ValueError`: if `name` is not a shipped metric.
    """
    if name not in METRICS:
        raise ValueError(f"`name` must be one of {', '.join(repr(m) for m in METRICS)}, got {name!r}.")
    return str(Path(__file__).resolve().parent / name / f"{name}.py")
