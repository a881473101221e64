"""`benchmarks/gpu_check.py` without a GPU: its exit path, and its table built from made-up timings."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from testing_utils import load_benchmark_script
from torch.autograd import DeviceType

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu_check.py"


def test_without_a_cuda_gpu_it_exits_non_zero_with_a_clear_message(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # no GPU visible even where there is one
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--output_dir", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode != 0
    assert "needs one CUDA GPU" in proc.stderr, proc.stderr
    assert proc.stdout == ""  # nothing measured, no table
    assert not out.exists()


def _rows(gc):
    rows = [
        gc.row_summary("plain", "bf16", [10.0, 11.0, 9.0, 10.0, 10.0], 2**30),
        gc.row_summary("floor", "bf16", [20.0, 19.0, 21.0, 20.0, 20.0], 2**30),
        gc.row_summary("sam", "bf16", [21.0, 22.0, 20.0, 21.0, 21.0], 2**30 + 2**20),
        gc.row_summary("plain", "fp16", [8.0, 8.0, 8.0]),
        gc.row_summary("floor", "fp16", [16.0, 16.0, 16.0]),
        gc.row_summary("sam", "fp16", [18.0, 18.0, 18.0]),
        gc.row_summary("floor, torch_compile", "bf16", [12.0, 12.0], compiled=True),
        gc.row_summary("sam, torch_compile", "bf16", [13.0, 13.0], compiled=True),
        gc.skipped_row("sam, QLoRA via examples/sft_lora.py", "4bit", "skipped: no bitsandbytes"),
    ]
    gc.add_ratios(rows)
    return rows


def test_ratios_compare_rows_of_the_same_precision_and_compile_setting():
    gc = load_benchmark_script("gpu_check")
    rows = {(r["row"], r["precision"]): r for r in _rows(gc)}
    assert rows["sam", "bf16"]["x_floor"] == pytest.approx(21 / 20)
    assert rows["sam", "bf16"]["x_plain"] == pytest.approx(21 / 10)
    assert rows["sam", "fp16"]["x_floor"] == pytest.approx(18 / 16)
    assert rows["floor", "fp16"]["x_plain"] == pytest.approx(2.0)
    assert rows["sam, torch_compile", "bf16"]["x_floor"] == pytest.approx(13 / 12)  # the compiled floor
    assert math.isnan(rows["sam, torch_compile", "bf16"]["x_plain"])  # no compiled plain row
    qlora = rows["sam, QLoRA via examples/sft_lora.py", "4bit"]
    assert math.isnan(qlora["x_floor"]) and qlora["steps"] == 0
    lo, hi = rows["sam", "bf16"]["ci_ms"]
    assert lo <= rows["sam", "bf16"]["median_ms"] <= hi
    assert rows["sam", "bf16"]["peak_mib"] == pytest.approx(1025.0)


def test_table_has_one_line_per_row_and_the_json_round_trips(tmp_path):
    gc = load_benchmark_script("gpu_check")
    rows = _rows(gc)
    rows.append(gc.kernel_row({"plain": 300, "floor": 600, "sam": 642}))
    table = gc.format_table(rows)
    body = [line for line in table.splitlines()[2:] if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in body] == [r["row"] for r in rows]
    assert "| sam | bf16 | 5 | 21.00 (" in table
    assert "fp16 + GradScaler" in table
    assert "skipped: no bitsandbytes" in table
    assert "| 42 |" in table and "plain 300, floor 600, sam 642" in table
    path = tmp_path / "gpu_check.json"
    gc.write_json(path, rows, {"gpu": "none (test)"})
    loaded = json.loads(path.read_text())
    assert loaded["environment"] == {"gpu": "none (test)"}
    assert [r["row"] for r in loaded["rows"]] == [r["row"] for r in rows]
    assert loaded["rows"][2]["step_times_ms"] == [21.0, 22.0, 20.0, 21.0, 21.0]


class _Event:
    def __init__(self, name: str, device: DeviceType) -> None:
        self._name, self._device = name, device

    def name(self) -> str:
        return self._name

    def device_type(self) -> DeviceType:
        return self._device


def test_kernel_count_takes_device_kernels_only():
    gc = load_benchmark_script("gpu_check")
    events = [
        _Event("void at::native::vectorized_elementwise_kernel<4, ...>", DeviceType.CUDA),
        _Event("multi_tensor_apply_kernel<...>", DeviceType.CUDA),
        _Event("Memcpy HtoD (Pageable -> Device)", DeviceType.CUDA),
        _Event("Memset (Device)", DeviceType.CUDA),
        _Event("cudaLaunchKernel", DeviceType.CPU),
        _Event("aten::_foreach_add_", DeviceType.CPU),
    ]
    assert gc.count_kernels(events) == 2
    assert gc.kernel_row({"plain": 10, "floor": 20, "sam": 35})["kernels"] == 15
    assert "no count" in gc.kernel_row({"plain": 10, "floor": None, "sam": 35})["notes"]


def test_qlora_row_says_why_it_was_skipped(tmp_path, monkeypatch):
    gc = load_benchmark_script("gpu_check")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name))
    args = gc.argparse.Namespace(output_dir=str(tmp_path), qlora_steps=3)
    row = gc.qlora_row(args)
    assert row["steps"] == 0 and "bitsandbytes is not installed" in row["notes"]
    assert not (tmp_path / "qlora").exists()


def test_qlora_row_reads_the_metrics_that_sft_lora_writes(tmp_path, monkeypatch):
    gc = load_benchmark_script("gpu_check")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "bitsandbytes" else real(name)
    )
    calls = []

    def fake_run(cmd, **kwargs):  # what examples/sft_lora.py leaves behind (keys as in its metrics.json)
        calls.append(cmd)
        out = Path(cmd[cmd.index("--output_dir") + 1])
        out.mkdir(parents=True)
        metrics = {"train_runtime_s": 2.5, "final_loss": 3.64, "final_sam_sharpness": 0.222, "final_sam_skipped": 0.0}
        (out / "metrics.json").write_text(json.dumps(metrics))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(gc.subprocess, "run", fake_run)
    row = gc.qlora_row(gc.argparse.Namespace(output_dir=str(tmp_path), qlora_steps=5))
    (cmd,) = calls
    assert cmd[cmd.index("--load_in_4bit") + 1] == "true" and cmd[cmd.index("--max_steps") + 1] == "5"
    assert row["median_ms"] == pytest.approx(500.0) and row["steps"] == 5
    assert "loss 3.64" in row["notes"] and "sam_sharpness 0.222" in row["notes"]

    def failing_run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "Traceback ...\nRuntimeError: CUDA out of memory")

    monkeypatch.setattr(gc.subprocess, "run", failing_run)
    row = gc.qlora_row(gc.argparse.Namespace(output_dir=str(tmp_path / "second"), qlora_steps=5))
    assert "failed (exit 1" in row["notes"] and "CUDA out of memory" in row["notes"]
    assert "CUDA out of memory" in (tmp_path / "second" / "qlora.log").read_text()


def test_kernel_row_flags_a_profiler_that_saw_no_kernel():
    gc = load_benchmark_script("gpu_check")
    row = gc.kernel_row({"plain": 0, "floor": 0, "sam": 0})
    assert row["kernels"] is None and "no CUDA kernel" in row["notes"]
