"""The chain runtime: executes a BDIA chain block by block, and its reversible backward.

The converted model's parent module runs eagerly and calls its block modules in order; each
block of a chain is a thin proxy (see :mod:`bdia_fx.module_tree`) that hands the call to the
chain's :class:`ChainRuntime`. In ``mode="reversible"`` training the runtime runs every block
without autograd, keeps only the chain state of SPEC §2 (x_K, x_{K-1}, packed side bits, γ signs,
RNG snapshots, block call arguments) and attaches one autograd Function at the last block whose
backward rebuilds x_{K-2} … x_0 bit-exactly while recomputing each block once for its
vector-Jacobian product. ``mode="stored"`` runs the very same arithmetic under ordinary autograd.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils._pytree import tree_flatten, tree_unflatten

from bdia_fx import fixed_point as fp
from bdia_fx.config import BDIAConfig
from bdia_fx.errors import ConversionError, ReversibilityError
from bdia_fx.rng import AutocastState, RNGSnapshot, capture_rng, replay_rng


_capturing = [False]


def capturing() -> bool:
    """Whether a graph capture is running (blocks then run their original forward)."""
    return _capturing[0]


@contextlib.contextmanager
def capture_mode() -> Iterator[None]:
    """Blocks run their original forward and the root hook stands aside while capturing."""
    previous = _capturing[0]
    _capturing[0] = True
    try:
        yield
    finally:
        _capturing[0] = previous


@dataclass
class _BlockCall:
    """A block call's arguments with the stream leaf taken out (kept once per block)."""

    leaves: list[Any]
    spec: Any
    stream_index: int

    def with_stream(self, x: torch.Tensor, replace: Callable[[Any], Any] = lambda v: v) -> tuple[tuple, dict]:
        leaves = [replace(v) for v in self.leaves]
        leaves[self.stream_index] = x
        return tree_unflatten(leaves, self.spec)


def _split_call(args: tuple, kwargs: dict, where: str) -> tuple[torch.Tensor, _BlockCall]:
    leaves, spec = tree_flatten((args, kwargs))
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            rest = list(leaves)
            rest[i] = None
            return leaf, _BlockCall(rest, spec, i)
    raise ConversionError("block was called without a floating-point tensor (the residual stream)", module=where)


def _split_output(out: Any, where: str) -> tuple[torch.Tensor, Callable[[torch.Tensor], Any]]:
    leaves, spec = tree_flatten(out)
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            def rebuild(x: torch.Tensor, _i: int = i) -> Any:
                new = list(leaves)
                new[_i] = x
                return tree_unflatten(new, spec)
            return leaf, rebuild
    raise ConversionError("block returned no floating-point tensor (the residual stream)", module=where)


def gamma0_block_forward(block: nn.Module, original: type, args: tuple, kwargs: dict, frac_bits: int,
                         first: bool, where: str) -> Any:
    """One step of the quantized γ = 0 chain: x_{k+1} = Q[f_k(x_k)], with x_0 = Q[x_in] if ``first``."""
    x, call = _split_call(args, kwargs, where)
    if first:
        x = fp.quantize(x, frac_bits)
    f_args, f_kwargs = call.with_stream(x)
    f, rebuild = _split_output(original.forward(block, *f_args, **f_kwargs), where)
    return rebuild(fp.quantize(f, frac_bits))


