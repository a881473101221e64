"""Framework integrations (hf_sam.integrations): Axolotl's plugin and the LLaMA-Factory launcher.

The fast tests run in the main venv, without the frameworks. The `slow` ones run the real frameworks end to end on a
tiny Llama, in the venvs that `scripts/framework_venvs.sh` creates (each framework pins its own transformers), and
skip when a venv is missing. Both check that training logs SAM's metrics and that with rho -> 0 the final weights
equal the framework's plain run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_sam import SAMConfig
from hf_sam.integrations import SAM_KEYS, check_sam_keys, sam_config_from_keys, unknown_sam_keys

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent / "scripts"


# ---- shared key handling --------------------------------------------------------------------------------------------
def test_import_hf_sam_imports_no_framework():
    code = (
        "import sys, hf_sam, hf_sam.integrations; "
        "print([m for m in sys.modules if m.split('.')[0] in ('axolotl', 'llamafactory', 'omegaconf')])"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_sam_keys_are_the_sam_arguments_fields():
    from dataclasses import fields

    from hf_sam import SAMArguments

    assert set(SAM_KEYS) == {f.name for f in fields(SAMArguments)}


def test_sam_config_from_keys_reads_sam_keys_and_keeps_defaults():
    config = {"learning_rate": 1e-3, "sam_rho": 0.1, "sam_adaptive": True, "sam_method": None}
    assert sam_config_from_keys(config, "cfg") == SAMConfig(rho=0.1, adaptive=True)
    assert sam_config_from_keys({}, "cfg") == SAMConfig()


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({"sam_rho": -1.0}, r"the test config: `rho` \(`--sam_rho`\) must be a finite number > 0, got -1.0"),
        ({"sam_method": "sharp"}, r"`method` \(`--sam_method`\) must be one of 'sam', .*, got 'sharp'"),
        (
            {"sam_rhoo": 0.1},
            r"^Unknown SAM setting in the test config: `sam_rhoo` \(did you mean `sam_rho`\?\)\. Valid keys \(the "
            r"fields of `hf_sam\.SAMArguments`, described in the README's Settings and in docs/api\.md\): sam_rho, ",
        ),
    ],
)
def test_sam_config_from_keys_errors_name_the_field_and_the_valid_values(keys, expected):
    with pytest.raises(ValueError, match=expected):
        sam_config_from_keys(keys, "the test config")


def test_check_sam_keys_ignores_other_keys():
    check_sam_keys(["learning_rate", "sample_packing", "sam_rho", 3], "cfg")


VALID_KEYS_TAIL = (
    " Valid keys (the fields of `hf_sam.SAMArguments`, described in the README's Settings and in docs/api.md): "
    + ", ".join(SAM_KEYS)
    + "."
)


@pytest.mark.parametrize(
    ("key", "closest"),
    [
        ("sam_rhoo", "sam_rho"),  # a typo
        ("sam-rho", "sam_rho"),  # hyphens, as in command-line flags
        ("sam-looksam-interval", "sam_looksam_interval"),
        ("SAM_ADAPTIVE", "sam_adaptive"),
        ("sam_rho_scheduel", "sam_rho_schedule"),
        ("sam_acumulation", "sam_accumulation"),
        ("sam_functional_grad_type", "sam_functional_grad_dtype"),
    ],
)
def test_misspelled_sam_key_is_refused_naming_the_closest_valid_key(key, closest):
    assert closest in SAM_KEYS
    config = {"learning_rate": 1e-3, "sample_packing": True, key: 0.1}
    with pytest.raises(ValueError) as info:
        sam_config_from_keys(config, "the Axolotl config")
    assert str(info.value) == (
        f"Unknown SAM setting in the Axolotl config: `{key}` (did you mean `{closest}`?)." + VALID_KEYS_TAIL
    )


def test_unknown_sam_keys_are_all_named_and_others_left_alone():
    keys = ["sam-rho", "sam_zzzzzzzz", "sam_rho", "sample_packing", "samples", "sam", "rho", "SAM-ETA", 7]
    assert unknown_sam_keys(keys) == {"SAM-ETA": "sam_eta", "sam-rho": "sam_rho", "sam_zzzzzzzz": None}
    with pytest.raises(ValueError) as info:
        check_sam_keys(keys, "the LLaMA-Factory config")
    assert str(info.value) == (
        "Unknown SAM settings in the LLaMA-Factory config: `SAM-ETA` (did you mean `sam_eta`?), `sam-rho` (did you "
        "mean `sam_rho`?), `sam_zzzzzzzz`." + VALID_KEYS_TAIL
    )
    # Every valid key, under its own name, passes; so does a config without SAM keys.
    check_sam_keys(SAM_KEYS, "cfg")
    check_sam_keys({"learning_rate": 1e-3, "sample_packing": True}, "cfg")


def test_errors_page_shows_the_misspelled_key_message():
    """docs/errors.md quotes the message for `sam_rhoo: 0.1` in an Axolotl config; it is the one the code raises."""
    page = (ROOT / "docs" / "errors.md").read_text()
    section = page.split("\n## Framework configs\n", 1)[1]
    quoted = section.split("```text\n", 1)[1].split("\n```", 1)[0]
    with pytest.raises(ValueError) as info:
        check_sam_keys({"sam_rhoo": 0.1}, "the Axolotl config")
    assert quoted == str(info.value)


# ---- LLaMA-Factory launcher: everything it checks before importing LLaMA-Factory ------------------------------------
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ({"stage": "sft", "sam_rho_schedule": "linear"}, r"`rho_schedule`.*'constant', 'lr', 'cosine_ramp'"),
        (
            {"stage": "ppo"},
            r"`stage: ppo` in the LLaMA-Factory config: SAM runs with the stages pt, sft, rm, dpo, kto",
        ),
        ({"stage": "sft", "use_ray": True}, r"`use_ray` in the LLaMA-Factory config"),
        ({"stage": "sft", "use_mca": True}, r"`use_mca`"),
        (
            {"stage": "sft", "sam-rho": 0.1},
            r"^Unknown SAM setting in the LLaMA-Factory config: `sam-rho` \(did you mean `sam_rho`\?\)",
        ),
    ],
)
def test_llamafactory_launcher_refuses_before_training(args, expected):
    from hf_sam.integrations import llamafactory

    with pytest.raises(ValueError, match=expected):
        llamafactory.run_exp(args)


def test_llamafactory_launcher_usage():
    from hf_sam.integrations import llamafactory

    with pytest.raises(SystemExit, match="must be a .yaml, .yml or .json config, got 'config.txt'"):
        llamafactory.main(["config.txt"])


def test_llamafactory_read_config_applies_overrides_and_keeps_sam_keys(tmp_path):
    pytest.importorskip("omegaconf")  # LLaMA-Factory's own dependency, absent from the main venv
    from hf_sam.integrations.llamafactory import read_config

    path = tmp_path / "c.yaml"
    path.write_text("stage: sft\nsam_rho: 1.0e-3\nlearning_rate: 1.0e-4\n")
    assert read_config([str(path), "sam_rho=0.2"]) == {"stage": "sft", "sam_rho": 0.2, "learning_rate": 1e-4}


# ---- Axolotl plugin: needs Axolotl installed ------------------------------------------------------------------------
def test_axolotl_args_validation():
    pytest.importorskip("axolotl", reason="Axolotl is not installed here (see scripts/framework_venvs.sh)")
    from pydantic import ValidationError

    from hf_sam.integrations.axolotl import SAMAxolotlArgs, SAMPlugin

    assert SAMPlugin().get_input_args() == "hf_sam.integrations.axolotl.SAMAxolotlArgs"
    assert set(SAMAxolotlArgs.model_fields) == set(SAM_KEYS)
    assert SAMAxolotlArgs(sam_rho="1e-3").sam_rho == 1e-3  # YAML 1.1 reads 1e-3 as a string
    with pytest.raises(ValidationError, match=r"`rho` \(`--sam_rho`\) must be a finite number > 0"):
        SAMAxolotlArgs(sam_rho=0)
    with pytest.raises(ValidationError, match=r"Unknown SAM setting in the Axolotl config: `sam_rhoo` \(did you"):
        SAMAxolotlArgs(sam_rhoo=0.1)
    with pytest.raises(ValidationError, match=r"`sam-rho` \(did you mean `sam_rho`\?\)"):
        SAMAxolotlArgs.model_validate({"sam-rho": 0.1})


# ---- end to end in the framework venvs (slow) -----------------------------------------------------------------------
def _venvs_dir() -> Path:
    """Where scripts/framework_venvs.sh puts the venvs (the same rule as the script)."""
    if os.environ.get("HF_SAM_VENVS"):
        return Path(os.environ["HF_SAM_VENVS"])
    if os.environ.get("HF_SAM_CACHE"):
        return Path(os.environ["HF_SAM_CACHE"]) / "venvs"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hf_sam" / "venvs"


def _framework_venv(name: str) -> Path:
    venv = _venvs_dir() / name
    if not (venv / "bin" / "python").is_file():
        pytest.skip(f"no {name} venv at {venv}: create it with `scripts/framework_venvs.sh {name}`")
    return venv


def _env(venv: Path, **extra: str) -> dict[str, str]:
    # PYTHONPATH: this checkout's hf_sam, whichever checkout the venv was created from.
    env = dict(os.environ, PATH=f"{venv / 'bin'}:{os.environ['PATH']}", PYTHONPATH=str(ROOT), VIRTUAL_ENV=str(venv))
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 900) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    return output


def _tiny_llm(venv: Path, tmp_path: Path, env: dict[str, str]) -> Path:
    _run([str(venv / "bin" / "python"), str(SCRIPTS / "tiny_llm.py"), str(tmp_path / "tiny")], tmp_path, env)
    return tmp_path / "tiny"


def _logged_metrics(output: str) -> list[dict]:
    """The Trainer's per-step log dicts, as printed to the console."""
    import ast

    rows = []
    for line in output.splitlines():
        start = line.find("{'loss'")
        if start >= 0:
            rows.append(ast.literal_eval(line[start : line.index("}", start) + 1]))
    return rows


