"""``check_exactness``: one training step that compares every rebuilt x_k with its forward value, bit for bit."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bdia_fx.conversion import state_of
from bdia_fx.errors import ReversibilityError
from bdia_fx.frame import ChainFrame
from bdia_fx.memory import default_loss
from bdia_fx.observe import ChainObserver, observing


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
                 f"over {len(self.blocks)} rebuilt block inputs"]
        lines += [f"  {b.block}: {b.mismatched} of {b.elements} codes differ (max |error| {b.max_code_error})"
                  for b in self.blocks if b.mismatched]
        return "\n".join(lines)


class _CodeTrace(ChainObserver):
    """The codes of every x_k a chain call made in forward and rebuilt in backward."""

    def __init__(self) -> None:
        self.calls: dict[ChainFrame, tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]] = {}

    def stream_codes(self, frame: ChainFrame, k: int, codes: torch.Tensor, rebuilt: bool) -> None:
        self.calls.setdefault(frame, ({}, {}))[rebuilt][k] = codes.clone()

    def complete(self) -> bool:
        """Whether every chain call's walk down rebuilt all its inputs, x_{K-2} … x_0."""
        return all(len(rebuilt) == len(frame.steps) - 1 for frame, (_, rebuilt) in self.calls.items())


def check_exactness(model: nn.Module, example_inputs: tuple = (), example_kwargs: dict | None = None,
                    loss_fn: Callable[[Any], torch.Tensor] | None = None) -> ExactnessReport:
    """Run one reversible training step of a converted ``model`` and compare, on integer codes,
    every x_k its backward rebuilt with the x_k of its forward (they must be equal:
    ``docs/design.md``).

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
    for frame, (forward, rebuilt) in trace.calls.items():
        for k in sorted(rebuilt):
            error = (rebuilt[k].to(torch.int64) - forward[k].to(torch.int64)).abs()
            blocks.append(BlockExactness(frame.container, frame.steps[k].path, error.numel(),
                                         int((error != 0).sum()), int(error.max()) if error.numel() else 0))
    return ExactnessReport(tuple(blocks))
