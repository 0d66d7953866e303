"""benchmarks/post_ln.py --quick: both tasks train plain and BDIA (residual_only=False) and report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "post_ln.py"


def test_quick_run_reports_both_tasks(tmp_path):
    out = tmp_path / "post_ln.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path), "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "encoder-digits" in done.stdout and "bert-counting" in done.stdout
    results = json.loads(out.read_text())
    for task in ("encoder-digits", "bert-counting"):
        final = results[task]["final"]
        assert len(final["plain"]) == len(final["bdia"]) == 2
        assert all(0 <= a <= 1 for a in final["plain"] + final["bdia"])
        assert (tmp_path / f"{task}.png").is_file()
