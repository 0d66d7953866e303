"""The benchmark scripts and examples the README and docs show, each run end to end in a tiny
configuration (the timing and the table are the scripts' job; here: they run, and what they
print and write holds together). The last test checks that every such command has a run here
or in another test file, so a new README command cannot go untested."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(script: str, *arguments: str, cwd: Path = ROOT) -> str:
    done = subprocess.run([sys.executable, str(ROOT / script), *arguments], capture_output=True, text=True,
                          timeout=600, cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_memory_table_orders_the_methods_as_measured(tmp_path):
    out = tmp_path / "memory.json"
    _run("benchmarks/memory.py", "--layers", "2", "--width", "128", "--steps", "1", "--methods", "bdia",
         "--json", str(out))
    rows = {row["method"]: row for row in json.loads(out.read_text())}
    assert set(rows) == {"plain", "checkpoint", "checkpoint-full", "bdia"} and {r["d"] for r in rows.values()} == {128}
    assert rows["bdia"]["saved_bytes"] < rows["checkpoint"]["saved_bytes"] * 1.1 < rows["plain"]["saved_bytes"]
    for row in rows.values():  # each ratio is the median of its paired per-round ratios, inside their quartiles
        for name in ("plain", "checkpoint", "checkpoint_full"):
            q1, q3 = row[f"time_vs_{name}_iqr"]
            assert 0 < q1 <= row[f"time_vs_{name}"] <= q3


def test_paired_ratios_are_medians_and_quartiles_of_per_round_ratios(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import memory

    # per-round ratios 2, 2, 3, 5: median 2.5, inclusive quartiles 2 and 3.5 (hand-computed)
    assert memory.paired_ratio([2.0, 4.0, 6.0, 5.0], [1.0, 2.0, 2.0, 1.0]) == (2.5, 2.0, 3.5)
    assert memory.paired_ratio([3.0], [2.0]) == (1.5, 1.5, 1.5)
    assert memory.heads_of(16) == 1 and memory.heads_of(1024) == 16
    with pytest.raises(ValueError, match="multiple of 64"):
        memory.heads_of(200)


@pytest.mark.parametrize("options", [(), ("--method", "bdia-stored", "--against", "plain", "--width", "64")])
def test_profile_step_groups_operators_by_kind(tmp_path, options):
    out = tmp_path / "profile.json"
    stdout = _run("benchmarks/profile_step.py", "--layers", "2", "--steps", "1", *options, "--json", str(out))
    result = json.loads(out.read_text())
    fixed = sum(r["bdia"] for r in result["rows"] if r["kind"] == "fixed point")
    (line,) = [line for line in stdout.splitlines() if line.startswith("fixed point")]
    assert float(line.split()[3]) == pytest.approx(fixed, abs=0.051)  # the printed total is the rows' sum
    assert result["method"] == (options[1] if options else "bdia") and result["width"] == (64 if options else 256)
    assert any(r["kind"] == "fixed point" and r["calls_bdia"] > r["calls_base"] for r in result["rows"])


def test_compile_benchmark_traces_gpt2_and_llama_whole_and_saves_less_than_checkpointing(tmp_path):
    out = tmp_path / "compile.json"
    _run("benchmarks/compile.py", "--families", "gpt2,llama", "--layers", "2", "--width", "64", "--batch", "2",
         "--seq", "16", "--steps", "1", "--backend", "aot_eager", "--json", str(out))
    rows = {(r["family"], r["method"]): r for r in json.loads(out.read_text())["rows"]}
    assert len(rows) == 12
    for family in ("gpt2", "llama"):  # Llama's hub-kernel attention forward included
        assert rows[(family, "bdia compiled")]["graph_breaks"] == 0
        assert rows[(family, "bdia compiled")]["saved_bytes"] <= 1.1 * rows[(family, "bdia eager")]["saved_bytes"]
        assert rows[(family, "checkpoint compiled")]["vs_checkpoint_compiled"] == 1.0
        assert rows[(family, "bdia eager")]["saved_bytes"] < rows[(family, "plain eager")]["saved_bytes"]


def test_hf_families_reports_converted_and_refused_families(tmp_path):
    out = tmp_path / "families.json"
    _run("benchmarks/hf_families.py", "--families", "bart", "opt", "--json", str(out))
    rows = {(r["family"], r["granularity"]): r for r in json.loads(out.read_text())}
    assert not rows["bart", "block"]["ok"] and "post-LN" in rows["bart", "block"]["error"]
    for granularity, steps in (("block", 3), ("sublayer", 6)):
        row = rows["opt", granularity]
        assert row["ok"] and row["exact"] and row["grad_diff"] == 0.0
        assert row["steps"] == {"model.decoder.layers": steps}


def test_onnx_export_benchmark_checks_both_graphs(tmp_path):
    out = tmp_path / "onnx.json"
    _run("benchmarks/onnx_export.py", "--layers", "2", "--embd", "64", "--batch", "2", "--tokens", "16",
         "--repeats", "1", "--json", str(out))
    rows = {row["quantize"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {False, True}
    assert rows[False]["max_abs_diff"] < 1e-4 and rows[False]["mismatched"] == 0
    assert rows[True]["max_abs_diff"] <= max(rows[True]["quantization_effect"], 1e-4)


def test_odeint_benchmark_compares_with_torchdiffeq(tmp_path):
    pytest.importorskip("torchdiffeq")  # a test extra; the benchmark needs it
    out = tmp_path / "odeint.json"
    _run("benchmarks/odeint.py", "--repeats", "1", "--steps", "10", "20", "--json", str(out))
    result = json.loads(out.read_text())
    saved = {row["method"]: row for row in result["memory_by_steps"]}
    reversible, stored = saved["bdia_fx alf4"], saved["bdia_fx alf4, stored"]
    assert reversible["20"] - reversible["10"] == 10 * 8  # one float64 step size per step
    assert stored["20"] > 1.9 * stored["10"]
    assert all(row["grad_rel_error"] < 1e-5 for row in result["comparison"])


def test_gpt2_demo_trains_and_measures_memory():
    stdout = _run("examples/gpt2_demo.py", "--layers", "2", "--steps", "2", "--batch", "2", "--seq", "16")
    assert "step 1: loss" in stdout and "x less" in stdout


def _shown_commands() -> set[str]:
    text = "".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    return set(re.findall(r"python ((?:benchmarks|examples)/\w+\.py)", text))


def test_every_script_the_readme_and_docs_show_is_run_by_a_test():
    """A shown script counts as run when this file passes it to ``_run`` or another test file names it."""
    here = Path(__file__).resolve()
    others = "".join(p.read_text() for p in (ROOT / "tests").rglob("test_*.py") if p.resolve() != here)
    run_here = set(re.findall(r'_run\("((?:benchmarks|examples)/\w+\.py)"', here.read_text()))
    shown = _shown_commands()
    assert "benchmarks/memory.py" in shown and "examples/vit_digits.py" in shown
    missing = [script for script in sorted(shown) if script not in run_here and Path(script).name not in others]
    assert not missing, f"README/docs commands no test runs: {missing}"


def test_host_overhead_benchmark_counts_ops_and_profiles_the_chain(tmp_path):
    out = tmp_path / "host.json"
    stdout = _run("benchmarks/host_overhead.py", "--widths", "16", "--layers", "2", "--steps", "2", "--top", "5",
                  "--json", str(out))
    assert "where bdia_fx's host time goes" in stdout
    rows = {row["method"]: row for row in json.loads(out.read_text())["widths"]["16"]["rows"]}
    assert set(rows) == {"plain", "checkpoint", "bdia"}
    # checkpointing recomputes the block forward in backward; bdia_fx also runs its fixed-point update
    assert rows["checkpoint"]["backward_ops_per_block"] > rows["plain"]["backward_ops_per_block"]
    assert rows["bdia"]["forward_ops_per_block"] > rows["plain"]["forward_ops_per_block"]
    assert rows["plain"]["over_plain_ms"] == 0 and rows["checkpoint"]["vs_checkpoint"] == 1


def test_budget_benchmark_honours_every_budget_and_compares_the_plans(tmp_path):
    out, picture = tmp_path / "budget.json", tmp_path / "budget.png"
    stdout = _run("benchmarks/budget.py", "--families", "encoder", "--layers", "4", "--width", "32", "--seq", "16",
                  "--budgets", "3", "--steps", "1", "--compile-budgets", "0.5", "--backend", "aot_eager",
                  "--json", str(out), "--plot", str(picture))
    assert "fastest fitting" in stdout and picture.stat().st_size > 0
    (result,) = json.loads(out.read_text())
    rows = {row["method"]: row for row in result["rows"]}
    baselines = {"plain", "checkpoint every 1", "checkpoint first 2", "compile budget 0.5", "bdia all reversible"}
    assert baselines <= set(rows)
    planned = [row for row in result["rows"] if "budget" in row]
    assert len(planned) == 3 and planned[0]["budget"] == result["smallest_peak"]
    for row in planned:  # measured on the same inputs as the plan's own measurement
        assert row["peak"] <= row["budget"] and row["peak"] == row["planned_peak"]
    assert rows["bdia all reversible"]["peak"] == result["smallest_peak"]
