"""``check_exactness``: one training step that compares every rebuilt x_k with its forward value, bit for bit."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from bdia_fx.convert import state_of
from bdia_fx.errors import ConversionError
from bdia_fx.memory import default_loss


@dataclass(frozen=True)
class BlockExactness:
    """How the backward rebuild of one block input compares with the forward: integer codes."""

    chain: str
    block: str
    elements: int
    mismatched: int   # codes that differ
    max_code_error: int


@dataclass(frozen=True)
class ExactnessReport:
    blocks: tuple[BlockExactness, ...]

    @property
    def exact(self) -> bool:
        return all(b.mismatched == 0 for b in self.blocks)

    def __str__(self) -> str:
        lines = [f"exactness: {'bit-exact' if self.exact else 'NOT exact'} over {len(self.blocks)} rebuilt block inputs"]
        lines += [f"  {b.block}: {b.mismatched} of {b.elements} codes differ (max |error| {b.max_code_error})"
                  for b in self.blocks if b.mismatched]
        return "\n".join(lines)


def check_exactness(model: nn.Module, example_inputs: tuple = (), example_kwargs: dict | None = None,
                    loss_fn: Callable[[Any], torch.Tensor] | None = None) -> ExactnessReport:
    """Run one reversible training step of a converted ``model`` and compare, on integer codes,
    every x_k its backward rebuilt with the x_k of its forward (SPEC §2: they must be equal).

    Parameter gradients of the step are accumulated as in any backward; zero them afterwards if
    the step should not count. ``loss_fn(output)`` defaults to the mean square of the first
    floating-point output.
    """
    state = state_of(model)
    if state.config.mode != "reversible":
        raise ConversionError("check_exactness needs BDIAConfig(mode='reversible')", module="")
    was_training = model.training
    model.train()
    if not state.runtimes:  # lazily converted: plan on this call
        model(*example_inputs, **dict(example_kwargs or {}))
    runtimes = list(state.runtimes.values())
    for runtime in runtimes:
        runtime.code_trace = {"forward": [], "backward": []}
    try:
        (loss_fn or default_loss)(model(*example_inputs, **dict(example_kwargs or {}))).backward()
        blocks = []
        for runtime in runtimes:
            forward, rebuilt = runtime.code_trace["forward"], runtime.code_trace["backward"]
            k_top = len(runtime.step_paths) - 2  # backward rebuilds x_{K-2} … x_0 (K steps: blocks or sublayers)
            for k, codes in zip(range(k_top, -1, -1), rebuilt):
                error = (codes.to(torch.int64) - forward[k].to(torch.int64)).abs()
                blocks.append(BlockExactness(runtime.container, runtime.step_paths[k], error.numel(),
                                             int((error != 0).sum()), int(error.max()) if error.numel() else 0))
    finally:
        for runtime in runtimes:
            runtime.code_trace = None
        model.train(was_training)
    return ExactnessReport(tuple(reversed(blocks)))
