"""What the tests share: tiny data and models, argument builders, assertions, the host-read detector, TRL's tiny
policy and tokenizer, the runners of the resume script and of the multi-process scripts, the benchmark loader.

Imported by the test modules (`from testing_utils import ...`), by `conftest.py` and by the scripts of `scripts/`
and `dist_scripts/` that run in the main venv (each puts this folder on `sys.path`). Needs torch, transformers,
datasets and hf_sam, not pytest (imported where a run fails a test). The DeepSpeed and framework venvs, which have
neither pytest nor datasets, import `tiny_llama.py` alone. The float64 references are in `references.py`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from datasets import Dataset
from references import BETAS, EPS, LR
from tiny_llama import VOCAB, tiny_llama, tiny_llama_config  # noqa: F401  (re-exported to the tests)
from torch import nn

import hf_sam

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
BENCHMARKS = REPO / "benchmarks"
PACKAGE_DIR = str(Path(hf_sam.__file__).parent)  # where the host-read detector looks
RESUME_SCRIPT = TESTS / "scripts" / "resume_run.py"


# ---- data -----------------------------------------------------------------------------------------------------------
def lm_dataset(n: int = 8, length: int = 12, seed: int = 1) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, length), generator=g)
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def regression_dataset(n: int = 8, seed: int = 0) -> Dataset:
    """Rows {x: 4 numbers, labels: sum(x) + 0.1}, for the small regression models the tests define."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return Dataset.from_dict({"x": x.tolist(), "labels": (x.sum(-1) + 0.1).tolist()})


def regression_data(n: int = 16, seed: int = 3) -> Dataset:
    """Rows {x: 4 numbers, labels: sum(x) + noise}, for `BatchNormRegressor` (tests and `ddp_batchnorm.py`)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return Dataset.from_dict({"x": x.tolist(), "labels": (x.sum(1) + 0.1 * torch.randn(n, generator=g)).tolist()})


# ---- models with state besides their weights ------------------------------------------------------------------------
class RunningStat(nn.Module):
    """A running statistic that is not BatchNorm: re-assigned (`mean`) and updated in place (`count`)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.mean = 0.9 * self.mean + 0.1 * x.detach().mean(0)
            self.count += 1
        return x - self.mean


class BatchNormRegressor(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.inp, self.bn, self.stat, self.out = nn.Linear(4, 8), nn.BatchNorm1d(8), RunningStat(8), nn.Linear(8, 1)

    def forward(self, x, labels):
        prediction = self.out(torch.relu(self.stat(self.bn(self.inp(x))))).squeeze(-1)
        return {"loss": F.mse_loss(prediction, labels)}


# ---- arguments ------------------------------------------------------------------------------------------------------
def base_args(tmp_path, **overrides) -> dict:
    """Keyword arguments for (SAM)TrainingArguments: CPU, no saving, no reporting, deterministic."""
    kwargs = dict(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
    )
    kwargs.update(overrides)
    return kwargs


def sgd_args(tmp_path, **overrides) -> dict:
    """Plain SGD at a constant learning rate, no clipping, sequential data: the setting of the reference tests."""
    return base_args(
        tmp_path,
        **{
            "optim": "sgd",
            "learning_rate": 0.5,
            "lr_scheduler_type": "constant",
            "weight_decay": 0.0,
            "max_grad_norm": 0.0,
            "train_sampling_strategy": "sequential",
            **overrides,
        },
    )


def adam_args(tmp_path, **overrides) -> dict:
    """`sgd_args` with the AdamW of `references.reference_sam_adamw` (no weight decay)."""
    return sgd_args(
        tmp_path, optim="adamw_torch", learning_rate=LR, adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_epsilon=EPS,
        **overrides,
    )  # fmt: skip


# ---- assertions -----------------------------------------------------------------------------------------------------
def trainable_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def assert_updates_close(start, got, want, rtol=1e-5):
    """Compare the weight changes (not the weights, which a tiny step would make trivially close)."""
    for k in want:
        delta_got, delta_want = got[k] - start[k], want[k] - start[k]
        scale = delta_want.abs().max().clamp_min(1e-12)
        assert ((delta_got - delta_want).abs().max() / scale) < rtol, k


def assert_tiny_rho_reproduces_the_plain_trainer(tmp_path, sam_method: str) -> None:
    """rho -> 0: SAM with `sam_method` takes the plain Trainer's steps (AdamW, 4 steps of 2 micro-batches of 2)."""
    from transformers import Trainer, TrainingArguments

    from hf_sam import SAMTrainer, SAMTrainingArguments

    data = lm_dataset(n=8)
    plain, sam = tiny_llama(), tiny_llama()
    kwargs = base_args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=4)
    kwargs.update(learning_rate=1e-2, optim="adamw_torch")
    Trainer(model=plain, args=TrainingArguments(**kwargs), train_dataset=data).train()
    args = SAMTrainingArguments(**kwargs, sam_rho=1e-9, sam_method=sam_method)
    SAMTrainer(model=sam, args=args, train_dataset=data).train()
    for (name, p), q in zip(plain.named_parameters(), sam.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)


