"""The chain runtime: executes a BDIA chain block by block, and its reversible backward.

The converted model's parent module runs eagerly and calls its block modules in order; each block
of a chain is a thin proxy (see :mod:`bdia_fx.module_tree`) that hands the call to the chain's
:class:`ChainRuntime`. A training call is one :class:`~bdia_fx.frame.ChainFrame` (made at block 0)
run under ordinary autograd, one step per block (or per sublayer): an update Function turns the
step's output f_k(x_k) into the integer codes of Q[v_k], v_k = (1+γ)f_k − 2γx_k, and a stream
Function forms the exact fixed-point update x_{k+1} = Q[γx_{k-1}] + Q[v_k]; both pass
straight-through gradients (``docs/design.md``).

``mode="reversible"`` runs each step under non-reentrant ``torch.utils.checkpoint`` (its RNG and
autocast replay, no early stop) holding no tensor input: the step reads x_k from the frame, so
nothing but x_K, x_{K-1} codes and one packed side bit per element per step is saved (as ordinary
saved tensors of the stream Functions; γ is drawn again from one seed per call). When backward
reaches step k, its recompute checks and replays what the forward read (:mod:`bdia_fx.guards`),
reads x_k rebuilt from the codes, and inverts the update to x_{k-1} for step k-1. Parameter
gradients are accumulated operation by operation, as with per-block checkpointing.
``mode="stored"`` runs the very same steps without checkpointing (the reference).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.utils.checkpoint as checkpoint
from torch import nn

from bdia_fx import fixed_point as fp
from bdia_fx.calls import BlockCall, StreamSlots, describe_leaf, split_call, split_output
from bdia_fx.config import BDIAConfig
from bdia_fx.errors import ConversionError, ReversibilityError
from bdia_fx.frame import ChainFrame, StepRecord, recomputing
from bdia_fx.guards import StepState, record_step, version_of
from bdia_fx.scheme_chain import SchemeFrame, block_map_of, scheme_block_forward
from bdia_fx.scheme_form import SchemeForm
from bdia_fx.schemes import BDIA, scheme_of

if TYPE_CHECKING:
    from bdia_fx.passes.plan import ChainPlan, StepGraph

_capturing = [False]

StepFunction = Callable[[torch.Tensor], "tuple[torch.Tensor, Callable[[torch.Tensor], Any] | None]"]
SublayerPlanner = Callable[..., tuple[Any, Callable[[torch.Tensor], Any]]]


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


def gamma0_block_forward(block: nn.Module, original: type, args: tuple, kwargs: dict, frac_bits: int,
                         first: bool, where: str, slots: StreamSlots, branch: bool = False) -> Any:
    """One step of the quantized γ = 0 chain: x_{k+1} = Q[f_k(x_k)], with x_0 = Q[x_in] if ``first``.
    A ``branch`` module (its residual add in the parent) returns x_{k+1} − x_in for the parent to add."""
    x_in, call = split_call(args, kwargs, slots, where)
    x = fp.quantize(x_in, frac_bits) if first else x_in
    f_args, f_kwargs = call.with_stream(x)
    f, rebuild = split_output(original.forward(block, *f_args, **f_kwargs), slots, where)
    if branch:
        return rebuild(fp.quantize(x + f, frac_bits) - x_in)
    return rebuild(BDIA.inference(f, frac_bits))


class _EnterChain(torch.autograd.Function):
    """x_0 = Q[x_in] with the straight-through gradient; its codes start the chain."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, frame: ChainFrame) -> torch.Tensor:
        return frame.enter(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _Update(torch.autograd.Function):
    """Codes of Q[v_k] (left on the frame) from f_k and the codes of x_k, without materialising v_k.

    Returns an empty tensor that links f_k and x_k to the stream update, which hands the gradient
    g_{k+1} over through the frame; the straight-through gradients are (1+γ)g for f_k and −2γg for
    x_k. It saves only a 0-element anchor inside the step's checkpoint: backward reaches this node
    first in the step, so its unpack starts the recompute (and with it the rebuild of x_{k-1})
    before anything else of the step runs backward.
    """

    @staticmethod
    def forward(ctx, f: torch.Tensor, x: torch.Tensor, anchor: torch.Tensor, frame: ChainFrame, k: int,
                x_codes: torch.Tensor, direction: str) -> torch.Tensor:
        ctx.save_for_backward(anchor)
        ctx.frame, ctx.k = frame, k
        frame.update = frame.make_update(k, f, x_codes, direction)
        return f.new_empty(0)

    @staticmethod
    def backward(ctx, _link: torch.Tensor):
        ctx.saved_tensors  # noqa: B018 -- the unpack is the point: it triggers the step's recompute
        frame, k = ctx.frame, ctx.k
        grad = frame.grads.pop(k)
        if k == 0:
            return grad, None, None, None, None, None, None
        gamma = frame.gammas.gamma(k)
        frame.gammas.release(k)  # step k is done backward (drawn again if a retained graph runs again)
        grad_f, grad_x = frame.scheme.update_gradients(grad, gamma)
        return grad_f, grad_x, None, None, None, None, None


class _StreamUpdate(torch.autograd.Function):
    """x_{k+1} = Q[γx_{k-1}] + Q[v_k] on integer codes (x_1 = Q[v_0]); gradients γg and g (STE).

    In reversible mode it saves the packed side bits of x_{k-1}, and at the top the codes of x_K
    and x_{K-1}, as ordinary saved tensors (freed by autograd after backward unless the graph is
    retained); its backward hands them to the frame before step k is recomputed.
    """

    @staticmethod
    def forward(ctx, x_below: torch.Tensor | None, link: torch.Tensor, frame: ChainFrame, k: int,
                last: bool) -> torch.Tensor:
        b, frame.update = frame.update, None
        new, saved = frame.advance(k, b)
        if frame.reversible and last:
            saved += [new, frame.below]
        ctx.save_for_backward(*saved)
        ctx.frame, ctx.k, ctx.last = frame, k, last
        return fp.from_codes(new, frame.frac_bits, frame.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        frame, k = ctx.frame, ctx.k
        if frame.reversible:
            if torch.is_grad_enabled():
                raise ConversionError(
                    "a reversible chain does not support higher-order gradients (create_graph=True: gradient "
                    "penalties, double backward); convert with BDIAConfig(mode='stored') for them",
                    module=frame.container)
            saved = list(ctx.saved_tensors)
            if k > 0:
                frame.bits[k] = saved.pop(0)
            if ctx.last:
                frame.begin_backward(k, saved)
            elif k + 1 not in frame.codes:
                raise ReversibilityError(
                    f"the forward of chain '{frame.container}' ended after this step, before the chain's last "
                    "block: a reversible chain rebuilds its inputs from the last block's output, so the parent "
                    "must call every block of the chain in each training call (layer dropping and early exits "
                    "need BDIAConfig(mode='stored'))", module=frame.steps[k].path)
        frame.grads[k] = grad  # for the step's update node (the link carries no data)
        link = grad.new_zeros(0)
        if k == 0:
            return None, link, None, None, None
        return frame.scheme.below_gradient(grad, frame.gammas.gamma(k)), link, None, None, None


class _Step:
    """Step k of one chain call as a function of a 0-element anchor only (nothing held).

    ``function(x)`` gives the step's f_k(x) = x + h_k(x) and the block's output structure. The
    first call is the forward: it reads the live x_k. Checkpoint calls it again when backward
    reaches the step: it then checks what the recompute reads (``state``), replays the forward's
    module state, reads x_k rebuilt from codes and inverts the update, leaving the codes of x_{k-1}
    for step k-1. Checkpoint holds the step until backward has run, and no longer.
    """

    def __init__(self, frame: ChainFrame, k: int, function: StepFunction, state: StepState | None):
        self.frame, self.k, self.function, self.state = frame, k, function, state
        self.ran = False

    def __call__(self, anchor: torch.Tensor) -> torch.Tensor:
        frame, k = self.frame, self.k
        record = frame.steps[k]
        if self.ran:
            return self._recompute(record, anchor)
        self.ran = True
        x = frame.stream
        record.x_requires_grad = x.requires_grad
        version = version_of(x)
        f, rebuild = self.function(x)
        if version_of(x) != version:
            raise ConversionError("in-place op on the residual stream input inside the block", module=record.path)
        link = _Update.apply(f, x, anchor, frame, k, frame.top, "forward")
        if rebuild is not None:
            frame.rebuild = rebuild
        return link

    def _recompute(self, record: StepRecord, anchor: torch.Tensor) -> torch.Tensor:
        frame, k = self.frame, self.k
        if k not in frame.codes:
            raise ReversibilityError("backward reached this step before the one above it rebuilt its input",
                                     module=record.path)
        self.state.check()
        x_codes = frame.codes[k]
        x = fp.from_codes(x_codes, frame.frac_bits, frame.dtype).requires_grad_(record.x_requires_grad)
        with self.state.replay(), recomputing():
            f, _ = self.function(x)
        link = _Update.apply(f, x, anchor, frame, k, x_codes, "backward")
        b, frame.update = frame.update, None
        with torch.no_grad():
            frame.invert(k, b)
        return link


class ChainRuntime:
    """Runs one chain of ``K`` blocks as BDIA (training) or as the γ = 0 chain (eval).

    ``plan_sublayers(block, original, leaves, spec, stream_index, slots, where)`` (given by
    :func:`bdia_fx.convert` for ``granularity="sublayer"``) returns a block call's sublayer plan
    and a function rebuilding the block's output; the runtime caches and executes plans, it does
    not make them.
    """

    def __init__(self, container: str, block_paths: tuple[str, ...], blocks: list[nn.Module],
                 originals: list[type], config: BDIAConfig, batch_dim: int, random_blocks: list[bool],
                 slots: list[StreamSlots], plan_sublayers: SublayerPlanner | None = None, branch: bool = False):
        self.container = container
        self.branch = branch  # the blocks compute h(x) only; the parent adds the stream (x = h(x) + x)
        self.block_paths = block_paths
        self.blocks = blocks
        self.originals = originals
        self.config = config
        self.batch_dim = batch_dim
        self.random_blocks = list(random_blocks)
        self.slots = slots
        self.plan_sublayers = plan_sublayers
        self.observers: list = []  # bdia_fx.observe.ChainObserver instances while something measures
        self._frame: ChainFrame | None = None  # the training call whose forward is running
        self._training = False  # whether the running call trains (some block of the chain is in training mode)
        self._plans: dict[Any, tuple] = {}  # granularity="sublayer": (plan, rebuild) per block call and shapes
        # BDIAConfig(scheme=...) other than BDIA: the chain integrates its blocks with that scheme
        self.shear_scheme = None if config.scheme == "bdia" else scheme_of(config.scheme)
        self.form = None if self.shear_scheme is None else \
            SchemeForm(container, self.shear_scheme, config.frac_bits, config.quantize_eval, len(blocks))

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_frame"], state["_plans"], state["observers"] = None, {}, []  # per call, or re-made on demand
        return state

    # ------------------------------------------------------------------ dispatch
    def run_block(self, index: int, block: nn.Module, args: tuple, kwargs: dict) -> Any:
        original = self.originals[index]
        if capturing():
            return original.forward(block, *args, **kwargs)
        where = self.block_paths[index]
        if index == 0:  # the whole chain call trains if any of its blocks is in training mode
            self._training = any(b.training for b in self.blocks)
        if not self._training:
            if self.form is not None:
                return scheme_block_forward(self.form, block, original, args, kwargs, index, where,
                                            self.slots[index], self.branch)
            if not self.config.quantize_eval:
                return original.forward(block, *args, **kwargs)
            return gamma0_block_forward(block, original, args, kwargs, self.config.frac_bits, index == 0, where,
                                        self.slots[index], self.branch)
        x, call = split_call(args, kwargs, self.slots[index], where)
        if index == 0:
            if x.dim() <= self.batch_dim:
                raise ConversionError(f"stream has {x.dim()} dims, no batch dim {self.batch_dim}", module=where)
            self._frame = self._new_frame(x, where)
        elif self.branch:
            self._accept_parent_add(index, x)
        else:
            self._accept(index, x)
        frame = self._frame
        frame.next_block = index + 1
        passed, x = x, (frame.out if self.branch and index > 0 else x)  # a branch chain steps from its own stream
        try:
            if self.shear_scheme is not None:
                return self._train_scheme_block(frame, index, block, original, call, passed)
            return self._train_block(frame, index, block, original, x, call, passed)
        except BaseException:
            self._frame = None  # a failed call keeps nothing alive until the next one
            raise

    def _new_frame(self, x: torch.Tensor, where: str) -> ChainFrame | SchemeFrame:
        """The frame of a training call starting at block 0 with stream ``x``."""
        if self.shear_scheme is None:
            return ChainFrame(self.container, x, self.config, self.batch_dim, tuple(self.observers))
        sharded = [p for p, b in zip(self.block_paths, self.blocks) if type(b).__name__.startswith("FSDP")]
        if sharded:
            raise ConversionError(
                f"scheme chain '{self.container}' runs its backward in one autograd node, which FSDP's per-block "
                f"hooks cannot see ('{sharded[0]}' is sharded with fully_shard); shard the model above the chain, "
                "or train with the default BDIA scheme", module=sharded[0])
        return SchemeFrame(self.container, self.shear_scheme, self.config.frac_bits, self.config.mode == "reversible",
                           self.config.verify, x, len(self.blocks))

    def _check_order(self, index: int) -> tuple[ChainFrame, str, str]:
        """The running call's frame, block ``index``'s path and the previous block's, if block ``index`` is due."""
        frame, where = self._frame, self.block_paths[index]
        if frame is None or frame.next_block != index:
            expected = 0 if frame is None else frame.next_block
            raise ConversionError(
                f"block {index} of chain '{self.container}' ran out of order (block {expected} was due): the "
                "blocks of a chain must run in order, each once per call", module=where)
        return frame, where, self.block_paths[index - 1]

    def _accept(self, index: int, x: torch.Tensor) -> None:
        """Block ``index`` must get exactly what block ``index - 1`` returned, unmodified."""
        frame, where, before = self._check_order(index)
        if not _same_stream(x, frame.out):
            hooks = _hooks_between(self.blocks[index - 1], before, self.blocks[index], where)
            raise ConversionError(
                f"block {index} of chain '{self.container}' got a stream that is not block {index - 1}'s output: "
                f"something between '{before}' and '{where}' replaced it ({hooks or 'no hook is registered there'}; "
                "else the parent's code or a wrapper around the block). A chain keeps its own exact copy of the "
                "stream, so nothing may change it between blocks; a change made inside a block (a hook on one of "
                "its submodules) is part of the block and is replayed exactly", module=where)
        if version_of(frame.out) != frame.out_version:
            hooks = _hooks_between(self.blocks[index - 1], before, self.blocks[index], where)
            raise ConversionError(
                f"the stream between '{before}' and '{where}' was modified in place "
                f"({hooks or 'no hook is registered there: the parent code'}). A chain keeps its own exact copy "
                "of the stream, so the change would be lost in backward; a change made inside a block (a hook on "
                "one of its submodules) is part of the block and is replayed exactly", module=where)

    def _accept_parent_add(self, index: int, x: torch.Tensor) -> None:
        """Branch chains: block ``index`` must get the parent's ``h + x`` of what block ``index - 1``
        returned and the stream it was given, nothing else (checked on the autograd graph; by value
        when no graph is recorded). The chain then steps from its own exact copy of that sum."""
        frame, where, before = self._check_order(index)
        returned, passed, version = frame.branch_io
        if version_of(returned) != version:
            added = False  # edited in place after the block returned it (a forward hook, the parent)
        elif x.grad_fn is not None or returned.grad_fn is not None:
            nexts = {node for node, _ in x.grad_fn.next_functions} if x.grad_fn is not None else set()
            added = (type(x.grad_fn).__name__ == "AddBackward0" and returned.grad_fn in nexts
                     and (passed.grad_fn is None or passed.grad_fn in nexts))
        else:
            added = torch.equal(x, returned + passed)
        if not added:
            raise ConversionError(
                f"block {index} of chain '{self.container}' got a stream that is not the parent's residual add of "
                f"'{before}''s output and its input: something between '{before}' and '{where}' changed it (an "
                "in-place edit, another op in the parent's loop, or a hook). A chain keeps its own exact copy of the "
                "stream, so nothing may change it between blocks", module=where)

    # ------------------------------------------------------------------ training (BDIA)
    def _train_block(self, frame: ChainFrame, index: int, block: nn.Module, original: type, x: torch.Tensor,
                     call: BlockCall, passed: torch.Tensor) -> Any:
        if index == 0:
            x = _EnterChain.apply(x, frame)
        sides = call.side_tensors()
        for observer in frame.observers:
            observer.block_called(frame, index, sides)
        x = self._run_steps(frame, index, x, self._steps_of(index, block, original, x, call), sides, call.leaf_name)
        rebuild, frame.rebuild = frame.rebuild, None
        returned = x - passed if self.branch else x  # the parent adds ``passed`` back: x_{k+1}
        if index < len(self.blocks) - 1:
            frame.out, frame.out_version = x, version_of(x)
            if self.branch:
                frame.branch_io = (returned, passed, version_of(returned))
            return rebuild(returned)
        self._frame, frame.branch_io = None, None
        frame.finish_forward()
        return rebuild(returned)

    def _train_scheme_block(self, frame: SchemeFrame, index: int, block: nn.Module, original: type,
                            call: BlockCall, passed: torch.Tensor) -> Any:
        """Block ``index`` as step k of a scheme chain (:mod:`bdia_fx.scheme_chain`); the chain steps
        from its own state, so ``passed`` (the stream the parent handed over) is only checked."""
        where, slots = self.block_paths[index], self.slots[index]
        sides = call.side_tensors()
        names = {i: call.leaf_name(i) for i, _ in sides}  # the frame outlives the call: keep no leaf of it
        state = record_step(block, where, sides, names.__getitem__) if frame.reversible else None
        rebind, side_tensors, first_rebuild = block_map_of(block, original, call, slots, where)
        z = frame.step(index, where, rebind, side_tensors, [p for p in block.parameters() if p.requires_grad],
                       self.branch, state, self.random_blocks[index])
        rebuild = first_rebuild()
        returned = z - passed if self.branch else z
        if index < len(self.blocks) - 1:
            frame.out, frame.out_version = z, version_of(z)
            if self.branch:
                frame.branch_io = (returned, passed, version_of(returned))
            return rebuild(returned)
        self._frame = None
        joined = frame.finish()
        if joined is not None:
            returned = joined - passed if self.branch else joined
        return rebuild(returned)

    def _steps_of(self, index: int, block: nn.Module, original: type, x: torch.Tensor,
                  call: BlockCall) -> list[tuple[StepFunction, str, bool]]:
        """The BDIA steps of one block call: the whole block, or one per sequential residual add."""
        where, slots = self.block_paths[index], self.slots[index]
        if self.config.granularity == "block" or self.branch:  # a branch is one residual add: one step
            def whole(stream: torch.Tensor) -> tuple[torch.Tensor, Any]:
                f_args, f_kwargs = call.with_stream(stream)
                f, rebuild = split_output(original.forward(block, *f_args, **f_kwargs), slots, where)
                return (stream + f if self.branch else f), rebuild
            return [(whole, where, self.random_blocks[index])]
        steps, rebuild = self._plan(index, block, original, x, call)  # plans are per module state too
        tensors = [leaf for i, leaf in enumerate(call.leaves)
                   if i != call.stream_index and isinstance(leaf, torch.Tensor)]
        return [(functools.partial(_planned_step, step, block, tensors, rebuild if j == len(steps) - 1 else None),
                 f"{where} (sublayer {j})", step.random) for j, step in enumerate(steps)]

    def _plan(self, index: int, block: nn.Module, original: type, x: torch.Tensor, call: BlockCall) -> tuple:
        """The block's sublayer steps for this call structure, these input shapes and this module state
        (training flags, ``Dropout.p``, ...: an exported graph holds them as constants); made once, cached."""
        state = tuple(tuple(v for v in m.__dict__.values() if type(v) in (bool, int, float, str))
                      for m in block.modules())
        key = (index, call.spec, describe_leaf(x, shapes=True),
               tuple(describe_leaf(v, shapes=True) for v in call.leaves),
               state)
        if key not in self._plans:
            leaves = list(call.leaves)
            leaves[call.stream_index] = x.detach()
            self._plans[key] = self.plan_sublayers(block, original, leaves, call.spec, call.stream_index,
                                                   self.slots[index], self.block_paths[index])
        return self._plans[key]

    # ------------------------------------------------------------------ the rewritten graph's chain node
    def run_plan(self, plan: ChainPlan, x: torch.Tensor, sides: list[torch.Tensor], training: bool) -> torch.Tensor:
        """Run the chain ``plan`` (from :mod:`bdia_fx.passes.plan`) on the stream ``x`` = Q[x_in] and
        the chain's side inputs: the BDIA chain in training, the γ = 0 chain otherwise. The steps are
        the planned graphs of the blocks, the machinery the same as for the eager model's calls."""
        block_sides = [[sides[i] for i in plan.side_positions(block)] for block in plan.blocks]
        if self.shear_scheme is not None:
            return self._run_scheme_plan(plan, x, block_sides, training)
        if not training:
            for index, block in enumerate(plan.blocks):
                for step in block.steps:
                    x = step(self.blocks[index], x, block_sides[index])
                x = fp.quantize(x, self.config.frac_bits) if self.config.quantize_eval else x
            return x
        frame = self._frame = ChainFrame(self.container, x, self.config, self.batch_dim, tuple(self.observers))
        x = _EnterChain.apply(x, frame)
        for index, block in enumerate(plan.blocks):
            named = list(enumerate(block_sides[index]))
            for observer in frame.observers:
                observer.block_called(frame, index, named)
            steps = [(functools.partial(_planned_step, step, self.blocks[index], block_sides[index], None),
                      block.path if len(block.steps) == 1 else f"{block.path} (sublayer {j})", step.random)
                     for j, step in enumerate(block.steps)]
            x = self._run_steps(frame, index, x, steps, named, lambda i, b=block: b.side_inputs[i].name)
        self._frame = None
        frame.finish_forward()
        return x

    def _run_scheme_plan(self, plan: ChainPlan, x: torch.Tensor, block_sides: list[list[torch.Tensor]],
                         training: bool) -> torch.Tensor:
        """:meth:`run_plan` for a scheme chain: its inference form, or its training frame."""
        def rebind(index: int) -> Callable[[list[torch.Tensor]], Callable[[torch.Tensor], torch.Tensor]]:
            steps, block = plan.blocks[index].steps, self.blocks[index]
            return lambda sides: lambda z: functools.reduce(lambda s, step: step(block, s, list(sides)), steps, z)

        if not training:
            out = x
            for index, block in enumerate(plan.blocks):
                out = self.form.step(index, out, rebind(index)(block_sides[index]), False, block.path)
            return out
        frame = self._new_frame(x, self.container)
        z = x
        for index, block in enumerate(plan.blocks):
            state = None
            if frame.reversible:
                state = record_step(self.blocks[index], block.path, list(enumerate(block_sides[index])),
                                    lambda i, b=block: b.side_inputs[i].name)
            z = frame.step(index, block.path, rebind(index), block_sides[index],
                           [p for p in self.blocks[index].parameters() if p.requires_grad], False, state,
                           any(s.random for s in block.steps))
        joined = frame.finish()
        return z if joined is None else joined

    # ------------------------------------------------------------------ both
    def _run_steps(self, frame: ChainFrame, index: int, x: torch.Tensor, steps: list[tuple[StepFunction, str, bool]],
                   sides: list[tuple[int, torch.Tensor]], name_of: Callable[[int], str]) -> torch.Tensor:
        for j, (function, path, random) in enumerate(steps):
            last = index == len(self.blocks) - 1 and j == len(steps) - 1
            x = self._run_step(frame, x, function, path, random, last, index, sides, name_of)
        return x

    def _run_step(self, frame: ChainFrame, x: torch.Tensor, function: StepFunction, path: str, random: bool,
                  last: bool, index: int, sides: list[tuple[int, torch.Tensor]],
                  name_of: Callable[[int], str]) -> torch.Tensor:
        k = len(frame.steps)
        state = record_step(self.blocks[index], self.block_paths[index], sides, name_of) if frame.reversible else None
        frame.steps.append(StepRecord(path, random))
        frame.stream = x
        step = _Step(frame, k, function, state)
        anchor = x.new_empty(0)  # on x's device: checkpoint keeps that device's RNG state
        if frame.reversible:
            with checkpoint.set_checkpoint_early_stop(False):  # the rebuild needs the step's whole output
                link = checkpoint.checkpoint(step, anchor, use_reentrant=False, preserve_rng_state=random)
        else:
            link = step(anchor)
        out = _StreamUpdate.apply(frame.prev, link, frame, k, last)
        frame.prev, frame.stream = x, None
        return out


def _planned_step(step: StepGraph, block: nn.Module, sides: list[torch.Tensor], rebuild: Callable | None,
                  stream: torch.Tensor) -> tuple[torch.Tensor, Callable | None]:
    """A planned step as a step function: its output, and the block's output structure (last step)."""
    return step(block, stream, sides), rebuild


class BDIAChain(nn.Module):
    """The chain node of the rewritten graph: ``forward(x0, *side_inputs)`` runs a planned chain with
    the chain runtime, the same one the eager converted model runs (see ``docs/design.md``).

    The rewritten graph is the training graph of the captured call (its dropout ops, shapes and
    call pattern are the capture's); in ``.eval()`` the node runs the γ = 0 chain of the same steps.
    """

    def __init__(self, runtime: ChainRuntime, plan: ChainPlan):
        super().__init__()
        self.runtime, self.plan = runtime, plan

    def forward(self, x0: torch.Tensor, *sides: torch.Tensor) -> torch.Tensor:
        return self.runtime.run_plan(self.plan, x0, list(sides), self.training)

    def extra_repr(self) -> str:
        steps = sum(len(b.steps) for b in self.plan.blocks)
        return f"chain '{self.plan.container}': {len(self.plan.blocks)} blocks, {steps} steps"


def _same_stream(x: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether block k+1's stream ``x`` is block k's output ``out``: the object itself, or an alias of
    it with the same geometry (FSDP2 passes block inputs through an identity autograd Function)."""
    while x is not out:
        base = x._base
        if base is None or x.shape != base.shape or x.stride() != base.stride() or \
                x.storage_offset() != base.storage_offset():
            return False
        x = base
    return True


def _hooks_between(before: nn.Module, before_path: str, block: nn.Module, path: str) -> str:
    """The hooks that run between two blocks' forwards, named with their module."""
    from torch.nn.modules import module as module_globals

    def names(hooks: dict) -> list[str]:
        return [getattr(h, "__qualname__", type(h).__name__) for h in hooks.values()]

    found = [f"forward hook {n} on '{before_path}'" for n in names(before._forward_hooks)]
    found += [f"forward pre-hook {n} on '{path}'" for n in names(block._forward_pre_hooks)]
    found += [f"global forward hook {n}" for n in names(module_globals._global_forward_hooks)]
    found += [f"global forward pre-hook {n}" for n in names(module_globals._global_forward_pre_hooks)]
    return ", ".join(found)
