"""Before/after pictures of the convert pass, drawn with torch.fx's graph drawer (graphviz).

Needs the ``viz`` extra (pydot) and graphviz's ``dot`` program on the PATH.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from torch import fx, nn

from bdia_fx.converted import state_of
from bdia_fx.errors import ConversionError
from bdia_fx.passes import BLOCK_META_KEY, CHAIN_META_KEY, QUANT_META_KEY, REVERT_META_KEY
from bdia_fx.passes.rewrite import safe_name
from bdia_fx.reversal import graph_of, revert

__all__ = ["BLOCK_COLOURS", "CHAIN_COLOUR", "OTHER_COLOUR", "QUANT_COLOUR", "SIDE_COLOUR", "block",
           "draw_conversion", "side_input_construction"]

CHAIN_COLOUR = "#f4a261"     # the BDIA chain node
QUANT_COLOUR = "#e9c46a"     # quantization nodes
BLOCK_COLOURS = ("#8ecae6", "#bde0fe")  # blocks, alternating so neighbours stay apart
OTHER_COLOUR = "#f2f2f2"     # everything the pass did not touch
SIDE_COLOUR = "#d9d9d9"      # the collapsed construction of side inputs (masks, position tables)


def draw_conversion(model: nn.Module, folder: str | Path, expand: bool = False) -> list[Path]:
    """Write ``before`` and ``after`` pictures (SVG and PNG) of a converted ``model`` into ``folder``.

    ``after`` is the rewritten graph (each chain one highlighted node fed by its quantize node).
    ``before`` is the reverted (γ = 0) graph with every block collapsed to one box, or, with
    ``expand``, every block's operations coloured by block. In both, the operations that only build
    side inputs are one grey box. Returns the written paths.
    """
    pydot = _require_graphviz()
    state = state_of(model)
    if state.graph is None:
        raise ConversionError("the converted model has not been called yet; pass example inputs to convert", module="")
    before = graph_of(revert(model))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, graph in (("before", before), ("after", state.graph)):
        dot = _dot(graph, name, pydot, collapse_blocks=not expand)
        for fmt in ("svg", "png"):
            path = folder / f"{name}.{fmt}"
            dot.write(str(path), format=fmt)
            written.append(path)
    return written


def _require_graphviz():
    try:
        import pydot
    except ImportError as error:
        raise ConversionError(f"drawing needs pydot: pip install \"bdia-fx[viz]\" ({error})") from error
    if shutil.which("dot") is None:
        raise ConversionError("drawing needs graphviz's 'dot' program on the PATH (e.g. apt-get install graphviz)")
    return pydot


def _dot(gm: fx.GraphModule, name: str, pydot, collapse_blocks: bool):
    from torch.fx.passes.graph_drawer import FxGraphDrawer

    graph = _without_unused_inputs(gm.graph)
    graph = _side_inputs_collapsed(_blocks_collapsed(graph) if collapse_blocks else graph)
    pruned = fx.GraphModule(gm, graph)
    dot = FxGraphDrawer(pruned, name, ignore_getattr=True, ignore_parameters_and_buffers=True).get_main_dot_graph()
    dot.set_rankdir("TB")
    for node in pruned.graph.nodes:
        colour = _highlight(node) or (SIDE_COLOUR if node.target is side_input_construction else OTHER_COLOUR)
        for drawn in dot.get_node(node.name) or dot.get_node(f'"{node.name}"'):
            drawn.set_fillcolor(colour)
            drawn.set_style("filled")
            if CHAIN_META_KEY in node.meta:
                drawn.set_penwidth("3")
    return dot


def _highlight(node: fx.Node) -> str | None:
    """The fill colour of a node the passes created or marked, else None."""
    if CHAIN_META_KEY in node.meta:
        return CHAIN_COLOUR
    if QUANT_META_KEY in node.meta or node.meta.get(REVERT_META_KEY, (None, 0))[1] is None:
        return QUANT_COLOUR
    mark = node.meta.get(BLOCK_META_KEY) or node.meta.get(REVERT_META_KEY)
    return BLOCK_COLOURS[mark[1] % 2] if mark is not None else None


def block(*inputs):
    """Stands in, in pictures, for all the operations of one block of a chain (never called)."""
    raise RuntimeError("a drawing placeholder")


def _blocks_collapsed(graph: fx.Graph) -> fx.Graph:
    """A copy of ``graph`` in which each block's operations (marked by the reverse pass) are one
    ``block`` node, named after the block and reading the block's inputs."""
    copy = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    boxes: dict[tuple, fx.Node] = {}
    groups: dict[tuple, list[fx.Node]] = {}
    for node in graph.nodes:
        mark = node.meta.get(REVERT_META_KEY)
        if mark is not None and mark[1] is not None:
            groups.setdefault(mark, []).append(node)
    for node in graph.nodes:
        mark = node.meta.get(REVERT_META_KEY)
        if mark is None or mark[1] is None:
            env[node] = copy.node_copy(node, lambda n: env[n])
            continue
        if mark not in boxes:
            members = set(groups[mark])
            inputs = [a for a in dict.fromkeys(a for n in groups[mark] for a in n.all_input_nodes if a not in members)
                      if a.op != "get_attr"]
            out = getattr(groups[mark][-1].meta.get("val"), "shape", None)
            inputs.sort(key=lambda a: getattr(a.meta.get("val"), "shape", None) != out)  # the stream first
            boxes[mark] = copy.call_function(block, tuple(env[a] for a in inputs))
            boxes[mark].name = f"{safe_name(mark[0])}_{mark[1]}"
            boxes[mark].meta[REVERT_META_KEY] = mark
        env[node] = boxes[mark]
    return copy


