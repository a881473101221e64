"""Trainers that generate inside `training_step` are refused, wherever the installed TRL keeps them; others are not.

The classes are the ones the docs list (docs/errors.md, `generating-trainer`): GRPO, RLOO, online DPO, XPO, Nash-MD,
PPO, GKD and the distillation trainers. Each is looked up by name in every module of the installed TRL (TRL moves
trainers between `trl`, `trl.experimental.*` and out), so the test follows TRL's layout instead of assuming it, and
skips a class only when no module of TRL defines it.
"""

from __future__ import annotations

import ast
import importlib
import re
from functools import cache
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from testing_utils import VOCAB, base_args, tiny_llama

from hf_sam import SAMConfig, SAMMixin, enable_sam
from hf_sam.setup_checks import check_before_setup, generating_trainer_reason

trl = pytest.importorskip("trl")

# The generating trainers the docs list; the distillation entries are TRL's on-policy distillation trainers (each
# generates the student's completions inside the step).
LISTED = [
    "GRPOTrainer",
    "RLOOTrainer",
    "OnlineDPOTrainer",
    "XPOTrainer",
    "NashMDTrainer",
    "PPOTrainer",
    "GKDTrainer",
    "DistillationTrainer",
    "ServerDistillationTrainer",
    "GOLDTrainer",
    "IWOPDTrainer",
    "SDFTTrainer",
    "SDPOTrainer",
    "SSDTrainer",
]
# One forward-backward on the given batch: supported, so never refused.
NOT_GENERATING = ["SFTTrainer", "DPOTrainer", "RewardTrainer", "KTOTrainer", "ORPOTrainer"]


@cache
def trl_classes(name: str) -> tuple[tuple[str, type], ...]:
    """Every class called `name` that a module of the installed TRL defines, as (module, class); found by reading
    the sources, then imported from where they are defined."""
    root = Path(trl.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        if any(isinstance(node, ast.ClassDef) and node.name == name for node in tree.body):
            parts = path.relative_to(root.parent).with_suffix("").parts
            module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found.append((module, getattr(importlib.import_module(module), name)))
    return tuple(found)


def _listed_classes(names):
    params = []
    for name in names:
        classes = trl_classes(name)
        if not classes:
            reason = f"TRL {trl.__version__} ships no `{name}` (no module of trl defines it)"
            params.append(pytest.param(name, None, marks=pytest.mark.skip(reason=reason), id=name))
        params += [pytest.param(name, module, id=f"{module}.{name}") for module, _ in classes]
    return params


def _cls(name: str, module: str) -> type:
    return dict(trl_classes(name))[module]


def _message(cls_name: str, through: str) -> str:
    return (
        f"SAM does not support `{cls_name}`: it generates completions inside `training_step` (through `{through}`), "
        "so SAM's perturbed pass would generate and score new completions and train on a different batch. Supported: "
        "trainers whose `training_step` is one forward-backward on the given batch: `Trainer`, `Seq2SeqTrainer` and "
        "TRL's SFT, DPO, Reward, KTO and ORPO trainers."
    )


@pytest.mark.parametrize(("name", "module"), _listed_classes(LISTED))
def test_generating_trainer_is_refused(name, module):
    cls = _cls(name, module)
    mixed = type(f"SAM{name}", (SAMMixin, cls), {})
    with pytest.raises(ValueError) as info:
        check_before_setup(mixed, None)
    message = str(info.value)
    through = re.search(r"\(through `(\w+)`\)", message)[1]
    assert through in {base.__name__ for base in cls.__mro__}
    assert message == _message(f"SAM{name}", through)
    # The class-level mixin refuses before the parent constructor: no model, no arguments needed.
    with pytest.raises(ValueError) as info:
        mixed(model=None, args=None, sam_config=SAMConfig(rho=0.05))
    assert str(info.value) == message
    # `enable_sam` refuses an instance before looking at it, naming the trainer's own class.
    with pytest.raises(ValueError) as info:
        enable_sam(object.__new__(cls), SAMConfig(rho=0.05))
    assert str(info.value) == _message(name, through)


@pytest.mark.parametrize(("name", "module"), _listed_classes(NOT_GENERATING))
def test_trainer_that_does_not_generate_is_not_refused(name, module):
    cls = _cls(name, module)
    assert generating_trainer_reason(cls) is None
    check_before_setup(type(f"SAM{name}", (SAMMixin, cls), {}), SAMConfig(rho=0.05))


def test_every_trl_trainer_with_a_generation_method_is_refused():
    """Beyond the list: every trainer class of the installed TRL whose own body defines a generation method is refused
    (TRL 1.15.0's `SSDTrainer`, with `_generate_completion_ids`, was caught only by the prefix rule)."""
    from transformers import Trainer

    root = Path(trl.__file__).parent
    checked = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if not (isinstance(node, ast.ClassDef) and node.name.endswith("Trainer")):
                continue  # rollout workers and helpers (some need optional packages to import) are no trainers
            methods = {f.name for f in node.body if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)}
            if any(m.startswith("_generate") or m == "generate_on_policy_outputs" for m in methods):
                parts = path.relative_to(root.parent).with_suffix("").parts
                module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
                cls = getattr(importlib.import_module(module), node.name)
                if issubclass(cls, Trainer):
                    checked.append(cls.__name__)
                    assert generating_trainer_reason(cls) is not None, f"{module}.{cls.__name__}"
    assert {"GRPOTrainer", "RLOOTrainer"} <= set(checked)  # the scan found TRL's trainers


