"""benchmarks/accuracy.py: the --quick study end to end, the γ batch dim of both example models,
the Monte-Carlo evaluation mode and the seeds-needed estimate."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import bdia_fx
from bdia_fx.converted import state_of

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "accuracy.py"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def accuracy():
    """The benchmark as a module (it puts examples/ on sys.path for vit_digits, char_lm, paired)."""
    spec = importlib.util.spec_from_file_location("accuracy_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass resolves annotations through sys.modules
    spec.loader.exec_module(module)
    from transformers.utils import logging

    logging.set_verbosity_error()
    return module


def test_quick_run_reports_every_cell_variant_and_mode(tmp_path):
    out = tmp_path / "acc.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path), "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    cells = json.loads(out.read_text())["cells"]
    assert set(cells) == {"K6", "lm-K4"}
    assert set(cells["K6"]["summary"]) == {"bdia", "bdia-b16", "scheme-alf"}  # per frac_bits variant and scheme
    for name, cell in cells.items():
        for row in cell["summary"].values():
            assert len(row["final"]["plain"]) == len(row["final"]["bdia"]) == 2
            assert set(row["modes"]) == {"gamma0", "gamma0-float", "mc2"}
            assert row["seeds_for_resolution"] >= 2 and len(row["gap"]["plain"]) == len(row["gap"]["bdia"]) == 2
            values = row["final"]["plain"] + row["final"]["bdia"]
            assert all(0 <= v <= 1 for v in values) if name == "K6" else all(1 < v < 6 for v in values)
            # the model's own eval is the γ = 0 mode: the same numbers as the curve's last point
            assert row["modes"]["gamma0"]["bdia"] == pytest.approx(row["final"]["bdia"], rel=1e-5)
        for path in cell["plots"]:
            assert Path(path).read_bytes()[:8] == PNG
    table = (tmp_path / "table.md").read_text()
    assert "| K6 | digits |" in table and "| lm-K4 | bdia | mc2 |" in table
    assert "Δ final [95 % CI]" in done.stdout
    assert (tmp_path / "differences.png").read_bytes()[:8] == PNG
    again = tmp_path / "again"  # the table is rebuilt from the JSON alone, identically
    done = subprocess.run([sys.executable, str(SCRIPT), "--from-json", str(out), "--out", str(again)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (again / "table.md").read_text() == table


def test_unknown_cell_is_refused_by_name():
    done = subprocess.run([sys.executable, str(SCRIPT), "--cells", "K7"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "unknown cell(s) K7" in done.stderr


def _identical_rows_differ(model: nn.Module, call) -> bool:
    """Whether a batch of 4 copies of one sample gives 4 different outputs in a training forward
    with dropout off (only γ, drawn per sample, can make the rows differ)."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.eval()
    with torch.no_grad():
        out = call(model)
    return not all(torch.equal(out[0], out[i]) for i in range(1, len(out)))


@pytest.mark.parametrize("gammas, differ", [((-0.5, 0.5), True), ((0.5,), False)])
def test_gamma_is_drawn_per_sample_on_batch_dim_0_in_both_examples(accuracy, gammas, differ):
    torch.manual_seed(0)
    image = torch.rand(1, 1, 8, 8).expand(4, 1, 8, 8).contiguous()
    vit = bdia_fx.convert(accuracy.build_vit(4, 64), (image,), config=bdia_fx.BDIAConfig(gammas=gammas))
    ids = torch.randint(0, 50, (1, 16)).expand(4, 16).contiguous()
    gpt = bdia_fx.convert(accuracy.build_gpt(50, 4, 64, 16), (ids,), {"use_cache": False},
                          config=bdia_fx.BDIAConfig(gammas=gammas))
    for model in (vit, gpt):
        assert [r.batch_dim for r in state_of(model).runtimes.values()] == [0]
    torch.manual_seed(1)
    assert _identical_rows_differ(vit, lambda m: m(pixel_values=image).logits) is differ
    assert _identical_rows_differ(gpt, lambda m: m(ids, use_cache=False).logits) is differ


def test_mc_mode_averages_gamma_draws_without_dropout_and_leaves_the_rng_alone(accuracy):
    torch.manual_seed(0)
    images = torch.rand(6, 1, 8, 8)
    model = bdia_fx.convert(accuracy.build_vit(4, 64, dropout=0.5), (images,))
    logits = lambda: model(pixel_values=images).logits  # noqa: E731
    state = torch.get_rng_state()
    one = accuracy.mean_probabilities(logits, model, 1)
    assert torch.equal(torch.get_rng_state(), state)
    assert not model.training and all(not m.training for m in model.modules())  # back in eval mode
    assert torch.equal(one, accuracy.mean_probabilities(logits, model, 1))  # seeded: reproducible
    eight = accuracy.mean_probabilities(logits, model, 8)
    assert not torch.allclose(one, eight)  # the draws differ: γ is live in the chain
    assert torch.allclose(eight.sum(-1), torch.ones(6))
    with accuracy.gamma_draws(model, seed=0):
        assert all(not m.training for m in model.modules() if isinstance(m, nn.Dropout))
        assert model.training


def test_seeds_to_resolve(accuracy):
    # sd of [0, 0.02] is 0.01414: t(0.975, 9)/√10 = 0.715 > 0.707, t(0.975, 10)/√11 = 0.672 ≤ 0.707
    assert accuracy.seeds_to_resolve([0.0, 0.02], 0.01) == 11
    assert accuracy.seeds_to_resolve([0.0, 0.0, 0.0], 0.01) == 2
    assert accuracy.seeds_to_resolve([0.01], 0.01) is None
