"""SAM across processes and devices: DDP (both sync modes) and FSDP2 on CPU with gloo, refusals, placements.

The multi-process tests launch the helper scripts of `tests/dist_scripts/` with `torch.distributed.run` on two CPU
processes (gloo), one thread each, and compare the weights they save with a single-process run on the same global
batch. They are marked `slow`; `make test` (CI) runs them.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from testing_utils import REPO, base_args, lm_dataset, run_launch, tiny_llama, torchrun_arguments, update_error
from transformers import TrainingArguments

from hf_sam import SAMConfig, SAMTrainer, SAMTrainingArguments
from hf_sam.deepspeed_support import DEEPSPEED_STAGE_UNSUPPORTED
from hf_sam.distributed import (
    FSDP1_UNSUPPORTED,
    FSDP_LOCAL_UNSUPPORTED,
    unsupported_setup_reason,
)
from hf_sam.perturbation import global_norm, perturb_, restore_

SCRIPTS = Path(__file__).resolve().parent / "dist_scripts"
LAUNCH_TIMEOUT_S = 300


def launch(script: str, out: Path, nproc: int | None) -> None:
    """Run `script OUT` with `nproc` processes under `torch.distributed.run`, or as one plain process for None."""
    launcher = torchrun_arguments(nproc) if nproc is not None else []
    run_launch([sys.executable, *launcher, str(SCRIPTS / script), str(out)], LAUNCH_TIMEOUT_S)


# ---------------------------------------------------------------------------------------------------------------
# BatchNorm under DDP: the running statistics are the clean passes' only (SyncBatchNorm needs GPU modules).


@pytest.mark.slow
def test_ddp_batchnorm_statistics_follow_the_clean_pass(tmp_path):
    launch("ddp_batchnorm.py", tmp_path, nproc=2)
    runs = {
        n: [torch.load(tmp_path / f"{n}.rank{r}.pt") for r in (0, 1)]
        for n in ("plain", "tiny-exact", "tiny-micro", "sam-exact", "sam-micro")
    }
    assert int(runs["plain"][0]["bn.num_batches_tracked"]) == 3 * 2
    for name in ("tiny-exact", "tiny-micro"):  # rho -> 0: weights and every buffer as the plain Trainer's, per rank
        for rank in (0, 1):
            for k, v in runs["plain"][rank].items():
                torch.testing.assert_close(runs[name][rank][k], v, rtol=1e-5, atol=1e-7, msg=f"{name} {rank} {k}")
    for name in ("sam-exact", "sam-micro"):  # a real radius: one update per micro-batch; the weights agree
        for rank in runs[name]:
            assert int(rank["bn.num_batches_tracked"]) == int(rank["stat.count"]) == 3 * 2
        assert all(torch.equal(runs[name][0][k], runs[name][1][k]) for k in ("bn.weight", "bn.bias", "out.weight"))


# ---------------------------------------------------------------------------------------------------------------
# DDP through the Trainer: 2 processes x batch 2 against 1 process x batch 4, gradient accumulation 2, 2 steps.


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """Each run's saved results: {"ddp": {name: [rank0, rank1]}, "single": {name: result}, "start": state}."""
    root = tmp_path_factory.mktemp("ddp")
    launch("ddp_trainer.py", root / "two", nproc=2)
    launch("ddp_trainer.py", root / "one", nproc=None)
    names = [
        "plain",
        "global-exact",
        "global-micro",
        "local-exact",
        "local-micro",
        "local-exact-no-buffer-broadcast",
        "global-exact-random",
        "functional-exact",
        "functional-micro",
    ]
    load = lambda p: torch.load(p, weights_only=False)  # noqa: E731
    return {
        "ddp": {n: [load(root / "two" / f"{n}.rank{r}.pt") for r in (0, 1)] for n in names},
        "single": {n: load(root / "one" / f"{n}.rank0.pt") for n in names},
        "start": {k: v.detach().clone() for k, v in tiny_llama(seed=0).state_dict().items()},
    }


@pytest.mark.slow
def test_ddp_runs_on_two_processes(ddp_runs):
    for name, results in ddp_runs["ddp"].items():
        assert [r["world_size"] for r in results] == [2, 2], name
        assert ddp_runs["single"][name]["world_size"] == 1


