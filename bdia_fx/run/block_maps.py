"""A chain step as a map of the stream (:class:`bdia_fx.schemes.BlockMap`): a block call, or a planned sublayer.

A :class:`StepSource` is what a chain keeps of one step between its forward and its backward: the
module, the call's non-tensor arguments and where its tensors go, never a tensor. :meth:`StepSource.bind`
puts tensors back (the forward's, or the backward's fresh copies) and gives the step's map:
``output(z)`` is the block's output stream F(z) (a residual block's z + h(z); for a branch module,
whose parent adds the stream, z + the module's output) and ``increment(z)`` is h(z). With
``params`` (under ``torch.compile``, where the backward takes a vector–Jacobian product with
``torch.func.vjp``) the module runs through ``torch.func.functional_call`` of an :class:`OriginalCall`,
so that those tensors are its parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from bdia_fx.calls import BlockCall, StreamSlots, split_output
from bdia_fx.errors import ConversionError
from bdia_fx.module_tree import original_class

__all__ = ["CallMap", "OriginalCall", "PlannedMap", "StepSource"]


class CallMap:
    """One block call as a map of the stream; remembers the output structure of its first call."""

    def __init__(self, source: StepSource, call: BlockCall, params: Sequence[torch.Tensor] | None):
        self.source, self.call, self.params = source, call, params
        self.rebuild: Callable[[torch.Tensor], Any] | None = None
        self.calls = 0  # how often the block ran (an update that never runs it needs no replay)

    def _run(self, z: torch.Tensor) -> torch.Tensor:
        source = self.source
        if source.pre is not None:  # h(z) = branch(pre(z))
            z = original_class(source.pre).forward(source.pre, z)
        args, kwargs = self.call.with_stream(z)
        if self.params is None:
            out = source.original.forward(source.block, *args, **kwargs)
        else:
            out = torch.func.functional_call(source.caller, dict(zip(source.param_names, self.params)), args, kwargs)
        stream, rebuild = split_output(out, source.slots, source.path)
        if self.rebuild is None:
            self.rebuild = rebuild
        self.calls += 1
        return stream

    def output(self, z: torch.Tensor) -> torch.Tensor:
        return z + self._run(z) if self.source.branch else self._run(z)

    def increment(self, z: torch.Tensor) -> torch.Tensor:
        return self._run(z) if self.source.branch else self._run(z) - z


class PlannedMap:
    """A planned sublayer step (:class:`bdia_fx.passes.plan.StepGraph`) as a map of the stream."""

    def __init__(self, source: StepSource, sides: list[torch.Tensor]):
        self.source, self.sides = source, sides
        self.rebuild = None
        self.calls = 0

    def output(self, z: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.source.graph(self.source.block, z, self.sides)

    def increment(self, z: torch.Tensor) -> torch.Tensor:
        return self.output(z) - z


class OriginalCall(nn.Module):
    """A chain block called as its original class: ``torch.func.functional_call`` of this module runs the
    block's own forward with other parameter tensors (``block.<name>``), never re-entering the chain."""

    def __init__(self, block: nn.Module, original: type):
        super().__init__()
        self.block, self.original = block, original

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.original.forward(self.block, *args, **kwargs)


class StepSource:
    """One chain step of one training call, without its tensors (see the module docstring)."""

    def __init__(self, block: nn.Module, original: type, path: str, slots: StreamSlots, branch: bool,
                 call: BlockCall | None = None, graph: Any = None, caller: OriginalCall | None = None,
                 param_names: Sequence[str] = (), pre: nn.Module | None = None):
        self.block, self.original, self.path, self.slots, self.branch = block, original, path, slots, branch
        self.pre = pre  # a branch's pre module: the stream passes through it first (its original forward)
        self.graph = graph  # a planned sublayer step, else None (the whole block call)
        self.caller = caller  # under compile: the block as its original class, for functional_call
        self.param_names = [f"block.{name}" for name in param_names]  # caller's names of the trained parameters
        if call is not None:
            self.positions = [i for i, leaf in enumerate(call.leaves) if isinstance(leaf, torch.Tensor)]
            self.skeleton = [None if i in self.positions else leaf for i, leaf in enumerate(call.leaves)]
            self.spec, self.stream_index = call.spec, call.stream_index

    def bind(self, sides: Sequence[torch.Tensor], params: Sequence[torch.Tensor] | None = None) -> CallMap | PlannedMap:
        """The step's map with these side inputs (and, under compile, parameters) in place."""
        if self.graph is not None:
            if params is not None:
                raise ConversionError("a planned sublayer step runs its captured graph, which cannot take other "
                                      "parameter tensors (it trains eagerly only)", module=self.path)
            return PlannedMap(self, list(sides))
        leaves = list(self.skeleton)
        for i, t in zip(self.positions, sides):
            leaves[i] = t
        return CallMap(self, BlockCall(leaves, self.spec, self.stream_index), params)
