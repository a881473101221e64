"""What the examples share and the scripts they mirror do not have: embedded offline defaults and run summaries.

Each example imports this module from its own directory, so an example stays runnable from a fresh clone; copying
one elsewhere means copying this file beside it (or passing `--model_name_or_path` and a dataset, which need none of
it). Nothing here reaches the network.

- `digits_dataset`: scikit-learn's bundled 8x8 digit images as a `datasets.DatasetDict` of PIL images, with a fixed
  held-out split and optional label noise (the image example's and the benefit benchmark's default data).
- `tiny_image_config`: small from-scratch `ResNetConfig` (BatchNorm), `ViTConfig` or `ConvNextConfig` for CPU runs.
- `final_train_metrics`: the last logged training loss and `sam_*` metrics, plus their curves.
- `write_json`, `write_predictions`: the metrics and predictions files the examples write.
- `load_classifier`, `classify_texts`: text classification's `--predict_from` mode.
- `SFTExampleArguments` and the functions after it: what `sft_lora.py` adds to TRL's `sft.py` (the embedded
  word-reversal task, LoRA on the last layers only, held-out exact match by greedy generation, `--predict_from`).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
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
            image_size=image_size,
            patch_size=4,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
            **label_kwargs,
        )
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


def classify_texts(model: Any, tokenizer: Any, texts: list[str], max_length: int, batch_size: int = 64) -> list[int]:
    """The argmax class of each text (for `--predict_from`)."""
    import torch

    model.eval()
    predictions: list[int] = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                texts[start : start + batch_size],
                truncation=True,
                max_length=max_length,
                padding=True,
                return_tensors="pt",
            ).to(model.device)
            predictions += model(**batch).logits.argmax(-1).tolist()
    return predictions


def load_classifier(source: str | Path, base_default: str | None = None) -> tuple[Any, Any, dict[int, str]]:
    """Load a run saved by `text_classification.py`: a full model, or its base encoder + LoRA adapter.

    Returns:
        `tuple`: model, tokenizer and `id2label`.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    source = Path(source)
    if not source.is_dir():
        raise ValueError(f"`predict_from` (`--predict_from`) must be a directory of a saved run, got {source}.")
    id2label = {int(k): v for k, v in json.loads((source / "labels.json").read_text()).items()}
    if (source / "adapter_config.json").is_file():  # LoRA: the base encoder with a head of the right size + adapter
        from peft import PeftModel

        base_path = json.loads((source / "adapter_config.json").read_text()).get("base_model_name_or_path")
        base = AutoModelForSequenceClassification.from_pretrained(
            base_path or base_default,
            num_labels=len(id2label),
            id2label=id2label,
            label2id={n: i for i, n in id2label.items()},
        )
        model = PeftModel.from_pretrained(base, str(source))
    else:
        model = AutoModelForSequenceClassification.from_pretrained(source)
    return model, AutoTokenizer.from_pretrained(source), id2label


def write_predictions(out_dir: str | Path, records: list[dict[str, Any]], metrics: dict[str, Any]) -> None:
    """`predictions.jsonl` and `metrics.json` of a `--predict_from` run; prints the first records."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    for record in records[:5]:
        print(json.dumps(record))
    write_json(out / "metrics.json", metrics)


# ---- SFT (examples/sft_lora.py): the embedded task, LoRA on the last layers, held-out exact match ----------------
@dataclass
class SFTExampleArguments:
    """What `sft_lora.py` adds to the arguments of TRL's `sft.py`."""

    use_sam: bool = field(default=True, metadata={"help": "Train with SAM; `false` gives TRL's plain SFTTrainer."})
    lora_last_layers: int | None = field(
        default=None, metadata={"help": "Adapt only the last N transformer layers (cheaper backward on CPU)."}
    )
    system_prompt: str | None = field(default=None, metadata={"help": "System message before each prompt."})
    task_train_size: int = field(default=2000, metadata={"help": "Embedded task: training examples."})
    task_eval_size: int = field(default=200, metadata={"help": "Embedded task: held-out examples (unseen words)."})
    task_min_words: int = field(default=3, metadata={"help": "Embedded task: fewest words per example."})
    task_max_words: int = field(default=4, metadata={"help": "Embedded task: most words per example."})
    label_noise: float = field(default=0.0, metadata={"help": "Embedded task: fraction of wrong training answers."})
    max_new_tokens: int = field(default=24, metadata={"help": "Held-out scoring: generation budget per answer."})
    generation_batch_size: int = field(default=50, metadata={"help": "Held-out scoring: prompts per batch."})
    predict_from: str | None = field(default=None, metadata={"help": "Skip training: answer with this saved run."})
    prompts: list[str] | None = field(default=None, metadata={"help": "With `--predict_from`: prompts to answer."})


def reverse_task_conversations(args: SFTExampleArguments, seed: int) -> Any:
    """The embedded word-reversal task as conversational prompt/completion pairs: `train` and `test` (unseen words)."""
    from embedded import make_reverse_task

    raw = make_reverse_task(
        n_train=args.task_train_size,
        n_eval=args.task_eval_size,
        seed=seed,
        label_noise=args.label_noise,
        min_words=args.task_min_words,
        max_words=args.task_max_words,
    )
    raw["test"] = raw.pop("validation")

    def convert(ex: dict[str, Any]) -> dict[str, Any]:
        return {
            "prompt": messages(ex["prompt"], args.system_prompt),
            "completion": [{"role": "assistant", "content": ex["completion"]}],
        }

    return raw.map(convert, remove_columns=raw["train"].column_names)