@pytest.mark.slow
def test_ddp_plain_trainer_sees_the_single_process_global_batch(ddp_runs):
    # The premise of the SAM comparisons: with the sequential sampler both runs train on the same global batches.
    got = ddp_runs["ddp"]["plain"][0]["state"]
    assert update_error(got, ddp_runs["single"]["plain"]["state"], ddp_runs["start"]) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("accumulation", ["exact", "micro"])
def test_ddp_global_sync_equals_the_single_process_run(ddp_runs, accumulation):
    name = f"global-{accumulation}"
    got, want = ddp_runs["ddp"][name][0]["state"], ddp_runs["single"][name]["state"]
    assert update_error(got, want, ddp_runs["start"]) < 1e-5
    # and SAM did something: the update is not the plain one
    assert update_error(got, ddp_runs["single"]["plain"]["state"], ddp_runs["start"]) > 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("accumulation", ["exact", "micro"])
def test_ddp_functional_sam_equals_the_single_process_run(ddp_runs, accumulation):
    # Functional-SAM's hooks on the logits: the normal backward all-reduces the gradient they shape.
    name = f"functional-{accumulation}"
    got, want = ddp_runs["ddp"][name][0]["state"], ddp_runs["single"][name]["state"]
    assert update_error(got, want, ddp_runs["start"]) < 1e-5
    assert update_error(got, ddp_runs["single"][f"global-{accumulation}"]["state"], ddp_runs["start"]) > 1e-3


@pytest.mark.slow
def test_ddp_global_sync_equals_the_single_process_run_with_the_random_sampler(ddp_runs):
    # The Trainer's default sampler: Accelerate draws one seeded permutation and deals its batches round-robin.
    name = "global-exact-random"
    got, want = ddp_runs["ddp"][name][0]["state"], ddp_runs["single"][name]["state"]
    assert update_error(got, want, ddp_runs["start"]) < 1e-5
    assert update_error(want, ddp_runs["single"]["global-exact"]["state"], ddp_runs["start"]) > 1e-2  # other data


@pytest.mark.slow
@pytest.mark.parametrize("accumulation", ["exact", "micro"])
def test_ddp_local_sync_differs_from_global(ddp_runs, accumulation):
    local = ddp_runs["ddp"][f"local-{accumulation}"][0]["state"]
    global_ = ddp_runs["single"][f"global-{accumulation}"]["state"]
    assert update_error(local, global_, ddp_runs["start"]) > 1e-2
    # With one process there is no other gradient: local is global.
    single_local = ddp_runs["single"][f"local-{accumulation}"]["state"]
    assert update_error(single_local, global_, ddp_runs["start"]) < 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("name", ["plain", "global-exact", "global-micro", "local-exact", "local-micro"])
def test_ddp_ranks_end_with_identical_weights(ddp_runs, name):
    rank0, rank1 = (r["state"] for r in ddp_runs["ddp"][name])
    for k in rank0:
        assert torch.equal(rank0[k], rank1[k]), k


# All-reduce rounds of each `training_step` call, in call order, for 2 optimizer steps with accumulation 2.
# exact: clean 1, clean 2, perturbed 1, perturbed 2; micro: clean 1, perturbed 1, clean 2, perturbed 2.
EXPECTED_ROUNDS = {
    "plain": [0, 1] * 2,  # the Trainer's no_sync on the first micro-batch, one all-reduce per step
    "global-exact": [0, 1, 0, 1] * 2,  # 2 per step: the clean window's gradient, then the SAM gradient
    "global-micro": [1, 0, 1, 1] * 2,  # k + 1 = 3 per step: every clean micro-batch, then the SAM gradient
    "local-exact": [0, 0, 0, 1] * 2,  # 1 per step: nothing in the first pass
    "local-micro": [0, 0, 0, 1] * 2,
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EXPECTED_ROUNDS))
def test_ddp_all_reduce_rounds_per_pass(ddp_runs, name):
    for rank in (0, 1):
        assert ddp_runs["ddp"][name][rank]["rounds_per_pass"] == EXPECTED_ROUNDS[name], rank


