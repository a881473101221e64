"""SAM under DeepSpeed ZeRO-1/2: the DDP bar (2 processes equal 1), resume, collectives, and every refusal.

The fast tests run in the main venv, without DeepSpeed: the config and engine checks, the refusal at argument time,
and the Accelerate example config. The slow ones launch `tests/dist_scripts/deepspeed_trainer.py` on two CPU processes
(gloo) with the python of a venv that has DeepSpeed (`scripts/deepspeed_venv.sh`): `HF_SAM_DEEPSPEED_PYTHON`, else
`$HF_SAM_DEEPSPEED_VENV/bin/python`, else the `deepspeed` venv beside the framework venvs; they skip without one.
Four launches
(`torchrun` with `TrainingArguments(deepspeed=...)` for ZeRO 1, 2 and 2 with overlapped bucketed reductions, and
the refusals; `torchrun` with DDP for `sam_sync="local"`; `accelerate launch` with
`examples/accelerate/deepspeed_zero2.yaml`; the one-process reference without DeepSpeed).
"""

from __future__ import annotations

import base64
import importlib
import json
import os
import sys
from types import SimpleNamespace

import pytest
import torch
from testing_utils import REPO, base_args, free_port, run_launch, torchrun_arguments, update_error

from hf_sam import SAMConfig, SAMTrainingArguments
from hf_sam.deepspeed_support import (
    DEEPSPEED_ENGINE_UNSUPPORTED,
    DEEPSPEED_FP16_UNSUPPORTED,
    DEEPSPEED_OFFLOAD_UNSUPPORTED,
    DEEPSPEED_PRECONDITIONER_UNSUPPORTED,
    DEEPSPEED_STAGE_UNSUPPORTED,
    DEEPSPEED_VARIANT_UNSUPPORTED,
    deepspeed_config_reason,
    deepspeed_engine_reason,
)
from hf_sam.distributed import unsupported_setup_reason

SCRIPT = REPO / "tests" / "dist_scripts" / "deepspeed_trainer.py"
ACCELERATE_CONFIG = REPO / "examples" / "accelerate" / "deepspeed_zero2.yaml"
LAUNCH_TIMEOUT_S = 400
STAGES = ("1", "2", "2-overlap")


# ---------------------------------------------------------------------------------------------------------------
# Fast: the checks, without DeepSpeed.


def zero(stage, **extra) -> dict:
    return {"zero_optimization": {"stage": stage}, **extra}


@pytest.mark.parametrize(
    "config, sam, fp16, reason",
    [
        (zero(1), {}, False, None),
        (zero(2), {}, False, None),
        (zero("2"), {}, False, None),  # a string, as some launchers write it
        (zero(2), dict(sync="local", accumulation="micro", adaptive=True), False, None),
        (zero(2, bf16={"enabled": True}), {}, False, None),
        (zero(2, fp16={"enabled": "auto"}), {}, False, None),  # "auto" with fp16=False
        ({}, {}, False, DEEPSPEED_STAGE_UNSUPPORTED[0]),  # no zero_optimization: stage 0
        (zero(0), {}, False, DEEPSPEED_STAGE_UNSUPPORTED[0]),
        (zero(3), {}, False, DEEPSPEED_STAGE_UNSUPPORTED[3]),
        (
            {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
            {},
            False,
            DEEPSPEED_OFFLOAD_UNSUPPORTED.format(key="offload_optimizer", device="cpu"),
        ),
        (
            {"zero_optimization": {"stage": 1, "offload_param": {"device": "nvme"}}},
            {},
            False,
            DEEPSPEED_OFFLOAD_UNSUPPORTED.format(key="offload_param", device="nvme"),
        ),
        ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "none"}}}, {}, False, None),
        (zero(2, fp16={"enabled": True}), {}, False, DEEPSPEED_FP16_UNSUPPORTED),
        (zero(2, fp16={"enabled": "auto"}), {}, True, DEEPSPEED_FP16_UNSUPPORTED),
        (zero(2, amp={"enabled": True}), {}, False, DEEPSPEED_FP16_UNSUPPORTED),
        (
            zero(2, compile={"deepcompile": True}),
            {},
            False,
            DEEPSPEED_ENGINE_UNSUPPORTED.format(what="DeepCompile (`compile.deepcompile`)"),
        ),
        (
            zero(2, tensor_parallel={"autotp_size": 2}),
            {},
            False,
            DEEPSPEED_ENGINE_UNSUPPORTED.format(what="tensor parallelism (`tensor_parallel.autotp_size` > 1)"),
        ),
        (zero(2), dict(method="looksam"), False, DEEPSPEED_VARIANT_UNSUPPORTED.format(method="looksam")),
        (zero(2), dict(preconditioner="adam"), False, DEEPSPEED_PRECONDITIONER_UNSUPPORTED),
    ],
)
def test_deepspeed_config_reason(config, sam, fp16, reason):
    assert deepspeed_config_reason(config, SAMConfig(**sam), fp16=fp16) == reason