def messages(prompt: str, system_prompt: str | None) -> list[dict[str, str]]:
    """A user prompt as chat messages, after an optional system message."""
    return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": prompt}
    ]


def restrict_lora_layers(peft_config: Any, model_name_or_path: str, last_layers: int | None) -> Any:
    """Adapt only the last `last_layers` transformer layers (`layers_to_transform`); unchanged when `None`."""
    if peft_config is None or last_layers is None:
        return peft_config
    from transformers import AutoConfig

    num_layers = AutoConfig.from_pretrained(model_name_or_path).num_hidden_layers
    peft_config.layers_to_transform = list(range(max(0, num_layers - last_layers), num_layers))
    return peft_config


def _text(value: Any) -> str:
    return value[-1]["content"] if isinstance(value, list) else str(value)


def generate_answers(
    model: Any,
    tokenizer: Any,
    prompts: list[Any],
    max_new_tokens: int = 24,
    batch_size: int = 50,
    progress: bool = True,
) -> list[str]:
    """Greedy answers to prompts (chat messages, through the chat template; or plain strings), left-padded batches."""
    import torch
    from tqdm.auto import tqdm

    was_training, padding_side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    answers: list[str] = []
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc="generating", disable=not progress):
            texts = [
                tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                if isinstance(p, list)
                else p
                for p in prompts[start : start + batch_size]
            ]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            with torch.no_grad():
                out = model.generate(
                    **batch,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                )
            decoded = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            answers += [d.strip() for d in decoded]
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return answers


def held_out_exact_match(
    model: Any, tokenizer: Any, ds: Any, args: SFTExampleArguments, progress: bool = True
) -> tuple[float, list[dict[str, str]]]:
    """Exact match of greedy answers against the completions (the shipped `evaluate` script), and the records."""
    import evaluate
    from embedded import metric_path

    answers = generate_answers(
        model, tokenizer, ds["prompt"], args.max_new_tokens, args.generation_batch_size, progress
    )
    references = [_text(c) for c in ds["completion"]]
    records = [
        {"prompt": _text(p), "reference": r, "prediction": a} for p, r, a in zip(ds["prompt"], references, answers)
    ]
    score = evaluate.load(metric_path("exact_match")).compute(predictions=answers, references=references)
    return score["exact_match"], records


def write_sft_metrics(trainer: Any, test: Any, args: SFTExampleArguments, train_s: float) -> dict[str, Any]:
    """After training: held-out exact match (when the test split has prompt/completion), metrics.json."""
    out = Path(trainer.args.output_dir)
    metrics: dict[str, Any] = {
        "use_sam": args.use_sam,
        "seed": trainer.args.seed,
        "max_steps": trainer.args.max_steps,
        "label_noise": args.label_noise,
        "train_runtime_s": train_s,
    }
    if getattr(trainer.args, "sam_rho", None) is not None and args.use_sam:
        metrics["sam_rho"] = trainer.args.sam_rho
    metrics.update(final_train_metrics(trainer.state.log_history))
    if test is not None and {"prompt", "completion"} <= set(test.column_names):
        start = time.perf_counter()
        metrics["eval_exact_match"], records = held_out_exact_match(
            trainer.model, trainer.processing_class, test, args
        )
        metrics["eval_generation_runtime_s"] = time.perf_counter() - start
        metrics["eval_samples"] = len(records)
        with open(out / "predictions.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    write_json(out / "metrics.json", metrics)
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}, indent=2))
    return metrics


def predict_sft(args: SFTExampleArguments, model_args: Any, output_dir: str, test: Any) -> dict[str, Any]:
    """`--predict_from`: load a saved run (a PEFT adapter or a full model) and answer `--prompts` or the test split."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = Path(args.predict_from)
    if not source.is_dir():
        raise ValueError(f"`predict_from` (`--predict_from`) must be a directory of a saved run, got {source}.")
    tokenizer = AutoTokenizer.from_pretrained(source)
    if (source / "adapter_config.json").is_file():
        from embedded import smollm2_path
        from peft import PeftModel

        base = (
            model_args.model_name_or_path
            or json.loads((source / "adapter_config.json").read_text()).get("base_model_name_or_path")
            or smollm2_path()
        )
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(source))
    else:
        model = AutoModelForCausalLM.from_pretrained(source)
    metrics: dict[str, Any] = {"predict_from": str(source)}
    if args.prompts:
        prompts = [messages(p, args.system_prompt) for p in args.prompts]
        answers = generate_answers(model, tokenizer, prompts, args.max_new_tokens, args.generation_batch_size)
        records = [{"prompt": p, "prediction": a} for p, a in zip(args.prompts, answers)]
    else:
        metrics["eval_exact_match"], records = held_out_exact_match(model, tokenizer, test, args)
        metrics["eval_samples"] = len(records)
    write_predictions(output_dir, records, metrics)
    return metrics
