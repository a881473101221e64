"""The tasks of the benefit benchmark (`bench_benefit.py`): each builds one training run and says how to score it.

Older tasks (the first study, one rho per task):

- `digits`: a small ResNet (BatchNorm) from a config, trained from scratch on scikit-learn's 8x8 digits (upsampled
  to 32x32), 500 training images, the other 1,297 held out.
- `minilm`: all-MiniLM-L6-v2 full fine-tuning on the generated word-category task with few training sentences;
  the held-out split has unseen words in unseen sentence templates.
- `smollm`: SmolLM2-135M-Instruct + LoRA on the word-reversal task, held-out prompts of unseen words (the expensive
  one: generation-based accuracy).

Language tasks designed so that the gains the literature reports could show (rho tuned on a validation split, then
reported on a disjoint test split; `bench_benefit.py --tune`):

- `sentiment_minilm`: all-MiniLM-L6-v2 full fine-tuning on word sentiment (`examples/embedded/sentiment.py`: 1,000
  training words, 1,001 validation and 2,002 test words of other word families), many epochs, so that with label
  noise AdamW fits the wrong labels (the memorisation regime of the label-noise results).
- `sentiment_smollm`: SmolLM2-135M-Instruct + LoRA on the last `TAIL_LAYERS` layers, the same data, classification
  by scoring the label tokens " positive" / " negative" after the prompt '"<word>" is'. Also measures forgetting:
  the change of the language-model loss on general English text the fine-tuning never saw (Python's own
  documentation, `pydoc_data`).
- `fewshot_smollm`: the same model with 64 training words per label (BAR's few-shot protocol, scaled down).

SmolLM2 runs only its last `TAIL_LAYERS` layers in training. LoRA adapts only those layers, so the layers below
compute the same function of the prompt before, during and after training: their output is computed once per prompt
(`FrozenPrefix`) and the trained model is those layers (`LlamaForSequenceClassification` with `TAIL_LAYERS` layers,
whose classification weights are the language-model head's rows of the two label tokens) fed with it. The logits
equal the full model's to float32 rounding (`tests/test_bench_benefit.py` checks it), at a fraction of the cost.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))  # the examples' shared helpers: examples/_common.py, examples/embedded/

WORKDIR = Path(
    "outputs/benefit/runs"
)  # trainers' output_dir (nothing is saved there: save_strategy "no"); main sets it


@dataclass
class TaskRun:
    """What a task hands the benchmark for one run: a trainer ready to train and how to score a model."""

    trainer: Any
    accuracy: Any  # callable(model) -> float, on the held-out split
    measure_data: Any  # list of model-ready training batches for the flatness measures
    lora: bool = False
    validation: Any = None  # callable(model) -> float on the validation split (for choosing rho), if the task has one
    measures: Any = None  # callable(model, full) -> dict of the task's own measures (noise fit; full: forgetting too)
    epoch_steps: int | None = None  # optimizer steps per epoch: validation and test accuracy after each epoch


@dataclass
class Task:
    name: str
    rho: float
    steps: int
    quick_steps: int
    lora: bool = False
    hyper: dict[str, Any] = field(default_factory=dict)
    rho_grids: dict[str, list[float]] = field(default_factory=dict)  # method -> the rho grid it is tuned over

    def rho_grid(self, method: str) -> list[float]:
        """The rho values `method` is tuned over on this task (its own scale), or [] when it is not tuned here."""
        return self.rho_grids.get(method, [])

    def build(self, method: str, sam_kwargs: dict | None, seed: int, noise: float, steps: int, quick: bool):
        raise NotImplementedError


def _load_example(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"hf_sam_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _common() -> Any:
    import _common

    return _common


def _training_args(out: Path, seed: int, steps: int, sam_kwargs: dict | None, config_cls: Any = None, **kw: Any):
    from hf_sam import SAMTrainingArguments

    cls = config_cls or SAMTrainingArguments
    sam = {k: v for k, v in (sam_kwargs or {}).items() if k.startswith("sam_")}
    return cls(
        output_dir=str(out),
        max_steps=steps,
        seed=seed,
        data_seed=seed,
        lr_scheduler_type="linear",
        warmup_steps=max(1, steps // 10),
        weight_decay=0.0,
        logging_steps=max(1, steps // 10),
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        **sam,
        **kw,
    )


def _classify_accuracy(model: Any, batches: list[dict]) -> float:
    import torch

    model.eval()
    correct = total = 0
    with torch.no_grad():
        for batch in batches:
            labels = batch["labels"]
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            correct += int((logits.argmax(-1) == labels).sum())
            total += len(labels)
    return correct / total


def _batches(trainer: Any, dataset: Any, limit: int | None = None) -> list[dict]:
    """Model-ready batches of `dataset` through the trainer's own column handling and collator, unshuffled."""
    import itertools

    import torch

    with torch.random.fork_rng(devices=[]):
        return list(itertools.islice(trainer.get_eval_dataloader(dataset), limit))


