"""Launching the multi-process scripts of `tests/dist_scripts/` for `test_distributed.py` and `test_deepspeed.py`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


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
    """Run `command` in the repository, one thread per process, offline, with `env` added to the environment; fail
    the test with the end of its output when it exits non-zero or runs past `timeout_s`."""
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


def update_error(got: dict, want: dict, start: dict) -> float:
    """||got - want|| / ||want - start|| over all tensors: the error relative to the size of the update."""
    num = sum((got[k].double() - want[k].double()).square().sum() for k in want)
    den = sum((want[k].double() - start[k].double()).square().sum() for k in want)
    return float((num / den).sqrt())
