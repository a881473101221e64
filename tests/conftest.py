"""pytest's part: the environment every test runs in (offline, one thread) and the fixtures several files use.

The helpers themselves are in `testing_utils.py` and the float64 references in `references.py`; tests import those,
never this file or another test module (`test_layout.py` checks it).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TESTS = str(Path(__file__).resolve().parent)
if TESTS not in sys.path:  # pytest's default import mode puts it there; --import-mode=importlib does not
    sys.path.insert(0, TESTS)

import pytest  # noqa: E402
import torch  # noqa: E402
from testing_utils import record_host_reads  # noqa: E402


@pytest.fixture(autouse=True)
def _few_threads():
    # Two cores, shared: keep each test on one thread so timings and reductions are steady.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def host_reads(monkeypatch):
    """The host reads hf_sam's code makes while the test runs (`testing_utils.record_host_reads`): on a GPU each would
    be a synchronisation."""
    return record_host_reads(monkeypatch)
