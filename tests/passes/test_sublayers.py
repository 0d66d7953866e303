"""Sublayer steps: a block call's exported graph cut at its residual adds, each step a graph run alone."""

import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_flatten

import bdia_fx
from bdia_fx.calls import StreamSlots
from bdia_fx.passes.plan import plan_block_call

from models import encoder


def _plan(block: nn.Module, *args, **kwargs):
    leaves, spec = tree_flatten((args, kwargs))
    return plan_block_call(block, type(block), leaves, spec, 0, StreamSlots().output_slot, "layer")


def test_pre_ln_block_splits_into_attention_and_mlp_steps_that_match_eager():
    torch.manual_seed(0)
    layers = encoder(2, dropout=0.0).layers
    x = torch.randn(2, 5, 32)
    steps, rebuild = _plan(layers[0], x)
    assert len(steps) == 2 and [s.random for s in steps] == [False, False]
    assert [s.end for s in steps] == ["add", "add_1"]
    ops = [{str(n.target) for n in step.graph_module.graph.nodes} for step in steps]
    assert "aten.scaled_dot_product_attention.default" in ops[0] and "aten.relu.default" not in ops[0]
    assert "aten.relu.default" in ops[1] and "aten.scaled_dot_product_attention.default" not in ops[1]
    assert "self_attn.in_proj_weight" in steps[0].parameters and "linear1.weight" in steps[1].parameters
    for layer in layers:  # the same steps serve every block with that graph: parameters are bound per call
        with torch.no_grad():
            y = steps[0](layer, x, [])
            z = steps[1](layer, y, [])
            want_y = x + layer._sa_block(layer.norm1(x), None, None)
            assert torch.equal(y, want_y)
            assert torch.equal(z, want_y + layer._ff_block(layer.norm2(want_y)))
            assert torch.equal(rebuild(z), layer(x))


class _Parallel(nn.Module):
    """x + a(x) + m(x): both branches read the block input."""

    def __init__(self, d=8):
        super().__init__()
        self.a, self.m = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        return x + self.a(x) + torch.tanh(self.m(x))


class _ReadsOlderStream(nn.Module):
    """y = x + a(x); z = y + a(x) * m(y): the second branch reads x, older than its step's input y."""

    def __init__(self, d=8):
        super().__init__()
        self.a, self.m = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        y = x + self.a(x)
        return y + self.a(x) * self.m(y)


class _WithDropout(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.a, self.m, self.drop = nn.Linear(d, d), nn.Linear(d, d), nn.Dropout(0.5)

    def forward(self, x):
        y = x + self.a(x)
        return y + self.drop(self.m(y))


def test_parallel_residual_block_stays_one_step():
    steps, _ = _plan(_Parallel(), torch.randn(3, 8))
    assert len(steps) == 1


def test_only_the_random_sublayer_is_marked_random():
    steps, _ = _plan(_WithDropout().train(), torch.randn(3, 8))
    assert [s.random for s in steps] == [False, True]


def test_a_branch_reading_an_older_stream_value_is_refused_naming_the_add():
    with pytest.raises(bdia_fx.ConversionError, match=r"\[module 'layer'\].*residual add 'add_1'.*older"):
        _plan(_ReadsOlderStream(), torch.randn(3, 8))


class _Stack(nn.Module):
    def __init__(self, block, n=3):
        super().__init__()
        self.layers = nn.ModuleList(block() for _ in range(n))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_convert_refuses_an_unsplittable_block_before_changing_anything():
    model = _Stack(_ReadsOlderStream)
    x = torch.randn(3, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(bdia_fx.ConversionError, match=r"layers\.0.*older than its step's input"):
        bdia_fx.convert(model, (x,), config=bdia_fx.BDIAConfig(granularity="sublayer"))
    assert type(model.layers[0]) is _ReadsOlderStream
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    bdia_fx.convert(model, (x,))  # the same blocks are fine as whole-block steps
