"""One training call of a chain, from its first block's forward to the end of its backward.

Note: [the chain call]. Like ``torch.utils.checkpoint``'s ``_CheckpointFrame``, a :class:`ChainCall`
is made when a call starts (block 0's forward); the chain's update Functions (:mod:`bdia_fx.run.chain_step`)
hold it afterwards, so it lives as long as backward can still reach the chain. It holds what one
call needs and nothing of another: the parts' values and codes while the forward runs, the γ seed,
the step names, the autocast state to replay, and the :class:`Checks`. What measures chain calls
(exactness, memory) is a :class:`ChainObserver` the call reports to, off the training hot path. The long-lived
:class:`~bdia_fx.run.runtime.ChainRuntime` holds only the call whose forward is running.

Note: [one host read per direction]. In eager code, range and checksum results stay on the device
while the chain runs; the host reads them once at the end of the chain's forward and once at the end
of its backward (an autograd engine callback, so a backward that stops early, e.g. ``autograd.grad``
of one middle block, is checked too), and raises for the first problem in the order it happened,
naming the block. Under ``torch.compile`` the same conditions are ``torch._assert_async`` checks in
the compiled graphs (forward and backward), each with the block's name in its message.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from bdia_fx import fixed_point as fp
from bdia_fx.errors import FixedPointRangeError, ReversibilityError
from bdia_fx.schemes import ChainScheme

if TYPE_CHECKING:
    from bdia_fx.config import BDIAConfig

__all__ = ["ChainCall", "ChainObserver", "Checks", "is_recomputing", "recomputing"]

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


def _rank() -> int:
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return torch.distributed.get_rank() if distributed else 0


class ChainObserver:
    """Receives the events of chain calls; every method is a no-op unless overridden."""

    def block_called(self, call: ChainCall, index: int, sides: list[tuple[int, torch.Tensor]]) -> None:
        """Block ``index`` of the chain starts a training step with these side inputs (by position)."""

    def state_codes(self, call: ChainCall, n: int, codes: torch.Tensor, rebuilt: bool) -> None:
        """The codes of every part of the chain's state before chain step n (stacked): made by the
        forward, or ``rebuilt`` by the backward's walk down."""

    def forward_finished(self, call: ChainCall) -> None:
        """The chain's forward ran its last step."""


class Checks:
    """Range and checksum results of one chain call, kept on the device (see the note above)."""

    def __init__(self, enabled: bool, dtype: torch.dtype, frac_bits: int, code_limit: int):
        self.enabled = enabled  # False on the meta device or under torch.compile
        self.dtype, self.frac_bits, self.code_limit = dtype, frac_bits, code_limit
        self.events: dict[str, list[tuple[str, str, tuple[torch.Tensor, ...]]]] = {"forward": [], "backward": []}

    def record(self, direction: str, kind: str, where: str, *tensors: torch.Tensor) -> None:
        """``kind``: "stream" (the [min, max] codes of a part), "update" (the [min, max] of a rounded
        increment, float), "checksum" (a bool: the recompute's codes differ) or "zero" (a bool: a part
        that must come back to zero did not)."""
        if self.enabled:
            self.events[direction].append((kind, where, tensors))

    def raise_first(self, direction: str) -> None:
        """Read this direction's results (one host read) and raise for the first problem."""
        events, self.events[direction] = self.events[direction], []
        if not events:
            return
        flat = torch.cat([t.reshape(-1).to(torch.float64) for _, _, ts in events for t in ts]).tolist()
        position = 0
        for kind, where, tensors in events:
            values = flat[position:position + sum(t.numel() for t in tensors)]
            position += len(values)
            if kind == "checksum":
                if any(values):
                    raise ReversibilityError(
                        "backward recompute of this block differs from its forward (checksum of its update codes): "
                        "the block is not deterministic (randomness torch.utils.checkpoint does not replay, such "
                        "as Python's random, numpy or a private torch.Generator; a non-deterministic kernel) or its "
                        "state changed in a way no version counter shows (an edit through .data)", module=where)
            elif kind == "zero":
                if any(values):
                    raise ReversibilityError(
                        "the backward did not return the scheme's extra parts to zero at the chain's input: the "
                        "blocks gave other numbers in backward than in forward", module=where)
            else:
                problem = fp.range_problem(min(values), max(values), self.frac_bits,
                                           self.dtype if kind == "stream" else None, self.code_limit)
                if problem is not None:
                    if kind == "entry":
                        problem = "the stream entering the chain: " + problem
                    elif direction == "backward":
                        problem = "in the backward recompute: " + problem
                    raise FixedPointRangeError(problem, module=where)


