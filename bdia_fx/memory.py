"""Measure the activation memory a training step keeps for backward."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def saved_activation_bytes(model: nn.Module, loss_fn: Callable[[], torch.Tensor]) -> int:
    """Bytes kept for backward by ``loss_fn()`` (a forward returning a loss), then run backward.

    Counts tensors autograd saves (``saved_tensors_hooks``, storages deduplicated, parameters
    excluded) plus the BDIA chain states a converted model keeps on its autograd Functions.
    """
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_ptrs:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    runtimes = []
    state = model.__dict__.get("_bdia_state")
    if state is not None:
        runtimes = list(state.runtimes.values())
        for runtime in runtimes:
            runtime.last_state_nbytes = 0
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    total = sum(storages.values()) + sum(r.last_state_nbytes for r in runtimes)
    loss.backward()
    return total
