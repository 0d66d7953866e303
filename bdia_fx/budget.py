"""``convert(model, ..., memory_budget=B)``: the fastest plan whose training step fits in B.

Note: [memory plans]. A plan gives every block of every chain a mode: *reversible* (the block's activations
are dropped and recomputed in backward; the chain keeps one side bit per element) or *kept* (its activations
stay for backward, as in the plain model: no recompute, and one code tensor of the stream instead of the side
bits, :class:`bdia_fx.run.chain_step.KeptUpdate`). The forward is the same BDIA forward in every plan, so the
gradients are those of ``BDIAConfig(mode="stored")`` bit for bit whatever the plan (tested), and ``revert`` and
the ONNX export do not depend on it. A budget at or above the plain model's peak plans nothing: the chains
then train (and evaluate) as the original model.

Plans keep the blocks that backward reaches first (the last blocks of the last chain, then down): their
activations are freed before any recompute runs, so each kept block adds its activations to the peak once,
and every kept block saves one recompute. Among those plans the estimated time falls with every kept block,
so the plan is the one keeping the most blocks whose estimated peak fits, a function of the budget and the
probes' byte counts only (deterministic, and never slower for more budget on the estimate).

The estimate comes from two probe steps on the example inputs, all blocks reversible and all kept, each cut
into phases (:mod:`bdia_fx.peak`). A phase belongs to a block (its forward, or its backward) or to the head
between the chains' forward and backward; a plan's peak is the largest of the phases whose block has the
probe's mode (the head: the reversible probe's), each corrected by the blocks alive then (those before it in
forward order; all at the head) whose mode differs: plus (reversible probe) or minus (kept probe) the bytes
keeping that block adds. A phase where the modes meet can hold a stream tensor more than either probe shows, so
:func:`bdia_fx.convert` measures the chosen plan's step and keeps one block fewer while it does not fit. Step
times come from timed steps of the plain model and both probes; each kept block saves its share of the
difference, split by the length of its backward phases.
"""

from __future__ import annotations

import logging
import math
import re
import statistics
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from bdia_fx.calls import describe_call
from bdia_fx.converted import ConvertedState
from bdia_fx.errors import ConversionError
from bdia_fx.memory import default_loss
from bdia_fx.module_tree import shallow_clone
from bdia_fx.peak import StepMemory, measure_step, preserved_training_state
from bdia_fx.report import text_table

__all__ = ["BlockMode", "FrontierPoint", "MemoryPlan", "Prober", "Probes", "apply_plan", "format_bytes", "parse_budget",
           "plan_memory"]

logger = logging.getLogger(__name__)

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_BUDGET = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")
_PROBED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {probe key: Probes}
Block = tuple[str, int]  # (chain, block index)


