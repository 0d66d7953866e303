"""Rewrite pass: collapse each found chain into one BDIA chain node with its quantization nodes.

The result is the converted model's graph as a reader sees it: the nodes outside the chains
are the captured ones, and each chain becomes

    %x0    = call_function[bdia_fx.fixed_point.quantize](%stream_in, frac_bits)
    %chain = call_module[target=<container>](%x0, *side_inputs, frac_bits=..., gammas=..., blocks=...)

with ``node.meta[CHAIN_META_KEY]`` holding the :class:`~bdia_fx.report.ChainInfo`. The chain node
is executed by :class:`bdia_fx.runtime.ChainRuntime`, which runs the container's block modules.
"""

from __future__ import annotations

import operator

import torch
from torch import fx, nn

from bdia_fx.config import BDIAConfig
from bdia_fx.fixed_point import quantize
from bdia_fx.passes.chains import BLOCK_META_KEY
from bdia_fx.report import ChainReport

CHAIN_META_KEY = "bdia_chain"
QUANT_META_KEY = "bdia_quantize"


def rewrite_chains(ep: torch.export.ExportedProgram, root: nn.Module, report: ChainReport,
                   config: BDIAConfig) -> fx.GraphModule:
    """Copy ``ep.graph`` with every chain of ``report`` replaced by quantize + chain nodes.

    ``ep.graph`` must have been marked by :func:`~bdia_fx.passes.chains.find_chains_in_graph`.
    The input graph is not modified.
    """
    chains = {c.container: c for c in report.chains}
    by_name = {n.name: n for n in ep.graph.nodes}
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in ep.graph.nodes:
        mark = node.meta.get(BLOCK_META_KEY)
        if mark is None or mark[0] not in chains:
            env[node] = graph.node_copy(node, lambda n: env[n])
            continue
        chain = chains[mark[0]]
        if node.name != chain.blocks[-1].stream_out:
            continue  # block internals vanish; the chain node is emitted at the chain's output
        container = chain.container
        stream_in = env[by_name[chain.blocks[0].stream_in]]
        sides = tuple(env[by_name[s.node]] for s in chain.side_inputs)
        x0 = graph.call_function(quantize, (stream_in, config.frac_bits))
        x0.name = f"bdia_quantize_{safe_name(container)}"
        x0.meta[QUANT_META_KEY] = container
        out = graph.call_module(
            container,
            (x0, *sides),
            {"frac_bits": config.frac_bits, "gammas": config.gammas, "blocks": list(chain.block_paths)},
        )
        out.name = f"bdia_chain_{safe_name(container)}"
        out.meta[CHAIN_META_KEY] = chain
        if "val" in by_name[chain.blocks[-1].stream_out].meta:
            out.meta["val"] = by_name[chain.blocks[-1].stream_out].meta["val"]
        env[by_name[chain.blocks[-1].stream_out]] = out
    graph.lint()
    return graph_module(graph, "BDIARewrittenGraph", root, ep.graph_module)


def graph_module(graph: fx.Graph, class_name: str, *roots: nn.Module) -> fx.GraphModule:
    """A GraphModule for ``graph`` whose ``call_module``/``get_attr`` targets are looked up in
    ``roots`` in order (blocks live on the model; captured sub-graphs such as ``submod_1`` of
    higher-order ops on the exported program's module)."""
    owners: dict[str, object] = {}
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr") and node.target not in owners:
            for root in roots:
                try:
                    owners[node.target] = operator.attrgetter(node.target)(root)
                    break
                except AttributeError:
                    continue
    return fx.GraphModule(owners, graph, class_name=class_name)


def safe_name(path: str) -> str:
    """A module path as a node-name fragment (dots become underscores)."""
    return path.replace(".", "_") or "root"