class _STEQuantize(torch.autograd.Function):
    """Q[v] with the straight-through gradient; range-checked like the reversible path."""

    @staticmethod
    def forward(ctx, v: torch.Tensor, frac_bits: int, where: str) -> torch.Tensor:
        return fp.from_codes(fp.to_codes(v, frac_bits, where), frac_bits, v.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None, None


class _STEHalf(torch.autograd.Function):
    """Exact Q[γx] for γ = sign/2 (x already on the grid) with gradient γ."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sign: torch.Tensor, frac_bits: int) -> torch.Tensor:
        ctx.save_for_backward(sign)
        codes = fp.to_codes(x, frac_bits)
        return fp.from_codes(fp.half_term(codes, sign), frac_bits, x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (sign,) = ctx.saved_tensors
        return grad * (0.5 * sign.to(grad.dtype)), None, None


@dataclass
class ChainState:
    """What one reversible chain call keeps for its backward (SPEC §2, "saved per chain")."""

    signs: torch.Tensor                      # [K-1, B] int32, ±1 (γ = sign/2)
    dtype: torch.dtype
    shape: torch.Size
    autocast: AutocastState
    calls: list[_BlockCall] = field(default_factory=list)
    rng: list[RNGSnapshot | None] = field(default_factory=list)
    side_bits: list[torch.Tensor] = field(default_factory=list)  # packed, for x_0 … x_{K-2}
    checksums: list[torch.Tensor] = field(default_factory=list)
    below: torch.Tensor | None = None        # codes of x_{K-1} (x_{k-1} while running)
    top: torch.Tensor | None = None          # codes of x_K (x_k while running)
    x_in: torch.Tensor | None = None         # the chain input (autograd edge only, not saved data)

    def nbytes(self) -> int:
        """Bytes this state holds for backward (block-call tensors are the model's own, not counted)."""
        tensors = [self.signs, self.below, self.top, *self.side_bits, *self.checksums]
        total = sum(t.numel() * t.element_size() for t in tensors if t is not None)
        return total + sum(s.nbytes() for s in self.rng if s is not None)


class _BDIAChainFunction(torch.autograd.Function):
    """Connects x_K to the chain input, side inputs and block parameters; backward = reversal."""

    @staticmethod
    def forward(ctx, runtime: "ChainRuntime", state: ChainState, n_sides: int, x_in: torch.Tensor, *inputs: torch.Tensor):
        ctx.runtime, ctx.state, ctx.n_sides = runtime, state, n_sides
        ctx.grad_inputs = inputs
        return fp.from_codes(state.top, runtime.config.frac_bits, state.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        sides = ctx.grad_inputs[: ctx.n_sides]
        params = ctx.grad_inputs[ctx.n_sides:]
        g_x, g_sides, g_params = ctx.runtime.backward(ctx.state, grad_out, sides, params)
        return (None, None, None, g_x, *g_sides, *g_params)


class ChainRuntime:
    """Runs one chain of ``K`` blocks as BDIA (training) or as the γ = 0 chain (eval)."""

    def __init__(self, container: str, block_paths: tuple[str, ...], blocks: list[nn.Module],
                 originals: list[type], config: BDIAConfig, batch_dim: int, random_blocks: list[bool]):
        self.container = container
        self.block_paths = block_paths
        self.blocks = blocks
        self.originals = originals
        self.config = config
        self.batch_dim = batch_dim
        self.random_blocks = list(random_blocks)
        self.code_trace: dict[str, list[torch.Tensor]] | None = None  # set by bdia_fx.check_exactness
        self.last_state_nbytes = 0  # bytes the last reversible call kept for backward
        self.last_side_storages: dict[int, int] = {}  # storage address -> bytes of its block-call tensors
        self._state: Any = None
        self._last_out: torch.Tensor | None = None
        self._index = 0

    # ------------------------------------------------------------------ dispatch
    def run_block(self, index: int, block: nn.Module, args: tuple, kwargs: dict) -> Any:
        original = self.originals[index]
        if capturing():
            return original.forward(block, *args, **kwargs)
        if not block.training:
            return self._eval_block(index, block, original, args, kwargs)
        x, call = _split_call(args, kwargs, self.block_paths[index])
        if index == 0:
            self._start(x)
        elif self._state is None or x is not self._last_out or index != self._index:
            raise ConversionError(
                f"block {index} of chain '{self.container}' got a stream that is not block {index - 1}'s "
                "output: the blocks must run in order with nothing applied to the stream in between",
                module=self.block_paths[index],
            )
        self._index = index + 1
        if self.config.mode == "stored":
            return self._stored_block(index, block, original, x, call)
        return self._reversible_block(index, block, original, x, call)

    def _gamma_view(self, sign: torch.Tensor, ndim: int) -> torch.Tensor:
        shape = [1] * ndim
        shape[self.batch_dim] = sign.numel()
        return sign.view(shape)

    def _draw_signs(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() <= self.batch_dim:
            raise ConversionError(f"stream has {x.dim()} dims, no batch dim {self.batch_dim}", module=self.block_paths[0])
        batch = x.shape[self.batch_dim]
        table = torch.tensor([int(2 * g) for g in self.config.gammas], dtype=torch.int32)
        draw = torch.randint(len(table), (len(self.blocks) - 1, batch))
        return table[draw].to(x.device)

    def _start(self, x: torch.Tensor) -> None:
        signs = self._draw_signs(x)
        device_type = x.device.type
        self._state = ChainState(signs=signs, dtype=x.dtype, shape=x.shape, autocast=AutocastState.capture(device_type))
        self._state.x_in = x
        self._last_out = None

    # ------------------------------------------------------------------ eval (γ = 0)
    def _eval_block(self, index: int, block: nn.Module, original: type, args: tuple, kwargs: dict) -> Any:
        if not self.config.quantize_eval:
            return original.forward(block, *args, **kwargs)
        return gamma0_block_forward(block, original, args, kwargs, self.config.frac_bits, index == 0,
                                    self.block_paths[index])

    # ------------------------------------------------------------------ stored reference
    def _stored_block(self, index: int, block: nn.Module, original: type, x: torch.Tensor, call: _BlockCall) -> Any:
        st, l, where = self._state, self.config.frac_bits, self.block_paths[index]
        if index == 0:
            st.below, st.top = None, _STEQuantize.apply(x, l, where)
        f_args, f_kwargs = call.with_stream(st.top)
        f, rebuild = _split_output(original.forward(block, *f_args, **f_kwargs), where)
        if index == 0:
            new = _STEQuantize.apply(f, l, where)
        else:
            sign = self._gamma_view(st.signs[index - 1], f.dim())
            v = fp.update_value(f, st.top, 0.5 * sign.to(f.dtype))
            new = _STEHalf.apply(st.below, sign, l) + _STEQuantize.apply(v, l, where)
            fp.to_codes(new.detach(), l, where)  # range check of the sum
        st.below, st.top = st.top, new
        return self._finish_or_pass(index, rebuild, new)

    def _finish_or_pass(self, index: int, rebuild: Callable, out: torch.Tensor) -> Any:
        if index == len(self.blocks) - 1:
            self._state, self._last_out = None, None
        else:
            self._last_out = out
        return rebuild(out)

    # ------------------------------------------------------------------ reversible forward
    def _reversible_block(self, index: int, block: nn.Module, original: type, x: torch.Tensor, call: _BlockCall) -> Any:
        st, l, where = self._state, self.config.frac_bits, self.block_paths[index]
        if index == 0:
            st.top = fp.to_codes(x.detach(), l, where)
            x = fp.from_codes(st.top, l, st.dtype)
        self._trace("forward", st.top)
        st.calls.append(call)
        st.rng.append(capture_rng(x) if self.random_blocks[index] else None)
        version = x._version
        with torch.no_grad():
            f_args, f_kwargs = call.with_stream(x)
            f, rebuild = _split_output(original.forward(block, *f_args, **f_kwargs), where)
            if x._version != version:
                raise ConversionError("in-place op on the residual stream input inside the block", module=where)
            if index == 0:
                b = fp.to_codes(f, l, where)
                new = b
            else:
                sign = self._gamma_view(st.signs[index - 1], f.dim())
                b = fp.to_codes(fp.update_value(f, x, 0.5 * sign.to(f.dtype)), l, where)
                new = fp.bdia_forward(st.below, b, sign)
                fp.check_codes(new, st.dtype, l, where)
                st.side_bits.append(fp.pack_bits(fp.side_bits(st.below)))
        if self.config.verify:
            st.checksums.append(fp.checksum(b))
        st.below, st.top = st.top, new
        if index < len(self.blocks) - 1:
            out = fp.from_codes(new, l, st.dtype)
            self._last_out = out
            return rebuild(out)
        self._trace("forward", st.top)
        return rebuild(self._attach(st))

    def _attach(self, st: ChainState) -> torch.Tensor:
        self._state, self._last_out = None, None
        x_in, st.x_in = st.x_in, None
        seen: set[int] = set()
        sides: list[torch.Tensor] = []
        for call in st.calls:
            for leaf in call.leaves:
                if isinstance(leaf, torch.Tensor) and leaf.requires_grad and id(leaf) not in seen:
                    seen.add(id(leaf))
                    sides.append(leaf)
        params = self._trainable_params()
        self.last_state_nbytes = st.nbytes()
        self.last_side_storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                                   for call in st.calls for t in call.leaves if isinstance(t, torch.Tensor)}
        return _BDIAChainFunction.apply(self, st, len(sides), x_in, *sides, *params)

    def _trainable_params(self) -> list[nn.Parameter]:
        seen: set[int] = set()
        params = []
        for block in self.blocks:
            for p in block.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        return params

    def _trace(self, direction: str, codes: torch.Tensor) -> None:
        if self.code_trace is not None:
            self.code_trace[direction].append(codes.clone())

    # ------------------------------------------------------------------ reversible backward
    def backward(self, st: ChainState, grad_out: torch.Tensor, sides: tuple, params: tuple):
        l = self.config.frac_bits
        leaf_of = {id(t): t.detach().requires_grad_() for t in sides}
        side_pos = {id(t): i for i, t in enumerate(sides)}
        param_pos = {id(p): i for i, p in enumerate(params)}
        g_sides: list[torch.Tensor | None] = [None] * len(sides)
        g_params: list[torch.Tensor | None] = [None] * len(params)
        g_hi, g_lo = grad_out, None
        c_hi, c_lo = st.top, st.below
        for k in reversed(range(len(self.blocks))):
            where = self.block_paths[k]
            xk = fp.from_codes(c_lo, l, st.dtype).requires_grad_()
            with torch.enable_grad(), replay_rng(st.rng[k]), st.autocast.entered():
                f_args, f_kwargs = st.calls[k].with_stream(xk, lambda v: leaf_of.get(id(v), v))
                f, _ = _split_output(self.originals[k].forward(self.blocks[k], *f_args, **f_kwargs), where)
                if k > 0:
                    sign = self._gamma_view(st.signs[k - 1], f.dim())
                    gamma = 0.5 * sign.to(f.dtype)
                    v = fp.update_value(f, xk, gamma)
                else:
                    v = f
            with torch.no_grad():
                b = fp.to_codes(v.detach(), l, where)
                if self.config.verify and not torch.equal(fp.checksum(b), st.checksums[k]):
                    raise ReversibilityError(
                        "backward recompute of this block differs from its forward (checksum mismatch): the block "
                        "is not deterministic (non-deterministic kernel, unreplayed randomness or changed state)",
                        module=where,
                    )
                if k > 0:
                    bits = fp.unpack_bits(st.side_bits[k - 1], c_lo.shape)
                    c_below = fp.bdia_inverse(c_hi, b, sign, bits)
            block_params = [p for p in self.blocks[k].parameters() if id(p) in param_pos]
            used = list(dict.fromkeys(id(t) for t in st.calls[k].leaves if id(t) in leaf_of))
            used_sides = [leaf_of[i] for i in used]
            grads = torch.autograd.grad(v, [xk, *used_sides, *block_params], g_hi, allow_unused=True)
            g_x = grads[0] if g_lo is None else grads[0] + g_lo
            for i, g in zip(used, grads[1:1 + len(used)]):
                _accumulate(g_sides, side_pos[i], g)
            for p, g in zip(block_params, grads[1 + len(used_sides):]):
                _accumulate(g_params, param_pos[id(p)], g)
            if k > 0:
                g_lo = gamma * g_hi
                g_hi = g_x
                c_hi, c_lo = c_lo, c_below
                self._trace("backward", c_lo)
        return g_x, g_sides, g_params


def _accumulate(slots: list, index: int, grad: torch.Tensor | None) -> None:
    if grad is not None:
        slots[index] = grad if slots[index] is None else slots[index] + grad