def test_deepspeed_refusals_say_what_is_supported():
    messages = [*DEEPSPEED_STAGE_UNSUPPORTED.values(), DEEPSPEED_OFFLOAD_UNSUPPORTED, DEEPSPEED_FP16_UNSUPPORTED]
    for message in [*messages, DEEPSPEED_ENGINE_UNSUPPORTED]:
        assert "Supported with DeepSpeed: ZeRO stage 1 or 2, fp32 or bf16, no offload" in message
    assert "ZeRO-3" in DEEPSPEED_STAGE_UNSUPPORTED[3] and "FSDP2" in DEEPSPEED_STAGE_UNSUPPORTED[3]


def fake_engine(**overrides):
    """The engine methods and attributes `deepspeed_engine_reason` reads, as a ZeRO-2 fp32 engine has them."""
    values = dict(
        stage=2, offload_optimizer=None, offload_param=None, fp16=False, pipeline=False, moe=False, dp_world_size=1
    )
    values.update(overrides)
    optimizer = type(values.pop("optimizer", "DeepSpeedZeroOptimizer"), (), {})()
    return SimpleNamespace(
        zero_optimization_stage=lambda: values["stage"],
        zero_offload_optimizer=lambda: values["offload_optimizer"],
        zero_offload_param=lambda: values["offload_param"],
        fp16_enabled=lambda: values["fp16"],
        pipeline_parallelism=values["pipeline"],
        has_moe_layers=values["moe"],
        dp_world_size=values["dp_world_size"],
        is_deepcompile_enabled=lambda: False,
        zenflow=False,
        optimizer=optimizer,
    )


@pytest.mark.parametrize(
    "overrides, reason",
    [
        ({}, None),
        (dict(stage=1), None),
        (dict(offload_optimizer=SimpleNamespace(device="none")), None),
        (dict(stage=3), DEEPSPEED_STAGE_UNSUPPORTED[3]),
        (dict(stage=0), DEEPSPEED_STAGE_UNSUPPORTED[0]),
        (
            dict(offload_optimizer=SimpleNamespace(device="cpu")),
            DEEPSPEED_OFFLOAD_UNSUPPORTED.format(key="offload_optimizer", device="cpu"),
        ),
        (dict(fp16=True), DEEPSPEED_FP16_UNSUPPORTED),
        (dict(pipeline=True), DEEPSPEED_ENGINE_UNSUPPORTED.format(what="pipeline parallelism (a `PipelineModule`)")),
        (dict(moe=True), DEEPSPEED_ENGINE_UNSUPPORTED.format(what="MoE layers")),
        (
            dict(optimizer="BF16_Optimizer"),
            DEEPSPEED_ENGINE_UNSUPPORTED.format(what="the optimizer wrapper `BF16_Optimizer`"),
        ),
    ],
)
def test_deepspeed_engine_reason(overrides, reason):
    assert deepspeed_engine_reason(fake_engine(**overrides)) == reason


