"""Where the residual stream is in a block's call arguments and in its output.

A block call is flattened to pytree leaves ``tree_flatten((args, kwargs))``. Which leaf is the
stream is *observed* while the model is captured (:func:`recording_block_calls`): block k+1 receives,
as the very same tensor object, what block k returned. :func:`stream_slots` turns those records into
one :class:`StreamSlots` per block, keyed by call structure. Only a call structure no capture has
seen (a block called directly, outside a planned model call) falls back to the rule in
:func:`first_float_leaf`: the first floating-point tensor leaf.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import SUPPORTED_NODES, TreeSpec, keystr, tree_flatten, tree_flatten_with_path, tree_unflatten

from bdia_fx.errors import ConversionError

__all__ = ["BlockCall", "StreamSlots", "call_pattern", "describe_call", "describe_leaf", "example_args",
           "first_float_leaf", "leaf_name", "recording_block_calls", "split_call", "split_output", "stream_slots",
           "structure_of"]


def describe_leaf(value: Any, shapes: bool) -> Any:
    """What of a call leaf selects a capture or a plan: a tensor's dtype and rank (with ``shapes``:
    its shape and device), or a plain value; other objects by their type."""
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), value.dtype, value.device) if shapes else (value.dtype, value.dim())
    return value if isinstance(value, (int, float, bool, str, type(None))) else type(value).__name__


def structure_of(value: Any, leaf: Callable[[Any], Any] = lambda v: None if v is None else "*") -> Any:
    """A pytree's structure as nested tuples of plain values: containers (and registered pytree
    nodes) by type with their keys, leaves as ``leaf`` describes them. Hashable, picklable, and plain
    Python that ``torch.compile`` traces (a :class:`TreeSpec` does not hash under dynamo)."""
    if isinstance(value, (tuple, list)) and not isinstance(value, torch.Size):
        return type(value).__name__, tuple(structure_of(v, leaf) for v in value)
    if isinstance(value, dict):
        return type(value).__name__, tuple((k, structure_of(v, leaf)) for k, v in value.items())
    node = SUPPORTED_NODES.get(type(value))
    if node is not None and value is not None:
        children, _ = node.flatten_fn(value)
        return type(value).__qualname__, tuple(structure_of(v, leaf) for v in children)
    return leaf(value)


def call_pattern(args: tuple, kwargs: dict) -> Any:
    """A training call pattern: argument structure, tensor dtypes and ranks, plain values."""
    return structure_of((args, kwargs), lambda v: describe_leaf(v, shapes=False))


def describe_call(args: tuple, kwargs: dict) -> str:
    """A call for the log: ``(Tensor[2, 8] int64, labels=Tensor[2, 8] int64, use_cache=False)``."""
    def one(value: Any) -> str:
        if isinstance(value, torch.Tensor):
            return f"Tensor[{', '.join(str(s) for s in value.shape)}] {str(value.dtype).replace('torch.', '')}"
        return repr(value) if isinstance(value, (int, float, bool, str, type(None))) else type(value).__name__
    return "(" + ", ".join([one(a) for a in args] + [f"{k}={one(v)}" for k, v in kwargs.items()]) + ")"


def first_float_leaf(leaves: list[Any]) -> int | None:
    """The fallback rule: the index of the first floating-point tensor leaf, or None."""
    return next((i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor) and leaf.is_floating_point()),
                None)


@dataclass
class StreamSlots:
    """Where one block's stream is, per call structure: the input leaf and the output leaf."""

    inputs: dict[Any, int] = field(default_factory=dict)  # keyed by structure_of((args, kwargs))
    outputs: dict[Any, int] = field(default_factory=dict)  # keyed by structure_of(output)

    def input_slot(self, leaves: list[Any], structure: Any) -> int | None:
        slot = self.inputs.get(structure)
        return slot if slot is not None else first_float_leaf(leaves)

    def output_slot(self, leaves: list[Any], structure: Any) -> int | None:
        slot = self.outputs.get(structure)
        return slot if slot is not None else first_float_leaf(leaves)

    def merge(self, other: StreamSlots) -> None:
        self.inputs.update(other.inputs)
        self.outputs.update(other.outputs)

    def __setstate__(self, state: dict) -> None:
        """Pickles of bdia_fx 0.x before 2026-12 keyed the tables by serialized TreeSpecs (strings):
        those entries are dropped and observed again at the model's next capture."""
        self.inputs = {k: v for k, v in state["inputs"].items() if not isinstance(k, str)}
        self.outputs = {k: v for k, v in state["outputs"].items() if not isinstance(k, str)}


@dataclass
class BlockCall:
    """A block call's arguments with the stream leaf taken out (the call keeps no stream tensor)."""

    leaves: list[Any]
    spec: TreeSpec
    stream_index: int

    def with_stream(self, x: torch.Tensor) -> tuple[tuple, dict]:
        leaves = list(self.leaves)
        leaves[self.stream_index] = x
        return tree_unflatten(leaves, self.spec)

    def side_tensors(self) -> list[tuple[int, torch.Tensor]]:
        """The call's other tensors (masks, position tables, encoder states) with their leaf index."""
        return [(i, leaf) for i, leaf in enumerate(self.leaves) if isinstance(leaf, torch.Tensor)]

    def leaf_name(self, index: int) -> str:
        """A readable name of argument leaf ``index``: ``attention_mask``, ``position_embeddings[0]``, ``args[1]``."""
        return leaf_name(self.spec, len(self.leaves), index)

    def names(self) -> Callable[[int], str]:
        """:meth:`leaf_name` as a function that holds none of the call's values."""
        return functools.partial(leaf_name, self.spec, len(self.leaves))


