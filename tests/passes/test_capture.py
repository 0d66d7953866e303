"""passes/capture.py: a forward that branches on tensor values is captured on the example's branch
(without torch's dump of the failed first try), converts, and trains exactly on either branch; a failed
capture says why."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import bdia_fx
from bdia_fx import BDIAConfig, ConversionError

from cases import grads
from models import ResidualMLP


class MaskedStack(nn.Module):
    """ESM-2's pattern: ``if not padding_mask.any(): padding_mask = None`` before the blocks."""

    def __init__(self, layers: int = 3, d: int = 8):
        super().__init__()
        self.embed = nn.Embedding(10, d)
        self.layers = nn.ModuleList(ResidualMLP(d) for _ in range(layers))

    def forward(self, tokens):
        padding = tokens.eq(0)
        x = self.embed(tokens)
        if padding.any():  # a branch on tensor values: torch.export alone cannot capture it
            x = x * (~padding).unsqueeze(-1)
        for layer in self.layers:
            x = layer(x)
        return x


def test_a_branch_on_tensor_values_is_captured_on_the_examples_branch_and_logged(caplog, capfd):
    torch.manual_seed(0)
    model = MaskedStack()
    example = torch.randint(1, 10, (2, 5))  # no padding: the branch is not taken
    with caplog.at_level(logging.WARNING, logger="bdia_fx.passes.capture"):
        converted = bdia_fx.convert(model, (example,))
    assert "def forward(self" not in capfd.readouterr().err  # torch.export's dump of its failed first try
    (record,) = [r for r in caplog.records if "branches on tensor values" in r.message]
    assert "test_capture.py:" in record.message and "if padding.any():" in record.message
    assert [c.container for c in bdia_fx.report_of(converted).chains] == ["layers"]
    stored = bdia_fx.convert(model, (example,), config=BDIAConfig(mode="stored"))
    padded = example.clone()
    padded[0, -2:] = 0  # the other branch, at training time: the model runs its own code
    for tokens in (example, padded):
        _, got = grads(converted, (tokens,), {}, seed=1)
        _, want = grads(stored, (tokens,), {}, seed=1)
        assert all(torch.equal(g, w) for g, w in zip(got, want))
    with pytest.raises(RuntimeError, match="Runtime assertion failed"):  # the graph holds the example's branch
        bdia_fx.graph_of(converted)(padded)


class NumpyInForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(ResidualMLP(8) for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x * float(x.detach().numpy().std())  # leaves torch: no graph


def test_a_capture_that_fails_names_the_model_and_torchs_reason():
    with pytest.raises(ConversionError, match=r"could not capture NumpyInForward for this call: RuntimeError: "
                                              r"\.numpy\(\) is not supported"):
        bdia_fx.convert(NumpyInForward(), (torch.randn(2, 8),))
