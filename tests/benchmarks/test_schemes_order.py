"""benchmarks/schemes_order.py: the order table it prints is the measured one, and its JSON holds it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "schemes_order.py"


def test_the_fitted_orders_match_the_claimed_ones(tmp_path):
    out = tmp_path / "order.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--json", str(out)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {r["scheme"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"alf", "alf4", "reversible_bosh3", "reversible_dopri5"}
    for row in rows.values():
        assert abs(row["local_orders"][-1] - row["claimed_order"]) < 0.2, row  # the finest pair of step counts
        assert row["scheme"] in done.stdout