def parse_budget(value: Any) -> int | float:
    """A memory budget: bytes (a positive int, or a string such as ``"6GiB"``, ``"512 MB"``), or a float in
    (0, 1], a fraction of the plain model's peak. ValueError for anything else."""
    if isinstance(value, bool):
        raise ValueError(f"memory_budget must be bytes or a fraction, got {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"memory_budget must be a positive number of bytes, got {value}")
        return value
    if isinstance(value, float):
        if not 0 < value <= 1:  # NaN fails too
            raise ValueError(f"memory_budget as a float is a fraction of the plain model's peak, in (0, 1]; got "
                             f"{value!r} (give bytes as an int or a string such as '6GiB')")
        return value
    if isinstance(value, str):
        match = _BUDGET.match(value)
        unit = match.group(2).upper() if match else ""
        if match is None or unit not in _UNITS:
            raise ValueError(f"memory_budget {value!r} is not a size: write a number and a unit, e.g. '6GiB', "
                             f"'512MB', '1e9' as an int ({', '.join(u for u in _UNITS if u)})")
        nbytes = int(float(match.group(1)) * _UNITS[unit])
        if nbytes <= 0:
            raise ValueError(f"memory_budget {value!r} is zero bytes")
        return nbytes
    raise ValueError(f"memory_budget must be an int (bytes), a str such as '6GiB' or a float fraction in (0, 1], "
                     f"got {type(value).__name__}")


def format_bytes(n: float) -> str:
    """Bytes as KiB/MiB/GiB with three significant digits."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class BlockMode:
    """One block of a plan: its mode ("kept", "reversible", or "plain" when nothing is converted), the bytes
    keeping it adds to the peak and the seconds per step it saves (estimates)."""

    chain: str
    index: int
    path: str
    mode: str
    kept_bytes: int
    saved_seconds: float


@dataclass(frozen=True)
class FrontierPoint:
    """A plan of the family (``kept`` blocks kept, the last in backward order first; ``kept = None``: the
    plain model) and its estimated peak and step time."""

    kept: int | None
    peak: int
    seconds: float


@dataclass(frozen=True)
class Probes:
    """What plans are estimated from: the two probe steps' phases, the plain step's peak and the step times."""

    reversible: StepMemory
    kept: StepMemory
    plain_peak: int
    seconds: dict[str, float]  # "plain", "reversible", "kept": median step seconds

    @property
    def blocks(self) -> tuple[Block, ...]:
        return self.reversible.blocks

    def kept_bytes(self) -> dict[Block, int]:
        """What keeping a block adds: its retained bytes in the kept probe less those in the reversible one."""
        kept, reversible = _retained(self.kept), _retained(self.reversible)
        return {b: kept[b] - reversible[b] for b in self.blocks}

    def saved_seconds(self) -> dict[Block, float]:
        """What keeping a block saves: the probes' time difference, split by each block's backward phases."""
        def backward(memory: StepMemory) -> dict[Block, float]:
            spent = dict.fromkeys(self.blocks, 0.0)
            for phase in memory.phases:
                if phase.kind == "backward":
                    spent[phase.block] += phase.seconds
            return spent
        rev, kept = backward(self.reversible), backward(self.kept)
        shares = {b: max(rev[b] - kept[b], 0.0) for b in self.blocks}
        total = sum(shares.values())
        gain = max(self.seconds["reversible"] - self.seconds["kept"], 0.0)
        return {b: gain * (shares[b] / total if total > 0 else 1 / len(self.blocks)) for b in self.blocks}

    def estimate(self, kept: set[Block], extra: dict[Block, int]) -> tuple[int, str]:
        """The estimated peak of the plan keeping ``kept`` (Note: [memory plans]), and what takes it; ``extra``:
        :meth:`kept_bytes`."""
        order = {b: i for i, b in enumerate(self.blocks)}
        best, what = -1, ""
        for memory, keeps in ((self.reversible, False), (self.kept, True)):
            for phase in memory.phases:
                if phase.block is not None and (phase.block in kept) != keeps:
                    continue  # a block's phase is read from the probe with that block's mode
                if phase.block is None and keeps:
                    continue  # the head from the reversible probe (the kept one over-counts a few streams)
                alive = self.blocks if phase.block is None else self.blocks[:order[phase.block]]
                other = sum(extra[b] for b in alive if (b in kept) != keeps)
                peak = phase.peak + (-other if keeps else other)
                if peak > best:
                    best, what = peak, _phase_name(phase, keeps)
        return best, what


def _retained(memory: StepMemory) -> dict[Block, int]:
    """Bytes each block's forward leaves allocated: the allocation after its last forward phase less that
    before its first."""
    first: dict[Block, int] = {}
    after: dict[Block, int] = {}
    phases = memory.phases
    for i, phase in enumerate(phases):
        if phase.kind == "forward":
            first.setdefault(phase.block, phase.start)
            after[phase.block] = phases[i + 1].start if i + 1 < len(phases) else phase.start
    return {b: after[b] - first[b] for b in memory.blocks}


def _phase_name(phase: Any, kept: bool) -> str:
    if phase.block is None:
        return "the modules after the chains, the loss and their backward (with what the chains keep for backward)"
    chain, index = phase.block
    if phase.kind == "forward":
        return f"the forward of block {index} of chain '{chain}'"
    work = "its stored activations' backward" if kept else "its recompute and its backward"
    return f"the backward of block {index} of chain '{chain}' ({work})"


@dataclass(frozen=True)
class MemoryPlan:
    """The plan :func:`bdia_fx.convert` made for ``memory_budget`` (``print(plan)`` shows it): per block its
    mode, the estimated peak and step time, and the frontier of the plan family. Byte counts follow Note:
    [what a step's peak counts] in :mod:`bdia_fx.peak`, measured on the example inputs."""

    requested: int | float
    budget: int
    blocks: tuple[BlockMode, ...]
    peak: int            # the chosen plan's peak: measured on the example inputs (or estimated)
    estimated_peak: int  # the chosen plan's estimate (its frontier point)
    seconds: float
    peak_phase: str
    plain_peak: int
    smallest_peak: int
    frontier: tuple[FrontierPoint, ...]
    inputs: str

    @property
    def unconverted(self) -> bool:
        """Whether the budget fits the plain model: nothing is made reversible."""
        return all(b.mode == "plain" for b in self.blocks)

    @property
    def kept(self) -> int:
        return sum(b.mode == "kept" for b in self.blocks)

    def __str__(self) -> str:
        asked = f" ({self.requested:g} of the plain peak)" if isinstance(self.requested, float) else ""
        lines = [f"memory plan for a budget of {format_bytes(self.budget)}{asked}, probed on {self.inputs}:"]
        if self.unconverted:
            lines.append(f"  the budget fits the plain model's peak ({format_bytes(self.plain_peak)}): nothing is made "
                         "reversible, the chains train as the original model")
        else:
            lines.append(f"  {self.kept} of {len(self.blocks)} blocks kept, the others reversible: peak "
                         f"{format_bytes(self.peak)} measured (estimate {format_bytes(self.estimated_peak)}; plain "
                         f"{format_bytes(self.plain_peak)}, smallest {format_bytes(self.smallest_peak)}), step "
                         f"{self.seconds * 1e3:.1f} ms estimated; the peak is {self.peak_phase}")
        rows = [("block", "mode", "bytes if kept", "saves per step")]
        rows += [(b.path, b.mode, format_bytes(b.kept_bytes), f"{b.saved_seconds * 1e3:.2f} ms") for b in self.blocks]
        lines.extend("    " + line for line in text_table(rows))
        lines.append("  frontier (blocks kept, estimated peak, step):")
        for point in self.frontier:
            name = "plain model" if point.kept is None else f"{point.kept} kept"
            mark = " <- plan" if (point.kept is None) == self.unconverted and \
                (point.kept is None or point.kept == self.kept) else ""
            lines.append(f"    {name:>12}  {format_bytes(point.peak):>10}  {point.seconds * 1e3:8.1f} ms{mark}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"budget": self.budget, "requested": self.requested, "peak": self.peak,
                "estimated_peak": self.estimated_peak, "seconds": self.seconds,
                "peak_phase": self.peak_phase, "plain_peak": self.plain_peak, "smallest_peak": self.smallest_peak,
                "inputs": self.inputs, "unconverted": self.unconverted,
                "blocks": [vars(b) for b in self.blocks], "frontier": [vars(p) for p in self.frontier]}


class Prober:
    """Probe steps of one converted model on its example call: the plain model's (``model``, unconverted), and
    the converted model's under any plan. Each leaves nothing changed
    (:func:`bdia_fx.peak.preserved_training_state`)."""

    def __init__(self, model: nn.Module, converted: nn.Module, state: ConvertedState, args: tuple, kwargs: dict,
                 loss_fn: Callable[[Any], torch.Tensor] | None = None):
        self.model, self.converted, self.state = model, converted, state
        self.args, self.kwargs, self.loss_fn = args, kwargs, loss_fn
        self.plain = shallow_clone(model)
        self.device = _device_of(args, kwargs, model)

    def _step(self, net: nn.Module) -> Callable[[], torch.Tensor]:
        loss_of = self.loss_fn or default_loss
        return lambda: loss_of(net(*self.args, **self.kwargs))

    def _set(self, kept: set[Block]) -> None:
        for name, runtime in self.state.runtimes.items():
            runtime.keeps = [(name, i) in kept for i in range(len(runtime.blocks))]

    def measure(self, kept: set[Block], steps: int = 1) -> StepMemory:
        """The converted model's step keeping the blocks ``kept`` (the others reversible), measured; of ``steps``
        consecutive steps the one with the highest peak (FSDP2 over gloo frees some communication buffers
        asynchronously, so its steps' peaks vary by about one such buffer)."""
        with preserved_training_state(self.model), preserved_training_state(self.converted):
            self.converted.train()
            self._set(kept)
            try:
                found = [measure_step(self.converted, self._step(self.converted), self.device) for _ in range(steps)]
                return max(found, key=lambda memory: memory.peak)
            finally:
                self._set(set())

    def probes(self, repeats: int = 3) -> Probes:
        """The probes plans are estimated from (cached per model, call, config and loss)."""
        key = (describe_call(self.args, self.kwargs), self.state.config, self.loss_fn)
        cache = _PROBED.setdefault(self.model, {})
        if key not in cache:
            start = time.perf_counter()
            cache[key] = self._probe(repeats)
            logger.info("%s: probed %s for a memory plan in %.1f s", type(self.model).__name__,
                        describe_call(self.args, self.kwargs), time.perf_counter() - start)
        return cache[key]

    def _probe(self, repeats: int) -> Probes:
        every = {(name, i) for name, runtime in self.state.runtimes.items() for i in range(len(runtime.blocks))}
        reversible, kept = self.measure(set()), self.measure(every)
        with preserved_training_state(self.model), preserved_training_state(self.converted):
            self.plain.train()
            self.converted.train()
            plain = measure_step(self.plain, self._step(self.plain), self.device)
            times: dict[str, list[float]] = {"plain": [], "reversible": [], "kept": []}
            for _ in range(repeats):  # interleaved, so that the machine's drift falls on all three
                for name, net, keeps in (("plain", self.plain, None), ("reversible", self.converted, set()),
                                         ("kept", self.converted, every)):
                    if keeps is not None:
                        self._set(keeps)
                    times[name].append(_timed(self._step(net), self.device))
            self._set(set())
        return Probes(reversible, kept, plain.peak, {name: statistics.median(ts) for name, ts in times.items()})


def _timed(step: Callable[[], torch.Tensor], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step().backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _device_of(args: tuple, kwargs: dict, model: nn.Module) -> torch.device:
    for leaf in tree_flatten((args, kwargs))[0]:
        if isinstance(leaf, torch.Tensor):
            return leaf.device
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def plan_memory(probes: Probes, budget: int | float, paths: dict[Block, str], inputs: str,
                measure: Callable[[set[Block]], int] | None = None) -> MemoryPlan:
    """The plan for ``budget`` (bytes, or a fraction of the plain peak) from ``probes``: ConversionError when
    it is below the smallest peak any plan reaches, naming that peak and what takes it. With ``measure`` (the
    measured peak of a plan's step) the chosen plan is measured, and one keeping fewer blocks taken while the
    measurement exceeds the budget: the plan's peak is then a measurement on the example inputs."""
    nbytes = math.floor(budget * probes.plain_peak) if isinstance(budget, float) else budget
    extra, saved = probes.kept_bytes(), probes.saved_seconds()
    backward_order = list(reversed(probes.blocks))
    frontier, estimates = [], []
    for m in range(len(backward_order) + 1):
        kept = set(backward_order[:m])
        peak, what = probes.estimate(kept, extra)
        seconds = probes.seconds["reversible"] - sum(saved[b] for b in kept)
        estimates.append((peak, what))
        frontier.append(FrontierPoint(m, peak, seconds))
    frontier.append(FrontierPoint(None, probes.plain_peak, probes.seconds["plain"]))
    smallest = min(range(len(estimates)), key=lambda m: estimates[m][0])
    chosen: int | None = None
    peak = probes.plain_peak
    if not _agreed(nbytes >= probes.plain_peak):
        fitting = [m for m, (estimate, _) in enumerate(estimates) if estimate <= nbytes]
        if not _agreed(bool(fitting)):
            estimate, what = estimates[smallest]
            raise ConversionError(
                f"memory_budget {format_bytes(nbytes)} is below the smallest peak a training step of this model "
                f"reaches on the example inputs, {format_bytes(estimate)} ({estimate} bytes, every block "
                f"reversible), taken by {what}; the plain model's peak is {format_bytes(probes.plain_peak)}"
                + ("" if fitting else " (on this rank)"), module="")
        chosen = _agreed(max(fitting))
        peak = estimates[chosen][0]
        if measure is not None:
            peak = measure(set(backward_order[:chosen]))
            while not _agreed(peak <= nbytes) and chosen > smallest:
                chosen -= 1
                peak = measure(set(backward_order[:chosen]))
    kept = set() if chosen is None else set(backward_order[:chosen])
    blocks = tuple(BlockMode(chain, index, paths[(chain, index)],
                             "plain" if chosen is None else "kept" if (chain, index) in kept else "reversible",
                             extra[(chain, index)], saved[(chain, index)]) for chain, index in probes.blocks)
    point = frontier[-1] if chosen is None else frontier[chosen]
    what = "the plain model's step" if chosen is None else estimates[chosen][1]
    return MemoryPlan(budget, nbytes, blocks, peak, point.peak, point.seconds, what, probes.plain_peak,
                      estimates[smallest][0], tuple(frontier), inputs)


def _agreed(value: int) -> int:
    """The smallest ``value`` over the ranks of the default process group (the value itself in one process):
    every rank takes the same plan, so their probe steps and collectives stay in step; each budget is per rank."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return int(value)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" else "cpu"
    found = torch.tensor([int(value)], device=device)
    torch.distributed.all_reduce(found, op=torch.distributed.ReduceOp.MIN)
    return int(found.item())


def apply_plan(state: ConvertedState, plan: MemoryPlan) -> None:
    """Set every chain's block modes to ``plan``'s."""
    modes = {(b.chain, b.index): b.mode for b in plan.blocks}
    for name, runtime in state.runtimes.items():
        runtime.keeps = [modes.get((name, i)) == "kept" for i in range(len(runtime.blocks))]
        runtime.unconverted = plan.unconverted
    if plan.unconverted:
        logger.info("memory_budget %s fits the plain model's peak %s: nothing is made reversible",
                    format_bytes(plan.budget), format_bytes(plan.plain_peak))
    else:
        logger.info("memory plan: %d of %d blocks kept, estimated peak %s for a budget of %s", plan.kept,
                    len(plan.blocks), format_bytes(plan.peak), format_bytes(plan.budget))
