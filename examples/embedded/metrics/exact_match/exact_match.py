"""Exact match: the fraction of predicted strings equal to their reference (an `evaluate` metric script).

Shipped with the examples (`examples/embedded/`) and loaded by path, so no Hub access is needed:
`evaluate.load(embedded.metric_path("exact_match"))`. Same inputs and output as the Hub's `exact_match`
metric (`regexes_to_ignore`, `ignore_case`, `ignore_punctuation`, `ignore_numbers`), plus `strip` (on by default:
leading and trailing whitespace never counts, and runs of inner whitespace count as one space).
"""

from __future__ import annotations

import re
import string

import datasets
import evaluate

_DESCRIPTION = "Exact match = (number of predictions equal to their reference after normalisation) / (number)."

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): Predicted strings.
    references (`list` of `str`): Reference strings.
    regexes_to_ignore (`list` of `str`, *optional*): Regular expressions whose matches are removed first.
    ignore_case (`bool`, defaults to `False`): Compare lower-cased strings.
    ignore_punctuation (`bool`, defaults to `False`): Remove `string.punctuation` first.
    ignore_numbers (`bool`, defaults to `False`): Remove digits first.
    strip (`bool`, defaults to `True`): Strip both ends and collapse inner whitespace to one space.

Returns:
    exact_match (`float`): In [0, 1].

Examples:
    >>> exact_match = evaluate.load("path/to/exact_match.py")
    >>> exact_match.compute(predictions=["cat dog", "dog"], references=["cat  dog ", "cat"])
    {'exact_match': 0.5}
"""


def _normalise(
    text: str,
    regexes_to_ignore: list[str] | None,
    ignore_case: bool,
    ignore_punctuation: bool,
    ignore_numbers: bool,
    strip: bool,
) -> str:
    for pattern in regexes_to_ignore or []:
        text = re.sub(pattern, "", text)
    if ignore_case:
        text = text.lower()
    if ignore_punctuation:
        text = text.translate(str.maketrans("", "", string.punctuation))
    if ignore_numbers:
        text = text.translate(str.maketrans("", "", string.digits))
    if strip:
        text = " ".join(text.split())
    return text


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ExactMatch(evaluate.Metric):
    """Exact string match."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string", id="sequence"), "references": datasets.Value("string")}
            ),
        )

    def _compute(
        self,
        predictions: list[str],
        references: list[str],
        regexes_to_ignore: list[str] | None = None,
        ignore_case: bool = False,
        ignore_punctuation: bool = False,
        ignore_numbers: bool = False,
        strip: bool = True,
    ) -> dict[str, float]:
        if len(predictions) == 0:
            raise ValueError("`predictions` is empty: exact match needs at least one prediction.")
        options = (regexes_to_ignore, ignore_case, ignore_punctuation, ignore_numbers, strip)
        hits = sum(_normalise(p, *options) == _normalise(r, *options) for p, r in zip(predictions, references))
        return {"exact_match": float(hits / len(predictions))}