def test_the_trainer_reads_the_config_of_accelerates_plugin():
    # `accelerate launch --use_deepspeed` and `deepspeed=` both end in the plugin's `deepspeed_config`.
    def setup(config, fp16=False):
        plugin = SimpleNamespace(deepspeed_config=config)
        trainer = SimpleNamespace(
            is_deepspeed_enabled=True,
            accelerator=SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin, fsdp_plugin=None)),
            args=SimpleNamespace(fp16=fp16, gradient_accumulation_steps=1),
        )
        return trainer, SAMConfig()

    assert unsupported_setup_reason(*setup(zero(2))) is None
    assert unsupported_setup_reason(*setup(zero(3))) == DEEPSPEED_STAGE_UNSUPPORTED[3]
    assert unsupported_setup_reason(*setup(zero(2, fp16={"enabled": "auto"}), fp16=True)) == DEEPSPEED_FP16_UNSUPPORTED


@pytest.mark.parametrize("form", ["dict", "file", "base64"])
def test_sam_arguments_refuse_zero3_without_importing_deepspeed(tmp_path, form):
    config = zero(3)
    value = {
        "dict": config,
        "file": str(tmp_path / "ds.json"),
        "base64": base64.urlsafe_b64encode(json.dumps(config).encode()).decode(),
    }[form]
    (tmp_path / "ds.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as info:
        SAMTrainingArguments(**base_args(tmp_path), deepspeed=value)
    assert str(info.value) == DEEPSPEED_STAGE_UNSUPPORTED[3]


def test_hf_sam_imports_without_deepspeed(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # `import deepspeed` now raises ImportError
    monkeypatch.delitem(sys.modules, "hf_sam.deepspeed_support")
    module = importlib.import_module("hf_sam.deepspeed_support")
    assert module.DeepSpeedSync is not None


def test_accelerate_deepspeed_config_describes_a_supported_setup():
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ACCELERATE_CONFIG))
    assert config.distributed_type.value == "DEEPSPEED"
    ds = config.deepspeed_config
    assert ds["zero_stage"] in (1, 2)
    assert ds["offload_optimizer_device"] == ds["offload_param_device"] == "none"
    assert config.mixed_precision in ("no", "bf16")  # fp16 is refused


# ---------------------------------------------------------------------------------------------------------------
# Slow: the launches.


def deepspeed_python() -> str | None:
    """The python of a venv with DeepSpeed, or None."""
    candidates = [os.environ.get("HF_SAM_DEEPSPEED_PYTHON")]
    if os.environ.get("HF_SAM_DEEPSPEED_VENV"):
        candidates.append(os.path.join(os.environ["HF_SAM_DEEPSPEED_VENV"], "bin", "python"))
    # Where scripts/deepspeed_venv.sh puts it by default: beside the framework venvs (scripts/framework_venvs.sh).
    venvs = os.environ.get("HF_SAM_VENVS") or os.path.join(
        os.environ.get("HF_SAM_CACHE")
        or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "hf_sam"),
        "venvs",
    )
    candidates.append(os.path.join(venvs, "deepspeed", "bin", "python"))
    for python in filter(None, candidates):
        if os.access(python, os.X_OK):
            return python
    return None