@pytest.mark.slow
def test_ddp_local_sync_needs_no_collective_in_the_first_pass(ddp_runs):
    first_passes = {"exact": [0, 1, 4, 5], "micro": [0, 2, 4, 6]}
    for name, accumulation in (("local-exact", "exact"), ("local-micro", "micro")):
        for rank in (0, 1):
            rounds = ddp_runs["ddp"][name][rank]["rounds_per_pass"]
            assert [rounds[i] for i in first_passes[accumulation]] == [0, 0, 0, 0]
            assert sum(rounds) == sum(ddp_runs["ddp"]["plain"][rank]["rounds_per_pass"]) == 2  # one per step
            # DDP's own forward-time buffer broadcast: as many as the plain Trainer does, none added by SAM.
            broadcasts = ddp_runs["ddp"][name][rank]["broadcasts_per_pass"]
            assert sum(broadcasts) == sum(ddp_runs["ddp"]["plain"][rank]["broadcasts_per_pass"]) > 0
    # With `ddp_broadcast_buffers=False` the first pass runs no collective of any kind.
    for rank in (0, 1):
        run = ddp_runs["ddp"]["local-exact-no-buffer-broadcast"][rank]
        assert run["broadcasts_per_pass"] == [0] * 8
        assert [run["rounds_per_pass"][i] for i in first_passes["exact"]] == [0, 0, 0, 0]
    same = ddp_runs["ddp"]["local-exact-no-buffer-broadcast"][0]["state"]
    assert update_error(same, ddp_runs["ddp"]["local-exact"][0]["state"], ddp_runs["start"]) < 1e-6


# ---------------------------------------------------------------------------------------------------------------
# FSDP2: SAM's engine on a fully_shard'ed tiny Llama against the unsharded model.


@pytest.fixture(scope="module")
def fsdp2_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp2")
    launch("fsdp2_engine.py", root, nproc=2)
    return torch.load(root / "fsdp2.pt", weights_only=False)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["sam-ga2", "asam-ga2", "sam-ga1"])
def test_fsdp2_sam_equals_the_unsharded_run(fsdp2_runs, case):
    run = fsdp2_runs[case]
    assert all(d["sharded_grads"] for d in run["diagnostics"])  # the DTensor path was taken
    assert not any(d["sharded_grads"] for d in run["reference_diagnostics"])
    for sharded, unsharded in zip(run["diagnostics"], run["reference_diagnostics"]):
        assert not sharded["skipped"]
        assert sharded["norm"] == pytest.approx(unsharded["norm"], rel=1e-5)  # reduced across the shards
    assert update_error(run["sharded"], run["unsharded"], run["initial"]) < 1e-5


@pytest.mark.slow
def test_fsdp2_comparison_catches_a_per_shard_norm(fsdp2_runs):
    # The control normalises e by each rank's own shard: the comparison above must be able to see that.
    run = fsdp2_runs["sam-ga2-shard-norm"]
    assert update_error(run["sharded"], run["unsharded"], run["initial"]) > 1e-2


@pytest.mark.slow
def test_fsdp2_partly_sharded_model(fsdp2_runs):
    # DTensor shards and plain tensors in one parameter list (e.g. FSDP2's ignored modules).
    run = fsdp2_runs["partly-sharded"]
    assert run["mixed"]
    assert run["norm"] == pytest.approx(run["want"], rel=1e-6)
    assert run["error"] < 1e-6 and run["exact"]


@pytest.mark.slow
def test_fsdp2_gradient_sync_reaches_every_sharded_module(fsdp2_runs):
    run = fsdp2_runs["sync-switch"]
    assert run["layers"] > 1 and run["off"] and run["on"]


# ---------------------------------------------------------------------------------------------------------------
# FSDP2 through the Trainer: Accelerate's own FSDP2 preparation, forced on CPU (see the script's docstring).


@pytest.fixture(scope="module")
def fsdp2_trainer_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp2-trainer")
    launch("fsdp2_trainer.py", root, nproc=2)
    load = lambda p: torch.load(p, weights_only=False)  # noqa: E731
    runs = {name: load(root / f"fsdp2-{name}.pt") for name in ("plain", "global-exact", "global-micro")}
    return {**runs, "refusals": json.loads((root / "refusals.json").read_text())}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["plain", "global-exact", "global-micro"])
