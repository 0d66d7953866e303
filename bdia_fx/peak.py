"""The memory one training step allocates over time, cut into the phases of its chain steps.

Note: [what a step's peak counts]. The peak of a step is the most memory allocated at any moment from the
start of its forward to the end of its backward, over what was allocated before: the model's parameters,
their gradient buffers (allocated before the step, as in a training loop after its first step: the
backward accumulates into them) and the inputs. It is read from the allocations torch's profiler records
(``profile_memory=True``: every allocation and free of the device's allocator, in bytes; on CUDA the
caching allocator's *allocated* bytes, what ``torch.cuda.max_memory_allocated`` counts), so the same step on
the same inputs gives the same number, byte for byte.

The step is cut at its chain updates (the profiler's ranges of the update Functions of
:mod:`bdia_fx.run.chain_step`): a forward phase ends with an update, so it holds its block's forward; the
*head* phase runs from the last update's forward to the first update's backward (the modules after the
chains, the loss, their backward); a backward phase starts with an update's backward, so it holds the
block's recompute (reversible) or its stored graph's backward (kept). :mod:`bdia_fx.budget` estimates the
peak of any plan from the phases of two probe steps.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bdia_fx.converted import observing
from bdia_fx.errors import ConversionError
from bdia_fx.run.frame import ChainObserver

__all__ = ["Phase", "StepMemory", "measure_step", "preserved_training_state"]

_UPDATES = ("UpdateStep", "KeptUpdate")
_BACKWARD = tuple(f"autograd::engine::evaluate_function: {name}Backward" for name in _UPDATES)


@dataclass(frozen=True)
class Phase:
    """A stretch of a training step: ``kind`` "forward", "head" or "backward"; ``block`` the (chain, block
    index) whose update it ends (forward) or starts (backward), None for the head; ``peak`` the most bytes
    allocated in it; ``start`` the bytes allocated when it began; ``seconds`` its length (under the profiler)."""

    kind: str
    block: tuple[str, int] | None
    peak: int
    start: int
    seconds: float


@dataclass(frozen=True)
class StepMemory:
    """One measured training step: its peak (Note: [what a step's peak counts]), its phases in time order,
    and the blocks in forward order (each (chain, block index) once)."""

    peak: int
    phases: tuple[Phase, ...]
    blocks: tuple[tuple[str, int], ...]


class _StepEnds(ChainObserver):
    """The block of every chain step, in forward order, and a profiler mark where each step ends."""

    def __init__(self) -> None:
        self.current: dict[str, int] = {}
        self.steps: list[tuple[str, int]] = []

    def block_called(self, call, index, sides) -> None:
        self.current[call.container] = index

    def state_codes(self, call, n, codes, rebuilt) -> None:
        if not rebuilt and n > 0:
            self.steps.append((call.container, self.current[call.container]))
            with torch.profiler.record_function("bdia_fx.step_end"):
                pass


def measure_step(model: nn.Module, step: Callable[[], torch.Tensor], device: torch.device) -> StepMemory:
    """Run ``step()`` (a training forward returning a loss) and its backward once under the memory profiler,
    and cut the allocations on ``device`` into phases. The caller keeps the model's state
    (:func:`preserved_training_state`)."""
    observer = _StepEnds()
    with observing(model, observer), _profiler() as prof:
        step().backward()
    events = prof.profiler.kineto_results.events()
    return _phases(events, observer.steps, device.type.upper())


def _phases(events: list, steps: list[tuple[str, int]], device_type: str) -> StepMemory:
    memory = sorted((e.start_ns(), e.nbytes()) for e in events
                    if e.name() == "[memory]" and e.device_type().name == device_type)
    forward = sorted(e.end_ns() for e in events if e.name() in _UPDATES)
    backward = sorted(e.start_ns() for e in events if e.name() in _BACKWARD)
    marks = sorted(e.start_ns() for e in events if e.name() == "bdia_fx.step_end")
    if len(backward) != len(forward):
        raise ConversionError(f"the probe step ran {len(forward)} chain updates forward but {len(backward)} backward: "
                              "a memory plan needs every chain's backward to run in the step", module="")
    owners = _owners(forward, marks, steps)
    cuts = [(t, "forward", block) for t, block in zip(forward, owners)]
    cuts += [(t, "backward", block) for t, block in zip(backward, reversed(owners))]
    cuts.sort(key=lambda cut: cut[0])
    first = min((t for t, _ in memory), default=0)
    bounds = [(first, "forward", owners[0] if owners else None)]
    for t, kind, block in cuts:  # a forward phase ends at its update; a backward phase starts at its own
        if kind == "forward":
            bounds[-1] = (bounds[-1][0], "forward", block)
            bounds.append((t, "head", None))
        else:
            bounds.append((t, "backward", block))
    last = max((t for t, _ in memory), default=0)
    phases, allocated, i = [], 0, 0
    for j, (start, kind, block) in enumerate(bounds):
        end = bounds[j + 1][0] if j + 1 < len(bounds) else last + 1
        at_start, peak = allocated, allocated
        while i < len(memory) and memory[i][0] < end:
            allocated += memory[i][1]
            peak = max(peak, allocated)
            i += 1
        phases.append(Phase(kind, block, peak, at_start, max(0, end - start) * 1e-9))
    blocks = tuple(dict.fromkeys(owners))
    return StepMemory(max((p.peak for p in phases), default=0), tuple(phases), blocks)


def _owners(forward: list[int], marks: list[int], steps: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """The block of each update: the step whose end mark is the first at or after the update's end."""
    if len(marks) != len(steps):
        raise ConversionError("the probe step's chain steps could not be matched to its blocks", module="")
    owners, j = [], 0
    for t in forward:
        while j < len(marks) and marks[j] < t:
            j += 1
        if j == len(marks):
            raise ConversionError("the probe step's chain updates could not be matched to its blocks", module="")
        owners.append(steps[j])
    return owners


@contextlib.contextmanager
def _profiler() -> Iterator[Any]:
    """torch's profiler recording allocations only (kineto's start and stop lines kept off stderr)."""
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():
        prof.start()
    try:
        yield prof
    finally:
        with _quiet_stderr():
            prof.stop()


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """The process's stderr (file descriptor 2) sent to /dev/null: kineto writes to it from C++."""
    try:
        saved = os.dup(2)
    except OSError:  # no stderr descriptor to silence
        yield
        return
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


@contextlib.contextmanager
def preserved_training_state(model: nn.Module) -> Iterator[None]:
    """Probe steps leave nothing behind: the parameters' gradients (each given a zeroed buffer for the step, as
    a training loop has after its first step), the buffers' values, the training flags and the random state."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad for p in params]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    flags = [(m, m.training) for m in model.modules()]
    for p, g in zip(params, grads):
        p.grad = torch.zeros_like(p) if g is None else g.detach().clone()
    devices = sorted({p.device.index for p in params if p.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        for p, g in zip(params, grads):
            p.grad = g
        with torch.no_grad():
            for b, value in buffers:
                b.copy_(value)
        for m, training in flags:
            m.training = training
