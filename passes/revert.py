"""Reverse pass: turn the rewritten graph's BDIA chain nodes back into the γ = 0 block chain.

It is the inverse of :func:`bdia_fx.passes.rewrite.rewrite_chains` and touches only the nodes
that pass created (found by ``node.meta[CHAIN_META_KEY]`` / ``node.meta[QUANT_META_KEY]``). Each

    %x0    = call_function[bdia_fx.fixed_point.quantize](%stream_in, frac_bits)
    %chain = call_module[target=<container>](%x0, *side_inputs, ...)

becomes the standard chain x_{k+1} = x_k + h_k(x_k), one node per block,

    %blocks_0 = call_module[target=<container>.0](%stream_in, *block_0_side_inputs)
    %blocks_1 = call_module[target=<container>.1](%blocks_0, *block_1_side_inputs)  ...

and, with ``quantize=True``, a ``quantize`` node on the chain input and after every block
(x_0 = Q[x_in], x_{k+1} = Q[f_k(x_k)]). New nodes carry ``node.meta[REVERT_META_KEY] =
(container, index)`` (index ``None`` for quantize nodes).
"""

from __future__ import annotations

from torch import fx, nn

from bdia_fx.errors import ConversionError
from bdia_fx.fixed_point import quantize as quantize_fn
from bdia_fx.passes.rewrite import CHAIN_META_KEY, QUANT_META_KEY, graph_module, safe_name
from bdia_fx.report import ChainInfo

REVERT_META_KEY = "bdia_reverted"


def chain_nodes(graph: fx.Graph) -> list[fx.Node]:
    """The chain nodes the rewrite pass created, in graph order."""
    return [n for n in graph.nodes if CHAIN_META_KEY in n.meta]


def revert_chains(gm: fx.GraphModule, root: nn.Module, quantize: bool, frac_bits: int) -> fx.GraphModule:
    """A copy of ``gm``'s graph with every BDIA chain node replaced by its γ = 0 block chain.

    ``root`` supplies the block modules the new ``call_module`` nodes refer to. Raises
    :class:`ConversionError` if ``gm`` has no chain node (it was not made by the rewrite pass).
    """
    if not chain_nodes(gm.graph):
        raise ConversionError("the graph has no bdia_chain node: it was not produced by bdia_fx.convert", module="")
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        if QUANT_META_KEY in node.meta:
            env[node] = graph.node_copy(node, lambda n: env[n]) if quantize else env[node.args[0]]
        elif CHAIN_META_KEY in node.meta:
            env[node] = _emit_chain(graph, node.meta[CHAIN_META_KEY], env[node.args[0]], _sides_by_name(node, env),
                                    quantize, frac_bits)
        else:
            env[node] = graph.node_copy(node, lambda n: env[n])
    graph.lint()
    return graph_module(graph, "BDIARevertedGraph", root, gm)


def _sides_by_name(chain_node: fx.Node, env: dict[fx.Node, fx.Node]) -> dict[str, fx.Node]:
    chain: ChainInfo = chain_node.meta[CHAIN_META_KEY]
    return {side.node: env[arg] for side, arg in zip(chain.side_inputs, chain_node.args[1:])}


def _emit_chain(graph: fx.Graph, chain: ChainInfo, x: fx.Node, sides: dict[str, fx.Node], quantize: bool,
                frac_bits: int) -> fx.Node:
    for index, block in enumerate(chain.blocks):
        x = graph.call_module(block.path, (x, *(sides[s.node] for s in block.side_inputs)))
        x.name = safe_name(block.path)
        x.meta[REVERT_META_KEY] = (chain.container, index)
        if quantize:
            x = graph.call_function(quantize_fn, (x, frac_bits))
            x.name = f"quantize_{safe_name(block.path)}"
            x.meta[REVERT_META_KEY] = (chain.container, None)
    return x


def reverted_blocks(gm: fx.GraphModule) -> list[tuple[str, int, str]]:
    """``(container, index, block path)`` of every block node the reverse pass emitted."""
    return [(n.meta[REVERT_META_KEY][0], n.meta[REVERT_META_KEY][1], n.target) for n in gm.graph.nodes
            if n.meta.get(REVERT_META_KEY, (None, None))[1] is not None]
