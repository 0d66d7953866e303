"""Where the stream is in a block's call and output: observed by identity during capture."""

from __future__ import annotations

import pytest
import torch

import bdia_fx
from bdia_fx import BDIAConfig, ConversionError
from bdia_fx.calls import recording_block_calls, stream_slots
from bdia_fx.converted import state_of

from cases import assert_close, grads
from models import ResidualMLP, Stack


class _ScaleFirst(ResidualMLP):
    """Takes a float side input before the stream, and returns (attention-like weights, stream)."""

    def forward(self, scale, x, *, bias):
        h = self.lin(self.ln(x)) * scale + bias
        return torch.softmax(h, -1), x + h


class _ScaleFirstStack(Stack):
    def forward(self, x):
        scale, bias = torch.full((8,), 0.5), torch.zeros(8)
        for layer in self.layers:
            _, x = layer(scale, x, bias=bias)
        return x


def test_a_float_side_input_before_the_stream_and_a_stream_returned_second():
    torch.manual_seed(0)
    model = _ScaleFirstStack([_ScaleFirst() for _ in range(3)])
    x = torch.randn(4, 8, requires_grad=True)
    rev = bdia_fx.convert(model, (x,))
    ref = bdia_fx.convert(model, (x,), config=BDIAConfig(mode="stored"))
    slots = state_of(rev).runtimes["layers"].slots
    assert [s.input_slot([], spec) for s in slots for spec in s.inputs] == [1, 1, 1]
    assert [s.output_slot([], spec) for s in slots for spec in s.outputs] == [1, 1, 1]
    loss_r, g_rev = grads(rev, (x,), {}, 1, lambda out: out.pow(2).mean(), (x,))
    loss_s, g_ref = grads(ref, (x,), {}, 1, lambda out: out.pow(2).mean(), (x,))
    assert torch.equal(loss_r, loss_s)
    assert_close(g_rev, g_ref)
    rev.eval()
    with torch.no_grad():
        assert rev(x).shape == (4, 8)


def test_recorded_calls_give_one_slot_per_block_and_refuse_an_ambiguous_handover():
    model = Stack([ResidualMLP() for _ in range(3)])
    with recording_block_calls(model) as calls:
        model(torch.randn(2, 8))
    slots = stream_slots(("layers.0", "layers.1", "layers.2"), calls)
    assert [list(s.inputs.values()) for s in slots] == [[0], [0], [0]]
    calls["layers.1"][0].leaves.append(calls["layers.0"][0].out_leaves[0])  # the same tensor passed twice
    with pytest.raises(ConversionError, match="cannot tell which argument of 'layers.1' is the residual stream"):
        stream_slots(("layers.0", "layers.1", "layers.2"), calls)
