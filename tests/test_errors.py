"""Every row of docs/errors.md, run: the setting it names raises exactly the error the page shows.

The page is the specification: each table row carries an id, and `CASES` below holds, under the same id, the code that
builds that setting. A row without a case, a case without a row, or a message that differs by one character fails.
"""

from __future__ import annotations

import importlib
import re
import sys
import tempfile
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from testing_utils import base_args, lm_dataset, tiny_llama
from transformers import TrainingArguments

from hf_sam import SAMConfig, SAMMixin, SAMTrainer, SAMTrainingArguments, enable_sam
from hf_sam.deepspeed_support import deepspeed_engine_reason
from hf_sam.distributed import unsupported_setup_reason
from hf_sam.integrations import check_sam_keys
from hf_sam.perturbation import global_norm

DOCS = Path(__file__).resolve().parent.parent / "docs" / "errors.md"
# | `id` | setting | `ValueError` | `` message `` |
ROW = re.compile(r"^\| `(?P<id>[a-z0-9-]+)` \| (?P<setting>.*?) \| `(?P<type>\w+)` \| `` (?P<message>.*) `` \|$")


def doc_rows() -> dict[str, tuple[str, str]]:
    rows = {}
    for line in DOCS.read_text().splitlines():
        match = ROW.match(line)
        if match:
            assert match["id"] not in rows, f"duplicate id {match['id']} in {DOCS.name}"
            rows[match["id"]] = (match["type"], match["message"].replace("\\|", "|"))
    return rows


def _args(tmp_path, **kwargs):
    return SAMTrainingArguments(**base_args(tmp_path), **kwargs)


def _load_state(tmp_path, monkeypatch, damage, **sam):
    """Resume SAM's state from `checkpoint-2/sam_state.pt` (a relative path: the message names it as given)."""
    monkeypatch.chdir(tmp_path)
    path = Path("checkpoint-2") / "sam_state.pt"
    path.parent.mkdir()
    damage(path)
    _trainer(tmp_path, args=_args(tmp_path, **sam))._sam.load(str(path))


def _trainer(tmp_path, model=None, args=None, **kwargs):
    args = args if args is not None else _args(tmp_path)
    return SAMTrainer(
        model=model if model is not None else tiny_llama(), args=args, train_dataset=lm_dataset(), **kwargs
    )


def _lora(target_modules=("q_proj", "v_proj")):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=list(target_modules))
    return peft.get_peft_model(tiny_llama(), config)


def _lora_with_trainable_base():
    model = _lora()
    model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.requires_grad_(True)
    return model


def _fsdp_setup(version, accumulation="exact", sync="global", accumulation_steps=1, method="sam"):
    # The decision the mixin takes right after `Trainer.__init__`, fed with the Accelerator state of an FSDP run
    # (a multi-process FSDP launch is out of the fast suite; tests/test_distributed.py runs FSDP2 for real).
    state = SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=version))
    trainer = SimpleNamespace(
        is_deepspeed_enabled=False,
        accelerator=SimpleNamespace(state=state),
        sam_config=SAMConfig(accumulation=accumulation, sync=sync, method=method),
        args=SimpleNamespace(gradient_accumulation_steps=accumulation_steps),
    )
    reason = unsupported_setup_reason(trainer, trainer.sam_config)
    if reason is not None:
        raise ValueError(reason)


def _deepspeed_engine_setup(**answers):
    # The check at the first step of a DeepSpeed run, fed with an engine's answers (a real pipeline engine needs a
    # `PipelineModule`; tests/test_deepspeed.py runs ZeRO-1/2 engines and the config refusals for real).
    values = dict(stage=2, fp16=False, pipeline_parallelism=False, **answers)
    engine = SimpleNamespace(
        zero_optimization_stage=lambda: values["stage"],
        zero_offload_optimizer=lambda: None,
        zero_offload_param=lambda: None,
        fp16_enabled=lambda: values["fp16"],
        pipeline_parallelism=values["pipeline_parallelism"],
    )
    reason = deepspeed_engine_reason(engine)
    if reason is not None:
        raise ValueError(reason)


def _without_module(monkeypatch, blocked, then):
    monkeypatch.setitem(sys.modules, blocked, None)  # `import blocked` now raises ImportError
    return then()


def _import_hf_sam_trl(monkeypatch):
    monkeypatch.delitem(sys.modules, "hf_sam.trl", raising=False)
    monkeypatch.setitem(sys.modules, "trl", None)
    importlib.import_module("hf_sam.trl")


def _generating_trainer():
    trl = pytest.importorskip("trl")
    return type("SAMGRPOTrainer", (SAMMixin, trl.GRPOTrainer), {})(model=None, args=None)


def _functional_without_logits(tmp_path):
    model = tiny_llama()  # its forward now returns the loss only, as a loss fused into the forward
    model.forward = lambda input_ids, labels=None, **kwargs: {
        "loss": type(model).forward(model, input_ids=input_ids, labels=labels).loss
    }
    _trainer(tmp_path, model=model, args=_args(tmp_path, max_steps=1, sam_method="functional")).train()