def _max_weight_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def _check_runs(outputs: dict[str, str], dirs: dict[str, Path]) -> None:
    """SAM runs log SAM's metrics; rho -> 0 equals the plain run; rho = 0.05 does not."""
    plain, rho0, sam = (_logged_metrics(outputs[k]) for k in ("plain", "rho0", "sam"))
    assert len(plain) == len(rho0) == len(sam) == 4
    assert not any("sam_sharpness" in row for row in plain)
    assert all(float(row["sam_sharpness"]) > 0 and float(row["sam_skipped"]) == 0 for row in sam)
    assert all(float(row["sam_perturbed_loss"]) > float(row["loss"]) for row in sam)
    assert all(float(row["sam_sharpness"]) == 0 for row in rho0)
    assert [row["loss"] for row in rho0] == [row["loss"] for row in plain]
    assert _max_weight_difference(dirs["plain"], dirs["rho0"]) <= 1e-6
    assert _max_weight_difference(dirs["plain"], dirs["sam"]) > 1e-4


AXOLOTL_CONFIG = """\
base_model: {model}
datasets:
  - path: {data}
    ds_type: json
    type: alpaca
dataset_prepared_path: {prepared}
val_set_size: 0
output_dir: {out}
sequence_len: 64
micro_batch_size: 4
gradient_accumulation_steps: 1
num_epochs: 1
max_steps: 4
optimizer: adamw_torch
learning_rate: 0.001
lr_scheduler: constant
seed: 42
logging_steps: 1
save_strategy: "no"
bf16: false
fp16: false
tf32: false
"""
AXOLOTL_SAM = "plugins:\n  - hf_sam.integrations.axolotl.SAMPlugin\n"