def leaf_name(spec: TreeSpec, count: int, index: int) -> str:
    """The readable name of leaf ``index`` of a call structure ``spec`` with ``count`` leaves."""
    paths = tree_flatten_with_path(tree_unflatten(list(range(count)), spec))[0]
    text = keystr(paths[index][0])
    if text.startswith("[0]"):
        return "args" + text[3:]
    name, _, rest = text[len("[1]['"):].partition("']")
    return name + rest


def split_call(args: tuple, kwargs: dict, slots: StreamSlots, where: str) -> tuple[torch.Tensor, BlockCall]:
    """The stream of a block call and the rest of the call."""
    leaves, spec = tree_flatten((args, kwargs))
    index = slots.input_slot(leaves, structure_of((args, kwargs)))
    if index is None or not (isinstance(leaves[index], torch.Tensor) and leaves[index].is_floating_point()):
        raise ConversionError("block was called without a floating-point tensor (the residual stream)", module=where)
    stream = leaves[index]
    leaves[index] = None
    return stream, BlockCall(leaves, spec, index)


def split_output(out: Any, slots: StreamSlots, where: str) -> tuple[torch.Tensor, Callable[[torch.Tensor], Any]]:
    """The stream a block returned, and a function putting another stream in its place."""
    leaves, spec = tree_flatten(out)
    index = slots.output_slot(leaves, structure_of(out))
    if index is None or not isinstance(leaves[index], torch.Tensor):
        raise ConversionError("block returned no floating-point tensor (the residual stream)", module=where)

    def rebuild(x: torch.Tensor) -> Any:
        new = list(leaves)
        new[index] = x
        return tree_unflatten(new, spec)

    return leaves[index], rebuild


@dataclass
class _Recorded:
    leaves: list[Any]
    structure: Any
    out_leaves: list[Any] | None = None
    out_structure: Any = None


@contextlib.contextmanager
def recording_block_calls(model: nn.Module) -> Iterator[dict[str, list[_Recorded]]]:
    """Record the flattened arguments and outputs of every call of a numbered child module
    (``layers.3``, ``h.0``: the candidates for blocks) while the body runs, e.g. a capture."""
    calls: dict[str, list[_Recorded]] = {}
    handles = []

    def before(path: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        calls.setdefault(path, []).append(_Recorded(tree_flatten((args, kwargs))[0], structure_of((args, kwargs))))

    def after(path: str, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        record = calls[path][-1]
        record.out_leaves, record.out_structure = tree_flatten(out)[0], structure_of(out)

    for path, module in model.named_modules():
        if path.rpartition(".")[2].isdigit():
            handles.append(module.register_forward_pre_hook(
                lambda m, a, k, _p=path: before(_p, m, a, k), with_kwargs=True))
            handles.append(module.register_forward_hook(
                lambda m, a, k, o, _p=path: after(_p, m, a, k, o), with_kwargs=True))
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def _handover(here: _Recorded, there: _Recorded) -> list[tuple[int, int]]:
    """(output leaf, input leaf) pairs where block k hands block k+1 a floating-point tensor it made
    (a value it only passes through, received as an argument, is not the stream)."""
    received = {id(leaf) for leaf in here.leaves if isinstance(leaf, torch.Tensor)}
    return [(j, i) for j, out in enumerate(here.out_leaves)
            if isinstance(out, torch.Tensor) and out.is_floating_point() and id(out) not in received
            for i, arg in enumerate(there.leaves) if arg is out]


def stream_slots(paths: tuple[str, ...], calls: dict[str, list[_Recorded]]) -> list[StreamSlots]:
    """Each block's stream slots from one recorded call of the chain ``paths`` (in chain order).

    Block k's output slot and block k+1's input slot are where one tensor object passes between
    them; the first block's input and the last block's output take the slot of their neighbour when
    the call structure is the same. Raises :class:`ConversionError` if no single tensor passes.
    """
    records = [calls[p][0] if calls.get(p) else None for p in paths]
    slots = [StreamSlots() for _ in paths]
    for k in range(len(paths) - 1):
        here, there = records[k], records[k + 1]
        if here is None or there is None or here.out_leaves is None:
            continue
        pairs = _handover(here, there)
        if len(pairs) != 1:
            raise ConversionError(
                f"cannot tell which argument of '{paths[k + 1]}' is the residual stream: "
                f"{len(pairs)} floating-point tensors made by '{paths[k]}' pass to it (need exactly one)",
                module=paths[k + 1])
        out_slot, in_slot = pairs[0]
        slots[k].outputs[here.out_structure] = out_slot
        slots[k + 1].inputs[there.structure] = in_slot
    if (len(paths) > 1 and records[0] is not None and records[1] is not None
            and records[0].structure == records[1].structure):
        slots[0].inputs.update(slots[1].inputs)
    last, before_last = records[-1], records[-2] if len(paths) > 1 else None
    if (last is not None and before_last is not None and last.out_leaves is not None
            and last.out_structure == before_last.out_structure):
        slots[-1].outputs.update(slots[-2].outputs)
    return slots


def example_args(example_inputs: Any) -> tuple:
    """Example positional arguments as a tuple (a bare tensor is one argument)."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError(f"example_inputs must be a tuple of positional arguments (or one tensor), "
                    f"got {type(example_inputs).__name__}")
