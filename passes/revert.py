"""Reverse pass: turn the rewritten graph's BDIA chain nodes back into the γ = 0 block chain.

It is the inverse of :func:`bdia_fx.passes.rewrite.rewrite_chains` and touches only the nodes
that pass created (found by ``node.meta[CHAIN_META_KEY]`` / ``node.meta[QUANT_META_KEY]``). From
the same plan, each chain node becomes its blocks' own operations again, x_{k+1} = x_k + h_k(x_k)
— the captured graph as it was — and, with ``quantize=True``, a ``quantize`` node on the chain
input and after every block (x_0 = Q[x_in], x_{k+1} = Q[f_k(x_k)]). The result runs: same inputs,
same outputs, the model's own parameters. Copied block nodes carry ``node.meta[REVERT_META_KEY] =
(container, index)``; quantize nodes ``(container, None)``.
"""

from __future__ import annotations

from torch import fx

from bdia_fx.errors import ConversionError
from bdia_fx.fixed_point import quantize as quantize_fn
from bdia_fx.passes.plan import ChainPlan, ModelPlan, copy_graph, owned_graph_module
from bdia_fx.passes.rewrite import CHAIN_META_KEY, QUANT_META_KEY, safe_name
from bdia_fx.scheme_form import SchemeForm
from bdia_fx.schemes import Scheme

REVERT_META_KEY = "bdia_reverted"


def revert_chains(gm: fx.GraphModule, plan: ModelPlan, quantize: bool, frac_bits: int,
                  schemes: dict[str, Scheme] | None = None) -> fx.GraphModule:
    """A copy of the rewritten graph ``gm`` with every BDIA chain node replaced by its γ = 0 block chain.

    A chain in ``schemes`` (container → scheme, ``BDIAConfig(scheme=...)``) becomes the scheme's float
    inference form instead: its shears traced onto the graph, each vector-field evaluation a fresh copy
    of the block's nodes (the float form only: ``quantize`` must be False for such chains).

    Raises :class:`ConversionError` if ``gm`` has no chain node (it was not made by the rewrite pass).
    """
    chains = {chain.container: chain for chain in plan.chains}
    if not any(CHAIN_META_KEY in n.meta for n in gm.graph.nodes):
        raise ConversionError("the graph has no bdia_chain node: it was not produced by bdia_fx.convert", module="")
    graph = copy_graph(gm.graph)
    env: dict[str, fx.Node] = {}  # by name: the rewritten graph's untouched nodes keep the captured names
    for node in gm.graph.nodes:
        if QUANT_META_KEY in node.meta:
            x_in, container = env[node.args[0].name], node.meta[QUANT_META_KEY]
            env[node.name] = (_quantized(graph, x_in, container, frac_bits, f"x0_{safe_name(container)}")
                              if quantize else x_in)
        elif CHAIN_META_KEY in node.meta:
            chain = chains[node.meta[CHAIN_META_KEY].container]
            sides = {side.name: env[arg.name] for side, arg in zip(chain.side_inputs, node.args[1:])}
            x = env[node.args[0].name]
            if chain.container in (schemes or {}):
                env[node.name] = _scheme_form(graph, chain, {**env, **sides}, x, schemes[chain.container])
                continue
            for index, block in enumerate(chain.blocks):
                inner: dict[str, fx.Node] = {**env, **sides, block.stream_in.name: x}
                for original in block.nodes:
                    copied = graph.node_copy(original, lambda n, _inner=inner: _inner[n.name])
                    copied.meta[REVERT_META_KEY] = (chain.container, index)
                    inner[original.name] = copied
                x = inner[block.stream_out.name]
                if quantize:
                    x = _quantized(graph, x, chain.container, frac_bits, safe_name(block.path))
            env[node.name] = x
        else:
            env[node.name] = graph.node_copy(node, lambda n: env[n.name])
    graph.lint()
    return owned_graph_module(graph, "BDIARevertedGraph", gm)


def _scheme_form(graph: fx.Graph, chain: ChainPlan, env: dict[str, fx.Node], x: fx.Node, scheme: Scheme) -> fx.Node:
    """The scheme's float form of ``chain`` on ``graph`` from stream ``x`` (the shears traced with fx proxies)."""
    tracer = fx.proxy.GraphAppendingTracer(graph)

    def block_map(index: int):
        block = chain.blocks[index]

        def run(z: fx.Proxy) -> fx.Proxy:
            inner = {**env, block.stream_in.name: z.node}
            for original in block.nodes:
                copied = graph.node_copy(original, lambda n: inner[n.name])
                copied.meta[REVERT_META_KEY] = (chain.container, index)
                inner[original.name] = copied
            return fx.Proxy(inner[block.stream_out.name], tracer)
        return run

    form = SchemeForm(chain.container, scheme, 0, False, len(chain.blocks))
    z = fx.Proxy(x, tracer)
    for index, block in enumerate(chain.blocks):
        z = form.step(index, z, block_map(index), False, block.path)
    return z.node


def _quantized(graph: fx.Graph, x: fx.Node, container: str, frac_bits: int, label: str) -> fx.Node:
    node = graph.call_function(quantize_fn, (x, frac_bits))
    node.name = f"quantize_{label}"
    node.meta[REVERT_META_KEY] = (container, None)
    return node