def launch(python: str, launcher: list[str], args: list[str]) -> None:
    run_launch([python, *launcher, str(SCRIPT), *args], LAUNCH_TIMEOUT_S, DS_ACCELERATOR="cpu")


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    python = deepspeed_python()
    if python is None:
        pytest.skip(
            "no venv with DeepSpeed: create one with scripts/deepspeed_venv.sh and point HF_SAM_DEEPSPEED_PYTHON at "
            "its python (default: ~/.cache/hf_sam/venvs/deepspeed/bin/python)"
        )
    out = tmp_path_factory.mktemp("deepspeed")
    ddp_runs = ["plain", "local-exact", "local-micro", "ascent-fraction"]
    launch(python, torchrun_arguments(2), [str(out), "--stages", *STAGES, "--refusals"])
    launch(python, torchrun_arguments(2), [str(out), "--stages", "--ddp-runs", *ddp_runs])
    accelerate = ["-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIG)]
    accelerate += ["--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(free_port())]
    launch(python, accelerate, [str(out), "--accelerate", "--runs", "global-exact"])
    launch(python, [], [str(out), "--reference"])

    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import deepspeed_trainer as script  # the run names and the tiny model, without importing DeepSpeed
    finally:
        sys.path.remove(str(SCRIPT.parent))
    load = lambda p: torch.load(p, weights_only=False)  # noqa: E731
    runs = {
        stage: {name: [load(out / f"{stage}-{name}.rank{r}.pt") for r in (0, 1)] for name in script.RUNS}
        for stage in STAGES
    }
    runs["ddp"] = {name: [load(out / f"ddp-{name}.rank{r}.pt") for r in (0, 1)] for name in ddp_runs}
    runs["accelerate"] = {"global-exact": [load(out / f"accelerate-global-exact.rank{r}.pt") for r in (0, 1)]}
    return SimpleNamespace(
        runs=runs,
        reference={name: load(out / f"ref-{name}.rank0.pt") for name in script.REFERENCE_RUNS},
        start={k: v.detach().float().clone() for k, v in script.tiny_llama().named_parameters()},
        refusals=json.loads((out / "refusals.json").read_text()),
    )


SAM_RUNS = ["global-exact", "global-micro", "local-exact", "local-micro", "asam-global-exact"]


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_runs_are_zero_on_two_processes(ds, stage):
    for name, ranks in ds.runs[stage].items():
        for r in ranks:
            assert r["world_size"] == 2 and r["engine"] == "DeepSpeedEngine", name
            assert r["zero_stage"] == int(stage[0]) and r["zero_optimizer"] == "DeepSpeedZeroOptimizer", name
            assert r["dtype"] == ("torch.bfloat16" if name.endswith("-bf16") else "torch.float32"), name
    assert ds.runs["accelerate"]["global-exact"][0]["zero_stage"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize(
    "name", ["plain", "global-exact", "global-micro", "asam-global-exact", "interval", "global-exact-clip"]
)
def test_two_processes_equal_the_single_process_run(ds, stage, name):
    got = ds.runs[stage][name][0]["state"]
    assert update_error(got, ds.reference[name]["state"], ds.start) < 1e-5
    for log, want in zip(ds.runs[stage][name][0]["logs"], ds.reference[name]["logs"], strict=True):
        for key in ("loss", "sam_grad_norm", "sam_perturbed_loss"):  # SAM's logged metrics too
            if key in want:
                assert log[key] == pytest.approx(want[key], rel=1e-4, nan_ok=True), key
    if name != "plain":  # and SAM did something: the update is not the plain one
        assert update_error(got, ds.reference["plain"]["state"], ds.start) > 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("accumulation", ["exact", "micro"])
def test_local_sync_perturbs_per_device_as_ddp_does(ds, stage, accumulation):
    assert ds.runs["ddp"][f"local-{accumulation}"][0]["engine"] == "DistributedDataParallel"
    got = ds.runs[stage][f"local-{accumulation}"][0]["state"]
    assert update_error(got, ds.runs["ddp"][f"local-{accumulation}"][0]["state"], ds.start) < 1e-5
    assert update_error(got, ds.reference[f"global-{accumulation}"]["state"], ds.start) > 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_ascent_fraction_takes_each_devices_leading_fraction_as_ddp_does(ds, stage):
    # `sam_ascent_fraction` cuts each process's micro-batch: the same examples as under DDP, not as on one process.
    assert ds.runs["ddp"]["ascent-fraction"][0]["engine"] == "DistributedDataParallel"
    got = ds.runs[stage]["ascent-fraction"][0]["state"]
    assert update_error(got, ds.runs["ddp"]["ascent-fraction"][0]["state"], ds.start) < 1e-5
    assert update_error(got, ds.reference["global-exact"]["state"], ds.start) > 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_ranks_end_with_identical_weights(ds, stage):
    for name, (rank0, rank1) in ds.runs[stage].items():
        assert all(torch.equal(rank0["state"][k], rank1["state"][k]) for k in rank0["state"]), name


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("accumulation", ["exact", "micro"])
def test_resume_is_bit_identical(ds, stage, accumulation):
    resumed = ds.runs[stage][f"global-{accumulation}-resume"]
    uninterrupted = ds.runs[stage][f"global-{accumulation}"]
    for a, b in zip(resumed, uninterrupted):
        assert all(torch.equal(a["state"][k], b["state"][k]) for k in b["state"])
    assert len(resumed[0]["checks"]["restored_bit_exact"]) == 1  # only step 2 ran after the resume


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("name", SAM_RUNS + ["global-exact-bf16"])
def test_first_pass_is_invisible_to_zero_and_the_restore_is_exact(ds, stage, name):
    for rank in ds.runs[stage][name]:
        checks = rank["checks"]
        perturbations = 2 if name.endswith("-exact") or name.endswith("-bf16") else 4  # per step / micro-batch
        assert checks["zero_untouched"] == [True] * perturbations
        assert checks["restored_bit_exact"] == [True, True]  # before each engine step
        for log in rank["logs"]:
            assert log["sam_skipped"] == 0 and log["sam_grad_norm"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_bf16_adds_no_error_beyond_bf16_rounding(ds, stage):
    # bf16 weights (fp32 master in ZeRO's partitions) against the fp32 single-process runs.
    plain = update_error(ds.runs[stage]["plain-bf16"][0]["state"], ds.reference["plain"]["state"], ds.start)
    sam = ds.runs[stage]["global-exact-bf16"][0]["state"]
    assert update_error(sam, ds.reference["global-exact"]["state"], ds.start) < 2 * plain
    assert update_error(sam, ds.reference["global-exact"]["state"], ds.start) < update_error(
        sam, ds.reference["plain"]["state"], ds.start
    )


@pytest.mark.slow
def test_accelerate_launch_equals_torchrun(ds):
    # `accelerate launch` with examples/accelerate/deepspeed_zero2.yaml: no `deepspeed=` in the arguments.
    got = ds.runs["accelerate"]["global-exact"][0]
    want = ds.runs["2"]["global-exact"][0]
    assert all(torch.equal(got["state"][k], want["state"][k]) for k in want["state"])
    assert got["collectives"] == want["collectives"]


# Collectives per optimizer step (accumulation 2), by phase: "plain"/"perturbed" are the engine's backward passes,
# "step" the engine's step, "sam" SAM's own work between the passes, "clean" SAM's first pass.
BACKWARD_ALL_REDUCES = {"1": 1, "2": 2, "2-overlap": 26}  # ZeRO-1 at the boundary; ZeRO-2 every micro-batch, bucketed
SAM_ALL_REDUCES = {"global-exact": 1, "global-micro": 2, "local-exact": 0, "local-micro": 0, "asam-global-exact": 1}


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("name", SAM_RUNS)
def test_collectives_per_step(ds, stage, name):
    plain = ds.runs[stage]["plain"][0]["collectives"]
    assert [s["plain"] for s in plain] == [{"all_reduce": BACKWARD_ALL_REDUCES[stage]}] * 2
    assert [s["step"] for s in plain] == [{"all_reduce": 2, "all_gather_into_tensor": 2}] * 2
    for rank in ds.runs[stage][name]:
        for step, plain_step in zip(rank["collectives"], plain):
            assert "clean" not in step  # the first pass runs no collective
            assert step["perturbed"] == plain_step["plain"] and step["step"] == plain_step["step"]
            sam = SAM_ALL_REDUCES[name]
            assert step.get("sam", {}) == ({"all_reduce": sam} if sam else {})


@pytest.mark.slow
def test_refusals_through_the_trainer(ds):
    stage3 = DEEPSPEED_STAGE_UNSUPPORTED[3]
    assert ds.refusals == {
        "zero1": None,
        "zero2": None,
        "zero2-local-micro": None,
        "zero0": DEEPSPEED_STAGE_UNSUPPORTED[0],
        "zero3": stage3,
        "zero3-accelerate": stage3,  # `accelerate launch --zero_stage 3`: plain arguments, no `deepspeed=`
        "offload": DEEPSPEED_OFFLOAD_UNSUPPORTED.format(key="offload_optimizer", device="cpu"),
        "fp16": DEEPSPEED_FP16_UNSUPPORTED,
        "looksam": DEEPSPEED_VARIANT_UNSUPPORTED.format(method="looksam"),
        "zero3-sam-arguments": stage3,
    }
