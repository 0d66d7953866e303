"""Before/after pictures of the convert pass, drawn with torch.fx's graph drawer (graphviz).

Needs the ``viz`` extra (pydot) and graphviz's ``dot`` program on the PATH.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from torch import fx, nn

from bdia_fx.convert import state_of
from bdia_fx.errors import ConversionError
from bdia_fx.passes import BLOCK_META_KEY, CHAIN_META_KEY, QUANT_META_KEY, REVERT_META_KEY
from bdia_fx.revert import graph_of, revert

CHAIN_COLOUR = "#f4a261"     # the BDIA chain node
QUANT_COLOUR = "#e9c46a"     # quantization nodes
BLOCK_COLOURS = ("#8ecae6", "#bde0fe")  # blocks, alternating so neighbours stay apart
OTHER_COLOUR = "#f2f2f2"     # everything the pass did not touch


def draw_conversion(model: nn.Module, folder: str | Path, expand: bool = False) -> list[Path]:
    """Write ``before`` and ``after`` pictures (SVG and PNG) of a converted ``model`` into ``folder``.

    ``after`` is the rewritten graph (each chain one highlighted node fed by its quantize node).
    ``before`` is the original chain with every block collapsed to one box, or, with ``expand``,
    the whole captured graph with each block's nodes coloured. Returns the written paths.
    """
    pydot = _require_graphviz()
    state = state_of(model)
    if state.graph is None:
        raise ConversionError("the converted model has not been called yet; pass example inputs to convert", module="")
    before = state.captured if expand else graph_of(revert(model))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, graph in (("before", before), ("after", state.graph)):
        dot = _dot(graph, name, pydot)
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


def _dot(gm: fx.GraphModule, name: str, pydot):
    from torch.fx.passes.graph_drawer import FxGraphDrawer

    pruned = fx.GraphModule(gm, _without_unused_inputs(gm.graph))
    dot = FxGraphDrawer(pruned, name, ignore_getattr=True, ignore_parameters_and_buffers=True).get_main_dot_graph()
    dot.set_rankdir("TB")
    for node in pruned.graph.nodes:
        colour = _highlight(node) or OTHER_COLOUR
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


def _without_unused_inputs(graph: fx.Graph) -> fx.Graph:
    """A copy of ``graph`` without placeholders nothing reads (e.g. the parameters of collapsed blocks)."""
    copy = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        if node.op == "placeholder" and not node.users:
            continue
        env[node] = copy.node_copy(node, lambda n: env[n])
    return copy
