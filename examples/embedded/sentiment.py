"""Word sentiment: thousands of independent held-out items, for measuring small effects with enough power.

The words and their polarity come from the VADER sentiment lexicon (Hutto & Gilbert 2014; the `vadersentiment`
wheel ships it, MIT licence): each entry is the mean of ten human ratings on a -4..+4 scale. Kept: lowercase
alphabetic entries rated at least 1.0 away from neutral (5,586 words: 2,442 positive, 3,144 negative); the label is
the sign of the mean rating.

The split is by word family, not by word: words that share their first five letters ("abandon", "abandoned",
"abandonment") fall in the same split, so a held-out word is never an inflection of a training word. A fixed
`split_seed` gives the same validation and test words to every run; the training examples of a run are drawn from
the remaining words with the run's seed, and a `label_noise` fraction of them (exactly `round(label_noise * n)`)
get the other label. Validation and test labels are never corrupted; validation is for choosing settings (rho),
test for reporting.
"""

from __future__ import annotations

import importlib.util
import math
import random
import re
from functools import lru_cache
from pathlib import Path

from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

__all__ = ["LABELS", "make_sentiment_task", "sentiment_lexicon"]

LABELS = ("positive", "negative")
VADER_WHEEL = "vadersentiment"
MIN_STRENGTH = 1.0
FAMILY_PREFIX = 5


@lru_cache(maxsize=1)
def sentiment_lexicon() -> tuple[tuple[str, int], ...]:
    """(word, label index) for every kept VADER entry, in the lexicon's (alphabetical) order."""
    spec = importlib.util.find_spec("vaderSentiment")  # located, not imported
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The sentiment task needs the `{VADER_WHEEL}` wheel (its lexicon): `pip install {VADER_WHEEL}==3.3.2`."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "vader_lexicon.txt"
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) < 2 or not re.fullmatch(r"[a-z]+", parts[0]):
            continue
        rating = float(parts[1])
        if abs(rating) >= MIN_STRENGTH:
            entries.append((parts[0], 0 if rating > 0 else 1))
    return tuple(entries)


def _split_families(n_validation: int, n_test: int, split_seed: int) -> tuple[list, list, list]:
    families: dict[str, list[tuple[str, int]]] = {}
    for word, label in sentiment_lexicon():
        families.setdefault(word[:FAMILY_PREFIX], []).append((word, label))
    order = sorted(families)
    random.Random(f"sentiment-split-{split_seed}").shuffle(order)
    validation: list[tuple[str, int]] = []
    test: list[tuple[str, int]] = []
    train: list[tuple[str, int]] = []
    for key in order:
        if len(test) < n_test:
            test += families[key]
        elif len(validation) < n_validation:
            validation += families[key]
        else:
            train += families[key]
    return train, validation, test


def make_sentiment_task(
    n_train: int = 1000,
    seed: int = 0,
    label_noise: float = 0.0,
    n_validation: int = 1000,
    n_test: int = 2000,
    split_seed: int = 0,
    per_class: int | None = None,
) -> DatasetDict:
    """Generate the word-sentiment task: `"train"`, `"validation"` and `"test"` splits.

    Args:
        n_train (`int`, defaults to `1000`): Training examples (distinct words), drawn with `seed`.
        seed (`int`, defaults to `0`): Seed of the training draw and of the label noise.
        label_noise (`float`, defaults to `0.0`): Fraction of training labels flipped (exactly `round(label_noise *
            n_train)` of them).
        n_validation (`int`, defaults to `1000`): At least this many validation words (whole families are kept).
        n_test (`int`, defaults to `2000`): At least this many test words (whole families are kept).
        split_seed (`int`, defaults to `0`): Seed of the word split; the same for every run of a study.
        per_class (`int`, *optional*): Few-shot: draw exactly this many training words of each label instead of
            `n_train` words at random.

    Returns:
        `DatasetDict`: splits with columns `word`, `label` (`ClassLabel` over `LABELS`) and `noisy` (`True` where the
        training label was flipped).

    Raises:
        `ValueError`: naming the argument, when a setting is out of range or asks for more words than there are.
    """
    for name, value in (("n_train", n_train), ("n_validation", n_validation), ("n_test", n_test)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")
    if not (isinstance(label_noise, (int, float)) and math.isfinite(label_noise) and 0 <= label_noise <= 1):
        raise ValueError(f"`label_noise` must be a number in [0, 1], got {label_noise!r}.")
    pool, validation, test = _split_families(n_validation, n_test, split_seed)
    rng = random.Random(f"sentiment-train-{seed}")
    if per_class is not None:
        chosen = []
        for label in range(len(LABELS)):
            words = [item for item in pool if item[1] == label]
            if per_class > len(words):
                raise ValueError(f"`per_class` must be at most {len(words)}, got {per_class}.")
            chosen += rng.sample(words, per_class)
        rng.shuffle(chosen)
    else:
        if n_train > len(pool):
            raise ValueError(f"`n_train` must be at most {len(pool)} (the training words), got {n_train}.")
        chosen = rng.sample(pool, n_train)
    noisy = set(random.Random(f"sentiment-noise-{seed}").sample(range(len(chosen)), round(label_noise * len(chosen))))
    features = Features({"word": Value("string"), "label": ClassLabel(names=list(LABELS)), "noisy": Value("bool")})

    def rows(items: list[tuple[str, int]], flipped: set[int]) -> Dataset:
        return Dataset.from_dict(
            {
                "word": [w for w, _ in items],
                "label": [1 - y if i in flipped else y for i, (_, y) in enumerate(items)],
                "noisy": [i in flipped for i in range(len(items))],
            },
            features=features,
        )

    return DatasetDict(train=rows(chosen, noisy), validation=rows(validation, set()), test=rows(test, set()))