def side_input_construction(*inputs):
    """Stands in, in pictures, for the nodes that only build the chains' side inputs (never called)."""
    raise RuntimeError("a drawing placeholder")


def _side_inputs_collapsed(graph: fx.Graph) -> fx.Graph:
    """A copy of ``graph`` in which the operations that only build the side inputs of chain or block
    nodes (mask construction, position tables) are one ``side_input_construction`` node."""
    def chain_or_block(node: fx.Node) -> bool:  # a chain node or a collapsed block: argument 0 is the stream
        return CHAIN_META_KEY in node.meta or node.target is block

    carried: set[fx.Node] = set()  # what the output needs other than through chain/block side inputs
    stack = [n for n in graph.nodes if n.op == "output"]
    while stack:
        node = stack.pop()
        if node in carried:
            continue
        carried.add(node)
        stack.extend(node.args[:1] if chain_or_block(node) else node.all_input_nodes)
    builders = {n for n in graph.nodes if n.op == "call_function" and n not in carried}
    if len(builders) < 2:
        return graph
    order = {node: i for i, node in enumerate(graph.nodes)}
    sources = list(dict.fromkeys(a for n in graph.nodes if n in builders
                                 for a in n.all_input_nodes if a not in builders))
    ready = max((order[a] for a in sources), default=-1)  # the one node goes after its last input ...
    needed = min((order[u] for n in builders for u in n.users if u not in builders),
                 default=len(order))  # ... first use
    if ready >= needed:
        return graph
    copy = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    collapsed = None
    for node in graph.nodes:
        if collapsed is None and order[node] > ready and node not in builders:
            collapsed = copy.call_function(side_input_construction, tuple(env[a] for a in sources))
            collapsed.name = f"side_inputs_{len(builders)}_ops"
        if node in builders:
            continue
        env[node] = copy.node_copy(node, lambda n, _collapsed=collapsed: env[n] if n not in builders else _collapsed)
    return copy


def _without_unused_inputs(graph: fx.Graph) -> fx.Graph:
    """A copy of ``graph`` without placeholders nothing reads (e.g. the parameters of collapsed blocks)."""
    copy = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        if node.op == "placeholder" and not node.users:
            continue
        env[node] = copy.node_copy(node, lambda n: env[n])
    return copy
