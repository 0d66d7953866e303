"""convert(..., memory_budget=B): the plan honours the budget on the example inputs (measured), is monotone in
it, keeps the stored run's gradients, refuses bad budgets before anything is made, and is shown."""

from __future__ import annotations

import logging
import math

import pytest
import torch

import bdia_fx
from bdia_fx import BDIAConfig, budget
from bdia_fx.memory import default_loss
from bdia_fx.peak import measure_step, preserved_training_state

from cases import _t5_inputs, grads
from models import NanoGPT, t5

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def nanogpt():
    torch.manual_seed(0)
    return NanoGPT(d=64, layers=6, vocab=128), torch.randint(0, 128, (4, 32))


def _plan(model, args, b, kwargs=None):
    converted = bdia_fx.convert(model, args, kwargs, memory_budget=b)
    return converted, bdia_fx.report_of(converted).memory_plan


def _measured(converted, args, kwargs=None):
    with preserved_training_state(converted):
        converted.train()
        return measure_step(converted, lambda: default_loss(converted(*args, **(kwargs or {}))), CPU).peak


@pytest.mark.parametrize("value, want", [(1000, 1000), ("6GiB", 6 * 2**30), ("512 MB", 512 * 10**6),
                                         ("1.5KiB", 1536), ("2e3", None), (0.25, 0.25), (1.0, 1.0)])
def test_budgets_are_bytes_sizes_or_fractions(value, want):
    if want is None:
        with pytest.raises(ValueError, match="is not a size"):
            budget.parse_budget(value)
    else:
        assert budget.parse_budget(value) == want


@pytest.mark.parametrize("value", [0, -5, 0.0, -0.5, 1.5, math.nan, "", "lots", "0MB", "5 parsecs", True, [1]])
def test_bad_budgets_raise_value_error_before_the_model_is_touched(nanogpt, value):
    model, ids = nanogpt
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match="memory_budget"):
        bdia_fx.convert(model, (ids,), memory_budget=value)
    assert all(torch.equal(p, before[name]) and p.grad is None for name, p in model.named_parameters())


def test_a_budget_needs_example_inputs_and_the_reversible_mode(nanogpt):
    model, ids = nanogpt
    with pytest.raises(ValueError, match="needs example inputs"):
        bdia_fx.convert(model, memory_budget="1MiB")
    with pytest.raises(ValueError, match="mode='stored'"):
        bdia_fx.convert(model, (ids,), config=BDIAConfig(mode="stored"), memory_budget="1MiB")


def test_every_budget_from_the_smallest_to_the_plain_peak_is_honoured_and_more_budget_is_never_slower(nanogpt):
    """Eight budgets from the smallest feasible peak to the plain peak: the step measured on the example inputs
    stays within each, the plan's peak is that measurement, the frontier estimate is within 5 % of it, and the
    kept blocks (so the estimated time) only grow with the budget."""
    model, ids = nanogpt
    _, full = _plan(model, (ids,), 1.0)
    assert full.unconverted
    low, high = full.smallest_peak, full.plain_peak
    kept, seconds = [], []
    for i in range(8):
        b = low + (high - 1 - low) * i // 7
        converted, plan = _plan(model, (ids,), b)
        measured = _measured(converted, (ids,))
        assert measured <= b and plan.peak == measured
        assert abs(plan.estimated_peak - measured) <= 0.05 * measured
        kept.append(plan.kept)
        seconds.append(plan.seconds)
    assert kept == sorted(kept) and kept[0] == 0 and kept[-1] > 0
    assert seconds == sorted(seconds, reverse=True)


def test_a_plan_keeps_the_stored_runs_gradients_and_reverts_to_the_same_model(nanogpt):
    model, ids = nanogpt
    _, full = _plan(model, (ids,), 1.0)
    middle = (full.smallest_peak + full.plain_peak) // 2
    planned, plan = _plan(model, (ids,), middle)
    assert 0 < plan.kept < len(plan.blocks)
    stored = bdia_fx.convert(model, (ids,), config=BDIAConfig(mode="stored"))
    for seed in (0, 1):
        got_loss, got = grads(planned, (ids,), {}, seed, default_loss)
        want_loss, want = grads(stored, (ids,), {}, seed, default_loss)
        assert torch.equal(got_loss, want_loss) and all(torch.equal(g, w) for g, w in zip(got, want))
    plain = bdia_fx.revert(planned).eval()
    assert torch.equal(plain(ids), model.eval()(ids))