def test_fsdp2_trainer_equals_the_single_process_run(fsdp2_trainer_runs, ddp_runs, name):
    run = fsdp2_trainer_runs[name]
    assert run["world_size"] == 2 and run["wrapped"].startswith("FSDP") and run["dtensor_params"]
    want = ddp_runs["single"][name]["state"]
    assert set(run["state"]) == set(want)
    assert update_error(run["state"], want, ddp_runs["start"]) < 1e-5
    if name != "plain":
        assert update_error(run["state"], ddp_runs["single"]["plain"]["state"], ddp_runs["start"]) > 1e-2


@pytest.mark.slow
def test_fsdp_refusals_through_the_trainer(fsdp2_trainer_runs):
    assert fsdp2_trainer_runs["refusals"] == {
        "fsdp1": FSDP1_UNSUPPORTED,
        "fsdp2-local": FSDP_LOCAL_UNSUPPORTED,
        "fsdp2-micro-ga2": None,  # every perturbed pass synchronises instead
        "fsdp2-global-exact": None,
    }


# ---------------------------------------------------------------------------------------------------------------
# Refusals at construction.


def fake_trainer(fsdp_version=None, deepspeed=None, sync="global", accumulation="exact", accumulation_steps=1):
    """The attributes `unsupported_setup_reason` reads (Accelerate cannot shard with FSDP on CPU); `deepspeed`: the
    DeepSpeed config of Accelerate's plugin (tests/test_deepspeed.py checks DeepSpeed in full)."""
    plugin = None if fsdp_version is None else SimpleNamespace(fsdp_version=fsdp_version)
    ds_plugin = None if deepspeed is None else SimpleNamespace(deepspeed_config=deepspeed)
    return SimpleNamespace(
        is_deepspeed_enabled=deepspeed is not None,
        accelerator=SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin, deepspeed_plugin=ds_plugin)),
        sam_config=SAMConfig(sync=sync, accumulation=accumulation),
        args=SimpleNamespace(gradient_accumulation_steps=accumulation_steps, fp16=False),
    )


@pytest.mark.parametrize(
    "setup, reason",
    [
        (dict(), None),
        (dict(sync="local", accumulation="micro", accumulation_steps=4), None),  # DDP or one device: anything
        (dict(deepspeed={"zero_optimization": {"stage": 2}}), None),  # ZeRO-1/2 are supported
        (dict(deepspeed={"zero_optimization": {"stage": 3}}), DEEPSPEED_STAGE_UNSUPPORTED[3]),
        (dict(fsdp_version=1), FSDP1_UNSUPPORTED),
        (dict(fsdp_version=2), None),
        (dict(fsdp_version=2, accumulation_steps=4), None),
        (dict(fsdp_version=2, accumulation="micro"), None),  # no accumulation: micro is exact
        (dict(fsdp_version=2, sync="local"), FSDP_LOCAL_UNSUPPORTED),
        (dict(fsdp_version=2, accumulation="micro", accumulation_steps=2), None),
    ],
)
def test_unsupported_setup_reason(setup, reason):
    trainer = fake_trainer(**setup)
    assert unsupported_setup_reason(trainer, trainer.sam_config) == reason


def test_refusals_say_what_is_supported():
    assert "Supported: single device, DDP and FSDP2" in FSDP1_UNSUPPORTED
    assert "ZeRO-3" in DEEPSPEED_STAGE_UNSUPPORTED[3] and "Supported with DeepSpeed" in DEEPSPEED_STAGE_UNSUPPORTED[3]
    assert "sam_sync='global'" in FSDP_LOCAL_UNSUPPORTED


@pytest.fixture
def deepspeed_sandbox():
    """Skip without DeepSpeed; afterwards undo what a DeepSpeed setup leaves behind in the process."""
    pytest.importorskip("deepspeed")
    from accelerate.state import AcceleratorState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    environ = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(environ)  # TrainingArguments(deepspeed=...) sets ACCELERATE_USE_DEEPSPEED
    unset_hf_deepspeed_config()
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("stage", [0, 3])  # 1 and 2 are supported (tests/test_deepspeed.py)
def test_deepspeed_is_refused_when_the_trainer_is_built(tmp_path, deepspeed_sandbox, stage):
    # Plain TrainingArguments (no sam_* fields, so no check there): the mixin refuses before any training.
    config = {
        "zero_optimization": {"stage": stage},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
    }
    args = TrainingArguments(**base_args(tmp_path), deepspeed=config)
    with pytest.raises(ValueError, match="does not support DeepSpeed"):
        SAMTrainer(model=tiny_llama(), args=args, train_dataset=lm_dataset(), sam_config=SAMConfig())


