"""The chain-finding and rewrite passes on captured graphs."""

import torch

import bdia_fx
from bdia_fx.conversion import state_of
from bdia_fx.fixed_point import quantize
from bdia_fx.passes import CHAIN_META_KEY

from models import encoder, gpt2, llama, neox, vit


def test_report_lists_blocks_side_inputs_and_randomness():
    report = bdia_fx.find_chains(gpt2(3), (torch.randint(0, 64, (2, 8)),), {"use_cache": False})
    (chain,) = report.chains
    assert chain.block_paths == ("transformer.h.0", "transformer.h.1", "transformer.h.2")
    assert all(b.random for b in chain.blocks)
    assert chain.blocks[1].stream_in == chain.blocks[0].stream_out
    text = str(report)
    assert "chain 'transformer.h': 3 blocks" in text and "transformer.h.2" in text


def test_vit_chain_is_found_under_wrapper_modules():
    report = bdia_fx.find_chains(vit(3), (torch.randn(2, 1, 16, 16),))
    assert [c.container for c in report.chains] == ["vit.layers"]


def test_rejections_are_reported_with_module_and_reason():
    report = bdia_fx.find_chains(encoder(2, norm_first=False), (torch.randn(2, 4, 32),))
    assert not report.chains
    (rejection,) = report.rejections
    assert rejection.module == "layers.0" and "post-LN" in rejection.reason
    assert "rejected" in str(report)


def test_rewritten_graph_has_one_chain_node_with_its_quantize_node():
    conv = bdia_fx.convert(encoder(4), (torch.randn(2, 5, 32),))
    graph = state_of(conv).graph.graph
    chain_nodes = [n for n in graph.nodes if CHAIN_META_KEY in n.meta]
    assert len(chain_nodes) == 1
    (node,) = chain_nodes
    assert node.op == "call_module" and node.target == "layers"
    assert node.args[0].target is quantize
    assert node.kwargs["blocks"] == ["layers.0", "layers.1", "layers.2", "layers.3"]
    assert not any("layers.1" in str(n.meta.get("nn_module_stack", "")) for n in graph.nodes)
    assert "bdia_chain_layers" in str(graph)


def test_dropout_with_p_zero_is_not_random():
    for p, random in ((0.0, False), (0.1, True)):
        report = bdia_fx.find_chains(encoder(2, dropout=p), (torch.randn(2, 4, 32),))
        assert [b.random for b in report.chains[0].blocks] == [random, random]


def test_llama_blocks_read_rotary_tables_and_neox_blocks_are_parallel_residual():
    ids = torch.randint(0, 64, (2, 8))
    (chain,) = bdia_fx.find_chains(llama(2), (ids,), {"use_cache": False}).chains
    assert chain.block_paths == ("model.layers.0", "model.layers.1")
    shapes = [s.shape for s in chain.blocks[0].side_inputs]
    assert sum(1 for shape in shapes if shape is not None and shape[-1] == 8) >= 2  # cos and sin, head dim 8
    (chain,) = bdia_fx.find_chains(neox(2), (ids,), {"use_cache": False}).chains
    assert chain.block_paths == ("gpt_neox.layers.0", "gpt_neox.layers.1")
    assert all(b.random for b in chain.blocks)
