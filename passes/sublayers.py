"""Sublayer pass: split one block's training graph at its residual adds into BDIA steps.

For ``BDIAConfig(granularity="sublayer")`` every residual add on a block's stream is its own
step: a pre-LN block ``y = x + attn(ln1(x)); z = y + mlp(ln2(y))`` becomes the two steps
``x -> y`` and ``y -> z``. Adds whose branches read the same stream value (a parallel-residual
block, ``x + attn(ln1(x)) + mlp(ln2(x))``) stay one step: only a branch that reads the previous
add's output starts a new step.

The input is the block's exported program (one call pattern, static shapes); the output is a
:class:`SublayerPlan` that runs each step's nodes on its own, binding the block's parameters by
name, so one plan serves any block with that graph. Refused, with the node named: a branch that
reads a stream value older than its step's input, and random ops whose results more than one
step read (they would be drawn twice).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.export.graph_signature import InputKind
from torch.utils._pytree import tree_flatten, tree_unflatten

from bdia_fx.errors import ConversionError
from bdia_fx.passes.capture import capture
from bdia_fx.passes.chains import _ADD_TARGETS, BLOCK_META_KEY, _find_skip_path, _is_random
from bdia_fx.report import ChainReport


@dataclass
class SublayerPlan:
    """A block graph cut into steps; step j maps its input stream value to ``boundaries[j]``."""

    graph_module: fx.GraphModule
    steps: list[list[fx.Node]]          # the nodes each step evaluates, in graph order
    inputs: list[fx.Node]               # the value each step reads as its stream input
    boundaries: list[fx.Node]           # the residual add that ends each step
    random: list[bool]                  # whether the step draws random numbers
    bindings: dict[fx.Node, Callable[[nn.Module, list[torch.Tensor]], Any]]  # placeholders

    def __len__(self) -> int:
        return len(self.steps)

    def run_step(self, j: int, block: nn.Module, tensors: list[torch.Tensor], stream: torch.Tensor) -> torch.Tensor:
        """Evaluate step ``j`` on ``stream`` with ``block``'s parameters and the call's tensors."""
        env: dict[fx.Node, Any] = {self.inputs[j]: stream}

        def value(node: fx.Node) -> Any:
            if node in env:
                return env[node]
            if node.op == "placeholder":
                env[node] = self.bindings[node](block, tensors)
            elif node.op == "get_attr":
                env[node] = operator.attrgetter(node.target)(self.graph_module)
            return env[node]

        for node in self.steps[j]:
            args = fx.node.map_arg(node.args, value)
            kwargs = fx.node.map_arg(node.kwargs, value)
            env[node] = node.target(*args, **kwargs)
        return env[self.boundaries[j]]


def _bindings(ep: torch.export.ExportedProgram, prefix: str, where: str) -> tuple[dict, list[fx.Node]]:
    """How each placeholder gets its value: a block parameter/buffer by name, or the i-th call tensor."""
    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder"]
    bindings: dict[fx.Node, Callable[[nn.Module, list[torch.Tensor]], Any]] = {}
    user: list[fx.Node] = []
    for node, spec in zip(placeholders, ep.graph_signature.input_specs):
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
            name = spec.target[len(prefix):] if spec.target.startswith(prefix) else spec.target
            bindings[node] = lambda block, tensors, _get=operator.attrgetter(name): _get(block)
        elif spec.kind == InputKind.CONSTANT_TENSOR:
            constant = ep.constants[spec.target]
            bindings[node] = lambda block, tensors, _c=constant: _c
        elif spec.kind == InputKind.USER_INPUT:
            index = len(user)
            user.append(node)
            bindings[node] = lambda block, tensors, _i=index: tensors[_i]
        else:
            raise ConversionError(f"sublayer split: unsupported graph input {spec.kind.name} '{node.name}'",
                                  module=where)
    return bindings, user


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
        raise ConversionError("sublayer split: block output is not x + h(x) through a path of adds", module=where)
    skip = list(reversed(hit[1]))  # forward order: adds (and identity casts) from the input to the output
    position = {stream_in: 0}  # stream values in order: the input, then each add (casts keep their input's)
    previous = stream_in
    for node in skip:
        position[node] = position[previous] + (node.target in _ADD_TARGETS)
        previous = node
    deps = _stream_positions(nodes, position)
    starts = [stream_in]
    previous_value = stream_in
    for add in (n for n in skip if n.target in _ADD_TARGETS):
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
            if owner.get(node, j) != j and (deps[node] or _is_random(node)):
                raise ConversionError(
                    f"sublayer split: node '{node.name}' of sublayer {owner[node]} is read again by sublayer {j}; "
                    "use granularity='block'", module=where)
            found.add(node)
            stack.extend(node.all_input_nodes)
        for node in found:
            owner.setdefault(node, j)
        steps.append([n for n in nodes if n in found])
    return starts, boundaries, steps


def split_sublayers(ep: torch.export.ExportedProgram, stream_index: int, prefix: str, where: str) -> SublayerPlan:
    """Cut the block program ``ep`` (tensor inputs only, the stream the ``stream_index``-th; its
    one output the block's stream output) into one step per sequential residual add."""
    bindings, user = _bindings(ep, prefix, where)
    (out,) = next(n for n in ep.graph.nodes if n.op == "output").args[0]
    nodes = [n for n in ep.graph.nodes if n.op == "call_function"]
    starts, boundaries, steps = split_steps(nodes, user[stream_index], out, where)
    randoms = [any(_is_random(n) for n in step) for step in steps]
    return SublayerPlan(ep.graph_module, steps, starts, boundaries, randoms, bindings)


class _TensorCall(nn.Module):
    """A block call as a function of its tensor arguments only (the other leaves fixed), returning
    just the stream; it remembers the rest of the block's output structure for the runtime."""

    def __init__(self, block: nn.Module, original: type, leaves: list[Any], spec: Any,
                 output_slot: Callable[[list[Any], Any], int]):
        super().__init__()
        self.block = block
        self.original, self.leaves, self.spec, self.output_slot = original, leaves, spec, output_slot
        self.tensor_slots = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
        out: dict[str, Any] = {}

        def record(**found: Any) -> None:  # a closure: export restores the module's own attributes after tracing
            out.update(found)

        self.record, self.rebuild = record, lambda stream: _rebuild_output(out, stream)

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        leaves = list(self.leaves)
        for slot, tensor in zip(self.tensor_slots, tensors):
            leaves[slot] = tensor
        args, kwargs = tree_unflatten(leaves, self.spec)
        out_leaves, out_spec = tree_flatten(self.original.forward(self.block, *args, **kwargs))
        stream = self.output_slot(out_leaves, out_spec)
        # Other tensors the block returns (e.g. attention weights) are unused by the parent for this
        # call pattern (the chain pass refuses blocks with any other value leaving them): None stands in.
        self.record(index=stream, spec=out_spec,
                    leaves=[None if isinstance(v, torch.Tensor) else v for v in out_leaves])
        return out_leaves[stream]


def _rebuild_output(out: dict[str, Any], stream: torch.Tensor) -> Any:
    """The block's output structure (recorded while traced) around ``stream``."""
    leaves = list(out["leaves"])
    leaves[out["index"]] = stream
    return tree_unflatten(leaves, out["spec"])


def plan_block_call(block: nn.Module, original: type, leaves: list[Any], spec: Any, stream_leaf: int,
                    output_slot: Callable[[list[Any], Any], int],
                    where: str) -> tuple[SublayerPlan, Callable[[torch.Tensor], Any]]:
    """Export one block call (training mode, these shapes) and split it into sublayer steps.

    ``leaves``/``spec`` are the call's flattened ``(args, kwargs)`` with the stream at
    ``stream_leaf``; ``output_slot(leaves, spec)`` says which leaf of the block's flattened output
    is the stream. Returns the plan and a function giving the block's output around a stream.
    """
    call = _TensorCall(block, original, leaves, spec, output_slot)
    tensors = [leaves[i] for i in call.tensor_slots]
    with torch.random.fork_rng(devices=[]):  # tracing must not move the generator the training step uses
        ep = capture(call, tuple(tensors))
    call.leaves = None  # the plan keeps no tensor of this call
    plan = split_sublayers(ep, call.tensor_slots.index(stream_leaf), "block.", where)
    return plan, call.rebuild


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
            nodes = [n for n in ep.graph.nodes if n.meta.get(BLOCK_META_KEY) == (chain.container, index)]
            _, boundaries, _ = split_steps(nodes, by_name[block.stream_in], by_name[block.stream_out], block.path)
            ends[chain.container].append([n.name for n in boundaries])
    return ends