@pytest.mark.parametrize("stage", ["3"])
def test_deepspeed_from_an_accelerate_config_is_refused(tmp_path, monkeypatch, deepspeed_sandbox, stage):
    # `accelerate launch` with a DeepSpeed config sets these variables; `SAMTrainingArguments` sees no `deepspeed`.
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", stage)
    args = SAMTrainingArguments(**base_args(tmp_path))
    with pytest.raises(ValueError, match="does not support DeepSpeed"):
        SAMTrainer(model=tiny_llama(), args=args, train_dataset=lm_dataset())


# ---------------------------------------------------------------------------------------------------------------
# Model-parallel placements: parameters spread over devices and dtypes.


def placements() -> list[list[str]]:
    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return [devices[:n] for n in range(2, len(devices) + 1)]


def check_norm_and_perturbation(devices: list[str]) -> None:
    """Parameters of three dtypes spread round-robin over `devices`: norm, w + e and restore against float64."""
    g = torch.Generator().manual_seed(0)
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    w, grads, params = [], [], []
    for i, shape in enumerate([(4, 3), (5,), (2, 3, 2), (7,), (3, 3), (6,)]):
        dtype, device = dtypes[i % len(dtypes)], devices[i % len(devices)]
        w.append(torch.randn(shape, generator=g).to(dtype))
        grads.append(torch.randn(shape, generator=g).to(dtype))
        p = torch.nn.Parameter(w[-1].clone().to(device))
        p.grad = grads[-1].clone().to(device)
        params.append(p)
    want = torch.sqrt(sum((gr.double() ** 2).sum() for gr in grads))

    norm = global_norm([p.grad for p in params])
    assert norm.device == params[0].device and norm.dtype == torch.float32
    assert float(norm) == pytest.approx(float(want), rel=1e-5)

    backups = [torch.empty_like(p) for p in params]
    perturb_(params, backups, rho=0.1)
    for p, w0, gr in zip(params, w, grads):
        expected = w0.double() + 0.1 * gr.double() / want
        tol = 1e-6 if p.dtype == torch.float32 else 1e-2
        torch.testing.assert_close(p.detach().cpu().double(), expected, rtol=tol, atol=tol)
    restore_(params, backups)
    for p, w0 in zip(params, w):
        assert torch.equal(p.detach().cpu(), w0)


def test_norm_and_perturbation_group_mixed_dtypes():
    # Runs everywhere: one device, three dtypes in one list (the grouping that model-parallel placements rely on).
    check_norm_and_perturbation(["cpu"])


@pytest.mark.parametrize("devices", placements() or [pytest.param([], marks=pytest.mark.skip("one device only"))])
def test_norm_and_perturbation_across_devices(devices):
    # `device_map="auto"`-style placement; needs a second device (a GPU), so it skips on a CPU-only machine.
    check_norm_and_perturbation(devices)


# ---------------------------------------------------------------------------------------------------------------
# The ready-made Accelerate configs parse with Accelerate's own loader and describe supported setups.


ACCELERATE_CONFIGS = REPO / "examples" / "accelerate"


@pytest.mark.parametrize(
    "name, distributed_type, machines",
    [("ddp_multi_gpu", "MULTI_GPU", 1), ("fsdp2", "FSDP", 1), ("multi_node", "MULTI_GPU", 2)],
)
def test_accelerate_configs_describe_supported_setups(name, distributed_type, machines):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ACCELERATE_CONFIGS / f"{name}.yaml"))
    assert config.distributed_type.value == distributed_type
    assert config.num_machines == machines and config.num_processes % machines == 0
    assert not config.deepspeed_config and not config.use_cpu
    if distributed_type == "FSDP":
        assert config.fsdp_config["fsdp_version"] == 2  # FSDP1 is refused
