"""Residual chains integrated with a shear scheme instead of BDIA (``BDIAConfig(scheme="alf")``).

Block k of a chain is read as the vector field of step k, ``f_k(t, z) = h_k(z)`` (the block's output
minus its input; a branch module's output itself), integrated with step size 1 from t = k by a
scheme of :mod:`bdia_fx.schemes`. The chain's state is the scheme's parts (z, the stream the parent
sees, and e.g. the leapfrog's velocity v) in int64 codes of the config's grid; the scheme's start
shears run at block 0. Every step is a sequence of shears, so the walk down rebuilds every part bit
for bit with no side bits at all (BDIA keeps one per element per block).

- Inference form (``.eval()``, :func:`bdia_fx.revert`, :func:`bdia_fx.export_onnx`;
  :mod:`bdia_fx.scheme_form`): the scheme's
  own step over the blocks, on codes (``quantize``) or on floats. Unlike BDIA at γ = 0 it is *not*
  the original model: the scheme changes what the network computes, and it must be trained so.
- ``mode="stored"``: the shears run with autograd (straight-through Q): the reference.
- ``mode="reversible"``: the blocks run on codes without a graph; the last block's output comes
  from one autograd Function whose backward undoes the shears from the top, recomputing each
  increment once (for the inversion and its vector–Jacobian product), under the forward's module
  state (:mod:`bdia_fx.guards`) and random state (``torch.utils.checkpoint``'s device-state
  helpers, recorded before every shear of a block with dropout). Kept: the final codes of every
  part (saved tensors of that Function), and per block a 16-byte checksum of z (``verify``), the
  random states of a block with dropout, and what the guards keep — nothing per element per block.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils.checkpoint as checkpoint
from torch import nn
from torch.autograd.function import once_differentiable

from bdia_fx import fixed_point as fp
from bdia_fx.calls import BlockCall, StreamSlots, split_call, split_output
from bdia_fx.errors import FixedPointRangeError, ReversibilityError
from bdia_fx.frame import recomputing
from bdia_fx.guards import StepState
from bdia_fx.scheme_form import BlockMap, SchemeForm, block_field, chain_shears
from bdia_fx.schemes import Scheme, apply_shear, read, undo_shear

Rebind = Callable[[Sequence[torch.Tensor]], BlockMap]
"""A block as a map of the stream, given its call's tensor side inputs (in the order of the call's leaves)."""


def block_map_of(block: nn.Module, original: type, call: BlockCall, slots: StreamSlots, where: str
                 ) -> tuple[Rebind, list[torch.Tensor], Callable[[], Callable[[torch.Tensor], Any]]]:
    """Block ``block`` (run with its ``original`` class's forward) as a map of the stream, with its side
    inputs bound at call time (the walk down binds fresh leaves, the frame keeps none); the call's
    tensor side inputs; and a function giving the output structure of the first call (to put the
    chain's stream into; later calls keep no block output alive)."""
    positions = [i for i, leaf in enumerate(call.leaves) if isinstance(leaf, torch.Tensor)]
    sides = [call.leaves[i] for i in positions]
    skeleton = [None if i in positions else leaf for i, leaf in enumerate(call.leaves)]
    spec, stream_index = call.spec, call.stream_index  # not ``call``: its leaves hold the side inputs
    rebuilds: list[Callable[[torch.Tensor], Any]] = []

    def rebind(tensors: Sequence[torch.Tensor]) -> BlockMap:
        leaves = list(skeleton)
        for i, t in zip(positions, tensors):
            leaves[i] = t
        bound = BlockCall(leaves, spec, stream_index)

        def block_map(z: torch.Tensor) -> torch.Tensor:
            f_args, f_kwargs = bound.with_stream(z)
            out, rebuild = split_output(original.forward(block, *f_args, **f_kwargs), slots, where)
            if not rebuilds:
                rebuilds.append(rebuild)
            return out
        return block_map

    def first_rebuild() -> Callable[[torch.Tensor], Any]:
        rebuild = rebuilds[0]
        rebuilds[0] = _unchanged
        return rebuild

    return rebind, sides, first_rebuild


def _unchanged(x: torch.Tensor) -> torch.Tensor:
    return x


def scheme_block_forward(form: SchemeForm, block: nn.Module, original: type, args: tuple, kwargs: dict,
                         index: int, where: str, slots: StreamSlots, branch: bool) -> Any:
    """A block call of a scheme chain's inference form (eval mode, and the reverted model's proxies)."""
    x, call = split_call(args, kwargs, slots, where)
    rebind, sides, first_rebuild = block_map_of(block, original, call, slots, where)
    z = form.step(index, x, rebind(sides), branch, where)
    return first_rebuild()(z)


@dataclass
class _BlockRecord:
    """What the walk down needs of one block: no activation, no side input (those are saved tensors)."""

    path: str
    rebind: Rebind
    branch: bool
    state: StepState | None
    random_states: list[tuple] | None  # before each shear, for a block with dropout
    sides: list[int]   # positions in the frame's side inputs
    params: list[int]  # positions in the frame's parameters
    checksum: torch.Tensor | None  # of z_k's codes (verify)


class SchemeFrame:
    """One training call of a scheme chain, from block 0's forward to the end of its backward."""

    def __init__(self, container: str, scheme: Scheme, frac_bits: int, reversible: bool, verify: bool,
                 x_in: torch.Tensor, blocks: int):
        self.container, self.scheme, self.frac_bits, self.blocks = container, scheme, frac_bits, blocks
        self.reversible = reversible and torch.is_grad_enabled()  # no backward can follow otherwise
        self.verify = verify and self.reversible
        self.dtype = x_in.dtype
        self.x_in: torch.Tensor | None = x_in  # until the last block joins the chain to the graph
        code0, _ = fp.to_codes(x_in.detach(), frac_bits, torch.int64)
        self.codes = [code0] + [torch.zeros_like(code0) for _ in scheme.parts[1:]]
        self.values: list[torch.Tensor] | None = None
        if not self.reversible:  # x_0 = Q[x_in] with the straight-through gradient
            self.values = [x_in + (read(code0, frac_bits, self.dtype) - x_in).detach()] + \
                [torch.zeros_like(x_in) for _ in scheme.parts[1:]]
        self.records: list[_BlockRecord] = []
        self.checks: list[torch.Tensor] = []
        self.side_inputs: list[torch.Tensor] = []  # handed to the backward Function as saved tensors
        self.params: list[torch.Tensor] = []
        self._positions: dict[int, int] = {}  # id -> position, sides and parameters (each list its own)
        self.autocast = _autocast_state(x_in.device.type)
        # the runtime's order checks read these (see ChainRuntime._accept / _accept_parent_add)
        self.next_block, self.out, self.out_version, self.branch_io = 0, x_in, None, None

    def _place(self, tensors: Sequence[torch.Tensor], into: list[torch.Tensor]) -> list[int]:
        positions = []
        for t in tensors:
            if id(t) not in self._positions:
                self._positions[id(t)] = len(into)
                into.append(t)
            positions.append(self._positions[id(t)])
        return positions

    def step(self, k: int, path: str, rebind: Rebind, sides: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
             branch: bool, state: StepState | None, random: bool) -> torch.Tensor:
        """Run block k's step forward; the new stream value (with autograd only in stored mode)."""
        field = block_field(rebind(sides), branch)
        record = _BlockRecord(path, rebind, branch, state, [] if random and self.reversible else None,
                              self._place(sides, self.side_inputs), self._place(params, self.params),
                              fp.checksum(self.codes[0]) if self.verify else None)
        self.records.append(record)
        with torch.no_grad() if self.reversible else contextlib.nullcontext():
            for shear in chain_shears(self.scheme, field, k):
                if record.random_states is not None:
                    record.random_states.append(_random_state(self.codes[0]))
                self.codes, self.values, check = apply_shear(shear, self.codes, self.frac_bits, self.dtype,
                                                             self.values)
                self.checks.append(check)
        return read(self.codes[0], self.frac_bits, self.dtype) if self.values is None else self.values[0]

    def finish(self) -> torch.Tensor | None:
        """After the last block: raise for the first block that left the int64 range (one host read);
        in reversible mode, the output joined to the autograd graph (None in stored mode)."""
        x_in, self.x_in, self.out, self.branch_io = self.x_in, None, None, None
        magnitudes = torch.stack(self.checks).tolist()
        self.checks = []
        start = 0
        for k, record in enumerate(self.records):
            count = len(chain_shears(self.scheme, _no_field, k))
            worst = magnitudes[start:start + count]
            start += count
            if not all(map(math.isfinite, worst)):
                raise FixedPointRangeError(f"the stream of scheme chain '{self.container}' became non-finite "
                                           "at this block (NaN or inf in the block's output)", module=record.path)
            if max(worst) >= fp.WIDE_CODE_LIMIT:
                raise FixedPointRangeError(
                    f"fixed-point overflow in scheme chain '{self.container}': |value| reached "
                    f"{max(worst) / 2.0 ** self.frac_bits:.6g}, beyond the int64 codes' exact range "
                    f"2^{60 - self.frac_bits} at frac_bits={self.frac_bits}", module=record.path)
        if not self.reversible:
            return None
        return _SchemeChainBackward.apply(self, x_in, *self.side_inputs, *self.params)

    # ---------------------------------------------------------------- backward
    def check_guards(self) -> None:
        """What the recompute reads is as the forward saw it (top block first), before the saved tensors
        are unpacked (whose own version check would raise first, without naming the block)."""
        for record in reversed(self.records):
            if record.state is not None:
                record.state.check()

    def walk_down(self, codes: list[torch.Tensor], sides: Sequence[torch.Tensor], grad_out: torch.Tensor
                  ) -> tuple[torch.Tensor, list[torch.Tensor | None], list[torch.Tensor | None]]:
        """Undo every block's shears from the top ``codes``: gradients w.r.t. x_in, the side inputs and the
        parameters. Each block's increments are recomputed from fresh leaves of its side inputs, so a side
        input computed from parameters gets its gradient once, through the autograd graph around the chain."""
        bits, dtype = self.frac_bits, self.dtype
        grads = [grad_out] + [torch.zeros_like(grad_out) for _ in self.scheme.parts[1:]]
        side_grads: list[torch.Tensor | None] = [None] * len(sides)
        param_grads: list[torch.Tensor | None] = [None] * len(self.params)
        mismatched: list[tuple[str, torch.Tensor]] = []
        for k in range(len(self.records) - 1, -1, -1):
            record = self.records[k]
            fresh = {i: sides[i].detach().requires_grad_() for i in dict.fromkeys(record.sides)
                     if sides[i].requires_grad}
            field = block_field(record.rebind([fresh.get(i, sides[i]) for i in record.sides]), record.branch)
            targets = [(param_grads, i) for i in record.params] + [(side_grads, i) for i in fresh]
            inputs = [self.params[i] for i in record.params] + list(fresh.values())
            shears = chain_shears(self.scheme, field, k)
            with record.state.replay() if record.state is not None else contextlib.nullcontext(), \
                    _autocast(self.autocast), recomputing():
                for j in range(len(shears) - 1, -1, -1):
                    with _replaying(record.random_states[j] if record.random_states is not None else None):
                        codes, grads, pg = undo_shear(shears[j], codes, grads, bits, dtype, inputs)
                    for (totals, i), g in zip(targets, pg):
                        if g is not None:
                            totals[i] = g if totals[i] is None else totals[i] + g
            if record.checksum is not None:
                mismatched.append((record.path, (fp.checksum(codes[0]) != record.checksum).any()))
        extra = [c.abs().amax() > 0 for c in codes[1:] if c.numel()]
        flags = torch.stack([m for _, m in mismatched] + extra + [torch.zeros((), dtype=torch.bool)]).tolist()
        for (path, _), bad in zip(mismatched, flags):
            if bad:
                raise ReversibilityError(
                    f"the backward of scheme chain '{self.container}' did not rebuild this block's input bit for "
                    "bit: the block gave other numbers in backward than in forward (randomness outside torch's "
                    "generators, or state changed through .data)", module=path)
        if any(flags[len(mismatched):]):
            raise ReversibilityError(f"the backward of scheme chain '{self.container}' did not return the scheme's "
                                     "extra parts to zero: the blocks gave other numbers in backward than in "
                                     "forward", module=self.records[0].path)
        return grads[0], side_grads, param_grads


def _no_field(t: float, z: torch.Tensor) -> torch.Tensor:
    return z


class _SchemeChainBackward(torch.autograd.Function):
    """The last block's output of a reversible scheme chain; backward walks the chain down.

    Saved tensors: the top codes of every part and the chain's side inputs (freed by autograd after
    backward unless the graph is retained; a retained graph walks down again)."""

    @staticmethod
    def forward(ctx, frame: SchemeFrame, x_in: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        ctx.frame, ctx.parts = frame, len(frame.codes)
        ctx.save_for_backward(*frame.codes, *frame.side_inputs)
        out = read(frame.codes[0], frame.frac_bits, frame.dtype)
        frame.codes, frame.side_inputs = [], []
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        frame = ctx.frame
        frame.check_guards()
        saved = ctx.saved_tensors
        grad_x, side_grads, param_grads = frame.walk_down(list(saved[:ctx.parts]), saved[ctx.parts:], grad)
        return (None, grad_x, *side_grads, *param_grads)


# ---------------------------------------------------------------- random and autocast state
def _random_state(like: torch.Tensor) -> tuple:
    """The CPU generator's state and that of ``like``'s accelerator (checkpoint's own helpers)."""
    devices, states = checkpoint.get_device_states(like) if like.device.type != "cpu" else ([], [])
    return torch.get_rng_state(), devices, states, like.device.type


@contextlib.contextmanager
def _replaying(state: tuple | None) -> Iterator[None]:
    if state is None:
        yield
        return
    cpu, devices, states, device_type = state
    with torch.random.fork_rng(devices=devices, device_type=device_type if devices else "cuda"):
        torch.set_rng_state(cpu)
        if devices:
            checkpoint.set_device_states(devices, states, device_type=device_type)
        yield


def _autocast_state(device_type: str) -> tuple:
    return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def _autocast(state: tuple):
    device_type, enabled, dtype = state
    return torch.autocast(device_type, dtype=dtype, enabled=enabled)