def _axolotl_config(tmp_path: Path, tiny: Path, name: str, extra: str = "") -> Path:
    text = AXOLOTL_CONFIG.format(
        model=tiny / "model", data=tiny / "data" / "train.jsonl", prepared=tmp_path / "prepared", out=tmp_path / name
    )
    path = tmp_path / f"{name}.yml"
    path.write_text(text + extra)
    return path


@pytest.mark.slow
def test_axolotl_config_validation_in_axolotl(tmp_path):
    venv = _framework_venv("axolotl")
    env = _env(venv, AXOLOTL_DO_NOT_TRACK="1")
    tiny = _tiny_llm(venv, tmp_path, env)
    cases = {
        "good": (AXOLOTL_SAM + "sam_rho: 1e-3\nsam_adaptive: true\n", None),
        "bad_rho": (AXOLOTL_SAM + "sam_rho: -1\n", r"`rho` (`--sam_rho`) must be a finite number > 0, got -1.0"),
        "bad_method": (AXOLOTL_SAM + "sam_method: sharp\n", "`method` (`--sam_method`) must be one of 'sam', "),
        "typo": (
            AXOLOTL_SAM + "sam_rhoo: 0.1\n",
            "Unknown SAM setting in the Axolotl config: `sam_rhoo` (did you mean `sam_rho`?). Valid keys (the fields",
        ),
        "hyphen": (AXOLOTL_SAM + "sam-rho: 0.1\n", "`sam-rho` (did you mean `sam_rho`?). Valid keys (the fields"),
        "no_plugin": ("sam_rho: 0.1\n", None),
    }
    paths = [str(_axolotl_config(tmp_path, tiny, name, extra)) for name, (extra, _) in cases.items()]
    output = _run([str(venv / "bin" / "python"), str(SCRIPTS / "axolotl_check_config.py"), *paths], tmp_path, env)
    results = {
        Path(r["path"]).stem: r for r in map(json.loads, (x for x in output.splitlines() if x.startswith('{"path"')))
    }
    assert results["good"] == {"path": paths[0], "ok": True, "sam": {"sam_rho": 1e-3, "sam_adaptive": True}}
    for name, (_, message) in cases.items():
        if message is not None:
            assert not results[name]["ok"] and message in results[name]["error"], results[name]
    # Without the plugin Axolotl drops the keys silently: the documented pitfall.
    assert results["no_plugin"] == {"path": paths[-1], "ok": True, "sam": {}}


