"""Each example's --quick run end to end as a subprocess: results JSON, plots, exports."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n"


def _run_quick(script: str, out: Path) -> str:
    done = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_vit_digits_the_demo_learns_measures_memory_by_depth_and_exports(tmp_path):
    stdout = _run_quick("vit_digits.py", tmp_path)
    result = json.loads((tmp_path / "results.json").read_text())
    accuracy = result["final_accuracy"]
    assert len(accuracy["plain"]) == len(accuracy["bdia"]) == 2
    assert min(accuracy["plain"] + accuracy["bdia"]) > 0.6  # chance is 0.1: both variants learn
    assert result["exact"] and "bit-exact" in stdout
    memory = result["saved_bytes_by_depth"]
    for i in range(1, len(memory["depths"])):  # plain grows with depth much faster than BDIA
        assert memory["plain"][i] - memory["plain"][i - 1] > 4 * (memory["bdia"][i] - memory["bdia"][i - 1])
    assert memory["bdia"][-1] < memory["checkpoint"][-1] < memory["plain"][-1]
    for name in ("accuracy.png", "memory.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG
    assert (tmp_path / "vit_digits.onnx").stat().st_size > 0
    summary = r"validation accuracy: plain \d+\.\d ± \d+\.\d %.*paired difference bdia − plain [+-]\d+\.\d pp"
    assert re.search(summary, stdout)


def test_char_lm(tmp_path):
    stdout = _run_quick("char_lm.py", tmp_path)
    result = json.loads((tmp_path / "results.json").read_text())
    losses = result["final_validation_loss"]
    assert all(0 < v < 10 for v in losses["plain"] + losses["bdia"])
    assert len(result["samples"]) == 2 and all(s.startswith(("The ", "A function ")) for s in result["samples"])
    assert (tmp_path / "val_loss.png").read_bytes()[:8] == PNG
    assert "samples from the reverted BDIA model" in stdout


def test_translation_toy(tmp_path):
    _run_quick("translation_toy.py", tmp_path)
    result = json.loads((tmp_path / "results.json").read_text())
    for metric in ("exact_match", "bleu"):
        assert all(0 <= v <= 1 for v in result[metric]["plain"] + result[metric]["bdia"])
    assert (tmp_path / "exact_match.png").read_bytes()[:8] == PNG


def test_toy_language_rules():
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import translation_toy as toy
    finally:
        sys.path.pop(0)
    pairs = toy.make_pairs(200)
    assert len({s for s, _ in pairs}) == 200
    for _source, target in pairs:
        assert target.split()[-1] in toy.VERBS.values()  # subject-object-verb
    assert toy.corpus_bleu(["ka neko miru"], ["ka neko miru"], order=3) == pytest.approx(1.0)
    assert toy.corpus_bleu(["ka neko ko inu miru"], ["ren tori"]) == 0.0


def test_neural_ode_learns_the_pendulum_and_keeps_constant_memory(tmp_path):
    pytest.importorskip("torchdiffeq")
    stdout = _run_quick("neural_ode.py", tmp_path)
    result = json.loads((tmp_path / "results.json").read_text())
    runs = result["runs"]
    assert set(runs) == {"reversible", "direct backprop"}
    for (run,) in runs.values():  # --quick: one seed
        assert sum(run["losses"][-10:]) / 10 < 0.5 * run["losses"][0]  # both runs learn
        assert run["rms_error_train_horizon"] < 1.0  # the states are O(1): a learnt field, not noise
    memory = result["memory_by_steps"]
    reversible, direct = memory["reversible"], memory["direct backprop"]
    steps = memory["steps"]
    assert reversible[-1] - reversible[0] == 8 * (steps[-1] - steps[0])  # one float64 step size per step
    assert direct[-1] > 100 * reversible[-1]
    assert (tmp_path / "neural_ode.png").read_bytes()[:8] == PNG
    assert result["gradient_agreement_at_init"] < 1e-3  # the two solvers' gradients differ by discretisation only
    assert "bytes kept for backward" in stdout
