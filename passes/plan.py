"""The plan of a converted model: what the passes decided, built once from a capture.

The rewrite pass and the reverse pass read one :class:`ModelPlan`, and the chain runtime executes
its steps. A :class:`StepGraph` is one BDIA step as a function: a GraphModule of the step's
operations whose inputs are the parameters and buffers it reads (looked up by name on the block
module at every call, so a tensor FSDP swaps in, or a replaced parameter, is read as it is then),
the step's stream input, and the block's side inputs; it returns the step's output f(x). A block
is one step (``granularity="block"``) or one step per sequential residual add ("sublayer").
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from bdia_fx.calls import structure_of
from bdia_fx.errors import ConversionError
from bdia_fx.passes.capture import capture
from bdia_fx.passes.chains import BLOCK_META_KEY
from bdia_fx.passes.nodes import is_random
from bdia_fx.passes.sublayers import split_steps
from bdia_fx.report import ChainInfo, ChainReport

__all__ = ["BlockPlan", "ChainPlan", "ModelPlan", "StepGraph", "copy_graph", "owned_graph_module", "plan_block_call",
           "plan_model", "plan_steps"]


@dataclass
class StepGraph:
    """One BDIA step as a function of (parameters by name, stream, side inputs)."""

    graph_module: fx.GraphModule
    parameters: tuple[str, ...]   # names relative to the block module, bound at each call
    fixed: tuple[torch.Tensor, ...]  # tensors from outside the block (tied weights), held as they were planned
    random: bool
    end: str                      # the node that ends the step (the block output, or a residual add)

    def __call__(self, block: nn.Module, stream: torch.Tensor, sides: list[torch.Tensor]) -> torch.Tensor:
        bound = [operator.attrgetter(name)(block) for name in self.parameters]
        return self.graph_module(*bound, *self.fixed, stream, *sides)


@dataclass
class BlockPlan:
    """A block of a chain: its operations in the captured graph, its stream, side inputs and steps."""

    path: str
    nodes: list[fx.Node]
    stream_in: fx.Node
    stream_out: fx.Node
    side_inputs: list[fx.Node]
    steps: list[StepGraph]


@dataclass
class ChainPlan:
    """A chain: its blocks, and the side inputs of all of them (each once, in first-use order)."""

    info: ChainInfo
    blocks: list[BlockPlan]
    side_inputs: list[fx.Node] = field(default_factory=list)

    @property
    def container(self) -> str:
        return self.info.container

    def side_positions(self, block: BlockPlan) -> list[int]:
        """Where each of ``block``'s side inputs is among the chain's."""
        return [self.side_inputs.index(node) for node in block.side_inputs]


@dataclass
class ModelPlan:
    """Everything the passes decided about one captured call of a model."""

    graph_module: fx.GraphModule  # the captured graph, parameters as get_attr (torch.export's ep.module())
    report: ChainReport
    chains: list[ChainPlan]


def plan_model(graph_module: fx.GraphModule, report: ChainReport, granularity: str) -> ModelPlan:
    """The plan of a captured model whose block nodes the chain pass marked (``BLOCK_META_KEY``)."""
    by_name = {n.name: n for n in graph_module.graph.nodes}
    chains = []
    for info in report.chains:
        blocks = []
        for index, block in enumerate(info.blocks):
            nodes = [n for n in graph_module.graph.nodes if n.meta.get(BLOCK_META_KEY) == (info.container, index)]
            stream_in, stream_out = by_name[block.stream_in], by_name[block.stream_out]
            sides = [by_name[s.node] for s in block.side_inputs]
            steps = plan_steps(graph_module, nodes, stream_in, stream_out, sides, f"{block.owner or block.path}.",
                               "block" if block.branch else granularity, block.path)
            blocks.append(BlockPlan(block.path, nodes, stream_in, stream_out, sides, steps))
        chain_sides = list(dict.fromkeys(node for b in blocks for node in b.side_inputs))
        chains.append(ChainPlan(info, blocks, chain_sides))
    return ModelPlan(graph_module, report, chains)


def plan_steps(owner: fx.GraphModule, nodes: list[fx.Node], stream_in: fx.Node, out: fx.Node, sides: list[fx.Node],
               prefix: str, granularity: str, where: str) -> list[StepGraph]:
    """A block's steps: the whole block, or one per sequential residual add (``split_steps``).

    ``nodes`` are the block's operations in ``owner``'s graph (parameters as get_attr nodes whose
    targets start with ``prefix``), ``sides`` its other inputs.
    """
    if granularity == "block":
        starts, ends, groups = [stream_in], [out], [[n for n in nodes if n.op == "call_function"]]
    else:
        starts, ends, groups = split_steps([n for n in nodes if n.op == "call_function"], stream_in, out, where)
    return [_step_graph(owner, group, start, end, sides, prefix) for start, end, group in zip(starts, ends, groups)]


def _step_graph(owner: fx.GraphModule, group: list[fx.Node], start: fx.Node, end: fx.Node, sides: list[fx.Node],
                prefix: str) -> StepGraph:
    """The operations ``group`` (graph order) as a GraphModule of (parameters, fixed, stream, sides)."""
    tensors = _tensor_attributes(owner)
    members = set(group)
    reads = list(dict.fromkeys(arg for node in group for arg in node.all_input_nodes if arg not in members))
    attributes = [n for n in reads if n.op == "get_attr" and n.target in tensors]
    parameters = [n for n in attributes if n.target.startswith(prefix)]
    fixed = [n for n in attributes if not n.target.startswith(prefix)]
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in [*parameters, *fixed]:
        env[node] = graph.placeholder("p_" + node.target.replace(".", "_"))  # a valid name for any path
    env[start] = graph.placeholder("stream")
    for index, side in enumerate(sides):
        env[side] = graph.placeholder(f"side_{index}")
    for node in reads:  # the remaining inputs: captured sub-graphs of higher-order ops, constants
        if node not in env:
            if node.op != "get_attr":
                raise ConversionError(f"a step reads '{node.name}', which is neither its stream nor a side input",
                                      module=prefix.rstrip("."))
            env[node] = graph.get_attr(node.target)
    for node in group:
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(env[end])
    graph.lint()
    return StepGraph(owned_graph_module(graph, "BDIAStep", owner), tuple(n.target[len(prefix):] for n in parameters),
                     tuple(tensors[n.target] for n in fixed), any(is_random(n) for n in group), end.name)


def _tensor_attributes(owner: fx.GraphModule) -> dict[str, torch.Tensor]:
    """The parameters and buffers of ``owner`` by name (get_attr targets that are tensors of the model)."""
    return dict(owner.named_parameters(remove_duplicate=False)) | dict(owner.named_buffers(remove_duplicate=False))


def owned_graph_module(graph: fx.Graph, class_name: str, *roots: nn.Module) -> fx.GraphModule:
    """A GraphModule for ``graph`` whose ``call_module``/``get_attr`` targets are looked up in ``roots``
    in order (the same objects: parameters stay shared)."""
    owners: dict[str, Any] = {}
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr") and node.target not in owners:
            for root in roots:
                try:
                    owners[node.target] = operator.attrgetter(node.target)(root)
                    break
                except AttributeError:
                    continue
    module = fx.GraphModule(owners, graph, class_name=class_name)
    return module


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
        out = self.original.forward(self.block, *args, **kwargs)
        out_leaves, out_spec = tree_flatten(out)
        stream = self.output_slot(out_leaves, structure_of(out))
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
                    where: str) -> tuple[list[StepGraph], Callable[[torch.Tensor], Any]]:
    """The sublayer steps of one block call: export it (training mode, these shapes) and cut it at
    its residual adds.

    ``leaves``/``spec`` are the call's flattened ``(args, kwargs)`` with the stream at
    ``stream_leaf``; ``output_slot(leaves, spec)`` says which leaf of the block's flattened output
    is the stream. Returns the steps (side inputs: the call's other tensors, in order) and a
    function giving the block's output around a stream.
    """
    call = _TensorCall(block, original, leaves, spec, output_slot)
    tensors = [leaves[i] for i in call.tensor_slots]
    with torch.random.fork_rng(devices=[]):  # tracing must not move the generator the training step uses
        program = capture(call, tuple(tensors))
    call.leaves = None  # the plan keeps no tensor of this call
    module = program.module()
    inputs = [n for n in module.graph.nodes if n.op == "placeholder"]
    stream = inputs[call.tensor_slots.index(stream_leaf)]
    (out,) = next(n for n in module.graph.nodes if n.op == "output").args[0]
    steps = plan_steps(module, list(module.graph.nodes), stream, out, [n for n in inputs if n is not stream],
                       "block.", "sublayer", where)
    return steps, call.rebuild


def copy_graph(source: fx.Graph) -> fx.Graph:
    """An empty graph with ``source``'s code generator (pytree handling of inputs and outputs; it
    holds no state, so the two graphs share it)."""
    graph = fx.Graph()
    graph._codegen = source._codegen
    return graph
