"""The rewrite pass gives a runnable training graph (one BDIAChain node per chain, run by the same
runtime as the eager model), and the reverse pass turns it back into the runnable γ = 0 graph."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bdia_fx
from bdia_fx import BDIAConfig
from bdia_fx.converted import state_of
from bdia_fx.fixed_point import quantize, quantize_ste
from bdia_fx.passes import CHAIN_META_KEY, QUANT_META_KEY, REVERT_META_KEY
from bdia_fx.run.runtime import BDIAChain

from cases import assert_close, logits
from models import ParentLoopViT, TinyGPT, encoder, gpt2

CALLS = {
    "hf-gpt2": (lambda: gpt2(3, dropout=0.1), lambda: (torch.randint(0, 64, (2, 8)),), {"use_cache": False}),
    "tiny-gpt": (lambda: TinyGPT(layers=4, dropout=0.1), lambda: (torch.randint(0, 50, (3, 9)),), {}),
    "encoder-seq-first": (lambda: encoder(3, batch_first=False, dropout=0.1), lambda: (torch.randn(7, 3, 32),), {}),
    "parent-loop": (lambda: ParentLoopViT(), lambda: (torch.randn(3, 8, 8),), {}),
}


def _loss_and_grads(fn, args, kwargs, params, seed):
    torch.manual_seed(seed)
    loss = logits(fn(*args, **kwargs)).pow(2).mean()
    return loss.detach(), torch.autograd.grad(loss, params)


@pytest.mark.parametrize("granularity", ["block", "sublayer"])
@pytest.mark.parametrize("case", CALLS)
def test_the_rewritten_graph_trains_like_the_converted_model(case, granularity):
    make, make_args, kwargs = CALLS[case]
    torch.manual_seed(0)
    model, args = make(), make_args()
    conv = bdia_fx.convert(model, args, kwargs, BDIAConfig(granularity=granularity)).train()
    graph = bdia_fx.graph_of(conv)
    (node,) = [n for n in graph.graph.nodes if CHAIN_META_KEY in n.meta]
    assert node.op == "call_module" and isinstance(graph.get_submodule(node.target), BDIAChain)
    assert node.args[0].target is quantize_ste and QUANT_META_KEY in node.args[0].meta
    blocks = set(bdia_fx.report_of(conv).chains[0].block_paths)
    assert not [n for n in graph.graph.nodes if n.op == "call_function"
                and blocks & {path for path, _ in n.meta.get("nn_module_stack", {}).values()}]  # folded into the node
    params = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in graph.parameters()} >= {id(p) for p in params}  # the model's own parameters
    loss_g, got = _loss_and_grads(graph, args, kwargs, params, 5)
    loss_c, want = _loss_and_grads(conv, args, kwargs, params, 5)
    assert torch.equal(loss_g, loss_c)
    assert_close(got, want)


def test_the_reverted_graph_is_the_captured_graph_and_with_quantize_the_gamma_zero_chain():
    torch.manual_seed(0)
    model = gpt2(3, dropout=0.0)
    ids = torch.randint(0, 64, (2, 8))
    conv = bdia_fx.convert(model, (ids,), {"use_cache": False})
    rewritten = bdia_fx.graph_of(conv)
    plain, quantized = (bdia_fx.graph_of(bdia_fx.revert(conv, quantize=q)) for q in (False, True))
    for graph in (plain, quantized):
        assert not [n for n in graph.graph.nodes if CHAIN_META_KEY in n.meta or QUANT_META_KEY in n.meta]
    blocks = {n.meta[REVERT_META_KEY] for n in plain.graph.nodes if REVERT_META_KEY in n.meta}
    assert blocks == {("transformer.h", k) for k in range(3)}
    order = [n.meta[REVERT_META_KEY][1] for n in quantized.graph.nodes
             if n.meta.get(REVERT_META_KEY) is not None and n.target is quantize]
    assert order == [None] * 4  # x_0 = Q[x_in] and one Q after each of the 3 blocks
    captured = state_of(conv).plan.graph_module
    with torch.no_grad():
        want = logits(captured(ids, use_cache=False))
        assert torch.equal(logits(plain(ids, use_cache=False)), want)  # the unchanged γ = 0 graph
        conv.eval()
        assert torch.equal(logits(quantized(ids, use_cache=False)), logits(conv(ids, use_cache=False)))
    assert rewritten.graph is not plain.graph and [n for n in rewritten.graph.nodes if CHAIN_META_KEY in n.meta]


def test_the_reverse_pass_of_an_encoder_decoder_keeps_the_decoders_cross_attention_input():
    model = nn.Transformer(d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=3, dim_feedforward=64,
                           dropout=0.0, norm_first=True, batch_first=True)
    src, tgt = torch.randn(2, 6, 32), torch.randn(2, 5, 32)
    conv = bdia_fx.convert(model, (src, tgt))
    chains = [n for n in bdia_fx.graph_of(conv).graph.nodes if CHAIN_META_KEY in n.meta]
    assert [n.meta[CHAIN_META_KEY].container for n in chains] == ["encoder.layers", "decoder.layers"]
    assert chains[0] in chains[1].all_input_nodes[1:] or any(chains[0] in a.all_input_nodes
                                                             for a in chains[1].all_input_nodes[1:])
    reverted = bdia_fx.graph_of(bdia_fx.revert(conv))
    with torch.no_grad():
        assert torch.equal(reverted(src, tgt), state_of(conv).plan.graph_module(src, tgt))
