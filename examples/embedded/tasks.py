"""Generated tasks with exactly checkable answers and a shifted held-out split.

Two tasks, both deterministic given a seed and both built from one embedded list of common English words in four
categories:

- `make_reverse_task`: "reverse: cat lamp river" -> "river lamp cat", for causal-LM fine-tuning. The held-out split
  uses words that never appear in training, so an exact answer there needs the operation, not memorised strings.
- `make_classification_task`: "my aunt keeps talking about the zebra." -> `animal`, for sequence classification. The
  held-out split uses unseen words in unseen sentence templates.

Both take `label_noise`: that fraction of the training examples gets a wrong answer (a different random permutation
of the words, or a different class), chosen exactly (`round(label_noise * n_train)` examples) and reproducibly. The
held-out split is never corrupted.
"""

from __future__ import annotations

import math
import random

from datasets import Dataset, DatasetDict

CATEGORIES: dict[str, tuple[str, ...]] = {
    "animal": (
        "cat", "dog", "horse", "cow", "sheep", "goat", "pig", "mouse", "rabbit", "fox", "wolf", "bear", "lion",
        "tiger", "deer", "duck", "goose", "owl", "eagle", "snake", "frog", "whale", "shark", "seal", "crab",
        "bee", "ant", "spider", "monkey", "zebra", "camel", "donkey", "parrot", "turtle", "otter", "badger",
        "moose", "hawk", "crow", "swan", "squirrel", "beaver", "lizard", "salmon", "dolphin", "pony", "bat", "llama",
    ),
    "food": (
        "bread", "apple", "cheese", "butter", "rice", "soup", "pasta", "pizza", "cake", "cookie", "salad", "honey",
        "banana", "orange", "lemon", "grape", "melon", "peach", "pear", "plum", "cherry", "tomato", "potato",
        "carrot", "onion", "garlic", "bean", "corn", "egg", "milk", "yogurt", "sugar", "salt", "pepper", "olive",
        "mango", "noodle", "steak", "bacon", "sausage", "muffin", "waffle", "pancake", "candy", "jam", "walnut",
        "peanut", "cereal",
    ),
    "vehicle": (
        "car", "bus", "truck", "train", "plane", "boat", "ship", "bike", "taxi", "van", "tram", "jet", "yacht",
        "canoe", "kayak", "scooter", "tractor", "wagon", "rocket", "subway", "ferry", "helicopter", "motorcycle",
        "sled", "cart", "jeep", "limo", "glider", "barge", "raft", "submarine", "ambulance", "trolley", "carriage",
        "bicycle", "tank", "caravan", "minivan", "coach", "airship", "hovercraft", "skateboard", "sailboat",
        "tugboat", "sedan", "pickup", "cab", "shuttle",
    ),
    "tool": (
        "hammer", "saw", "drill", "wrench", "knife", "axe", "shovel", "rake", "ladder", "rope", "needle", "brush",
        "chisel", "pliers", "screwdriver", "spade", "broom", "bucket", "scissors", "ruler", "tape", "glue",
        "pencil", "pen", "stapler", "clamp", "file", "sander", "trowel", "hoe", "crowbar", "mallet", "funnel",
        "sieve", "whisk", "ladle", "spatula", "compass", "magnet", "lantern", "torch", "level", "vise", "anvil",
        "sickle", "pickaxe", "shears", "grinder",
    ),
}  # fmt: skip

TRAIN_TEMPLATES = (
    "i saw a {} yesterday.",
    "there is a {} over there.",
    "she told me about the {}.",
    "we talked about a {} for an hour.",
    "the picture shows a {}.",
    "he pointed at the {}.",
)
HELD_OUT_TEMPLATES = (
    "my aunt keeps talking about the {}.",
    "look, a {}!",
    "the story was about an old {}.",
    "nobody expected the {} to be there.",
)

REVERSE_PREFIX = "reverse:"


