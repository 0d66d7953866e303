"""``check_exactness``: one training step that compares every rebuilt x_k with its forward value, bit for bit."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bdia_fx.converted import observing, state_of
from bdia_fx.errors import ReversibilityError
from bdia_fx.memory import default_loss
from bdia_fx.run.frame import ChainCall, ChainObserver

__all__ = ["BlockExactness", "ExactnessReport", "check_exactness"]


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
        lines = [f"exactness: {'bit-exact' if self.exact else 'NOT exact'} "
                 f"over the rebuilt chain states before {len(self.blocks)} steps"]
        lines += [f"  {b.block}: {b.mismatched} of {b.elements} codes differ (max |error| {b.max_code_error})"
                  for b in self.blocks if b.mismatched]
        return "\n".join(lines)


class _CodeTrace(ChainObserver):
    """The state codes before every chain step, made in forward and rebuilt in backward."""

    def __init__(self) -> None:
        self.calls: dict[ChainCall, tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]] = {}

    def state_codes(self, call: ChainCall, n: int, codes: torch.Tensor, rebuilt: bool) -> None:
        self.calls.setdefault(call, ({}, {}))[rebuilt][n] = codes.clone()

    def complete(self) -> bool:
        """Whether every chain call's walk down rebuilt the state before each of its steps."""
        return all(len(rebuilt) == len(call.steps) for call, (_, rebuilt) in self.calls.items())


def check_exactness(model: nn.Module, example_inputs: tuple = (), example_kwargs: dict | None = None,
                    loss_fn: Callable[[Any], torch.Tensor] | None = None) -> ExactnessReport:
    """Run one reversible training step of a converted ``model`` and compare, on integer codes,
    the chain state its backward rebuilt before every step with the state of its forward (they must
    be equal: ``docs/design.md``).

    Parameter gradients of the step are accumulated as in any backward; zero them afterwards if
    the step should not count. ``loss_fn(output)`` defaults to the mean square of the first
    floating-point output.
    """
    state = state_of(model)
    if state.config.mode != "reversible":
        raise ValueError("check_exactness needs a model converted with BDIAConfig(mode='reversible')")
    was_training = model.training
    model.train()
    try:
        if not state.runtimes:  # lazily converted: plan on this call
            model(*example_inputs, **dict(example_kwargs or {}))
        with observing(model, _CodeTrace()) as trace:
            try:
                (loss_fn or default_loss)(model(*example_inputs, **dict(example_kwargs or {}))).backward()
            except ReversibilityError:
                if not trace.complete():  # a guard stopped the walk: that is the answer, not a report
                    raise
                # the checksum check raises once every rebuilt input has been traced: report them
    finally:
        model.train(was_training)
    blocks = []
    for call, (forward, rebuilt) in trace.calls.items():
        for n in sorted(rebuilt):
            error = (rebuilt[n].to(torch.int64) - forward[n].to(torch.int64)).abs()
            blocks.append(BlockExactness(call.container, call.steps[n], error.numel(),
                                         int((error != 0).sum()), int(error.max()) if error.numel() else 0))
    return ExactnessReport(tuple(blocks))
