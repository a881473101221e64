"""Configuration: validation at construction time, CLI parsing, refusals of setups SAM cannot run in."""

from __future__ import annotations

import pytest
import torch
from testing_utils import REPO, base_args, lm_dataset, load_script, tiny_llama
from transformers import HfArgumentParser, TrainingArguments

from hf_sam import SAMConfig, SAMTrainer, SAMTrainingArguments

INVALID = [
    ("rho", 0.0, r"`rho` \(`--sam_rho`\) must be a finite number > 0, got 0.0"),
    ("rho", -0.05, r"`rho` \(`--sam_rho`\) must be a finite number > 0"),
    ("rho", float("nan"), r"`rho` \(`--sam_rho`\) must be a finite number > 0, got nan"),
    ("rho", float("inf"), r"`rho` \(`--sam_rho`\) must be a finite number > 0, got inf"),
    ("rho", "0.05", r"`rho` \(`--sam_rho`\) must be a finite number > 0, got '0.05'"),
    ("eta", -0.01, r"`eta` \(`--sam_eta`\) must be a finite number >= 0"),
    ("eta", float("nan"), r"`eta` \(`--sam_eta`\) must be a finite number >= 0"),
    ("adaptive", "yes", r"`adaptive` \(`--sam_adaptive`\) must be True or False"),
    ("accumulation", "sum", r"`accumulation` \(`--sam_accumulation`\) must be one of 'exact', 'micro', got 'sum'"),
    ("sync", "none", r"`sync` \(`--sam_sync`\) must be one of 'global', 'local', got 'none'"),
]


@pytest.mark.parametrize("name,value,message", INVALID)
def test_sam_config_rejects_bad_values(name, value, message):
    with pytest.raises(ValueError, match=message):
        SAMConfig(**{name: value})


@pytest.mark.parametrize("name,value,message", INVALID)
def test_training_arguments_reject_bad_values(tmp_path, name, value, message):
    with pytest.raises(ValueError, match=message):
        SAMTrainingArguments(**base_args(tmp_path), **{f"sam_{name}": value})


def test_valid_settings_round_trip(tmp_path):
    args = SAMTrainingArguments(
        **base_args(tmp_path), sam_rho=0.1, sam_adaptive=True, sam_eta=0.0, sam_accumulation="micro", sam_sync="local"
    )
    assert args.to_sam_config() == SAMConfig(rho=0.1, adaptive=True, eta=0.0, accumulation="micro", sync="local")
    assert isinstance(args, TrainingArguments)


def test_hf_argument_parser_flags(tmp_path):
    parser = HfArgumentParser(SAMTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--sam_rho", "0.1", "--sam_adaptive", "--sam_accumulation", "micro"]
    )
    assert args.to_sam_config() == SAMConfig(rho=0.1, adaptive=True, accumulation="micro")
    help_text = parser.format_help()
    assert "--sam_rho" in help_text and "Radius of the neighbourhood" in help_text
    with pytest.raises(SystemExit):  # argparse choices name the valid values
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--sam_sync", "sometimes"])
    with pytest.raises(ValueError, match="--sam_rho"):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--sam_rho", "-1"])


def test_deepspeed_is_refused_at_configuration_time(tmp_path):
    with pytest.raises(ValueError, match="does not support DeepSpeed ZeRO-3.*Supported with DeepSpeed: ZeRO stage 1"):
        SAMTrainingArguments(**base_args(tmp_path), deepspeed={"zero_optimization": {"stage": 3}})


@pytest.mark.parametrize("optim", ["lomo", "adalomo"])
def test_optimizers_that_step_inside_backward_are_refused(tmp_path, optim):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = SAMTrainingArguments(**base_args(tmp_path), optim=optim)
    with pytest.raises(ValueError, match=f"`optim='{optim}'` updates the weights inside `backward`"):
        SAMTrainer(model=model, args=args, train_dataset=lm_dataset())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_sam_config_must_be_a_sam_config(tmp_path):
    with pytest.raises(TypeError, match="`sam_config` must be a `SAMConfig`, got dict"):
        SAMTrainer(model=tiny_llama(), args=TrainingArguments(**base_args(tmp_path)), sam_config={"rho": 0.1})


def test_sam_arguments_mirror_sam_config():
    """Every SAMConfig field has a `sam_`-prefixed argument with the same type, default and help."""
    import dataclasses
    import typing

    from hf_sam import SAMArguments

    config_fields = {f.name: f for f in dataclasses.fields(SAMConfig)}
    argument_fields = {f.name: f for f in dataclasses.fields(SAMArguments)}
    # Resolved types: HfArgumentParser replaces string annotations on the fields in place.
    config_types, argument_types = typing.get_type_hints(SAMConfig), typing.get_type_hints(SAMArguments)
    assert set(argument_fields) == {f"sam_{name}" for name in config_fields}
    for name, f in config_fields.items():
        twin = argument_fields[f"sam_{name}"]
        assert argument_types[twin.name] == config_types[name], name
        assert (twin.default, twin.metadata["help"]) == (f.default, f.metadata["help"]), name


def test_every_setting_is_declared_once_and_generates_both_dataclasses():
    """`SAMConfig` and `SAMArguments` come from one declaration per setting (core and variant alike): same names,
    defaults, help and types; a `Setting` with choices is a `Literal` (argparse lists the choices)."""
    import dataclasses
    import typing

    from hf_sam import SAMArguments
    from hf_sam.config import all_settings

    settings = all_settings()
    config_types, argument_types = typing.get_type_hints(SAMConfig), typing.get_type_hints(SAMArguments)
    assert [f.name for f in dataclasses.fields(SAMConfig)] == list(settings)
    assert [f.name for f in dataclasses.fields(SAMArguments)] == [f"sam_{name}" for name in settings]
    for f in dataclasses.fields(SAMConfig):
        setting = settings[f.name]
        assert (f.default, f.metadata["help"]) == (setting.default, setting.help), f.name
        assert config_types[f.name] == argument_types[f"sam_{f.name}"] == setting.annotation, f.name
        if setting.choices:
            assert typing.get_args(config_types[f.name]) == setting.choices, f.name


def test_the_type_stub_for_ides_is_up_to_date():
    """hf_sam/config.pyi spells out the generated fields for IDEs; regenerate with `python scripts/config_stub.py`."""
    module = load_script(REPO / "scripts" / "config_stub.py", "config_stub")
    assert module.STUB.read_text() == module.stub_text()
    for name in ("rho", "looksam_interval", "friendly_lambda"):
        assert f"    sam_{name}: " in module.STUB.read_text()  # the variants' settings too
