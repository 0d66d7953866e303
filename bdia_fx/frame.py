"""One training call of a chain, from its first block's forward to the end of its backward.

Note: [the chain frame]. Like ``torch.utils.checkpoint``'s ``_CheckpointFrame``, a
:class:`ChainFrame` is made when a call starts (block 0's forward) and is owned by the autograd
graph afterwards: the chain's autograd nodes hold it, so it lives exactly as long as backward can
still reach the chain. It holds everything of one call and nothing of another: the γ draw, one
:class:`StepRecord` per step (its name and what its recompute depends on), the codes of the walk
down, and the :class:`Checks`. The long-lived :class:`~bdia_fx.runtime.ChainRuntime` holds only
the frame whose forward is running.

Note: [one host read per direction]. Range and checksum results stay on the device while the
chain runs; the host reads them once at the end of the chain's forward and once at the end of its
backward (an autograd engine callback, so a backward that stops early, e.g. ``autograd.grad`` of
one middle block, is checked too), and raises for the first problem in the order it happened,
naming the block. Everything after a failed step is discarded with the exception.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from bdia_fx import fixed_point as fp
from bdia_fx.errors import FixedPointRangeError, ReversibilityError
from bdia_fx.schemes import BDIA

if TYPE_CHECKING:
    from bdia_fx.observe import ChainObserver

_local = threading.local()


def is_recomputing() -> bool:
    """Whether a chain step is being recomputed in backward right now.

    Module hooks inside a converted block fire twice per training step, once in the forward and
    once in the backward's recompute (as with ``torch.utils.checkpoint``); a hook that collects
    statistics can skip the second call with ``if bdia_fx.is_recomputing(): return``.
    """
    return getattr(_local, "depth", 0) > 0


@contextlib.contextmanager
def recomputing() -> Iterator[None]:
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield
    finally:
        _local.depth -= 1


class GammaDraw:
    """γ = sign/2 per sample for every step of one chain call, drawn from one seed.

    Step k's signs come from a generator on the stream's device seeded with ``seed + k`` (no
    host-to-device copy); they are kept from the step's forward until its backward is done (B bytes
    per step, with the step's update coefficient), and a retained graph's second backward draws them
    again from the seed. The seed is drawn from
    torch's global (CPU) generator, and under ``torch.distributed`` offset by rank × 0x9E3779B9
    (the CPU generator reads the low 32 bits of a seed; this spreads ranks over them, far from the
    step offsets k), so that every rank of DDP or FSDP draws its own γ from the same global seed:
    ``torch.manual_seed`` reproduces. The signs of one seed differ between device types, as
    dropout masks do.
    """

    def __init__(self, gammas: tuple[float, ...], x: torch.Tensor, batch_dim: int):
        self.signs = tuple(int(2 * g) for g in gammas)
        self.device, self.dtype = x.device, x.dtype
        self.batch = x.shape[batch_dim]
        self.shape = [self.batch if d == batch_dim else 1 for d in range(x.dim())]
        self.seed = (int(torch.randint(2**62, ())) + _rank() * _RANK_STRIDE) % 2**62 if len(self.signs) > 1 else 0
        self._drawn: dict[int, torch.Tensor] = {}
        self._derived: dict[tuple, torch.Tensor] = {}  # γ and update coefficients of the drawn steps

    def sign(self, k: int) -> torch.Tensor:
        """Step k's signs (int8 ±1), shaped to broadcast over the stream."""
        if k not in self._drawn:
            if len(self.signs) > 1:
                device = self.device if self.device.type != "meta" else torch.device("cpu")
                generator = torch.Generator(device=device).manual_seed(self.seed + k)
                picks = torch.randint(2, (self.batch,), generator=generator, device=device, dtype=torch.int8)
                signs = picks.mul_(2 * self.signs[1]).add_(self.signs[0])  # index 0 -> signs[0], 1 -> signs[1]
            else:
                signs = torch.full((self.batch,), self.signs[0], dtype=torch.int8, device=self.device)
            self._drawn[k] = signs.to(self.device).view(self.shape)
        return self._drawn[k]

    def gamma(self, k: int) -> torch.Tensor:
        """Step k's γ in the stream dtype, shaped to broadcast over the stream."""
        if ("gamma", k) not in self._derived:
            self._derived["gamma", k] = fp.gamma_of(self.sign(k), self.dtype)
        return self._derived["gamma", k]

    def coefficient(self, k: int, frac_bits: int) -> torch.Tensor:
        """Step k's (1+γ)·2^l in the dtype codes are rounded in (see :func:`fixed_point.update_coefficient`)."""
        if ("coefficient", k) not in self._derived:
            self._derived["coefficient", k] = fp.update_coefficient(
                self.sign(k), frac_bits, fp.compute_dtype(self.dtype))
        return self._derived["coefficient", k]

    def release(self, k: int) -> None:
        """Step k is done backward: forget what was drawn for it."""
        self._drawn.pop(k, None)
        self._derived.pop(("gamma", k), None)
        self._derived.pop(("coefficient", k), None)

    def held_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self._drawn.values(), *self._derived.values()))