def test_a_budget_below_the_smallest_peak_names_it_and_what_takes_it(nanogpt):
    model, ids = nanogpt
    _, full = _plan(model, (ids,), 1.0)
    with pytest.raises(bdia_fx.ConversionError, match=rf"smallest peak .* \({full.smallest_peak} bytes, every block "
                                                     r"reversible\), taken by the .*block"):
        bdia_fx.convert(model, (ids,), memory_budget=full.smallest_peak - 1)


def test_the_plain_peaks_budget_makes_nothing_reversible_and_trains_as_the_original(nanogpt, caplog):
    model, ids = nanogpt
    with caplog.at_level(logging.INFO, logger="bdia_fx.budget"):
        converted, plan = _plan(model, (ids,), 1.0)
    assert plan.unconverted and all(b.mode == "plain" for b in plan.blocks)
    assert any("nothing is made reversible" in r.getMessage() for r in caplog.records)
    assert "nothing is made reversible" in str(bdia_fx.report_of(converted))
    got_loss, got = grads(converted, (ids,), {}, 0, default_loss)
    want_loss, want = grads(model, (ids,), {}, 0, default_loss)
    assert torch.equal(got_loss, want_loss) and all(torch.equal(g, w) for g, w in zip(got, want))
    assert torch.equal(converted.eval()(ids), model.eval()(ids))


def test_probes_are_cached_deterministic_and_leave_the_model_as_it_was(nanogpt, monkeypatch):
    model, ids = nanogpt
    rng, training = torch.get_rng_state(), model.training
    _, first = _plan(model, (ids,), 0.6)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters()) and model.training == training
    calls = []
    original = budget.Prober._probe
    monkeypatch.setattr(budget.Prober, "_probe", lambda self, repeats: calls.append(1) or original(self, repeats))
    _, again = _plan(model, (ids,), 0.6)
    assert not calls  # from the cache
    assert [b.mode for b in again.blocks] == [b.mode for b in first.blocks] and again.peak == first.peak


def test_two_chains_are_planned_together_last_chain_first():
    torch.manual_seed(0)
    model = t5(3, 32)
    args = _t5_inputs(2, 8)
    _, full = _plan(model, args, 1.0, {"use_cache": False})
    chains = [b.chain for b in full.blocks]
    assert len(set(chains)) == 2
    b = (full.smallest_peak + full.plain_peak) // 2
    converted, plan = _plan(model, args, b, {"use_cache": False})
    modes = [b.mode for b in plan.blocks]
    kept = [i for i, m in enumerate(modes) if m == "kept"]
    assert kept == list(range(len(modes) - len(kept), len(modes)))  # the blocks backward reaches first
    assert _measured(converted, args, {"use_cache": False}) <= b


def test_the_report_shows_each_blocks_mode_bytes_and_time_and_the_frontier(nanogpt):
    model, ids = nanogpt
    converted, plan = _plan(model, (ids,), 0.5)
    text = str(bdia_fx.report_of(converted))
    assert "memory plan for a budget of" in text and "(0.5 of the plain peak)" in text
    for block in plan.blocks:
        assert f"h.{block.index}" in text and block.mode in ("kept", "reversible")
    assert "frontier" in text and "<- plan" in text and "plain model" in text
    data = plan.to_dict()
    assert data["budget"] == plan.budget and len(data["frontier"]) == len(plan.blocks) + 2


@pytest.mark.parametrize("fraction", [None, 1.0], ids=["some-blocks-kept", "plain-peak"])
def test_a_planned_model_exports_the_original_model_to_onnx(nanogpt, tmp_path, fraction):
    """The file onnxruntime runs gives the original model's outputs at another batch and length, whatever the plan."""
    onnxruntime = pytest.importorskip("onnxruntime")
    model, ids = nanogpt
    _, full = _plan(model, (ids,), 1.0)
    planned, plan = _plan(model, (ids,), fraction or (full.smallest_peak + full.plain_peak) // 2)
    assert plan.unconverted == (fraction == 1.0) and (plan.unconverted or 0 < plan.kept < len(plan.blocks))
    path = tmp_path / "planned.onnx"
    bdia_fx.export_onnx(planned, path, (ids,))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    other = torch.randint(0, 128, (2, 20))
    got = session.run(None, {session.get_inputs()[0].name: other.numpy()})[0]
    with torch.no_grad():
        want = model.eval()(other)
    torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-4, rtol=1e-4)