class DigitsTask(Task):
    def build(self, method, sam_kwargs, seed, noise, steps, quick):
        from transformers import AutoModelForImageClassification, Trainer, ViTImageProcessorPil, set_seed

        from hf_sam import SAMTrainer

        common = _common()
        set_seed(seed)
        data = common.digits_dataset(200 if quick else 500, seed, noise)
        labels = data["train"].features["label"].names
        model = AutoModelForImageClassification.from_config(common.tiny_image_config("resnet", 32, labels))
        processor = ViTImageProcessorPil(size={"height": 32, "width": 32}, image_mean=0.5, image_std=0.5)

        def transforms(batch):
            images = [image.convert("RGB") for image in batch["image"]]
            return {"pixel_values": processor(images, return_tensors="pt")["pixel_values"], "labels": batch["label"]}

        for split in data.values():
            split.set_transform(transforms)
        args = _training_args(
            WORKDIR / "digits",
            seed,
            steps,
            sam_kwargs,
            learning_rate=2e-3,
            per_device_train_batch_size=32,
            per_device_eval_batch_size=128,
            remove_unused_columns=False,
        )
        trainer = (Trainer if sam_kwargs is None else SAMTrainer)(
            model=model, args=args, train_dataset=data["train"], data_collator=_stack_collate
        )
        evalset = _batches(trainer, data["validation"].select(range(200)) if quick else data["validation"])
        measure = _batches(trainer, data["train"], 2 if quick else 4)
        return TaskRun(trainer, lambda m: _classify_accuracy(m, evalset), measure)


def _stack_collate(examples):
    import torch

    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "labels": torch.tensor([e["labels"] for e in examples]),
    }


class MiniLMTask(Task):
    def build(self, method, sam_kwargs, seed, noise, steps, quick):
        from embedded import make_classification_task, minilm_path
        from transformers import (
            AutoModelForSequenceClassification,
            AutoTokenizer,
            DataCollatorWithPadding,
            Trainer,
            set_seed,
        )

        from hf_sam import SAMTrainer

        set_seed(seed)
        n_train = self.hyper["n_train"]
        data = make_classification_task(n_train=n_train, n_eval=64 if quick else 400, seed=seed, label_noise=noise)
        names = data["train"].features["label"].names
        path = minilm_path()
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)}
        )
        data = data.map(
            lambda b: tokenizer(b["sentence"], truncation=True, max_length=32),
            batched=True,
            remove_columns=["sentence", "word", "noisy"],
        )
        args = _training_args(
            WORKDIR / "minilm",
            seed,
            steps,
            sam_kwargs,
            learning_rate=self.hyper["lr"],
            per_device_train_batch_size=16,
            per_device_eval_batch_size=64,
        )
        trainer = (Trainer if sam_kwargs is None else SAMTrainer)(
            model=model,
            args=args,
            train_dataset=data["train"],
            processing_class=tokenizer,
            data_collator=DataCollatorWithPadding(tokenizer),
        )
        evalset = _batches(trainer, data["validation"])
        measure = _batches(trainer, data["train"], 2 if quick else 4)
        return TaskRun(trainer, lambda m: _classify_accuracy(m, evalset), measure)


