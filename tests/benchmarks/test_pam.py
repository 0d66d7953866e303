"""benchmarks/pam.py end to end on a tiny configuration: the table, the JSON rows and the plot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "pam.py"


@pytest.mark.slow
def test_a_tiny_paired_run_writes_rows_for_every_model_and_variant(tmp_path):
    out, png = tmp_path / "pam.json", tmp_path / "pam.png"
    done = subprocess.run([sys.executable, str(SCRIPT), "--seeds", "2", "--vit-epochs", "1", "--vit-layers", "2",
                           "--vit-width", "16", "--vit-batch", "256", "--lm-steps", "4", "--lm-eval-every", "2",
                           "--lm-width", "16", "--json", str(out), "--plot", str(png)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"].split()[0], r["variant"]) for r in rows] == [
        (model, variant) for model in ("digits", "char") for variant in ("float", "pam-matmuls", "pam-all",
                                                                          "pam-nonlinear")]
    for model in (rows[:4], rows[4:]):
        assert model[0]["pam_products_per_step"] == 0 and model[0]["time_vs_float"] == 1.0
        products = [r["pam_products_per_step"] for r in model[1:]]
        assert 0 < products[0] <= products[1] < products[2]  # more replaced as more ops are selected
        assert all(len(r["values"]) == 2 and len(r["ci95"]) == 2 for r in model)
    assert "| char GPT (2×16) | pam-nonlinear |" in done.stdout and png.read_bytes()[:4] == b"\x89PNG"
