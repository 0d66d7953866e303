"""benchmarks/gpu.py: refuses clearly without CUDA; on a CUDA device a tiny configuration runs end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_without_cuda_it_says_what_to_run_instead():
    done = subprocess.run([sys.executable, str(SCRIPT), "--layers", "2"], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "needs a CUDA device" in done.stderr and "benchmarks/memory.py" in done.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_a_tiny_configuration_runs_on_cuda(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--layers", "2", "--width", "128", "--seq", "64",
                           "--batch", "2", "--budget-gib", "0.5", "--steps", "2", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert {row["method"] for row in rows} == {"plain", "checkpoint", "bdia"}
    assert all(row["peak_bytes"] > 0 and row["step_s"] > 0 and row["max_batch"] >= 1 for row in rows)