class SmolLMTask(Task):
    def build(self, method, sam_kwargs, seed, noise, steps, quick):
        from transformers import set_seed
        from trl import SFTTrainer, get_peft_config

        from hf_sam.trl import SAMSFTTrainer

        common = _common()
        sft = _load_example("sft_lora")
        set_seed(seed)
        sam = [f"--{k}={v}" for k, v in (sam_kwargs or {}).items()]
        argv = [
            "--output_dir", str(WORKDIR / "smollm"), "--max_steps", str(steps), "--seed", str(seed),
            "--data_seed", str(seed), "--learning_rate", "2e-3", "--lr_scheduler_type", "linear",
            "--warmup_steps", str(max(1, steps // 10)), "--weight_decay", "0.0", "--per_device_train_batch_size", "8",
            "--per_device_eval_batch_size", "8", "--max_length", "64", "--logging_steps", str(max(1, steps // 10)),
            "--save_strategy", "no", "--report_to", "none", "--use_cpu", "true", "--disable_tqdm", "true",
            "--dataloader_num_workers", "0", "--task_train_size", "2000",
            "--task_eval_size", str(20 if quick else self.hyper["n_eval"]), "--task_min_words", "3",
            "--task_max_words", "3", "--label_noise", str(noise), "--system_prompt", "Be brief.",
            "--max_new_tokens", "12", "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0.0",
            "--lora_target_modules", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
            "--lora_last_layers", "8", *sam,
        ]  # fmt: skip
        _, args, model_args, _, example_args = sft.make_parser().parse_args_and_config(args=argv)
        from embedded import smollm2_path

        path = smollm2_path()
        data = common.reverse_task_conversations(example_args, seed)
        peft_config = common.restrict_lora_layers(get_peft_config(model_args), path, example_args.lora_last_layers)
        args.model_init_kwargs = {"dtype": "float32"}
        trainer = (SFTTrainer if sam_kwargs is None else SAMSFTTrainer)(
            model=path, args=args, train_dataset=data["train"], peft_config=peft_config
        )

        def accuracy(m):
            return common.held_out_exact_match(m, trainer.processing_class, data["test"], example_args, False)[0]

        measure = _batches(trainer, trainer.train_dataset, 2 if quick else 4)
        return TaskRun(trainer, accuracy, measure, lora=True)


# ---- language tasks with thousands of held-out items, rho tuned on validation -----------------------------------
TAIL_LAYERS = 4  # SmolLM2's LoRA layers: the last 4 of 30
LABEL_WORDS = (" positive", " negative")  # one token each in SmolLM2's vocabulary; order of `sentiment.LABELS`
GENERAL_TEXT_WINDOWS, GENERAL_TEXT_TOKENS = 64, 64  # forgetting: 64 windows of 64 tokens of Python's documentation

# rho grids, each method on its own scale (log-spaced). SAM itself on half-decades: on LoRA adapters 0.001 to 3
# (Flat-LoRA found 0.003 best for clean T5 adapters; the memorisation pilot resisted noise from 0.2 on; 3.0 was added
# when 1.0 came out best on noisy labels), on full weights 0.01 to 0.5 (0.07 and 0.14 added around 0.1, the best, next
# to the collapse at 0.2). The variants, on 2 cores, on fewer points: those that perturb along a normalised gradient
# direction on SAM's informative range (on LoRA below 0.1 SAM trained as AdamW does; on full weights 0.05 to 0.2, where
# SAM went from AdamW-like to collapsed), the others on points around their own scale (extended where the best fell at
# an end): ASAM's ball is relative (x10), Momentum-SAM steps along the normalised momentum (its authors use 3 on full
# weights), Flat-LoRA's rho is the relative noise of the frozen base weights.
LORA_GRIDS = {
    "sam": [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0],
    **dict.fromkeys(
        ("late_sam", "looksam", "functional", "preconditioned", "functional_preconditioned", "friendly"),
        [0.1, 0.3, 1.0, 3.0],
    ),
    "asam": [0.1, 1.0, 10.0, 30.0, 100.0],
    "msam": [0.03, 0.3, 1.0, 3.0],
    "flat_lora": [0.01, 0.03, 0.1],
}
FULL_GRIDS = {
    "sam": [0.01, 0.02, 0.05, 0.07, 0.1, 0.14, 0.2, 0.5],
    **dict.fromkeys(("functional", "friendly"), [0.05, 0.1, 0.2]),
    # 0.5 added: on MiniLM both preconditioned variants were best at 0.2, the top of the three; 0.5 collapsed
    **dict.fromkeys(("preconditioned", "functional_preconditioned"), [0.05, 0.1, 0.2, 0.5]),
    # On MiniLM LookSAM did not learn at 0.05 or 0.1, nor at 0.01 (its reuse term is alpha ||g|| long at any rho):
    # 0.2 left out, and no test seeds.
    "looksam": [0.01, 0.05, 0.1],
    "late_sam": [0.05, 0.1, 0.2, 0.5, 1.0],  # 0.5 and 1.0 added: MiniLM's best of the three was 0.2, the top
    "asam": [0.1, 0.5, 1.0, 2.0],  # 1.0 added: MiniLM trained as AdamW at 0.5 and collapsed at 2
    "msam": [0.3, 1.0, 3.0],
}
# Clean few-shot LoRA: SAM chose its smallest rho, level with AdamW on validation up to 0.1 and below it from 0.3 (-4
# points) to 1.0 (-19), so the variants that step along a normalised direction run a decade apart across that range,
# ASAM ten times higher; Flat-LoRA's relative noise keeps its own grid.
FEWSHOT_GRIDS = {
    **LORA_GRIDS,
    **dict.fromkeys(
        ("late_sam", "looksam", "functional", "preconditioned", "functional_preconditioned", "friendly", "msam"),
        [0.003, 0.03, 0.3],
    ),
    "asam": [0.03, 0.3, 3.0],
}


def _prompt(word: str) -> str:
    return f'"{word}" is'


class FrozenPrefix:
    """SmolLM2's layers below the LoRA layers, run once per text: what they output never changes during training.

    `hidden(texts)` gives each text's hidden states after layer `N - tail_layers` (unpadded, float32), cached in memory
    and, for the full word list, on disk under the embedded models' cache directory. `tail_classifier()` builds the
    trainable rest: the last `tail_layers` layers, the final norm, and the language-model head's rows of the label
    tokens as a 2-way classification head.
    """

    _instances: dict[int, FrozenPrefix] = {}

    @classmethod
    def get(cls, tail_layers: int) -> FrozenPrefix:
        if tail_layers not in cls._instances:
            cls._instances[tail_layers] = cls(tail_layers)
        return cls._instances[tail_layers]

    def __init__(self, tail_layers: int) -> None:
        import torch
        from embedded import smollm2_path
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.path = smollm2_path()
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.full = AutoModelForCausalLM.from_pretrained(self.path, dtype=torch.float32).eval()
        self.cut = self.full.config.num_hidden_layers - tail_layers
        self.tail_layers = tail_layers
        self.label_ids = [self.tokenizer(w, add_special_tokens=False).input_ids for w in LABEL_WORDS]
        if any(len(ids) != 1 for ids in self.label_ids):
            raise ValueError(f"each label word must be one token, got {self.label_ids}")
        self.lm_head = self.full.lm_head.weight.detach()  # for the language-model loss of the forgetting measure
        self._memo: dict[str, Any] = {}
        self._base_general_loss: float | None = None

    def _disk_cache(self) -> Path:
        from embedded.models import cache_dir

        key = hashlib.sha1(f"{self.path}|{self.cut}|{_prompt('x')}|{GENERAL_TEXT_TOKENS}".encode()).hexdigest()[:12]
        return cache_dir() / "benefit" / f"smollm2-prefix-{key}.pt"

    def _compute(self, token_lists: list[list[int]]) -> list[Any]:
        import torch

        captured = {}
        layer = self.full.model.layers[self.cut - 1]
        hook = layer.register_forward_hook(
            lambda m, i, o: captured.__setitem__("h", o[0] if isinstance(o, tuple) else o)
        )
        out = []
        try:
            with torch.no_grad():
                for start in range(0, len(token_lists), 64):
                    batch = token_lists[start : start + 64]
                    width = max(map(len, batch))
                    pads = torch.tensor([width - len(ids) for ids in batch])
                    ids = torch.tensor([[0] * (width - len(ids)) + ids for ids in batch])
                    mask = (torch.arange(width)[None] >= pads[:, None]).long()  # left padding, masked out
                    self.full.model(
                        input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)
                    )
                    out += [captured["h"][i, int(p) :].clone() for i, p in enumerate(pads)]
        finally:
            hook.remove()
        return out

    def hidden(self, texts: list[str], persist: bool = False) -> list[Any]:
        """Hidden states after the frozen layers for each text (token ids of the text as the tokenizer gives them)."""
        import torch

        missing = [t for t in dict.fromkeys(texts) if t not in self._memo]
        path = self._disk_cache()
        if missing and persist and path.exists():
            self._memo.update(torch.load(path, weights_only=True))
            missing = [t for t in missing if t not in self._memo]
        if missing:
            started = time.perf_counter()
            tokens = [self.tokenizer(t).input_ids for t in missing]
            self._memo.update(zip(missing, self._compute(tokens)))
            print(f"frozen prefix: {len(missing)} texts in {time.perf_counter() - started:.0f}s", flush=True)
            if persist:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                torch.save(self._memo, tmp)
                os.replace(tmp, path)  # never a half-written cache
        return [self._memo[t] for t in texts]

    def general_text(self) -> list[list[int]]:
        """Token windows of Python's own documentation (prose the fine-tuning never saw), deterministic."""
        import pydoc_data.topics

        text = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
        ids = self.tokenizer(text[:400_000]).input_ids
        n = GENERAL_TEXT_TOKENS
        return [ids[i * n : (i + 1) * n] for i in range(GENERAL_TEXT_WINDOWS)]

    def tail_classifier(self) -> Any:
        """A fresh `LlamaForSequenceClassification` of the last layers, scoring the two label tokens."""
        import torch
        from transformers import LlamaForSequenceClassification

        config = self.full.config.__class__.from_dict(self.full.config.to_dict())
        config.num_hidden_layers, config.num_labels = self.tail_layers, len(LABEL_WORDS)
        config.vocab_size, config.pad_token_id = 3, 2  # no token ids come in (inputs_embeds): no embedding needed
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[self.cut :]
        tail = LlamaForSequenceClassification(config)
        tail.model.layers.load_state_dict(self.full.model.layers[self.cut :].state_dict())
        tail.model.norm.load_state_dict(self.full.model.norm.state_dict())
        with torch.no_grad():
            tail.score.weight.copy_(self.lm_head[[ids[0] for ids in self.label_ids]])
        return tail

    def general_text_loss(self, backbone: Any) -> float:
        """Mean next-token loss on the general text through `backbone` (a tail's `LlamaModel`) and the LM head."""
        import torch

        windows = self.general_text()
        states = self._general_states(windows)
        total, count = 0.0, 0
        with torch.no_grad():
            for h, ids in zip(states, windows):
                position = torch.arange(h.shape[0])[None]
                out = backbone(inputs_embeds=h[None], position_ids=position).last_hidden_state[0]
                logits = out[:-1] @ self.lm_head.T
                total += float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum"))
                count += len(ids) - 1
        return total / count

    def _general_states(self, windows: list[list[int]]) -> list[Any]:
        if "__general__" not in self._memo:
            self._memo["__general__"] = self._compute(windows)
        return self._memo["__general__"]

    def base_general_text_loss(self) -> float:
        """The general-text loss of the model before fine-tuning (the reference of the forgetting measure)."""
        if self._base_general_loss is None:
            self._base_general_loss = self.general_text_loss(self.tail_classifier().model.eval())
        return self._base_general_loss


class _ListDataset:
    """A list of examples as a map-style dataset (the Trainer needs `__len__` and `__getitem__`)."""

    def __init__(self, items: list[dict]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def _left_pad_collate(examples: list[dict]) -> dict:
    """Hidden states of different lengths, left-padded; padding masked out, positions count from each text's start."""
    import torch

    width = max(e["inputs_embeds"].shape[0] for e in examples)
    dim = examples[0]["inputs_embeds"].shape[1]
    embeds = torch.zeros(len(examples), width, dim)
    mask = torch.zeros(len(examples), width, dtype=torch.long)
    for i, e in enumerate(examples):
        n = e["inputs_embeds"].shape[0]
        embeds[i, width - n :] = e["inputs_embeds"]
        mask[i, width - n :] = 1
    return {
        "inputs_embeds": embeds,
        "attention_mask": mask,
        "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
        "labels": torch.tensor([e["labels"] for e in examples]),
    }


def _fit(model: Any, batches: list[dict]) -> tuple[float, float]:
    """Accuracy against the given labels and mean cross-entropy on `batches` (the training data, noisy labels kept)."""
    import torch

    model.eval()
    correct = total = 0
    loss = 0.0
    with torch.no_grad():
        for batch in batches:
            labels = batch["labels"]
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            correct += int((logits.argmax(-1) == labels).sum())
            loss += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
            total += len(labels)
    return (correct / total, loss / total) if total else (float("nan"), float("nan"))


class SentimentTask(Task):
    """Word sentiment (`examples/embedded/sentiment.py`), MiniLM full fine-tuning or SmolLM2 + LoRA (see the module
    docstring). `hyper`: model ("minilm" or "smollm"), n_train or per_class, epochs, lr, batch."""

    def build(self, method, sam_kwargs, seed, noise, steps, quick):
        from embedded.sentiment import make_sentiment_task
        from transformers import Trainer, set_seed

        from hf_sam import SAMTrainer

        h = self.hyper
        set_seed(seed)
        sizes = {"n_validation": 40, "n_test": 40} if quick else {}
        per_class = (4 if quick else h["per_class"]) if "per_class" in h else None
        data = make_sentiment_task(
            n_train=16 if quick else h.get("n_train", 1000), seed=seed, label_noise=noise, per_class=per_class, **sizes
        )
        if h["model"] == "smollm":
            model, splits, collate = self._smollm(data, quick)
        else:
            model, splits, collate = self._minilm(data)
        batch = h["batch"]
        epoch_steps = math.ceil(len(splits["train"]) / batch)
        args = _training_args(
            WORKDIR / self.name,
            seed,
            steps,
            sam_kwargs,
            learning_rate=h["lr"],
            per_device_train_batch_size=batch,
            per_device_eval_batch_size=256,
            remove_unused_columns=False,
        )
        trainer = (Trainer if sam_kwargs is None else SAMTrainer)(
            model=model, args=args, train_dataset=splits["train"], data_collator=collate
        )
        evaluation = {name: _batches(trainer, splits[name]) for name in ("validation", "test")}
        train_batches = _batches(trainer, splits["train"])
        noisy = [i for i, flag in enumerate(data["train"]["noisy"]) if flag]
        clean = [i for i, flag in enumerate(data["train"]["noisy"]) if not flag]
        subsets = {
            "noisy": _batches(trainer, _ListDataset([splits["train"][i] for i in noisy])) if noisy else [],
            "clean": _batches(trainer, _ListDataset([splits["train"][i] for i in clean])),
        }
        prefix = FrozenPrefix.get(TAIL_LAYERS) if h["model"] == "smollm" else None

        def measures(m, full):
            out = {}
            for name, batches in subsets.items():
                if batches:
                    out[f"fit_{name}"], out[f"train_loss_{name}"] = _fit(m, batches)
            if prefix is not None and full:
                backbone = m.get_base_model().model if hasattr(m, "get_base_model") else m.model
                out["general_text_loss"] = prefix.general_text_loss(backbone)
                out["forgetting"] = out["general_text_loss"] - prefix.base_general_text_loss()
            m.train()
            return out

        return TaskRun(
            trainer,
            lambda m: _classify_accuracy(m, evaluation["test"]),
            train_batches[: 2 if quick else 4],
            lora=h["model"] == "smollm",
            validation=lambda m: _classify_accuracy(m, evaluation["validation"]),
            measures=measures,
            epoch_steps=epoch_steps,
        )

    def _smollm(self, data, quick):
        from peft import LoraConfig, get_peft_model

        prefix = FrozenPrefix.get(TAIL_LAYERS)
        texts = [_prompt(w) for split in data.values() for w in split["word"]]
        if not quick:  # the whole lexicon once, on disk: every later run only looks its words up
            from embedded.sentiment import sentiment_lexicon

            prefix.hidden([_prompt(w) for w, _ in sentiment_lexicon()], persist=True)
        states = dict(zip(texts, prefix.hidden(texts)))
        splits = {
            name: _ListDataset(
                [{"inputs_embeds": states[_prompt(w)], "labels": y} for w, y in zip(split["word"], split["label"])]
            )
            for name, split in data.items()
        }
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = get_peft_model(prefix.tail_classifier(), LoraConfig(r=8, lora_alpha=16, target_modules=targets))
        return model, splits, _left_pad_collate

    def _minilm(self, data):
        from embedded import minilm_path
        from embedded.sentiment import LABELS
        from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

        path = minilm_path()
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=2, id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)}
        )
        splits = {}
        for name, split in data.items():
            encoded = tokenizer(list(split["word"]))
            splits[name] = _ListDataset(
                [
                    {"input_ids": ids, "attention_mask": mask, "labels": y}
                    for ids, mask, y in zip(encoded["input_ids"], encoded["attention_mask"], split["label"])
                ]
            )
        return model, splits, DataCollatorWithPadding(tokenizer)


TASKS: dict[str, Task] = {
    "digits": DigitsTask("digits", rho=0.1, steps=400, quick_steps=12),
    "minilm": MiniLMTask("minilm", rho=0.05, steps=150, quick_steps=6, hyper={"n_train": 64, "lr": 1e-4}),
    "smollm": SmolLMTask("smollm", rho=0.05, steps=120, quick_steps=3, lora=True, hyper={"n_eval": 100}),
    # 20 epochs of 32 steps (MiniLM) and 16 (SmolLM2): with 40% wrong labels AdamW fits them all (a one-seed pilot:
    # 99.5% and 100% of the wrong labels reproduced, training loss on them 0.012 and 0.003).
    "sentiment_minilm": SentimentTask(
        "sentiment_minilm", rho=0.05, steps=640, quick_steps=4, rho_grids=FULL_GRIDS,
        hyper={"model": "minilm", "n_train": 1000, "batch": 32, "lr": 5e-5},
    ),
    "sentiment_smollm": SentimentTask(
        "sentiment_smollm", rho=0.05, steps=512, quick_steps=4, lora=True, rho_grids=LORA_GRIDS,
        hyper={"model": "smollm", "n_train": 1000, "batch": 32, "lr": 3e-3},
    ),
    # 64 words per label, 30 epochs of 8 steps.
    "fewshot_smollm": SentimentTask(
        "fewshot_smollm", rho=0.05, steps=240, quick_steps=4, lora=True, rho_grids=FEWSHOT_GRIDS,
        hyper={"model": "smollm", "per_class": 64, "batch": 16, "lr": 1e-3},
    ),
}  # fmt: skip
