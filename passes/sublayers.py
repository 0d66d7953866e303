"""Sublayer pass: split one block's training graph at its residual adds into BDIA steps.

For ``BDIAConfig(granularity="sublayer")`` every residual add on a block's stream is its own
step: a pre-LN block ``y = x + attn(ln1(x)); z = y + mlp(ln2(y))`` becomes the two steps
``x -> y`` and ``y -> z``. Adds whose branches read the same stream value (a parallel-residual
block, ``x + attn(ln1(x)) + mlp(ln2(x))``) stay one step: only a branch that reads the previous
add's output starts a new step.

This is the analysis: :func:`split_steps` finds the steps of a block's nodes and refuses, with the
node named, a branch that reads a stream value older than its step's input and random ops whose
results more than one step read (they would be drawn twice); :func:`check_sublayers` runs it on
every block of a captured model. The steps as callable graphs are made by :mod:`~bdia_fx.passes.plan`.
"""

from __future__ import annotations

import torch
from torch import fx

from bdia_fx.errors import ConversionError
from bdia_fx.passes.chains import BLOCK_META_KEY, _find_skip_path
from bdia_fx.passes.nodes import ADD_TARGETS, is_random
from bdia_fx.report import ChainReport

__all__ = ["check_sublayers", "split_steps"]


def _stream_positions(nodes: list[fx.Node], stream_values: dict[fx.Node, int]) -> dict[fx.Node, frozenset[int]]:
    """For each of ``nodes`` (in graph order), the positions of the stream values it depends on."""
    deps: dict[fx.Node, frozenset[int]] = {value: frozenset({p}) for value, p in stream_values.items()}
    for node in nodes:
        if node not in stream_values:
            deps[node] = frozenset().union(*(deps.get(arg, frozenset()) for arg in node.all_input_nodes))
    return deps


def split_steps(nodes: list[fx.Node], stream_in: fx.Node, out: fx.Node,
                where: str) -> tuple[list[fx.Node], list[fx.Node], list[list[fx.Node]]]:
    """Cut a block, given as its nodes in graph order, into sequential residual steps.

    Returns each step's stream input, the residual add that ends it, and the block nodes it
    evaluates (nodes outside the block are its inputs). Raises :class:`ConversionError` naming
    the node when a step would read a stream value older than its input.
    """
    members = set(nodes)
    hit = _find_skip_path(out, members, [stream_in], stream_in)
    if hit is None:
        raise ConversionError(f"sublayer split: block output '{out.name}' is not x + h(x) through a path of adds "
                              "(a post-LN block?), so it has no sublayer steps; use granularity='block'",
                              module=where, node=out.name)
    skip = list(reversed(hit[1]))  # forward order: adds (and identity casts) from the input to the output
    position = {stream_in: 0}  # stream values in order: the input, then each add (casts keep their input's)
    previous = stream_in
    for node in skip:
        position[node] = position[previous] + (node.target in ADD_TARGETS)
        previous = node
    deps = _stream_positions(nodes, position)
    starts = [stream_in]
    previous_value = stream_in
    for add in (n for n in skip if n.target in ADD_TARGETS):
        skip_arg = next(a for a in add.args[:2] if isinstance(a, fx.Node) and a in position)
        branch = [a for a in add.args[:2] if isinstance(a, fx.Node) and a is not skip_arg]
        reads = frozenset().union(*(deps.get(b, frozenset()) for b in branch))
        if previous_value is not starts[-1] and position[previous_value] in reads:
            starts.append(previous_value)  # this branch reads the previous add's output: a new step
        older = sorted(p for p in reads if p < position[starts[-1]])
        if older:
            raise ConversionError(
                f"sublayer split: the branch of residual add '{add.name}' reads stream value {older[0]} "
                f"of this block, older than its step's input; use granularity='block'", module=where)
        previous_value = add
    boundaries = starts[1:] + [out]
    steps: list[list[fx.Node]] = []
    owner: dict[fx.Node, int] = {}
    for j, (begin, end) in enumerate(zip(starts, boundaries)):
        found: set[fx.Node] = set()
        stack = [end]
        while stack:
            node = stack.pop()
            if node is begin or node in found or node not in members:
                continue
            if owner.get(node, j) != j and (deps[node] or is_random(node)):
                raise ConversionError(
                    f"sublayer split: node '{node.name}' of sublayer {owner[node]} is read again by sublayer {j}; "
                    "use granularity='block'", module=where)
            found.add(node)
            stack.extend(node.all_input_nodes)
        for node in found:
            owner.setdefault(node, j)
        steps.append([n for n in nodes if n in found])
    return starts, boundaries, steps


def check_sublayers(ep: torch.export.ExportedProgram, report: ChainReport) -> dict[str, list[list[str]]]:
    """Split every block of the chains found in the model graph ``ep`` (marked by the chain pass),
    raising :class:`ConversionError` where a block cannot be cut at its residual adds.

    Returns, per chain and block, the names of the residual add nodes that end its steps.
    """
    by_name = {n.name: n for n in ep.graph.nodes}
    ends: dict[str, list[list[str]]] = {}
    for chain in report.chains:
        ends[chain.container] = []
        for index, block in enumerate(chain.blocks):
            if block.branch:  # one residual add, in the parent: a step of its own
                ends[chain.container].append([block.stream_out])
                continue
            nodes = [n for n in ep.graph.nodes if n.meta.get(BLOCK_META_KEY) == (chain.container, index)]
            _, boundaries, _ = split_steps(nodes, by_name[block.stream_in], by_name[block.stream_out], block.path)
            ends[chain.container].append([n.name for n in boundaries])
    return ends
