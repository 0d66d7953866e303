"""The reverse pass finds exactly the rewrite pass's nodes and emits the γ = 0 block chain."""

import torch
from torch import nn

import bdia_fx
from bdia_fx.conversion import state_of
from bdia_fx.fixed_point import quantize
from bdia_fx.passes import CHAIN_META_KEY, QUANT_META_KEY, REVERT_META_KEY

from models import gpt2


def _converted_transformer():
    model = nn.Transformer(d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=3, dim_feedforward=64,
                           norm_first=True, batch_first=True)
    return bdia_fx.convert(model, (torch.randn(2, 6, 32), torch.randn(2, 5, 32)))


def test_reverse_pass_emits_one_node_per_block_with_side_inputs():
    conv = _converted_transformer()
    before = bdia_fx.graph_of(conv).graph
    reverted = bdia_fx.revert(conv)
    graph = bdia_fx.graph_of(reverted).graph
    assert not [n for n in graph.nodes if CHAIN_META_KEY in n.meta or QUANT_META_KEY in n.meta]
    blocks = [n for n in graph.nodes if n.op == "call_module"]
    assert [n.target for n in blocks] == ["encoder.layers.0", "encoder.layers.1",
                                          "decoder.layers.0", "decoder.layers.1", "decoder.layers.2"]
    assert all(REVERT_META_KEY in n.meta for n in blocks)
    assert blocks[1].args[0] is blocks[0] and blocks[3].args[0] is blocks[2]
    assert len(blocks[2].args) > 1  # the decoder blocks read the encoder memory as a side input
    untouched = [n for n in before.nodes if CHAIN_META_KEY not in n.meta and QUANT_META_KEY not in n.meta]
    assert len(graph.nodes) == len(untouched) + len(blocks)


def test_quantize_keeps_the_input_quantization_and_quantizes_every_block():
    conv = bdia_fx.convert(gpt2(3), (torch.randint(0, 64, (2, 8)),), {"use_cache": False})
    graph = bdia_fx.graph_of(bdia_fx.revert(conv, quantize=True)).graph
    order = [n.target if n.op == "call_module" else "Q" for n in graph.nodes
             if n.op == "call_module" or n.target is quantize]
    assert order == ["Q", "transformer.h.0", "Q", "transformer.h.1", "Q", "transformer.h.2", "Q"]
    assert state_of(conv).graph.graph is not graph  # the converted model's graph is not modified
