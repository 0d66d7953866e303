"""Stash and replay RNG and autocast state for a block's recompute.

Built on ``torch.utils.checkpoint``'s own helpers (``get_device_states`` /
``set_device_states`` and its autocast snapshot) and ``torch.random.fork_rng``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.utils.checkpoint as checkpoint


@dataclass
class RNGSnapshot:
    """The CPU generator state plus the states of the accelerator devices the inputs live on."""

    cpu_state: torch.Tensor
    devices: list[int]
    device_states: list[torch.Tensor]
    device_type: str

    def nbytes(self) -> int:
        return self.cpu_state.numel() + sum(s.numel() * s.element_size() for s in self.device_states)


def capture_rng(*tensors: torch.Tensor) -> RNGSnapshot:
    """Snapshot the RNG state a block is about to consume (contiguous clones, see SPEC §3)."""
    device_type = checkpoint._infer_device_type(*tensors)
    devices, states = checkpoint.get_device_states(*tensors)
    return RNGSnapshot(torch.get_rng_state().clone(), devices, [s.clone() for s in states], device_type)


@contextlib.contextmanager
def replay_rng(snapshot: RNGSnapshot | None) -> Iterator[None]:
    """Run the body with the snapshot's RNG state; the caller's RNG state is restored afterwards."""
    if snapshot is None:
        yield
        return
    with torch.random.fork_rng(devices=snapshot.devices, device_type=snapshot.device_type):
        torch.set_rng_state(snapshot.cpu_state)
        if snapshot.devices:
            checkpoint.set_device_states(snapshot.devices, snapshot.device_states, device_type=snapshot.device_type)
        yield


@dataclass
class AutocastState:
    """Autocast settings active in forward, re-entered for the recompute."""

    device_type: str
    device_kwargs: dict | None
    cpu_kwargs: dict

    @classmethod
    def capture(cls, device_type: str) -> "AutocastState":
        device_kwargs, cpu_kwargs = checkpoint._get_autocast_kwargs(device_type)
        return cls(device_type, device_kwargs, cpu_kwargs)

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            if self.device_kwargs is not None and self.device_type != "cpu":
                stack.enter_context(torch.autocast(self.device_type, **self.device_kwargs))
            stack.enter_context(torch.autocast("cpu", **self.cpu_kwargs))
            yield