_RANK_STRIDE = 0x9E3779B9  # odd, 2^32 / golden ratio: ranks land far apart in a seed's low 32 bits


def _rank() -> int:
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return torch.distributed.get_rank() if distributed else 0


@dataclass
class StepRecord:
    """One step of a chain call (a block, or one sublayer of a block); what its recompute reads is
    kept by the step itself (:class:`~bdia_fx.guards.StepState`), which backward frees."""

    path: str
    random: bool
    x_requires_grad: bool = False


class Checks:
    """Range and checksum results of one chain call, kept on the device (see the note above)."""

    def __init__(self, enabled: bool, dtype: torch.dtype):
        self.enabled = enabled  # False on the meta device: no values to check
        self.dtype = dtype
        self.events: dict[str, list[tuple[str, int, torch.Tensor]]] = {"forward": [], "backward": []}
        self.sums: dict[int, torch.Tensor] = {}

    def record_range(self, direction: str, kind: str, k: int, stats: torch.Tensor) -> None:
        """The [min, max] of step ``k``'s ``kind`` codes: "stream" (k = -1: entering the chain) or
        "update" (the rounded block term)."""
        if self.enabled:
            self.events[direction].append((kind, k, stats))

    def forward_sum(self, k: int, codes: torch.Tensor) -> None:
        if self.enabled:
            self.sums[k] = fp.checksum(codes)

    def backward_sum(self, k: int, codes: torch.Tensor) -> None:
        if self.enabled:
            self.events["backward"].append(("checksum", k, fp.checksum(codes) != self.sums[k]))

    def raise_first(self, direction: str, steps: list[StepRecord], frac_bits: int) -> None:
        """Read this direction's results (one host read) and raise for the first problem."""
        events, self.events[direction] = self.events[direction], []
        if not events:
            return
        rows = torch.stack([t.to(torch.float64) for _, _, t in events]).tolist()
        for (kind, k, _), (a, b) in zip(events, rows):
            where = steps[max(k, 0)].path
            if kind == "checksum":
                if a or b:
                    raise ReversibilityError(
                        "backward recompute of this block differs from its forward (checksum of its update codes): "
                        "the block is not deterministic (randomness torch.utils.checkpoint does not replay, such "
                        "as Python's random, numpy or a private torch.Generator; a non-deterministic kernel) or its "
                        "state changed in a way no version counter shows (an edit through .data)", module=where)
                continue
            problem = fp.range_problem(a, b, frac_bits, self.dtype if kind == "stream" else None)
            if problem is not None:
                if k < 0:
                    problem = "the stream entering the chain: " + problem
                elif direction == "backward":
                    problem = "in the backward recompute: " + problem
                raise FixedPointRangeError(problem, module=where)