def _search_with_rho(tmp_path, rho):
    pytest.importorskip("optuna")
    trainer = SAMTrainer(
        model_init=lambda: tiny_llama(), args=_args(tmp_path, max_steps=1), train_dataset=lm_dataset()
    )
    trainer.hyperparameter_search(hp_space=lambda trial: {"sam_rho": rho}, backend="optuna", n_trials=1)


def _friendly_fp16(tmp_path):
    # On CPU Accelerate creates no GradScaler for fp16; on a GPU it does, at construction. Give it one by hand: the
    # check runs again at the start of the training run.
    trainer = _trainer(tmp_path, args=_args(tmp_path, fp16=True, max_steps=1, sam_method="friendly"))
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu")
    trainer.train()


NAN, INF = float("nan"), float("inf")

# Rows about one `SAMConfig`: id -> its keyword arguments (the `sam_*` fields and `--sam_*` flags give the same
# messages: `test_sam_arguments_give_the_same_message`).
CONFIG_CASES = {
    "rho-zero": dict(rho=0.0),
    "rho-negative": dict(rho=-0.05),
    "rho-nan": dict(rho=NAN),
    "rho-inf": dict(rho=INF),
    "rho-string": dict(rho="0.05"),
    "eta-negative": dict(eta=-0.01),
    "eta-nan": dict(eta=NAN),
    "adaptive-not-bool": dict(adaptive="yes"),
    "accumulation-unknown": dict(accumulation="sum"),
    "sync-unknown": dict(sync="none"),
    "method-unknown": dict(method="esam"),
    "looksam-interval-zero": dict(looksam_interval=0),
    "looksam-interval-float": dict(looksam_interval=2.5),
    "looksam-alpha-negative": dict(looksam_alpha=-0.7),
    "start-fraction-one": dict(start_fraction=1.0),
    "start-fraction-negative": dict(start_fraction=-0.1),
    "interval-zero": dict(interval=0),
    "ascent-fraction-zero": dict(ascent_fraction=0.0),
    "ascent-fraction-above-one": dict(ascent_fraction=1.5),
    "rho-schedule-unknown": dict(rho_schedule="linear"),
    "rho-min-negative": dict(rho_min=-0.01),
    "rho-min-above-rho": dict(rho=0.05, rho_min=0.1),
    "looksam-adaptive": dict(method="looksam", adaptive=True),
    "looksam-micro": dict(method="looksam", accumulation="micro"),
    "looksam-local": dict(method="looksam", sync="local"),
    "looksam-interval": dict(method="looksam", interval=2),
    "preconditioner-unknown": dict(preconditioner="shampoo"),
    "preconditioner-method": dict(preconditioner="adam", method="looksam"),
    "functional-ascent-fraction": dict(method="functional", ascent_fraction=0.5),
    "functional-grad-dtype-unknown": dict(functional_grad_dtype="float16"),
    "flat-lora-adaptive": dict(method="flat_lora", adaptive=True),
    "flat-lora-ascent-fraction": dict(method="flat_lora", ascent_fraction=0.5),
    "msam-adaptive": dict(method="msam", adaptive=True),
    "msam-ascent-fraction": dict(method="msam", ascent_fraction=0.5),
    "friendly-sigma-negative": dict(friendly_sigma=-1.0),
    "friendly-lambda-one": dict(friendly_lambda=1.0),
}

