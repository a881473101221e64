#!/usr/bin/env python
"""Image classification with SAM, in the manner of transformers' `run_image_classification.py`.

Any `AutoModelForImageClassification`: a hub id or local path (`--model_name_or_path`, fine-tuned), or a small model
trained from scratch from a config (`--model_type resnet|vit|convnext`, see `examples/_common.py`); data from the hub
(`--dataset_name`), image folders (`--train_dir`/`--validation_dir`), or, by default and with no network,
scikit-learn's bundled 8x8 digit images (upsampled by the image processor; `--label_noise` corrupts training labels).
Accuracy through `evaluate`, with the metric script shipped in hf_sam loaded by path.

Examples:
    ```bash
    python examples/image_classification.py --output_dir out/img-sam --max_steps 300 --label_noise 0.4
    python examples/image_classification.py --output_dir out/img-adamw --max_steps 300 --label_noise 0.4 \
        --use_sam false
    python examples/image_classification.py --model_type vit --output_dir out/img-vit
    python examples/image_classification.py --model_name_or_path google/vit-base-patch16-224-in21k \
        --dataset_name beans --output_dir out/beans
    ```
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import evaluate
import numpy as np
import torch
from datasets import load_dataset
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    HfArgumentParser,
    Trainer,
    ViTImageProcessorPil,
    set_seed,
)

from hf_sam import SAMTrainer, SAMTrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/_common.py, examples/embedded/
from _common import digits_dataset, final_train_metrics, tiny_image_config, write_json  # noqa: E402
from embedded import metric_path  # noqa: E402


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "Hub id or path of a pretrained model."})
    model_type: str = field(
        default="resnet", metadata={"help": "Without `--model_name_or_path`: a small 'resnet', 'vit' or 'convnext'."}
    )
    image_size: int = field(default=32, metadata={"help": "Input size of a model built from a config."})
    use_sam: bool = field(default=True, metadata={"help": "Train with SAM; `false` gives the plain Trainer."})


@dataclass
class DataTrainingArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "A dataset from the hub."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Its configuration name."})
    train_dir: str | None = field(default=None, metadata={"help": "A folder of training images (imagefolder)."})
    validation_dir: str | None = field(default=None, metadata={"help": "A folder of validation images."})
    train_val_split: float = field(default=0.15, metadata={"help": "Held-out fraction when there is no validation."})
    image_column_name: str = field(default="image", metadata={"help": "Column holding the images."})
    label_column_name: str = field(default="label", metadata={"help": "Column holding the labels."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep this many training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep this many held-out examples."})
    digits_train_size: int = field(default=500, metadata={"help": "Embedded digits: training images (of 1,797)."})
    label_noise: float = field(default=0.0, metadata={"help": "Embedded digits: fraction of wrong training labels."})


def collate_fn(examples):
    pixel_values = torch.stack([example["pixel_values"] for example in examples])
    labels = torch.tensor([example["labels"] for example in examples])
    return {"pixel_values": pixel_values, "labels": labels}


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, SAMTrainingArguments))
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    set_seed(training_args.seed)

    if data_args.dataset_name is not None:
        dataset = load_dataset(data_args.dataset_name, data_args.dataset_config_name)
    elif data_args.train_dir is not None or data_args.validation_dir is not None:
        data_files = {}
        if data_args.train_dir is not None:
            data_files["train"] = os.path.join(data_args.train_dir, "**")
        if data_args.validation_dir is not None:
            data_files["validation"] = os.path.join(data_args.validation_dir, "**")
        dataset = load_dataset("imagefolder", data_files=data_files)
    else:
        dataset = digits_dataset(data_args.digits_train_size, training_args.seed, data_args.label_noise)

    # If we don't have a validation split, split off a percentage of train as validation.
    if "validation" not in dataset and data_args.train_val_split > 0.0:
        split = dataset["train"].train_test_split(data_args.train_val_split, seed=training_args.seed)
        dataset["train"], dataset["validation"] = split["train"], split["test"]
    for split, limit in (("train", data_args.max_train_samples), ("validation", data_args.max_eval_samples)):
        if limit is not None:
            dataset[split] = dataset[split].shuffle(seed=training_args.seed).select(range(limit))

    labels = dataset["train"].features[data_args.label_column_name].names
    label2id, id2label = {label: i for i, label in enumerate(labels)}, dict(enumerate(labels))

    metric = evaluate.load(metric_path("accuracy"))

    def compute_metrics(p):
        return metric.compute(predictions=np.argmax(p.predictions, axis=1), references=p.label_ids)

    if model_args.model_name_or_path is not None:
        model = AutoModelForImageClassification.from_pretrained(
            model_args.model_name_or_path,
            num_labels=len(labels),
            label2id=label2id,
            id2label=id2label,
            ignore_mismatched_sizes=True,  # a new head for these labels
        )
        image_processor = AutoImageProcessor.from_pretrained(model_args.model_name_or_path)
    else:  # from scratch: a config, and a processor that resizes to its input size and scales to [-1, 1]
        model = AutoModelForImageClassification.from_config(
            tiny_image_config(model_args.model_type, model_args.image_size, labels)
        )
        size = model_args.image_size
        # The PIL processor: `ViTImageProcessor` is the torchvision one, and without torchvision transformers falls
        # back to this class with a warning; named directly, the pixels do not depend on whether torchvision is there.
        image_processor = ViTImageProcessorPil(size={"height": size, "width": size}, image_mean=0.5, image_std=0.5)

    def transforms(example_batch):
        images = [image.convert("RGB") for image in example_batch[data_args.image_column_name]]
        return {
            "pixel_values": image_processor(images, return_tensors="pt")["pixel_values"],
            "labels": example_batch[data_args.label_column_name],
        }

    dataset["train"].set_transform(transforms)
    dataset["validation"].set_transform(transforms)

    training_args.remove_unused_columns = False  # the transform needs the image column
    trainer = (SAMTrainer if model_args.use_sam else Trainer)(
        model=model,
        args=training_args,
        train_dataset=dataset["train"],
        eval_dataset=dataset["validation"],
        compute_metrics=compute_metrics,
        processing_class=image_processor,
        data_collator=collate_fn,
    )

    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    trainer.log_metrics("train", train_result.metrics)
    metrics = trainer.evaluate()
    trainer.log_metrics("eval", metrics)

    metrics.update(train_result.metrics)
    metrics.update(final_train_metrics(trainer.state.log_history))
    metrics.update(use_sam=model_args.use_sam, label_noise=data_args.label_noise, train_samples=len(dataset["train"]))
    write_json(Path(training_args.output_dir) / "metrics.json", metrics)
    return metrics


if __name__ == "__main__":
    main()