class ChainCall:
    """One training call of a chain (see the note at the top of this module)."""

    def __init__(self, container: str, scheme: ChainScheme, config: BDIAConfig, x: torch.Tensor, batch_dim: int,
                 observers: tuple[ChainObserver, ...], compiled: bool):
        self.container = container
        self.scheme = scheme
        self.frac_bits = config.frac_bits
        self.dtype = x.dtype
        self.code_dtype = scheme.code_dtype
        self.autograd = torch.is_grad_enabled()  # no backward can follow otherwise
        self.reversible = config.mode == "reversible" and self.autograd
        self.verify = config.verify and self.reversible
        self.compiled = compiled  # traced by torch.compile: checks are graph asserts, no host reads
        self.observers = () if compiled else observers
        self.checks = Checks(x.device.type != "meta" and not compiled, x.dtype, config.frac_bits, scheme.code_limit)
        self.autocast = (x.device.type, torch.is_autocast_enabled(x.device.type),
                         torch.get_autocast_dtype(x.device.type)) if torch.amp.is_autocast_available(x.device.type) \
            else None
        self.steps: list[str] = []  # the path of chain step n
        # γ: one seed per call (drawn only where a step has a choice), signs per step from it
        signs = tuple(dict.fromkeys(int(2 * g) for g in config.gammas))
        self.fixed_sign = signs[0] if len(signs) == 1 else None
        self.seed = fp.draw_seed(x) if scheme.takes_signs and self.fixed_sign is None else None
        self._signs: torch.Tensor | None = None  # eager: the signs of steps 0, 1, … (see sign())
        self.batch_dim, self.batch = batch_dim, x.shape[batch_dim]
        self.sign_shape = [self.batch if d == batch_dim else 1 for d in range(x.dim())]
        self.rank = _rank()
        self.device = x.device
        # the forward's state: the parts' values (autograd tensors) and their codes
        self.values: list[torch.Tensor] = []
        self.codes: list[torch.Tensor] = []   # stored mode / no autograd: one tensor per part
        self.carrier: torch.Tensor | None = None  # reversible: the stacked codes (bdia_fx.run.chain_step)
        self.checking_backward = False  # an engine callback reads the backward checks
        self.random_bytes = 0  # the RNG states kept for replaying random steps
        # the runtime's order checks (ChainRuntime._accept / _accept_parent_add)
        self.next_block = 0
        self.out: torch.Tensor | None = None
        self.out_version: int | None = None
        self.branch_io: tuple | None = None

    def sign(self, n: int, seed: torch.Tensor | None = None) -> torch.Tensor | None:
        """Chain step n's signs, shaped to broadcast over the stream (None for schemes without). Eagerly,
        the signs of all steps are drawn at once and kept for the call (one byte per sample per step,
        where drawing them per step cost ~0.1 ms of host time each); traced, each step draws its own
        from the ``seed`` the backward gets as a saved tensor."""
        if not self.scheme.takes_signs:
            return None
        if self.fixed_sign is not None:
            if self._signs is None:
                self._signs = torch.full(self.sign_shape, self.fixed_sign, dtype=torch.int8, device=self.device)
            return self._signs
        if self.compiled:
            seed = self.seed if seed is None else seed
            return fp.gamma_signs(seed, range(n, n + 1), self.batch, self.rank).view(self.sign_shape)
        if self._signs is None or n >= len(self._signs):
            steps = max(16, 2 * n) if self._signs is None else 2 * len(self._signs) + n
            self._signs = fp.gamma_signs(self.seed, range(steps), self.batch, self.rank)
        return self._signs[n].view(self.sign_shape)

    def finish_forward(self) -> None:
        """The chain's last step ran: read the forward checks and drop the forward state."""
        for observer in self.observers:
            observer.forward_finished(self)
        self.values, self.codes, self.carrier, self.out, self.branch_io = [], [], None, None, None
        self.checks.raise_first("forward")

    def check_backward_at_end(self) -> None:
        """Read the backward checks when the engine finishes this backward (queued once per backward)."""
        if not self.checking_backward and self.checks.enabled:
            self.checking_backward = True
            torch.autograd.Variable._execution_engine.queue_callback(self._finish_backward)

    def _finish_backward(self) -> None:
        self.checking_backward = False
        self.checks.raise_first("backward")

    def unsaved_bytes(self) -> int:
        """Bytes the call keeps outside autograd's saved tensors: the RNG states of its random steps
        (checksums, side bits, codes and the γ seed are saved tensors)."""
        return self.random_bytes
