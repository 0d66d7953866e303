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
from bdia_fx.schemes import ChainScheme

__all__ = ["REVERT_META_KEY", "revert_chains"]

REVERT_META_KEY = "bdia_reverted"


def revert_chains(gm: fx.GraphModule, plan: ModelPlan, quantize: bool, frac_bits: int,
                  schemes: dict[str, ChainScheme]) -> fx.GraphModule:
    """A copy of the rewritten graph ``gm`` with every chain node replaced by its scheme's inference form.

    ``schemes``: container → the chain's scheme. The form is traced onto the graph with fx proxies, each
    block evaluation a fresh copy of the block's nodes and every Q a ``quantize`` node; a scheme whose
    unquantized form is the original model (BDIA at γ = 0) gives the captured graph back. Only forms on
    stream values can be traced (:meth:`~bdia_fx.schemes.ChainScheme.traceable_inference`).

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
            env[node.name] = _inference_form(graph, chain, {**env, **sides}, env[node.args[0].name],
                                             schemes[chain.container], quantize, frac_bits)
        else:
            env[node.name] = graph.node_copy(node, lambda n: env[n.name])
    graph.lint()
    return owned_graph_module(graph, "BDIARevertedGraph", gm)


class _TracedBlock:
    """A planned block as a map of graph values: every call copies the block's nodes onto the graph."""

    def __init__(self, graph: fx.Graph, tracer: fx.proxy.GraphAppendingTracer, chain: ChainPlan, index: int,
                 env: dict[str, fx.Node]):
        self.graph, self.tracer, self.chain, self.index, self.env = graph, tracer, chain, index, env

    def output(self, z: fx.Proxy) -> fx.Proxy:
        block = self.chain.blocks[self.index]
        inner = {**self.env, block.stream_in.name: z.node}
        for original in block.nodes:
            copied = self.graph.node_copy(original, lambda n: inner[n.name])
            copied.meta[REVERT_META_KEY] = (self.chain.container, self.index)
            inner[original.name] = copied
        return fx.Proxy(inner[block.stream_out.name], self.tracer)

    def increment(self, z: fx.Proxy) -> fx.Proxy:
        return self.output(z) - z


def _inference_form(graph: fx.Graph, chain: ChainPlan, env: dict[str, fx.Node], x: fx.Node, scheme: ChainScheme,
                    quantize: bool, frac_bits: int) -> fx.Node:
    """The scheme's inference form of ``chain`` on ``graph`` from stream ``x``."""
    tracer = fx.proxy.GraphAppendingTracer(graph)
    if quantize:  # the chain's input is quantized already (the rewrite's quantize node)
        labels = iter([safe_name(b.path) for b in chain.blocks])

        def q(value: fx.Proxy) -> fx.Proxy:
            return fx.Proxy(_quantized(graph, value.node, chain.container, frac_bits, next(labels)), tracer)
    else:
        q = None
    dtype = x.meta["val"].dtype if "val" in x.meta else None
    state = scheme.infer_start(fx.Proxy(x, tracer), frac_bits, None)
    for index in range(len(chain.blocks)):
        state = scheme.infer_step(index, state, _TracedBlock(graph, tracer, chain, index, env), frac_bits, q, dtype)
    return scheme.infer_stream(state, frac_bits, dtype).node


def _quantized(graph: fx.Graph, x: fx.Node, container: str, frac_bits: int, label: str) -> fx.Node:
    node = graph.call_function(quantize_fn, (x, frac_bits))
    node.name = f"quantize_{label}"
    node.meta[REVERT_META_KEY] = (container, None)
    return node
