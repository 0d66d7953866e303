"""torch.compile of a converted model: graph breaks independent of depth, eager's γ and gradients,
new batch sizes without reaching the recompile limit."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import bdia_fx

from cases import assert_close
from models import TinyGPT, gpt2


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _step(model, ids, seed):
    torch.manual_seed(seed)
    loss = model(ids, labels=ids).loss
    return loss.detach(), torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])


def test_graph_breaks_do_not_grow_with_depth_and_gamma_and_gradients_are_eager():
    breaks = {}
    for layers in (4, 8):
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        ids = torch.randint(0, 64, (2, 8))
        conv = bdia_fx.convert(gpt2(layers, dropout=0.1), (ids,), {"use_cache": False}).train()
        loss, got = _step(torch.compile(conv, backend="aot_eager"), ids, 3)
        breaks[layers] = sum(counters["graph_break"].values())
        want_loss, want = _step(conv, ids, 3)
        assert torch.equal(loss, want_loss)  # the same γ (and dropout) as eager for the same seed
        assert_close(got, want)
    assert breaks[4] == breaks[8] and 1 <= breaks[4] <= 4, breaks


def test_new_batch_sizes_and_lengths_stay_below_the_recompile_limit(monkeypatch):
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 4)
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)
    torch.manual_seed(0)
    conv = bdia_fx.convert(TinyGPT(layers=4, dropout=0.1), (torch.randint(0, 50, (2, 8)),)).train()
    compiled = torch.compile(conv, backend="aot_eager")
    for batch, length in [(2, 8), (3, 8), (5, 12), (7, 9), (1, 3), (2, 8)]:
        ids = torch.randint(0, 50, (batch, length))
        compiled(ids).pow(2).mean().backward()
