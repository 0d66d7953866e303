"""The chain runtime: executes a BDIA chain block by block, and its reversible backward.

The converted model's parent module runs eagerly and calls its block modules in order; each
block of a chain is a thin proxy (see :mod:`bdia_fx.module_tree`) that hands the call to the
chain's :class:`ChainRuntime`. Training runs SPEC §2 under ordinary autograd, one step per block
(or per sublayer): an update Function turns the step's output f_k(x_k) into the integer codes of
Q[v_k], v_k = (1+γ)f_k − 2γx_k, and a stream Function forms the exact fixed-point update
x_{k+1} = Q[γx_{k-1}] + Q[v_k]; both pass straight-through gradients.

``mode="reversible"`` runs each block under non-reentrant ``torch.utils.checkpoint`` (its RNG and
autocast replay, no early stop) with no tensor input held: the block reads x_k from the chain, so
nothing but x_K, x_{K-1} codes and one packed side bit per element per block is saved (as ordinary
saved tensors of the stream Functions; γ is drawn again from one seed per chain call). When
backward reaches block k its
recompute reads x_k rebuilt from the codes, and inverts the update to x_{k-1} for block k-1.
Parameter gradients are accumulated operation by operation, as with per-block checkpointing.
``mode="stored"`` runs the very same steps without checkpointing (the reference).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.utils.checkpoint as checkpoint
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils._pytree import tree_flatten, tree_unflatten

from bdia_fx import fixed_point as fp
from bdia_fx.config import BDIAConfig
from bdia_fx.errors import ConversionError, ReversibilityError
from bdia_fx.passes.sublayers import plan_block_call


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

    def with_stream(self, x: torch.Tensor) -> tuple[tuple, dict]:
        leaves = list(self.leaves)
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


class _EnterChain(torch.autograd.Function):
    """x_0 = Q[x_in] with the straight-through gradient; its codes start the chain."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, chain: "_ChainCall", frac_bits: int, where: str) -> torch.Tensor:
        chain.top = fp.to_codes(x, frac_bits, where)
        return fp.from_codes(chain.top, frac_bits, x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None, None, None


class _Update(torch.autograd.Function):
    """Codes of Q[v_k], v_k = (1+γ)f_k − 2γx_k (v_0 = f_0), without materialising v_k.

    Returns an empty tensor that links f_k and x_k to the stream update, which hands the gradient
    g_{k+1} over through the chain call; the STE gradients are (1+γ)g for f_k and −2γg for x_k.
    It saves only a 0-element anchor inside the step's checkpoint: backward reaches this node
    first in the step, so its unpack starts the recompute (and with it the rebuild of x_{k-1})
    before anything else of the step runs backward.
    """

    @staticmethod
    def forward(ctx, f: torch.Tensor, x: torch.Tensor, anchor: torch.Tensor, chain: "_ChainCall", k: int,
                where: str) -> torch.Tensor:
        ctx.save_for_backward(anchor)
        ctx.chain, ctx.k = chain, k
        if k == 0:
            chain.fresh = fp.to_codes(f, chain.frac_bits, where)
        else:
            scale = 2.0**chain.frac_bits
            gamma = chain.gammas.gamma(k)
            chain.fresh = fp.update_codes(f, x, (1.0 + gamma) * scale, (-2.0 * scale) * gamma, chain.frac_bits, where)
        return f.new_empty(0)

    @staticmethod
    @once_differentiable
    def backward(ctx, _link: torch.Tensor):
        ctx.saved_tensors  # noqa: B018 -- the unpack is the point: it triggers the step's recompute
        chain, k = ctx.chain, ctx.k
        grad = chain.grads.pop(k)
        if k == 0:
            return grad, None, None, None, None, None
        gamma = chain.gammas.gamma(k)
        chain.gammas.release(k)  # step k is done backward
        return grad * (1.0 + gamma), grad * (-2.0 * gamma), None, None, None, None


class _StreamUpdate(torch.autograd.Function):
    """x_{k+1} = Q[γx_{k-1}] + Q[v_k] on integer codes (x_1 = Q[v_0]); gradients γg and g (STE).

    In reversible mode it saves the packed side bits of x_{k-1}, and at the top the codes of x_K
    and x_{K-1}, as ordinary saved tensors (freed by autograd after backward unless the graph is
    retained); its backward hands them to the chain walk before step k is recomputed.
    """

    @staticmethod
    def forward(ctx, chain: "_ChainCall", k: int, last: bool, where: str, x_below: torch.Tensor | None,
                link: torch.Tensor) -> torch.Tensor:
        b, l = chain.update, chain.frac_bits
        chain.update = None
        saved: list[torch.Tensor] = []
        if k == 0:
            new = b
        else:
            new = fp.bdia_forward(chain.below, b, chain.gammas.sign(k))
            fp.check_codes(new, chain.dtype, l, where)
            if chain.reversible:
                saved.append(fp.pack_side_bits(chain.below))
        if chain.reversible and last:
            saved += [new, chain.top]
        ctx.save_for_backward(*saved)
        ctx.chain, ctx.k = chain, k
        chain.below, chain.top = chain.top, new
        return fp.from_codes(new, l, chain.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        chain, k = ctx.chain, ctx.k
        saved = list(ctx.saved_tensors)
        if chain.reversible:
            if k > 0:
                chain.bits[k] = saved.pop(0)
            if saved:  # the top: start the walk down at x_K, x_{K-1}
                chain.codes[k + 1], chain.codes[k] = saved
        chain.grads[k] = grad  # for the step's update node (the link carries no data)
        link = grad.new_zeros(0)
        if k == 0:
            return None, None, None, None, None, link
        return None, None, None, None, grad * chain.gammas.gamma(k), link


class _Gammas:
    """γ = sign/2 per sample for every step of one chain call, drawn from one seed.

    Step k's signs come from a generator seeded with ``seed + k`` and are drawn again whenever a
    step needs them (forward, and again in backward), so a chain keeps 8 bytes for γ, nothing
    per block. The seed is drawn from torch's global generator: ``torch.manual_seed`` reproduces.
    """

    def __init__(self, table: torch.Tensor, x: torch.Tensor, batch_dim: int):
        self.table, self.device, self.dtype = table, x.device, x.dtype
        self.batch = x.shape[batch_dim]
        self.shape = [self.batch if d == batch_dim else 1 for d in range(x.dim())]
        self.seed = int(torch.randint(2**62, ())) if len(table) > 1 else 0
        self._drawn: dict[int, torch.Tensor] = {}

    def sign(self, k: int) -> torch.Tensor:
        """Step k's signs (int8 ±1), shaped to broadcast over the stream."""
        if k not in self._drawn:
            if len(self.table) > 1:
                generator = torch.Generator().manual_seed(self.seed + k)
                signs = self.table[torch.randint(len(self.table), (self.batch,), generator=generator)]
            else:
                signs = self.table.expand(self.batch)
            self._drawn[k] = signs.to(self.device).view(self.shape)
        return self._drawn[k]

    def gamma(self, k: int) -> torch.Tensor:
        """Step k's γ in the stream dtype, shaped to broadcast over the stream."""
        return 0.5 * self.sign(k).to(self.dtype)

    def release(self, k: int) -> None:
        self._drawn.pop(k, None)


@dataclass
class _ChainCall:
    """One training call of a chain: what its steps share while running forward and backward."""

    gammas: _Gammas
    frac_bits: int
    dtype: torch.dtype
    reversible: bool
    verify: bool
    trace: Callable[[str, torch.Tensor], None]
    below: torch.Tensor | None = None   # forward: codes of x_{k-1}
    top: torch.Tensor | None = None     # forward: codes of x_k
    stream: torch.Tensor | None = None  # forward: x_k, the value step k reads
    prev: torch.Tensor | None = None    # forward: x_{k-1} (the autograd edge of the γ-term)
    update: torch.Tensor | None = None  # forward: codes of Q[v_k] of the step just run
    fresh: torch.Tensor | None = None   # codes of Q[v_k] just computed by the update node
    rebuild: Callable[[torch.Tensor], Any] | None = None  # forward: the block's output structure
    checksums: list[torch.Tensor] = field(default_factory=list)
    codes: dict[int, torch.Tensor] = field(default_factory=dict)  # backward: codes of x_j on the walk down
    bits: dict[int, torch.Tensor] = field(default_factory=dict)   # backward: side bits for step k
    grads: dict[int, torch.Tensor] = field(default_factory=dict)  # backward: g_{k+1} for step k's update node


class _Step:
    """Step k of one chain call as a function of a 0-element anchor only (nothing held).

    ``function(x)`` gives the step's f_k(x) = x + h_k(x) and the block's output structure. The
    first call is the forward: it reads the live x_k. Checkpoint calls it again when backward
    reaches the step: it then reads x_k rebuilt from codes, checks the recompute (``verify``),
    and inverts the update, leaving the codes of x_{k-1} for step k-1.
    """

    def __init__(self, chain: _ChainCall, k: int, function: Callable[[torch.Tensor], tuple[torch.Tensor, Any]],
                 where: str):
        self.chain, self.k, self.function, self.where = chain, k, function, where
        self.forward_done = False
        self.x_requires_grad = False

    def __call__(self, anchor: torch.Tensor) -> torch.Tensor:
        chain, k, l, where = self.chain, self.k, self.chain.frac_bits, self.where
        if self.forward_done:
            if k not in chain.codes:
                raise ReversibilityError("backward reached this step before the one above it rebuilt its input",
                                         module=where)
            x = fp.from_codes(chain.codes[k], l, chain.dtype).requires_grad_(self.x_requires_grad)
        else:
            x = chain.stream
            self.x_requires_grad = x.requires_grad
        version = x._version
        f, rebuild = self.function(x)
        if x._version != version:
            raise ConversionError("in-place op on the residual stream input inside the block", module=where)
        link = _Update.apply(f, x, anchor, chain, k, where)
        b, chain.fresh = chain.fresh, None
        with torch.no_grad():
            if not self.forward_done:
                self.forward_done = True
                chain.update, chain.rebuild = b, rebuild
                if chain.verify:
                    chain.checksums.append(fp.checksum(b))
            else:
                self._invert(b)
        return link

    def _invert(self, b: torch.Tensor) -> None:
        chain, k = self.chain, self.k
        if chain.verify and not torch.equal(fp.checksum(b), chain.checksums[k]):
            raise ReversibilityError(
                "backward recompute of this block differs from its forward (checksum mismatch): the block "
                "is not deterministic (non-deterministic kernel, unreplayed randomness or changed state)",
                module=self.where,
            )
        above = chain.codes.pop(k + 1)  # the walk needs x_{k+1} no longer
        if k == 0:
            chain.codes.pop(0)
            return
        bits = fp.unpack_side_bits(chain.bits.pop(k), b.shape)
        chain.codes[k - 1] = fp.bdia_inverse(above, b, chain.gammas.sign(k), bits)
        chain.trace("backward", chain.codes[k - 1])


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
        self.step_paths: list[str] = []  # the steps of the last training call (a block, or one sublayer)
        self._chain: _ChainCall | None = None
        self._last_out: torch.Tensor | None = None
        self._index = 0
        self._random_steps = 0
        self._plans: dict[Any, tuple] = {}  # granularity="sublayer": (plan, rebuild) per block call pattern

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
        elif self._chain is None or x is not self._last_out or index != self._index:
            raise ConversionError(
                f"block {index} of chain '{self.container}' got a stream that is not block {index - 1}'s "
                "output: the blocks must run in order with nothing applied to the stream in between",
                module=self.block_paths[index],
            )
        self._index = index + 1
        return self._train_block(index, block, original, x, call)

    def _start(self, x: torch.Tensor) -> None:
        if x.dim() <= self.batch_dim:
            raise ConversionError(f"stream has {x.dim()} dims, no batch dim {self.batch_dim}", module=self.block_paths[0])
        table = torch.tensor([int(2 * g) for g in self.config.gammas], dtype=torch.int8)
        self._chain = _ChainCall(_Gammas(table, x, self.batch_dim), self.config.frac_bits, x.dtype,
                                 self.config.mode == "reversible", self.config.verify, self._trace)
        self.step_paths = []
        self._random_steps = 0

    # ------------------------------------------------------------------ eval (γ = 0)
    def _eval_block(self, index: int, block: nn.Module, original: type, args: tuple, kwargs: dict) -> Any:
        if not self.config.quantize_eval:
            return original.forward(block, *args, **kwargs)
        return gamma0_block_forward(block, original, args, kwargs, self.config.frac_bits, index == 0,
                                    self.block_paths[index])

    # ------------------------------------------------------------------ training (BDIA)
    def _train_block(self, index: int, block: nn.Module, original: type, x: torch.Tensor, call: _BlockCall) -> Any:
        chain, where = self._chain, self.block_paths[index]
        if index == 0:
            x = _EnterChain.apply(x, chain, self.config.frac_bits, where)
        if self.memory_record is not None and chain.reversible:  # only while measuring: off the hot path
            self.memory_record.setdefault("side_storages", {}).update(
                {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                 for t in call.leaves if isinstance(t, torch.Tensor)})
        steps = self._steps_of(index, block, original, x, call)
        for j, (function, label, random) in enumerate(steps):
            last = index == len(self.blocks) - 1 and j == len(steps) - 1
            x = self._run_step(chain, x, function, label, random, last)
        rebuild, chain.rebuild = chain.rebuild, None
        if index < len(self.blocks) - 1:
            self._last_out = x
            return rebuild(x)
        self._trace("forward", chain.top)
        if self.memory_record is not None:
            self.memory_record["state_bytes"] = self._unsaved_bytes(chain)
        chain.below = chain.top = chain.prev = None
        self._chain, self._last_out = None, None
        return rebuild(x)

    def _steps_of(self, index: int, block: nn.Module, original: type, x: torch.Tensor,
                  call: _BlockCall) -> list[tuple[Callable[[torch.Tensor], tuple[torch.Tensor, Any]], str, bool]]:
        """The BDIA steps of one block call: the whole block, or one per sequential residual add."""
        where = self.block_paths[index]
        if self.config.granularity == "block":
            def whole(stream: torch.Tensor) -> tuple[torch.Tensor, Any]:
                f_args, f_kwargs = call.with_stream(stream)
                return _split_output(original.forward(block, *f_args, **f_kwargs), where)
            return [(whole, where, self.random_blocks[index])]
        plan, rebuild = self._plan(index, block, original, x, call)
        tensors = [None if i == call.stream_index else leaf for i, leaf in enumerate(call.leaves)
                   if i == call.stream_index or isinstance(leaf, torch.Tensor)]  # the stream is never held
        steps = []
        for j in range(len(plan)):
            def sublayer(stream: torch.Tensor, _j: int = j) -> tuple[torch.Tensor, Any]:
                return plan.run_step(_j, block, tensors, stream), (rebuild if _j == len(plan) - 1 else None)
            steps.append((sublayer, f"{where} (sublayer {j})", plan.random[j]))
        return steps

    def _plan(self, index: int, block: nn.Module, original: type, x: torch.Tensor, call: _BlockCall) -> tuple:
        """The block's sublayer plan for this call pattern and these shapes (exported once, cached)."""
        key = (index, call.spec, tuple(
            (tuple(v.shape), v.dtype, v.device) if isinstance(v, torch.Tensor)
            else v if isinstance(v, (int, float, bool, str, type(None))) else type(v).__name__
            for v in call.leaves))
        if key not in self._plans:
            leaves = list(call.leaves)
            leaves[call.stream_index] = x.detach()
            with capture_mode():
                self._plans[key] = plan_block_call(block, original, leaves, call.spec, call.stream_index,
                                                   self.block_paths[index])
        return self._plans[key]

    def _run_step(self, chain: _ChainCall, x: torch.Tensor, function: Callable, where: str, random: bool,
                  last: bool) -> torch.Tensor:
        k = len(self.step_paths)
        self.step_paths.append(where)
        chain.stream = x
        self._trace("forward", chain.top)
        step = _Step(chain, k, function, where)
        anchor = x.new_empty(0)  # on x's device: checkpoint keeps that device's RNG state
        if chain.reversible:
            self._random_steps += random
            with checkpoint.set_checkpoint_early_stop(False):  # the rebuild needs the step's whole output
                link = checkpoint.checkpoint(step, anchor, use_reentrant=False, preserve_rng_state=random)
        else:
            link = step(anchor)
        out = _StreamUpdate.apply(chain, k, last, where, chain.prev, link)
        chain.gammas.release(k)  # drawn again in backward
        chain.prev, chain.stream = x, None
        return out

    def _unsaved_bytes(self, chain: _ChainCall) -> int:
        """Bytes a chain call keeps outside autograd's saved tensors: checkpoint's RNG states, checksums, γ seed."""
        rng_bytes = torch.get_rng_state().numel() * self._random_steps
        return rng_bytes + sum(c.numel() * c.element_size() for c in chain.checksums) + 8

    def _trace(self, direction: str, codes: torch.Tensor) -> None:
        if self.code_trace is not None:
            self.code_trace[direction].append(codes.clone())
