"""Rewrite pass: each planned chain becomes one BDIA chain node fed by its quantization node.

From the plan's captured graph (parameters as get_attr), every chain's blocks are replaced by

    %bdia_quantize_<chain> = call_function[bdia_fx.fixed_point.quantize_ste](%stream_in, frac_bits)
    %bdia_chain_<chain>    = call_module[bdia_chain_<chain>](%bdia_quantize_<chain>, *side_inputs)

with ``node.meta[CHAIN_META_KEY]`` holding the :class:`~bdia_fx.report.ChainInfo`. The chain
node's module is given by the caller (the runtime's ``BDIAChain``, which runs the chain's planned
steps), so the result is a runnable training graph of the captured call: same inputs, same output
structure, the model's own parameters.
"""

from __future__ import annotations

from torch import fx, nn

from bdia_fx.fixed_point import quantize_ste
from bdia_fx.passes.chains import BLOCK_META_KEY
from bdia_fx.passes.plan import ModelPlan, copy_graph, owned_graph_module

__all__ = ["CHAIN_META_KEY", "QUANT_META_KEY", "chain_module_name", "rewrite_chains", "safe_name"]

CHAIN_META_KEY = "bdia_chain"
QUANT_META_KEY = "bdia_quantize"


def chain_module_name(container: str) -> str:
    """The attribute name of a chain's module in the rewritten graph."""
    return f"bdia_chain_{safe_name(container)}"


def rewrite_chains(plan: ModelPlan, chain_modules: dict[str, nn.Module], frac_bits: int) -> fx.GraphModule:
    """A copy of the plan's captured graph with every chain replaced by quantize + chain nodes;
    ``chain_modules`` maps each chain's container path to the module its node calls."""
    source = plan.graph_module
    ending = {chain.blocks[-1].stream_out: chain for chain in plan.chains}
    planned = {chain.container for chain in plan.chains}
    graph = copy_graph(source.graph)
    env: dict[fx.Node, fx.Node] = {}
    for node in source.graph.nodes:
        mark = node.meta.get(BLOCK_META_KEY)
        if mark is None or mark[0] not in planned:
            env[node] = graph.node_copy(node, lambda n: env[n])
            continue
        chain = ending.get(node)
        if chain is None:
            continue  # block internals vanish; the chain node is emitted at the chain's output
        x0 = graph.call_function(quantize_ste, (env[chain.blocks[0].stream_in], frac_bits))
        x0.name = f"bdia_quantize_{safe_name(chain.container)}"
        x0.meta[QUANT_META_KEY] = chain.container
        out = graph.call_module(chain_module_name(chain.container), (x0, *(env[s] for s in chain.side_inputs)))
        out.name = chain_module_name(chain.container)
        out.meta[CHAIN_META_KEY] = chain.info
        if "val" in node.meta:
            out.meta["val"] = node.meta["val"]
        env[node] = out
    graph.lint()
    holder = nn.ModuleDict({chain_module_name(c): module for c, module in chain_modules.items()})
    return owned_graph_module(graph, "BDIARewrittenGraph", holder, source)


def safe_name(path: str) -> str:
    """A module path as a node-name fragment (dots become underscores)."""
    return path.replace(".", "_") or "root"