class ChainFrame:
    """One training call of a chain (see the note at the top of this module)."""

    def __init__(self, container: str, x: torch.Tensor, config, batch_dim: int,
                 observers: tuple[ChainObserver, ...]):
        self.container = container
        self.scheme = BDIA  # its step math (bdia_fx.schemes: the scheme interface)
        self.frac_bits = config.frac_bits
        self.dtype = x.dtype
        self.autograd = torch.is_grad_enabled()  # no backward can follow otherwise
        self.reversible = config.mode == "reversible" and self.autograd
        self.verify = config.verify and self.reversible
        self.gammas = GammaDraw(config.gammas, x, batch_dim)
        self.checks = Checks(enabled=x.device.type != "meta", dtype=x.dtype)
        self.observers = observers
        self.steps: list[StepRecord] = []
        # forward: the codes of x_{k-1} and x_k, the float x_{k-1} and x_k, the codes of Q[v_k] just made
        self.below: torch.Tensor | None = None
        self.top: torch.Tensor | None = None
        self.prev: torch.Tensor | None = None
        self.stream: torch.Tensor | None = None
        self.branch_io: tuple | None = None  # branch chains: (returned, passed in, version of returned)
        self.update: torch.Tensor | None = None
        self.rebuild = None  # the running block's output structure around its stream
        self.next_block = 0
        self.out: torch.Tensor | None = None  # the stream value last handed to the parent (block k's output)
        self.out_version: int | None = None
        # backward: codes of x_j on the walk down, side bits and g_{k+1} per step
        self.codes: dict[int, torch.Tensor] = {}
        self.bits: dict[int, torch.Tensor] = {}
        self.grads: dict[int, torch.Tensor] = {}

    # ---------------------------------------------------------------- forward
    def enter(self, x: torch.Tensor) -> torch.Tensor:
        """x_0 = Q[x_in]: its codes start the chain."""
        self.top, stats = fp.to_codes(x, self.frac_bits)
        self.checks.record_range("forward", "stream", -1, stats)
        for observer in self.observers:
            observer.stream_codes(self, 0, self.top, rebuilt=False)
        return fp.from_codes(self.top, self.frac_bits, self.dtype)

    def make_update(self, k: int, f: torch.Tensor, x_codes: torch.Tensor, direction: str) -> torch.Tensor:
        """Codes of Q[v_k] from the step's output ``f`` and the codes of its input."""
        if k == 0:
            b, stats = self.scheme.update(f, None, None, 2.0**self.frac_bits)
        else:
            b, stats = self.scheme.update(f, x_codes, self.gammas.sign(k), self.gammas.coefficient(k, self.frac_bits))
        if self.verify:  # a recompute that differs is named before its consequences (its range)
            (self.checks.forward_sum if direction == "forward" else self.checks.backward_sum)(k, b)
        self.checks.record_range(direction, "update", k, stats)
        return b

    def advance(self, k: int, b: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x_{k+1} codes from the update codes ``b`` and the tensors a reversible backward needs saved."""
        saved: list[torch.Tensor] = []
        if k == 0:
            new = b
        else:
            new = self.scheme.forward(self.below, b, self.gammas.sign(k))
            self.checks.record_range("forward", "stream", k, fp.value_range(new))
            if self.reversible:
                saved.append(self.scheme.side(self.below))
        self.below, self.top = self.top, new
        for observer in self.observers:
            observer.stream_codes(self, k + 1, new, rebuilt=False)
        return new, saved

    def finish_forward(self) -> None:
        """The chain's last block ran: read the forward checks and drop the forward state."""
        for observer in self.observers:
            observer.forward_finished(self)
        self.below = self.top = self.prev = self.stream = self.out = None
        self.checks.raise_first("forward", self.steps, self.frac_bits)

    # ---------------------------------------------------------------- backward
    def begin_backward(self, last: int, codes: list[torch.Tensor]) -> None:
        """The walk down starts at x_K, x_{K-1} (``last`` = K-1, the last step); the checks are read
        when this backward ends."""
        self.codes[last + 1], self.codes[last] = codes
        torch.autograd.Variable._execution_engine.queue_callback(self.finish_backward)

    def invert(self, k: int, b: torch.Tensor) -> None:
        """With step k recomputed (update codes ``b``), rebuild the codes of x_{k-1}."""
        above = self.codes.pop(k + 1)  # the walk needs x_{k+1} no longer
        if k == 0:
            self.codes.pop(0)
            return
        self.codes[k - 1] = self.scheme.inverse(above, b, self.gammas.sign(k), self.bits.pop(k))
        for observer in self.observers:
            observer.stream_codes(self, k - 1, self.codes[k - 1], rebuilt=True)

    def finish_backward(self) -> None:
        """The engine finished this backward: drop what a walk that stopped early left, read the checks."""
        self.codes.clear()
        self.bits.clear()
        self.grads.clear()
        self.checks.raise_first("backward", self.steps, self.frac_bits)

    # ---------------------------------------------------------------- measurement
    def unsaved_bytes(self) -> int:
        """Bytes the call keeps outside autograd's saved tensors: checkpoint's RNG states of random
        steps (reversible calls), the checksums, the γ signs and coefficients, and the 8-byte γ seed."""
        rng = torch.get_rng_state().numel() * sum(step.random for step in self.steps) if self.reversible else 0
        return rng + sum(s.numel() * s.element_size() for s in self.checks.sums.values()) + self.gammas.held_bytes() + 8