# Every row: id -> code that builds its setting (tmp_path, monkeypatch).
CASES = {
    **{case_id: (lambda t, m, kw=kw: SAMConfig(**kw)) for case_id, kw in CONFIG_CASES.items()},
    # Arguments and trainer construction
    "deepspeed-zero3": lambda t, m: _args(t, deepspeed={"zero_optimization": {"stage": 3}}),
    "deepspeed-zero0": lambda t, m: _args(t, deepspeed={"zero_optimization": {"stage": 0}}),
    "deepspeed-offload": lambda t, m: _args(
        t, deepspeed={"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    ),
    "deepspeed-fp16": lambda t, m: _args(t, deepspeed={"zero_optimization": {"stage": 2}, "fp16": {"enabled": True}}),
    "deepspeed-method": lambda t, m: _args(t, sam_method="looksam", deepspeed={"zero_optimization": {"stage": 2}}),
    "deepspeed-preconditioner": lambda t, m: _args(
        t, sam_preconditioner="adam", deepspeed={"zero_optimization": {"stage": 2}}
    ),
    "deepspeed-pipeline": lambda t, m: _deepspeed_engine_setup(pipeline_parallelism=True),
    "fsdp1": lambda t, m: _fsdp_setup(1),
    "fsdp-local": lambda t, m: _fsdp_setup(2, sync="local"),
    "fsdp-functional": lambda t, m: _fsdp_setup(2, method="functional"),
    "fsdp-looksam": lambda t, m: _fsdp_setup(2, method="looksam"),
    "fsdp-flat-lora": lambda t, m: _fsdp_setup(2, method="flat_lora"),
    "fsdp-msam": lambda t, m: _fsdp_setup(2, method="msam"),
    "fsdp-friendly": lambda t, m: _fsdp_setup(2, method="friendly"),
    "optim-lomo": lambda t, m: _trainer(t, args=_args(t, optim="lomo")),
    "optim-adalomo": lambda t, m: _trainer(t, args=_args(t, optim="adalomo")),
    "preconditioner-optimizer": lambda t, m: _trainer(t, args=_args(t, optim="sgd", sam_preconditioner="adam")),
    "functional-no-logits": lambda t, m: _functional_without_logits(t),
    "sam-config-type": lambda t, m: _trainer(t, args=TrainingArguments(**base_args(t)), sam_config={"rho": 0.1}),
    "flat-lora-no-lora": lambda t, m: _trainer(t, args=_args(t, sam_method="flat_lora")),
    "flat-lora-trainable-base": lambda t, m: _trainer(
        t, model=_lora_with_trainable_base(), args=_args(t, sam_method="flat_lora")
    ),
    "flat-lora-embedding-base": lambda t, m: _trainer(
        t, model=_lora(["embed_tokens"]), args=_args(t, sam_method="flat_lora")
    ),
    "flat-lora-no-peft": lambda t, m: _without_module(
        m, "peft.tuners.lora", lambda: _trainer(t, args=_args(t, sam_method="flat_lora"))
    ),
    "msam-optimizer": lambda t, m: _trainer(t, args=_args(t, optim="sgd", sam_method="msam")),
    "friendly-fp16": lambda t, m: _friendly_fp16(t),
    "trl-missing": lambda t, m: _import_hf_sam_trl(m),
    "generating-trainer": lambda t, m: _generating_trainer(),
    "enable-sam-twice": lambda t, m: enable_sam(_trainer(t)),
    "enable-sam-not-a-trainer": lambda t, m: enable_sam(object()),
    "search-trial-rho": lambda t, m: _search_with_rho(t, -1.0),
    # Resuming (the file's path as given; tests/test_transactions.py covers each damage through `train`)
    "sam-state-unreadable": lambda t, m: _load_state(t, m, lambda path: path.write_bytes(b"")),
    "sam-state-not-sam": lambda t, m: _load_state(t, m, lambda path: torch.save([1, 2, 3], path)),
    "sam-state-bad-entry": lambda t, m: _load_state(
        t, m, lambda path: torch.save({"config": {}, "friendly_ema": [1.0]}, path), sam_method="friendly"
    ),
    # Framework configs
    "framework-sam-key-unknown": lambda t, m: check_sam_keys({"sam_rhoo": 0.1}, "the Axolotl config"),
    # Functions
    "global-norm-empty": lambda t, m: global_norm([]),
}


def test_every_row_has_a_case_and_every_case_a_row():
    rows = doc_rows()
    assert len(rows) >= 30, f"the table in {DOCS.name} did not parse"
    assert set(rows) == set(CASES)


def test_every_sam_config_field_has_a_row():
    text = DOCS.read_text()
    for f in fields(SAMConfig):
        assert f"SAMConfig({f.name}=" in text or f"sam_{f.name}" in text, f.name


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_documented_error(case_id, tmp_path, monkeypatch):
    rows = doc_rows()
    assert case_id in rows, f"no row `{case_id}` in {DOCS.name}"
    error_type, message = rows[case_id]
    with pytest.raises(BaseException) as info:
        CASES[case_id](tmp_path, monkeypatch)
    assert type(info.value).__name__ == error_type
    assert str(info.value) == message


@pytest.mark.parametrize("case_id", sorted(CONFIG_CASES))
def test_sam_arguments_give_the_same_message(case_id, tmp_path):
    """The `SAMConfig(...)` rows hold for `SAMTrainingArguments(sam_...=...)` (and so the `--sam_*` flags) too."""
    with pytest.raises(ValueError) as config_error:
        SAMConfig(**CONFIG_CASES[case_id])
    with pytest.raises(ValueError) as args_error:
        _args(tmp_path, **{f"sam_{k}": v for k, v in CONFIG_CASES[case_id].items()})
    assert str(args_error.value) == str(config_error.value)


def _raised(case_id: str) -> BaseException:
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as monkeypatch:
        try:
            CASES[case_id](Path(tmp), monkeypatch)
        except BaseException as error:  # the error is the result
            return error
    raise AssertionError(f"`{case_id}` raised nothing")


if __name__ == "__main__":
    # `python tests/test_errors.py`: after a message changes in hf_sam, rewrite the Error and Message columns of the
    # existing rows from what the code raises now (ids and settings stay; add rows for new cases by hand).
    lines = []
    for line in DOCS.read_text().splitlines():
        match = ROW.match(line)
        if match and match["id"] in CASES:
            error = _raised(match["id"])
            message = str(error).replace("|", "\\|")
            line = f"| `{match['id']}` | {match['setting']} | `{type(error).__name__}` | `` {message} `` |"
        lines.append(line)
    DOCS.write_text("\n".join(lines) + "\n")
