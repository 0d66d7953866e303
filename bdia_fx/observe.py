"""One interface for measuring what chain calls do (exactness, memory), off the training hot path.

A :class:`ChainObserver` is attached to every chain of a converted model with :func:`observing`;
a chain call whose forward starts while it is attached reports to it, backward included (also a
backward run after the ``with`` block). With none attached the runtime calls nothing; calls traced
by ``torch.compile`` report nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from bdia_fx.frame import ChainCall
    from bdia_fx.runtime import ChainRuntime


class ChainObserver:
    """Receives the events of chain calls; every method is a no-op unless overridden."""

    def block_called(self, call: ChainCall, index: int, sides: list[tuple[int, torch.Tensor]]) -> None:
        """Block ``index`` of the chain starts a training step with these side inputs (by position)."""

    def state_codes(self, call: ChainCall, n: int, codes: torch.Tensor, rebuilt: bool) -> None:
        """The codes of every part of the chain's state before chain step n (stacked): made by the
        forward, or ``rebuilt`` by the backward's walk down."""

    def forward_finished(self, call: ChainCall) -> None:
        """The chain's forward ran its last step."""


def runtimes_of(model: nn.Module) -> list[ChainRuntime]:
    """The chain runtimes of a converted model (empty for any other model)."""
    from bdia_fx.conversion import converted_state

    state = converted_state(model)
    return list(state.runtimes.values()) if state is not None else []


@contextlib.contextmanager
def observing(model: nn.Module, observer: ChainObserver) -> Iterator[ChainObserver]:
    """Attach ``observer`` to every chain of ``model`` for the chain calls started in the body."""
    runtimes = runtimes_of(model)
    for runtime in runtimes:
        runtime.observers.append(observer)
    try:
        yield observer
    finally:
        for runtime in runtimes:
            runtime.observers.remove(observer)
