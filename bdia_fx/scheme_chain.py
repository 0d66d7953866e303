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
from bdia_fx.schemes import Field, Scheme, apply_shear, read, undo_shear


def block_map_of(block: nn.Module, original: type, call: BlockCall, slots: StreamSlots, where: str
                 ) -> tuple[BlockMap, Callable[[], Callable[[torch.Tensor], Any]]]:
    """Block ``block`` (run with its ``original`` class's forward) as a map of the stream, and a function
    giving the output structure of its first call (to put the chain's stream into); later calls
    (the walk down's) keep no block output alive."""
    rebuilds: list[Callable[[torch.Tensor], Any]] = []

    def block_map(z: torch.Tensor) -> torch.Tensor:
        f_args, f_kwargs = call.with_stream(z)
        out, rebuild = split_output(original.forward(block, *f_args, **f_kwargs), slots, where)
        if not rebuilds:
            rebuilds.append(rebuild)
        return out

    def first_rebuild() -> Callable[[torch.Tensor], Any]:
        rebuild = rebuilds[0]
        rebuilds[0] = _unchanged
        return rebuild

    return block_map, first_rebuild


def _unchanged(x: torch.Tensor) -> torch.Tensor:
    return x


def scheme_block_forward(form: SchemeForm, block: nn.Module, original: type, args: tuple, kwargs: dict,
                         index: int, where: str, slots: StreamSlots, branch: bool) -> Any:
    """A block call of a scheme chain's inference form (eval mode, and the reverted model's proxies)."""
    x, call = split_call(args, kwargs, slots, where)
    block_map, first_rebuild = block_map_of(block, original, call, slots, where)
    z = form.step(index, x, block_map, branch, where)
    return first_rebuild()(z)


