"""bdia-inspect run as a subprocess on small models: report, graph, pictures, memory, refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GPT2 = ["--hf", "gpt2", "--config", "n_layer=3,n_embd=32,n_head=4,vocab_size=64,bos_token_id=0,eos_token_id=0"]


def _run(*args: str, script: bool = False) -> subprocess.CompletedProcess:
    command = ([sys.executable, str(ROOT / "tools" / "bdia_inspect.py")] if script
               else [str(Path(sys.executable).parent / "bdia-inspect")])
    env = dict(os.environ, PYTHONPATH=str(ROOT / "tests"))
    return subprocess.run(command + list(args), capture_output=True, text=True, env=env, timeout=300)


def test_hf_report_and_rewritten_graph(tmp_path):
    done = _run(*GPT2, "--graph", "--json", str(tmp_path / "r.json"))
    assert done.returncode == 0, done.stderr
    assert "chain 'transformer.h': 3 blocks" in done.stdout
    assert "transformer.h.2" in done.stdout and "expand_2" in done.stdout  # blocks and their side input
    assert "bdia_quantize_transformer_h" in done.stdout and "bdia_chain_transformer_h" in done.stdout
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["chains"][0]["blocks"] == ["transformer.h.0", "transformer.h.1", "transformer.h.2"]


def test_sublayer_granularity_lists_each_blocks_steps(tmp_path):
    done = _run("--torch", "transformer-encoder", "--layers", "3", "--granularity", "sublayer",
                "--json", str(tmp_path / "r.json"))
    assert done.returncode == 0, done.stderr
    assert "layers.1: 2 steps, ending at add_2, add_3" in done.stdout
    assert json.loads((tmp_path / "r.json").read_text())["sublayers"]["layers"][0] == ["add", "add_1"]


def test_draw_writes_before_and_after_pictures_with_the_chain_highlighted(tmp_path):
    done = _run("--torch", "transformer-encoder", "--layers", "3", "--draw", str(tmp_path), script=True)
    assert done.returncode == 0, done.stderr
    for name in ("before", "after"):
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    before, after = (tmp_path / "before.svg").read_text(), (tmp_path / "after.svg").read_text()
    assert "bdia_chain_layers" in after and "#f4a261" in after  # the chain node, highlighted
    assert "bdia_quantize_layers" in after and "#e9c46a" in after
    assert all(f"layers_{k}" in before for k in range(3)) and "bdia_chain" not in before  # one box per block
    expanded = tmp_path / "expanded"
    assert _run("--torch", "transformer-encoder", "--layers", "3", "--draw", str(expanded), "--expand").returncode == 0
    assert len((expanded / "before.svg").read_text()) > 2 * len(before)


def test_memory_table_estimates_match_measurements(tmp_path):
    done = _run("--factory", "models:TinyGPT", "--tokens", "50", "--memory", "4,32", "--measure",
                "--json", str(tmp_path / "m.json"))
    assert done.returncode == 0, done.stderr
    assert "estimated" in done.stdout and "measured" in done.stdout
    rows = {r["method"]: r for r in json.loads((tmp_path / "m.json").read_text())["memory"]["rows"]}
    for row in rows.values():
        assert row["measured"] == pytest.approx(row["estimated"], rel=0.02)
    assert rows["bdia"]["measured"] < rows["checkpoint"]["measured"] < rows["plain"]["measured"]


@pytest.mark.parametrize("args, reason", [
    (["--torch", "transformer-encoder", "--post-ln"], "post-LN block"),
    (["--factory", "models:bert"], "give its input with --tokens or --shape"),
    (["--hf", "no-such-model"], "unknown HF model type"),
    (["--hf", "gpt2", "--config", "n_layer=2,n_embd=128"], "divisible"),  # the underlying error, not swallowed
])
def test_unconvertible_models_exit_non_zero_with_one_line(args, reason):
    done = _run(*args)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("bdia-inspect: cannot convert:") and reason in lines[-1]


def test_budget_prints_the_plan_and_the_frontier(tmp_path):
    done = _run("--factory", "models:TinyGPT", "--tokens", "50", "--batch", "4", "--seq", "32", "--budget", "0.5",
                "--json", str(tmp_path / "b.json"))
    assert done.returncode == 0, done.stderr
    assert "memory plan for a budget of" in done.stdout and "frontier" in done.stdout and "<- plan" in done.stdout
    plan = json.loads((tmp_path / "b.json").read_text())["memory_plan"]
    assert plan["peak"] <= plan["budget"] and plan["requested"] == 0.5
    assert {b["mode"] for b in plan["blocks"]} <= {"kept", "reversible"}
    done = _run("--factory", "models:TinyGPT", "--tokens", "50", "--budget", "lots")
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith("bdia-inspect: memory_budget")