@pytest.mark.slow
def test_axolotl_train_end_to_end(tmp_path):
    venv = _framework_venv("axolotl")
    env = _env(venv, AXOLOTL_DO_NOT_TRACK="1")
    tiny = _tiny_llm(venv, tmp_path, env)
    extras = {"plain": "", "rho0": AXOLOTL_SAM + "sam_rho: 1.0e-12\n", "sam": AXOLOTL_SAM + "sam_rho: 0.05\n"}
    outputs = {}
    for name, extra in extras.items():
        config = _axolotl_config(tmp_path, tiny, name, extra)
        outputs[name] = _run([str(venv / "bin" / "axolotl"), "train", str(config)], tmp_path, env)
    _check_runs(outputs, {name: tmp_path / name for name in extras})


LLAMAFACTORY_CONFIG = """\
model_name_or_path: {model}
stage: sft
do_train: true
finetuning_type: full
dataset: tiny_alpaca
dataset_dir: {data}
template: default
cutoff_len: 64
overwrite_cache: true
preprocessing_num_workers: 1
output_dir: {out}
overwrite_output_dir: true
per_device_train_batch_size: 4
gradient_accumulation_steps: 1
max_steps: 4
learning_rate: 1.0e-3
lr_scheduler_type: constant
optim: adamw_torch
logging_steps: 1
save_strategy: "no"
report_to: none
seed: 42
bf16: false
use_cpu: true
"""  # LLaMA-Factory's own gradient checkpointing stays on (its default): SAM's two passes go through it


@pytest.mark.slow
def test_llamafactory_end_to_end(tmp_path):
    venv = _framework_venv("llamafactory")
    env = _env(venv, DISABLE_VERSION_CHECK="1")  # LLaMA-Factory 0.9.5 checks transformers <= 5.6.0 at import
    tiny = _tiny_llm(venv, tmp_path, env)
    python = str(venv / "bin" / "python")
    commands = {
        "plain": [str(venv / "bin" / "llamafactory-cli"), "train"],
        "rho0": [python, "-m", "hf_sam.integrations.llamafactory"],
        "sam": [python, "-m", "hf_sam.integrations.llamafactory"],
    }
    outputs = {}
    for name, command in commands.items():
        config = tmp_path / f"{name}.yaml"
        config.write_text(LLAMAFACTORY_CONFIG.format(model=tiny / "model", data=tiny / "data", out=tmp_path / name))
        overrides = {"plain": [], "rho0": ["sam_rho=1e-12"], "sam": ["sam_rho=0.05"]}[name]
        outputs[name] = _run([*command, str(config), *overrides], tmp_path, env)
    assert all("Gradient checkpointing enabled" in output for output in outputs.values())
    _check_runs(outputs, {name: tmp_path / name for name in commands})


@pytest.mark.slow
def test_llamafactory_misspelled_sam_key_stops_before_training(tmp_path):
    venv = _framework_venv("llamafactory")
    # ALLOW_EXTRA_ARGS=1: LLaMA-Factory's own parser then ignores unknown keys, so without the launcher's check
    # `sam-rho` would be ignored silently (measured: 4 steps at the default rho 0.05 instead of the 0.1 asked for).
    env = _env(venv, DISABLE_VERSION_CHECK="1", ALLOW_EXTRA_ARGS="1")
    tiny = _tiny_llm(venv, tmp_path, env)
    config = tmp_path / "typo.yaml"
    out = tmp_path / "typo"
    config.write_text(LLAMAFACTORY_CONFIG.format(model=tiny / "model", data=tiny / "data", out=out) + "sam-rho: 0.1\n")
    command = [str(venv / "bin" / "python"), "-m", "hf_sam.integrations.llamafactory", str(config)]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-6000:]
    assert "ValueError: Unknown SAM setting in the LLaMA-Factory config: `sam-rho` (did you mean `sam_rho`?)" in output
    assert not _logged_metrics(output) and not out.exists()  # nothing trained
