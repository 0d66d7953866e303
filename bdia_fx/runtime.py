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

    signs: torch.Tensor                      # [K-1, B] int8, ±1 (γ = sign/2)
    dtype: torch.dtype
    shape: torch.Size
    autocast: AutocastState
    calls: list[_BlockCall] = field(default_factory=list)
    rng: list[RNGSnapshot | None] = field(default_factory=list)
    side_bits: list[torch.Tensor | None] = field(default_factory=list)  # packed, x_0 … x_{K-2}; freed in backward
    checksums: list[torch.Tensor] = field(default_factory=list)
    below: torch.Tensor | None = None        # codes of x_{K-1} (x_{k-1} while running)
    top: torch.Tensor | None = None          # codes of x_K (x_k while running)
    x_in: torch.Tensor | None = None         # the chain input (autograd edge only, not saved data)
    cursor: "_Cursor | None" = None          # the backward walk's position (set while it runs)

    def nbytes(self) -> int:
        """Bytes this state holds for backward (block-call tensors are the model's own, not counted)."""
        tensors = [self.signs, self.below, self.top, *self.side_bits, *self.checksums]
        total = sum(t.numel() * t.element_size() for t in tensors if t is not None)
        return total + sum(s.nbytes() for s in self.rng if s is not None)


class _ReversibleStep(torch.autograd.Function):
    """Block k of a reversible chain as one autograd node.

    The K steps are linked in order (step k's output feeds step k+1), so autograd runs their
    backwards from the top down; step k's backward rebuilds x_{k-1} and recomputes block k for
    its vector-Jacobian product, and hands block k's parameter gradients to autograd at once —
    they are accumulated (or returned by ``torch.autograd.grad``) block by block, as with
    per-block checkpointing. The stream gradients g_{k+1}, g_k travel in the chain state; the
    link between steps carries none (an empty tensor), except into the chain input at step 0.
    """

    @staticmethod
    def forward(ctx, runtime: "ChainRuntime", state: "ChainState", index: int, n_sides: int,
                link: torch.Tensor, *inputs: torch.Tensor):
        ctx.runtime, ctx.state, ctx.index = runtime, state, index
        ctx.sides, ctx.params = inputs[:n_sides], inputs[n_sides:]
        if index == len(runtime.blocks) - 1:
            return fp.from_codes(state.top, runtime.config.frac_bits, state.dtype)
        return link.new_empty(0)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        g_link, g_sides, g_params = ctx.runtime.backward_step(ctx.state, ctx.index, grad, ctx.sides, ctx.params)
        return (None, None, None, None, g_link, *g_sides, *g_params)


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
        self.memory_record: dict[str, Any] | None = None  # filled per call while bdia_fx.memory measures
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
        table = torch.tensor([int(2 * g) for g in self.config.gammas], dtype=torch.int8)
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
        link, st.x_in = st.x_in, None
        if self.memory_record is not None:  # only while measuring: kept off the training hot path
            self.memory_record["state_bytes"] = st.nbytes()
            self.memory_record["side_storages"] = {
                t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for call in st.calls for t in call.leaves if isinstance(t, torch.Tensor)}
        for index, (block, call) in enumerate(zip(self.blocks, st.calls)):
            sides = list({id(t): t for t in call.leaves if isinstance(t, torch.Tensor) and t.requires_grad}.values())
            params = list({id(p): p for p in block.parameters() if p.requires_grad}.values())
            link = _ReversibleStep.apply(self, st, index, len(sides), link, *sides, *params)
        return link

    def _trace(self, direction: str, codes: torch.Tensor) -> None:
        if self.code_trace is not None:
            self.code_trace[direction].append(codes.clone())

    # ------------------------------------------------------------------ reversible backward
    def backward_step(self, st: ChainState, k: int, grad: torch.Tensor, sides: tuple, params: tuple):
        """Backward of block k: rebuild x_{k-1}, recompute block k once, and return the gradients
        of the link into this step, of block k's side inputs and of its parameters."""
        l, where = self.config.frac_bits, self.block_paths[k]
        if k == len(self.blocks) - 1:  # the top: start the walk down, handing x_K, x_{K-1} to the cursor
            if st.top is None:
                raise ConversionError(
                    "the backward of a reversible chain can run only once per forward (retain_graph=True is not "
                    "supported); run the forward again, or use BDIAConfig(mode='stored')", module=self.container)
            st.cursor = _Cursor(g_hi=grad, g_lo=None, c_hi=st.top, c_lo=st.below)
            st.top = st.below = None
        cur = st.cursor
        leaves = [t.detach().requires_grad_() for t in sides]
        leaf_of = {id(t): leaf for t, leaf in zip(sides, leaves)}
        xk = fp.from_codes(cur.c_lo, l, st.dtype).requires_grad_()
        with torch.enable_grad(), replay_rng(st.rng[k]), st.autocast.entered():
            f_args, f_kwargs = st.calls[k].with_stream(xk, lambda v: leaf_of.get(id(v), v))
            f, _ = _split_output(self.originals[k].forward(self.blocks[k], *f_args, **f_kwargs), where)
            if k > 0:
                sign = self._gamma_view(st.signs[k - 1], f.dim())
                gamma = 0.5 * sign.to(f.dtype)
                v = fp.update_value(f, xk, gamma)
            else:
                v = f
        del f
        with torch.no_grad():
            b = fp.to_codes(v.detach(), l, where)
            if self.config.verify and not torch.equal(fp.checksum(b), st.checksums[k]):
                raise ReversibilityError(
                    "backward recompute of this block differs from its forward (checksum mismatch): the block "
                    "is not deterministic (non-deterministic kernel, unreplayed randomness or changed state)",
                    module=where,
                )
            if k > 0:
                bits = fp.unpack_bits(st.side_bits[k - 1], cur.c_lo.shape)
                st.side_bits[k - 1] = None  # walked past: free as we go
                c_below = fp.bdia_inverse(cur.c_hi, b, sign, bits)
                del bits
        del b
        grads = torch.autograd.grad(v, [xk, *leaves, *params], cur.g_hi, allow_unused=True)
        del v
        g_x = grads[0] if cur.g_lo is None else grads[0] + cur.g_lo
        g_sides, g_params = grads[1:1 + len(leaves)], grads[1 + len(leaves):]
        if k == 0:
            st.cursor = None
            return g_x, g_sides, g_params
        st.cursor = _Cursor(g_hi=g_x, g_lo=gamma * cur.g_hi, c_hi=cur.c_lo, c_lo=c_below)
        self._trace("backward", c_below)
        return grad.new_zeros(0), g_sides, g_params


@dataclass
class _Cursor:
    """Where the backward walk down a chain is: g_{k+1}, the γ-term for g_k, codes of x_{k+1}, x_k."""

    g_hi: torch.Tensor
    g_lo: torch.Tensor | None
    c_hi: torch.Tensor
    c_lo: torch.Tensor
