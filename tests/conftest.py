"""Shared test configuration: subprocess runs (examples, benchmarks, README commands) are marked
``slow``, so a quick loop can run ``pytest -m "not slow"`` while CI runs everything."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers share the machine's cores: one thread each,
    torch.set_num_threads(1)  # and one for the subprocesses they start (oversubscribed, OpenMP's
    os.environ["OMP_NUM_THREADS"] = "1"  # waits made the demo's run 3.5x slower)

SLOW_FILES = {"test_examples.py", "test_readme.py", "test_bdia_inspect.py"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        path = Path(str(item.fspath))
        if path.name in SLOW_FILES or path.parent.name == "benchmarks":
            item.add_marker(pytest.mark.slow)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="no CUDA device"))]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    """Run a test on the CPU and, where a CUDA device exists, on it too (the same test)."""
    return torch.device(request.param)