def assert_learning_rate_zero_never_changes_the_weights(training_kwargs: dict, sam_method: str) -> None:
    """The perturbation is undone by copy: with lr = 0 every weight ends bit for bit where it started (3 steps at
    rho = 0.5 with `training_kwargs`, the (SAM)TrainingArguments of the optimizer `sam_method` needs)."""
    from hf_sam import SAMTrainer, SAMTrainingArguments

    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = SAMTrainingArguments(**training_kwargs, max_steps=3, sam_rho=0.5, sam_method=sam_method)
    args.learning_rate = 0.0
    SAMTrainer(model=model, args=args, train_dataset=lm_dataset(8)).train()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def update_error(got: dict, want: dict, start: dict) -> float:
    """||got - want|| / ||want - start|| over all tensors: the error relative to the size of the update."""
    num = sum((got[k].double() - want[k].double()).square().sum() for k in want)
    den = sum((want[k].double() - start[k].double()).square().sum() for k in want)
    return float((num / den).sqrt())


# ---- host reads (the `host_reads` fixture of conftest.py) -----------------------------------------------------------
HOST_READS = ["item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu"]


def record_host_reads(monkeypatch) -> list[str]:
    """Wrap the tensor methods that copy a value to the host; return the list each call made from hf_sam's own code
    outside logging (`pop`) is appended to, as "item in add_perturbation (trainer.py)". On CPU the reads are free, so
    this catches them where they would cost a synchronisation on a GPU."""
    calls: list[str] = []
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, _original=original, _name=name, **kwargs):
            frame = sys._getframe(1)
            if frame.f_code.co_filename.startswith(PACKAGE_DIR) and frame.f_code.co_name != "pop":
                calls.append(f"{_name} in {frame.f_code.co_name} ({Path(frame.f_code.co_filename).name})")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    return calls


# ---- TRL: a tiny policy, a WordLevel tokenizer built here, local data -----------------------------------------------
SPECIAL = ["<pad>", "<eos>", "<unk>"]
WORDS = [f"w{i}" for i in range(VOCAB - len(SPECIAL))]
TRL_METRICS = ("entropy", "mean_token_accuracy", "num_tokens")


def tiny_tokenizer():
    """A PreTrainedTokenizerFast over `SPECIAL + WORDS` (VOCAB tokens) with a one-line chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}assistant {% endif %}"
    )
    return fast


def tiny_policy(seed: int = 0):
    return tiny_llama(seed, pad_token_id=0, eos_token_id=1, bos_token_id=None)


def _words(g: torch.Generator, low: int, high: int) -> str:
    n = int(torch.randint(low, high + 1, (1,), generator=g))
    return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (n,), generator=g).tolist())


def sft_dataset(n: int = 8, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    return Dataset.from_list([{"prompt": _words(g, 2, 6), "completion": " " + _words(g, 1, 4)} for _ in range(n)])


def dpo_dataset(n: int = 8, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    rows = [
        {"prompt": _words(g, 2, 5), "chosen": " " + _words(g, 1, 4), "rejected": " " + _words(g, 1, 4)}
        for _ in range(n)
    ]
    return Dataset.from_list(rows)


def trl_sgd_args(tmp_path, **overrides) -> dict:
    """`sgd_args` for TRL's configs, which default to bf16 autocast; the references are float32/float64."""
    return sgd_args(tmp_path, **{"max_length": 32, "bf16": False, **overrides})


def train_logs(trainer) -> list[dict]:
    return [h for h in trainer.state.log_history if "loss" in h]


# ---- running scripts in fresh processes -----------------------------------------------------------------------------
def resume_run(out_dir: Path, max_steps: int, resume: str | None, sam: dict) -> dict[str, torch.Tensor]:
    """Train with `scripts/resume_run.py` in a new process (saving every 2 steps into `out_dir`, resuming from the
    checkpoint `resume` if given, with the sam_* arguments `sam`); return its final state_dict."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run(
        [sys.executable, str(RESUME_SCRIPT), str(out_dir), str(max_steps), resume or "-", json.dumps(sam)],
        check=True,
        env=env,
        timeout=300,
        capture_output=True,
    )
    return torch.load(out_dir / "final.pt", weights_only=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_arguments(nproc: int) -> list[str]:
    """`-m torch.distributed.run` with `nproc` processes on a free local port (after a python, before a script)."""
    return [
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
    ]


def run_launch(command: list[str], timeout_s: float, **env: str) -> None:
    """Run `command` (a script of `dist_scripts/`) in the repository, one thread per process, offline, with `env`
    added to the environment; fail the test with the end of its output when it exits non-zero or runs past
    `timeout_s`."""
    import pytest

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **env}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    if sys.platform.startswith("linux"):  # gloo on loopback: containers whose hostname resolves elsewhere
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    # A session of its own, so that a hang takes the launcher's worker processes down with it.
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"{' '.join(command)} ran past {timeout_s} s:\n{output[-6000:]}")
    if process.returncode != 0:
        pytest.fail(f"{' '.join(command)} exited with {process.returncode}:\n{output[-6000:]}")


def load_script(path: Path, name: str) -> ModuleType:
    """Import the script at `path` (not in a package) as the module `name`."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def load_benchmark_script(name: str) -> ModuleType:
    """Import `benchmarks/<name>.py` as the module `name`."""
    return load_script(BENCHMARKS / f"{name}.py", name)


class ForwardCounter:
    """Counts the forward calls of `model` (how many passes a step ran)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.count = 0
        model.register_forward_pre_hook(self._hook)

    def _hook(self, *_: Any) -> None:
        self.count += 1