class SchemeFrame:
    """One training call of a scheme chain, from block 0's forward to the end of its backward."""

    def __init__(self, container: str, scheme: Scheme, frac_bits: int, reversible: bool, verify: bool,
                 x_in: torch.Tensor, blocks: int):
        self.container, self.scheme, self.frac_bits = container, scheme, frac_bits
        self.reversible, self.verify, self.blocks = reversible, verify, blocks
        self.dtype = x_in.dtype
        self.x_in = x_in
        code0, _ = fp.to_codes(x_in.detach(), frac_bits, torch.int64)
        self.codes = [code0] + [torch.zeros_like(code0) for _ in scheme.parts[1:]]
        self.values: list[torch.Tensor] | None = None
        if not reversible:  # x_0 = Q[x_in] with the straight-through gradient
            self.values = [x_in + (read(code0, frac_bits, self.dtype) - x_in).detach()] + \
                [torch.zeros_like(x_in) for _ in scheme.parts[1:]]
        self.paths: list[str] = []
        self.fields: list[Field] = []
        self.states: list[StepState | None] = []
        self.rng: list[list[tuple] | None] = []
        self.checksums: list[torch.Tensor] = []
        self.checks: list[torch.Tensor] = []
        self.inputs: dict[int, torch.Tensor] = {}  # what gradients flow to, besides x_in: side inputs, parameters
        self.autocast = _autocast_state(x_in.device.type)
        # the runtime's order checks read these (see ChainRuntime._accept / _accept_parent_add)
        self.next_block, self.out, self.out_version, self.branch_io = 0, x_in, None, None

    def step(self, k: int, path: str, block_map: BlockMap, branch: bool, state: StepState | None, random: bool,
             grad_inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Run block k's step forward; the new stream value (with autograd only in stored mode)."""
        field = block_field(block_map, branch)
        self.paths.append(path)
        self.fields.append(field)
        self.states.append(state)
        for t in grad_inputs:
            self.inputs.setdefault(id(t), t)
        if self.verify and self.reversible:
            self.checksums.append(fp.checksum(self.codes[0]))
        states: list[tuple] | None = [] if random and self.reversible else None
        with torch.no_grad() if self.reversible else contextlib.nullcontext():
            for shear in chain_shears(self.scheme, field, k):
                if states is not None:
                    states.append(_random_state(self.codes[0]))
                self.codes, self.values, check = apply_shear(shear, self.codes, self.frac_bits, self.dtype,
                                                             self.values)
                self.checks.append(check)
        self.rng.append(states)
        return read(self.codes[0], self.frac_bits, self.dtype) if self.values is None else self.values[0]

    def finish(self) -> torch.Tensor | None:
        """After the last block: raise for the first block that left the int64 range (one host read);
        in reversible mode, the output joined to the autograd graph (None in stored mode)."""
        per_shear = [len(chain_shears(self.scheme, lambda t, z: z, k)) for k in range(self.blocks)]
        magnitudes = torch.stack(self.checks).tolist()
        start = 0
        for path, count in zip(self.paths, per_shear):
            worst = magnitudes[start:start + count]
            start += count
            if not all(map(math.isfinite, worst)):
                raise FixedPointRangeError(f"the stream of scheme chain '{self.container}' became non-finite "
                                           "at this block (NaN or inf in the block's output)", module=path)
            if max(worst) >= fp.WIDE_CODE_LIMIT:
                raise FixedPointRangeError(
                    f"fixed-point overflow in scheme chain '{self.container}': |value| reached "
                    f"{max(worst) / 2.0 ** self.frac_bits:.6g}, beyond the int64 codes' exact range "
                    f"2^{60 - self.frac_bits} at frac_bits={self.frac_bits}", module=path)
        self.checks = []
        if not self.reversible:
            return None
        inputs = list(self.inputs.values())
        return _SchemeChainBackward.apply(self, self.x_in, *inputs)

    # ---------------------------------------------------------------- backward
    def walk_down(self, codes: list[torch.Tensor], grad_out: torch.Tensor, inputs: list[torch.Tensor]
                  ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """Undo every block's shears from the top ``codes``: the gradient w.r.t. x_in and ``inputs``."""
        bits, dtype = self.frac_bits, self.dtype
        grads = [grad_out] + [torch.zeros_like(grad_out) for _ in self.scheme.parts[1:]]
        totals: list[torch.Tensor | None] = [None] * len(inputs)
        mismatched: list[tuple[str, torch.Tensor]] = []
        for k in range(self.blocks - 1, -1, -1):
            state, path = self.states[k], self.paths[k]
            if state is not None:
                state.check()
            shears = chain_shears(self.scheme, self.fields[k], k)
            states = self.rng[k]
            with state.replay() if state is not None else contextlib.nullcontext(), \
                    _autocast(self.autocast), recomputing():
                for j in range(len(shears) - 1, -1, -1):
                    with _replaying(states[j] if states is not None else None):
                        codes, grads, pg = undo_shear(shears[j], codes, grads, bits, dtype, inputs)
                    for i, g in enumerate(pg):
                        if g is not None:
                            totals[i] = g if totals[i] is None else totals[i] + g
            if self.verify:
                mismatched.append((path, (fp.checksum(codes[0]) != self.checksums[k]).any()))
        extra = [c.abs().amax() for c in codes[1:] if c.numel()]
        flags = torch.stack([m for _, m in mismatched] + [torch.stack(extra).amax() > 0 if extra else
                                                           torch.zeros((), dtype=torch.bool)]).tolist()
        for (path, _), bad in zip(mismatched, flags):
            if bad:
                raise ReversibilityError(
                    f"the backward of scheme chain '{self.container}' did not rebuild this block's input bit for "
                    "bit: the block gave other numbers in backward than in forward (randomness outside torch's "
                    "generators, or state changed through .data)", module=path)
        if flags[-1]:
            raise ReversibilityError(f"the backward of scheme chain '{self.container}' did not return the scheme's "
                                     "extra parts to zero: the blocks gave other numbers in backward than in "
                                     "forward", module=self.paths[0])
        return grads[0], totals


class _SchemeChainBackward(torch.autograd.Function):
    """The last block's output of a reversible scheme chain; backward walks the chain down."""

    @staticmethod
    def forward(ctx, frame: SchemeFrame, x_in: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        ctx.frame = frame
        ctx.save_for_backward(*frame.codes)  # the top codes of every part: all the walk down starts from
        out = read(frame.codes[0], frame.frac_bits, frame.dtype)
        frame.codes = []
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        frame = ctx.frame  # the walk down leaves the frame's codes as they are: a retained graph runs again
        inputs = list(frame.inputs.values())
        grad_x, totals = frame.walk_down(list(ctx.saved_tensors), grad, inputs)
        return (None, grad_x, *totals)


def grad_inputs_of(block: nn.Module, sides: Sequence[tuple[int, torch.Tensor]]) -> list[torch.Tensor]:
    """What gradients of a block's step flow to besides its stream: its parameters and side inputs that need them."""
    params = [p for p in block.parameters() if p.requires_grad]
    return params + [t for _, t in sides if t.requires_grad]


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