def _split_words(seed: int, held_out_fraction: float) -> tuple[list[str], list[str], dict[str, str]]:
    """Split every category's words into training and held-out words, deterministically."""
    rng = random.Random(f"words-{seed}")
    train, held_out, category_of = [], [], {}
    for category, words in CATEGORIES.items():
        shuffled = sorted(words)
        rng.shuffle(shuffled)
        n_held = max(1, round(held_out_fraction * len(shuffled)))
        held_out += shuffled[:n_held]
        train += shuffled[n_held:]
        category_of.update(dict.fromkeys(words, category))
    return train, held_out, category_of


def _check_common(n_train: int, n_eval: int, label_noise: float, held_out_fraction: float) -> None:
    for name, value in (("n_train", n_train), ("n_eval", n_eval)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")
    if not (isinstance(label_noise, (int, float)) and math.isfinite(label_noise) and 0 <= label_noise <= 1):
        raise ValueError(f"`label_noise` (`--label_noise`) must be a number in [0, 1], got {label_noise!r}.")
    if not (isinstance(held_out_fraction, (int, float)) and 0 < held_out_fraction < 1):
        raise ValueError(f"`held_out_fraction` must be a number in (0, 1), got {held_out_fraction!r}.")


def _noisy_indices(rng: random.Random, n: int, label_noise: float) -> set[int]:
    return set(rng.sample(range(n), round(label_noise * n)))


def make_reverse_task(
    n_train: int = 2000,
    n_eval: int = 200,
    seed: int = 0,
    label_noise: float = 0.0,
    min_words: int = 3,
    max_words: int = 4,
    held_out_fraction: float = 0.25,
) -> DatasetDict:
    """Generate the word-reversal task as prompt/completion pairs.

    Each prompt is `"reverse: w1 w2 ... wk"` and its completion `"wk ... w2 w1"`. The training split draws words
    from 75% of the embedded vocabulary, the `"validation"` split only from the other 25%: a model that is exact on
    it has learnt to reverse, not to recall training strings.

    Args:
        n_train (`int`, defaults to `2000`): Number of training examples.
        n_eval (`int`, defaults to `200`): Number of held-out examples.
        seed (`int`, defaults to `0`): Seed of the word split, the examples and the label noise.
        label_noise (`float`, defaults to `0.0`): Fraction of training completions replaced by a wrong order of the
            same words (exactly `round(label_noise * n_train)` of them).
        min_words (`int`, defaults to `3`): Fewest words per example (>= 2).
        max_words (`int`, defaults to `4`): Most words per example (>= `min_words`).
        held_out_fraction (`float`, defaults to `0.25`): Fraction of each category's words kept for held-out data.

    Returns:
        `DatasetDict`: `"train"` and `"validation"` splits with columns `prompt`, `completion` (strings), `words`
        (the list of words) and `noisy` (`True` where the completion was corrupted).

    Raises:
        `ValueError`: naming the argument, when a setting is out of range.
    """
    _check_common(n_train, n_eval, label_noise, held_out_fraction)
    if isinstance(min_words, bool) or not isinstance(min_words, int) or min_words < 2:
        raise ValueError(f"`min_words` must be an integer >= 2, got {min_words!r}.")
    if isinstance(max_words, bool) or not isinstance(max_words, int) or max_words < min_words:
        raise ValueError(f"`max_words` must be an integer >= `min_words` ({min_words}), got {max_words!r}.")
    train_words, held_out_words, _ = _split_words(seed, held_out_fraction)
    if max_words > len(held_out_words):
        raise ValueError(f"`max_words` must be at most {len(held_out_words)}, got {max_words}.")

    def generate(words: list[str], n: int, rng: random.Random, noisy: set[int]) -> dict[str, list]:
        rows: dict[str, list] = {"prompt": [], "completion": [], "words": [], "noisy": []}
        for i in range(n):
            chosen = rng.sample(words, rng.randint(min_words, max_words))
            answer = chosen[::-1]
            if i in noisy:  # a wrong order of the same words, from its own generator: the prompts stay the same
                corrupt = random.Random(f"reverse-corrupt-{seed}-{i}")
                while answer == chosen[::-1]:
                    answer = corrupt.sample(chosen, len(chosen))
            rows["prompt"].append(f"{REVERSE_PREFIX} {' '.join(chosen)}")
            rows["completion"].append(" ".join(answer))
            rows["words"].append(chosen)
            rows["noisy"].append(i in noisy)
        return rows

    train_rng = random.Random(f"reverse-train-{seed}")
    eval_rng = random.Random(f"reverse-eval-{seed}")
    noisy = _noisy_indices(random.Random(f"reverse-noise-{seed}"), n_train, label_noise)
    return DatasetDict(
        train=Dataset.from_dict(generate(train_words, n_train, train_rng, noisy)),
        validation=Dataset.from_dict(generate(held_out_words, n_eval, eval_rng, set())),
    )


def reverse_answer(prompt: str) -> str:
    """The correct completion of a reverse-task prompt (`"reverse: a b c"` -> `"c b a"`).

    Args:
        prompt (`str`): A prompt of `make_reverse_task`.

    Returns:
        `str`: The words after the `"reverse:"` prefix, in reverse order.

    Raises:
        `ValueError`: if the prompt does not start with `"reverse:"`.
    """
    if not prompt.startswith(REVERSE_PREFIX):
        raise ValueError(f"A reverse-task prompt starts with {REVERSE_PREFIX!r}, got {prompt!r}.")
    return " ".join(prompt[len(REVERSE_PREFIX) :].split()[::-1])


def make_classification_task(
    n_train: int = 1000,
    n_eval: int = 200,
    seed: int = 0,
    label_noise: float = 0.0,
    held_out_fraction: float = 0.25,
) -> DatasetDict:
    """Generate the word-category classification task (animal, food, vehicle, tool).

    Each sentence mentions one word of a category in a template; its label is that category. Training sentences use
    75% of each category's words and six templates; the `"validation"` split uses only the other 25% of the words,
    in four other templates, so held-out accuracy measures whether the category transfers to unseen words.

    Args:
        n_train (`int`, defaults to `1000`): Number of training examples.
        n_eval (`int`, defaults to `200`): Number of held-out examples.
        seed (`int`, defaults to `0`): Seed of the word split, the examples and the label noise.
        label_noise (`float`, defaults to `0.0`): Fraction of training labels replaced by a different, random class
            (exactly `round(label_noise * n_train)` of them).
        held_out_fraction (`float`, defaults to `0.25`): Fraction of each category's words kept for held-out data.

    Returns:
        `DatasetDict`: `"train"` and `"validation"` splits with columns `sentence`, `label` (a `ClassLabel` over the
        category names), `word` and `noisy`.

    Raises:
        `ValueError`: naming the argument, when a setting is out of range.
    """
    from datasets import ClassLabel, Features, Value

    _check_common(n_train, n_eval, label_noise, held_out_fraction)
    train_words, held_out_words, category_of = _split_words(seed, held_out_fraction)
    names = list(CATEGORIES)
    features = Features(
        {
            "sentence": Value("string"),
            "label": ClassLabel(names=names),
            "word": Value("string"),
            "noisy": Value("bool"),
        }
    )

    def generate(words: list[str], templates: tuple[str, ...], n: int, rng: random.Random, noisy: set[int]) -> dict:
        rows: dict[str, list] = {"sentence": [], "label": [], "word": [], "noisy": []}
        for i in range(n):
            word = rng.choice(words)
            label = names.index(category_of[word])
            if i in noisy:  # from its own generator: the sentences stay those of the clean data
                label = random.Random(f"classify-corrupt-{seed}-{i}").choice(
                    [c for c in range(len(names)) if c != label]
                )
            rows["sentence"].append(rng.choice(templates).format(word))
            rows["label"].append(label)
            rows["word"].append(word)
            rows["noisy"].append(i in noisy)
        return rows

    noisy = _noisy_indices(random.Random(f"classify-noise-{seed}"), n_train, label_noise)
    train = generate(train_words, TRAIN_TEMPLATES, n_train, random.Random(f"classify-train-{seed}"), noisy)
    held = generate(held_out_words, HELD_OUT_TEMPLATES, n_eval, random.Random(f"classify-eval-{seed}"), set())
    return DatasetDict(
        train=Dataset.from_dict(train, features=features),
        validation=Dataset.from_dict(held, features=features),
    )