# ---- real trainers, where constructing one is cheap ----------------------------------------------------------------
SPECIAL = ["<pad>", "<eos>", "<unk>"]
WORDS = [f"w{i}" for i in range(VOCAB - len(SPECIAL))]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}assistant {% endif %}"
    )
    return tokenizer


def _policy():
    return tiny_llama(0, pad_token_id=0, eos_token_id=1, bos_token_id=None)


def _prompts(n: int = 4) -> Dataset:
    g = torch.Generator().manual_seed(0)
    return Dataset.from_list(
        [{"prompt": " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (3,), generator=g))} for _ in range(n)]
    )


def _grpo(tmp_path):
    config = trl.GRPOConfig(
        **base_args(tmp_path), per_device_train_batch_size=2, num_generations=2, max_completion_length=4, bf16=False
    )
    return trl.GRPOTrainer(
        model=_policy(),
        reward_funcs=lambda completions, **kwargs: [float(len(c)) for c in completions],
        args=config,
        train_dataset=_prompts(),
        processing_class=_tokenizer(),
    )


def _gkd(tmp_path):
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    rows = [{"messages": [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w3"}]}] * 4
    return GKDTrainer(
        model=_policy(),
        teacher_model=tiny_llama(1, pad_token_id=0, eos_token_id=1, bos_token_id=None),
        args=GKDConfig(**base_args(tmp_path), max_length=16, bf16=False),
        train_dataset=Dataset.from_list(rows),
        processing_class=_tokenizer(),
    )


@pytest.mark.parametrize(("build", "name"), [(_grpo, "GRPOTrainer"), (_gkd, "GKDTrainer")], ids=["grpo", "gkd"])
def test_enable_sam_refuses_a_constructed_generating_trainer(tmp_path, build, name):
    trainer = build(tmp_path)
    cls = type(trainer)
    assert cls.__name__ == name
    with pytest.raises(ValueError, match=rf"^SAM does not support `{name}`: it generates completions"):
        enable_sam(trainer, SAMConfig(rho=0.05))
    assert type(trainer) is cls and not isinstance(trainer, SAMMixin)  # left as it was


def test_enable_sam_accepts_a_constructed_sft_trainer(tmp_path):
    rows = [{"prompt": "w1 w2", "completion": " w3"}] * 4
    trainer = trl.SFTTrainer(
        model=_policy(),
        args=trl.SFTConfig(**base_args(tmp_path), max_length=16, bf16=False),
        train_dataset=Dataset.from_list(rows),
        processing_class=_tokenizer(),
    )
    assert isinstance(enable_sam(trainer, SAMConfig(rho=0.05)), SAMMixin)
