"""What the examples share and the scripts they mirror do not have: embedded offline defaults and run summaries.

Each example imports this module from its own directory, so an example stays runnable from a fresh clone; copying
one elsewhere means copying this file beside it (or passing `--model_name_or_path` and a dataset, which need none of
it). Nothing here reaches the network.

- `digits_dataset`: scikit-learn's bundled 8x8 digit images as a `datasets.DatasetDict` of PIL images, with a fixed
  held-out split and optional label noise (the image example's and the benefit benchmark's default data).
- `tiny_image_config`: small from-scratch `ResNetConfig` (BatchNorm), `ViTConfig` or `ConvNextConfig` for CPU runs.
- `final_train_metrics`: the last logged training loss and `sam_*` metrics, plus their curves.
- `write_json`: the metrics file each example writes.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

SAM_LOG_KEYS = ("loss", "sam_perturbed_loss", "sam_sharpness", "sam_grad_norm", "sam_skipped")


def noisy_labels(labels: list[int], num_classes: int, label_noise: float, seed: int) -> tuple[list[int], list[bool]]:
    """Replace exactly `round(label_noise * len(labels))` labels, chosen at random, by a different random class.

    Returns:
        `tuple[list[int], list[bool]]`: The new labels and which ones were changed.
    """
    if not (isinstance(label_noise, (int, float)) and math.isfinite(label_noise) and 0 <= label_noise <= 1):
        raise ValueError(f"`label_noise` (`--label_noise`) must be a number in [0, 1], got {label_noise!r}.")
    rng = random.Random(f"label-noise-{seed}")
    chosen = set(rng.sample(range(len(labels)), round(label_noise * len(labels))))
    out = [rng.choice([c for c in range(num_classes) if c != y]) if i in chosen else y for i, y in enumerate(labels)]
    return out, [i in chosen for i in range(len(labels))]


def digits_dataset(n_train: int = 1000, seed: int = 0, label_noise: float = 0.0) -> Any:
    """scikit-learn's 1,797 bundled 8x8 digit images as PIL images: `train` (`n_train`) and `validation` (the rest).

    The split is a seeded permutation; only training labels get noise (`noisy` marks them).

    Returns:
        `DatasetDict`: columns `image` (`datasets.Image`), `label` (`ClassLabel` "0".."9") and `noisy`.
    """
    import numpy as np
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value
    from PIL import Image as PILImage
    from sklearn.datasets import load_digits

    digits = load_digits()
    if not 1 <= n_train < len(digits.images):
        raise ValueError(f"`n_train` must be in [1, {len(digits.images) - 1}], got {n_train!r}.")
    order = np.random.default_rng(seed).permutation(len(digits.images))
    images = [PILImage.fromarray((digits.images[i] * 255 / 16).round().astype("uint8"), mode="L") for i in order]
    labels = [int(digits.target[i]) for i in order]
    train_labels, noisy = noisy_labels(labels[:n_train], 10, label_noise, seed)
    features = Features(
        {"image": Image(), "label": ClassLabel(names=[str(d) for d in range(10)]), "noisy": Value("bool")}
    )
    return DatasetDict(
        train=Dataset.from_dict({"image": images[:n_train], "label": train_labels, "noisy": noisy}, features=features),
        validation=Dataset.from_dict(
            {"image": images[n_train:], "label": labels[n_train:], "noisy": [False] * (len(labels) - n_train)},
            features=features,
        ),
    )


def tiny_image_config(model_type: str, image_size: int, labels: list[str]) -> Any:
    """A small image classifier's config, trained from scratch on CPU in minutes.

    Args:
        model_type (`str`): `"resnet"` (BatchNorm), `"vit"` or `"convnext"` (LayerNorm).
        image_size (`int`): Input height and width.
        labels (`list[str]`): Class names.
    """
    from transformers import ConvNextConfig, ResNetConfig, ViTConfig

    label_kwargs = {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {n: i for i, n in enumerate(labels)},
    }
    if model_type == "resnet":
        return ResNetConfig(
            embedding_size=16, hidden_sizes=[16, 32, 64], depths=[1, 1, 1], layer_type="basic", **label_kwargs
        )
    if model_type == "vit":
        return ViTConfig(
            image_size=image_size, patch_size=4, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=128, **label_kwargs,
        )  # fmt: skip
    if model_type == "convnext":
        return ConvNextConfig(
            image_size=image_size, patch_size=2, hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, **label_kwargs
        )
    raise ValueError(f"`model_type` must be 'resnet', 'vit' or 'convnext', got {model_type!r}.")


def final_train_metrics(log_history: list[dict[str, float]]) -> dict[str, Any]:
    """The last logged value of the training loss and of each `sam_*` metric (`final_<key>`), and the curves."""
    logs = [log for log in log_history if "loss" in log and "step" in log]
    out: dict[str, Any] = {"curves": {"step": [log["step"] for log in logs]}}
    for key in SAM_LOG_KEYS:
        values = [log.get(key) for log in logs]
        out["curves"][key] = values
        finite = [v for v in values if v is not None and math.isfinite(v)]
        if finite:
            out[f"final_{key}"] = finite[-1]
    return out


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    """Write `payload` as indented JSON, creating the directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
