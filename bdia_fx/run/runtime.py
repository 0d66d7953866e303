"""The chain runtime: executes a chain block by block, in training and in eval.

The converted model's parent module runs and calls its block modules in order; each block of a chain
is a thin proxy (see :mod:`bdia_fx.module_tree`) that hands the call to the chain's
:class:`ChainRuntime`. A training call is one :class:`~bdia_fx.run.frame.ChainCall` (made at block 0):
each block (or sublayer) is one chain step of the chain's scheme (:mod:`bdia_fx.schemes`), run by
:func:`bdia_fx.run.chain_step.run_step` — the one training path of every scheme, reversible or stored,
eager or traced by ``torch.compile``. Eval runs the scheme's inference form (:class:`InferenceForm`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from bdia_fx import fixed_point as fp
from bdia_fx.calls import BlockCall, StreamSlots, describe_leaf, split_call
from bdia_fx.config import BDIAConfig
from bdia_fx.errors import ConversionError
from bdia_fx.hub_kernels import kernelized, named_kernel_wrapped
from bdia_fx.module_tree import pre_call_of
from bdia_fx.run import chain_step
from bdia_fx.run.block_maps import OriginalCall, StepSource
from bdia_fx.run.frame import ChainCall
from bdia_fx.run.guards import record_step, version_of
from bdia_fx.schemes import ChainScheme, chain_scheme_of

if TYPE_CHECKING:
    from bdia_fx.passes.plan import ChainPlan

__all__ = ["BDIAChain", "ChainRuntime", "InferenceForm", "SublayerPlanner", "capture_mode", "capturing"]

logger = logging.getLogger(__name__)
_capturing = [False]

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


class InferenceForm:
    """A chain's inference form (eval, and the reverted model's proxies), block call by block call:
    a scheme whose inference state is more than the stream keeps it here from block 0's call to the
    last block's (the parent hands over only the stream)."""

    def __init__(self, container: str, scheme: ChainScheme, frac_bits: int, quantize: bool, blocks: int,
                 pres: tuple[bool, ...] = ()):
        self.container, self.scheme, self.frac_bits, self.quantize = container, scheme, frac_bits, quantize
        self.blocks = blocks
        self.pres = pres or (False,) * blocks  # which steps' streams pass through a pre module first
        self._state: list | None = None
        self._out: Any = None
        self._next = 0

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_state": None, "_out": None, "_next": 0}

    def with_quantize(self, quantize: bool) -> InferenceForm:
        """The same form, quantized or not."""
        return InferenceForm(self.container, self.scheme, self.frac_bits, quantize, self.blocks, self.pres)

    def quantizer(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        return functools.partial(fp.quantize, frac_bits=self.frac_bits) if self.quantize else None

    def run_block(self, index: int, block: nn.Module, original: type, args: tuple, kwargs: dict, where: str,
                  slots: StreamSlots, branch: bool) -> Any:
        """Block ``index``'s call (``where``: its path; ``slots``: where its stream is; ``branch``: it
        computes h(x) only and the parent adds the stream)."""
        x, call = split_call(args, kwargs, slots, where)
        x, pre = _pre_stream(x, where) if self.pres[index] else (x, None)
        source = StepSource(block, original, where, slots, branch, call, pre=pre)
        block_map = source.bind([leaf for leaf in call.leaves if isinstance(leaf, torch.Tensor)])
        z = self.step(index, x, block_map, branch, where)
        return block_map.rebuild(z) if block_map.rebuild is not None else z

    def step(self, k: int, x: torch.Tensor, block: Any, branch: bool, where: str) -> torch.Tensor:
        """Block k's call: the new stream z_{k+1} from z_k = ``x`` (a branch gets z_{k+1} − x back)."""
        scheme, bits, q = self.scheme, self.frac_bits, self.quantizer()
        if k == 0:
            state = scheme.infer_start(x, bits, q)
        elif self._state is not None and len(self._state) == 1:
            state = scheme.infer_start(x, bits, None)  # the state is the stream: step from what the parent gave
        else:
            if self._state is None or self._next != k or not self._handed_over(x, branch):
                raise ConversionError(
                    f"block {k} of chain '{self.container}' did not get block {k - 1}'s output: this chain's "
                    "inference form carries state between its blocks, so they must run in order, each once per "
                    "call, with nothing changing the stream in between", module=where)
            state = self._state
        state = scheme.infer_step(k, state, block, bits, q, x.dtype)
        z = scheme.infer_stream(state, bits, x.dtype)
        returned = z - x if branch else z
        self._state, self._out, self._next = (None, None, 0) if k == self.blocks - 1 else \
            (state, (returned, x) if branch else z, k + 1)
        return returned

    def _handed_over(self, x: torch.Tensor, branch: bool) -> bool:
        """The stream block k got is block k−1's output: the object itself, or for a branch module the
        parent's add of what it returned and its input (by value; not checked while being compiled or
        exported, where values are symbolic)."""
        if not branch:
            return x is self._out
        if torch.compiler.is_compiling():
            return True
        returned, passed = self._out
        return x.shape == passed.shape and torch.equal(x, returned + passed)


def _first(per_step: list) -> int | None:
    """The first step whose entry is set (a pre module, state read from outside), or None."""
    return next((i for i, entry in enumerate(per_step) if entry), None)


def _pre_stream(got: torch.Tensor, where: str) -> tuple[torch.Tensor, nn.Module]:
    """The stream and pre module behind what a branch with a pre module got (h(x) = branch(pre(x)))."""
    found = pre_call_of(got)
    if found is None:
        raise ConversionError(
            f"'{where}' got a value that is not its pre module's output of the stream: the parent changed it "
            "between the two calls, or called the branch without the module it was captured with", module=where)
    if isinstance(found, str):
        raise ConversionError(f"'{where}' got its pre module's output, but {found}; a step replays the pre module on "
                              "the stream alone, so it must be called as pre(x) and its output passed on as it is",
                              module=where)
    return found


class ChainRuntime:
    """Runs one chain of ``K`` blocks: the scheme's training chain, or its inference form in eval.

    ``plan_sublayers(block, original, leaves, spec, stream_index, slots, where)`` (given by
    :func:`bdia_fx.convert` for ``granularity="sublayer"``) returns a block call's sublayer plan
    and a function rebuilding the block's output; the runtime caches and executes plans, it does
    not make them.
    """

    def __init__(self, container: str, block_paths: tuple[str, ...], blocks: list[nn.Module],
                 originals: list[type], config: BDIAConfig, batch_dim: int, random_blocks: list[bool],
                 slots: list[StreamSlots], plan_sublayers: SublayerPlanner | None = None, branch: bool = False,
                 pres: list[nn.Module | None] | None = None, owners: list[tuple[str, nn.Module]] | None = None,
                 outside: list[list[tuple[str, nn.Module, str]]] | None = None):
        self.container = container
        self.branch = branch  # the blocks compute h(x) only; the parent adds the stream (x = h(x) + x)
        self.pres = list(pres or [None] * len(blocks))  # a branch's pre module (h(x) = branch(pre(x))), else None
        owners = list(owners or zip(block_paths, blocks))  # the module holding a step's modules: its parameters
        self.owner_paths, self.owners = [p for p, _ in owners], [m for _, m in owners]  # and what its guard reads
        # per step, the state it reads from modules outside it: (name, module, attribute), read at each call
        self.outside = list(outside or [[] for _ in blocks])
        self.block_paths = block_paths
        self.blocks = blocks
        self.originals = originals
        self.config = config
        self.batch_dim = batch_dim
        self.random_blocks = list(random_blocks)
        self.slots = slots
        self.plan_sublayers = plan_sublayers
        self.scheme = chain_scheme_of(config.scheme)
        # a memory plan (bdia_fx.budget): per block, it keeps its activations in the reversible chain; or the
        # whole chain runs as the original model (the budget fits the plain model's peak)
        self.keeps = [False] * len(blocks)
        self.unconverted = False
        self.observers: list = []  # bdia_fx.run.frame.ChainObserver instances while something measures
        self._call: ChainCall | None = None  # the training call whose forward is running
        self._training = False  # whether the running call trains (some block of the chain is in training mode)
        self._plans: dict[Any, tuple] = {}  # granularity="sublayer": (plan, rebuild) per block call and shapes
        self.callers = [OriginalCall(b, o) for b, o in zip(blocks, originals)]  # for torch.func under compile
        self.kernel_wrapped = named_kernel_wrapped(block_paths, blocks)  # Note: [hub kernel forwards]
        self.form = InferenceForm(container, self.scheme, config.frac_bits, config.quantize_eval, len(blocks),
                                  tuple(p is not None for p in self.pres))

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_call=None, _plans={}, observers=[])  # per call, or re-made on demand
        return state

    def compile_blocker(self) -> str | None:
        """Why ``torch.compile`` cannot trace this chain's calls now (the module calling its blocks then runs
        eagerly behind a boundary, :class:`bdia_fx.module_tree.CompileBoundary`), or None when it can:
        eval calls can unless their inference form steps through a pre module; training calls unless their
        streams pass through a pre module, a block reads state from outside it, they plan sublayers at run
        time, run kernelized forwards of the ``kernels`` package, or draw random numbers a compiled recompute could not
        replay."""
        if self.unconverted:
            return None
        training = any(b.training for b in self.blocks)
        original = not self.config.quantize_eval and self.scheme.original_at_inference  # eval runs the blocks
        pre = _first(self.pres)
        if pre is not None and (training or not original):
            return (f"the stream of '{self.block_paths[pre]}' passes through a module the parent calls first (a "
                    "pre-norm beside the branch, as in x-transformers), which is matched to the branch's call by "
                    "object identity")
        if not training:
            return None
        reads = _first(self.outside)
        if reads is not None:
            return (f"block '{self.block_paths[reads]}' reads '{self.outside[reads][0][0]}' from a module outside "
                    "it, which the compiled recompute cannot take as a parameter")
        if self.config.granularity != "block":
            return "granularity='sublayer' plans its steps from exports at run time"
        kernelized_now = [path for path, module in self.kernel_wrapped if kernelized(module)]
        if kernelized_now:
            return (f"module '{kernelized_now[0]}' was kernelized (the `kernels` package, Hugging Face hub kernels): "
                    "its wrapper sets a global under torch.compile, which dynamo cannot trace inside a backward "
                    "recompute")
        random = [p for p, r in zip(self.block_paths, self.random_blocks) if r]
        if random:
            return (f"block '{random[0]}' draws random numbers in training (dropout): a compiled recompute cannot "
                    "replay torch's generator")
        return None

    # ------------------------------------------------------------------ dispatch
    def run_block(self, index: int, block: nn.Module, args: tuple, kwargs: dict) -> Any:
        original = self.originals[index]
        if capturing() or self.unconverted:
            return original.forward(block, *args, **kwargs)
        where = self.block_paths[index]
        if index == 0:  # the whole chain call trains if any of its blocks is in training mode
            self._training = any(b.training for b in self.blocks)
        if not self._training:
            if not self.config.quantize_eval and self.scheme.original_at_inference:
                return original.forward(block, *args, **kwargs)
            return self.form.run_block(index, block, original, args, kwargs, where, self.slots[index], self.branch)
        x, call = split_call(args, kwargs, self.slots[index], where)
        pre = None
        if self.pres[index] is not None:
            x, pre = _pre_stream(x, where)
            if pre is not self.pres[index]:
                raise ConversionError(f"'{where}' got the output of another module than its pre module "
                                      f"'{type(self.pres[index]).__name__}' it was captured with", module=where)
        if index == 0:
            if x.dim() <= self.batch_dim:
                raise ConversionError(f"stream has {x.dim()} dims, no batch dim {self.batch_dim}", module=where)
            self._call = ChainCall(self.container, self.scheme, self.config, x, self.batch_dim,
                                   tuple(self.observers), torch.compiler.is_compiling())
        elif self.branch:
            self._accept_parent_add(index, x)
        else:
            self._accept(index, x)
        chain = self._call
        chain.next_block = index + 1
        try:
            return self._train_block(chain, index, block, original, x, call, pre)
        except BaseException:
            self._call = None  # a failed call keeps nothing alive until the next one
            raise

    def _check_order(self, index: int) -> tuple[ChainCall, str, str]:
        """The running call, block ``index``'s path and the previous block's, if block ``index`` is due."""
        frame, where = self._call, self.block_paths[index]
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
        if not frame.compiled and version_of(frame.out) != frame.out_version:
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
        if frame.compiled:  # traced values: the graph fixes what the parent adds
            return
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

    # ------------------------------------------------------------------ training
    def _train_block(self, chain: ChainCall, index: int, block: nn.Module, original: type, x: torch.Tensor,
                     call: BlockCall, pre: nn.Module | None = None) -> Any:
        where, slots = self.block_paths[index], self.slots[index]
        if index == 0:
            chain_step.enter(chain, x, where)
        sides = call.side_tensors()
        for observer in chain.observers:
            observer.block_called(chain, index, sides)
        side_tensors = [t for _, t in sides]
        owner = self.owners[index]  # the block, or the layer holding a branch and its pre module
        named = [(name, p) for name, p in owner.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        outside = []  # convert kept only state that is not the owner's; read now (FSDP2 swaps tensors)
        if self.outside[index]:
            outside = [(name, getattr(module, attribute)) for name, module, attribute in self.outside[index]]
            params += [t for _, t in outside if t.requires_grad]
        keep = self.keeps[index]
        guard = (record_step(owner, self.owner_paths[index], sides, call.names(), outside)
                 if chain.reversible and not chain.compiled and not keep else None)
        last_block = index == len(self.blocks) - 1
        if self.config.granularity == "block" or self.branch:  # a branch is one residual add: one step
            source = StepSource(block, original, where, slots, self.branch, call, caller=self.callers[index],
                                param_names=[name for name, _ in named], pre=pre)
            block_map = chain_step.run_step(chain, source, side_tensors, params, guard, self.random_blocks[index],
                                            last_block, keep)
            rebuild = block_map.rebuild
        else:
            steps, rebuild = self._plan(index, block, original, x, call)  # plans are per module state too
            for j, step in enumerate(steps):
                source = StepSource(block, original, f"{where} (sublayer {j})", slots, False, graph=step)
                chain_step.run_step(chain, source, side_tensors, params, guard, step.random,
                                    last_block and j == len(steps) - 1, keep)
        out = chain_step.stream(chain)
        returned = out - x if self.branch else out  # the parent adds ``x`` back: x_{k+1}
        if not last_block:
            chain.out, chain.out_version = out, (None if chain.compiled else version_of(out))
            if self.branch:
                chain.branch_io = (returned, x, None if chain.compiled else version_of(returned))
            return rebuild(returned) if rebuild is not None else returned
        self._call = None
        chain.finish_forward()
        return rebuild(returned) if rebuild is not None else returned

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
        """Run the chain ``plan`` (from :mod:`bdia_fx.passes.plan`) on the stream ``x`` = Q[x_in] and the
        chain's side inputs: the training chain, or the inference form. The steps are the planned graphs
        of the blocks, the machinery the same as for the eager model's calls."""
        block_sides = [[sides[i] for i in plan.side_positions(block)] for block in plan.blocks]
        if not training:
            out = x
            for index, block in enumerate(plan.blocks):
                steps = block.steps
                source = StepSource(self.owners[index], self.originals[index], block.path, self.slots[index],
                                    False, graph=_Chained(steps))
                out = self.form.step(index, out, source.bind(block_sides[index]), False, block.path)
            return out
        return self._train_plan(plan, x, block_sides)

    @torch.compiler.disable  # planned steps run their graphs, which torch.func cannot rebind to parameters
    def _train_plan(self, plan: ChainPlan, x: torch.Tensor, block_sides: list[list[torch.Tensor]]) -> torch.Tensor:
        reads = _first(self.outside)
        if reads is not None:
            raise ConversionError(
                f"the captured graph's training chain cannot give '{self.outside[reads][0][0]}', which block "
                f"'{plan.blocks[reads].path}' reads from a module outside it, its gradient (the planned step holds "
                "it as a constant); train the converted model itself", module=plan.blocks[reads].path)
        chain = self._call = ChainCall(self.container, self.scheme, self.config, x, self.batch_dim,
                                       tuple(self.observers), compiled=False)
        chain_step.enter(chain, x, plan.blocks[0].path)
        for index, block in enumerate(plan.blocks):
            module = self.owners[index]  # the planned steps' parameters are named from it
            named = list(enumerate(block_sides[index]))
            for observer in chain.observers:
                observer.block_called(chain, index, named)
            params = [p for p in module.parameters() if p.requires_grad]
            keep = self.keeps[index]
            guard = record_step(module, self.owner_paths[index], named, lambda i, b=block: b.side_inputs[i].name) \
                if chain.reversible and not keep else None
            last_block = index == len(plan.blocks) - 1
            steps = block.steps if self.scheme.original_at_inference else [_Chained(block.steps)]
            for j, step in enumerate(steps):
                path = block.path if len(steps) == 1 else f"{block.path} (sublayer {j})"
                source = StepSource(module, self.originals[index], path, self.slots[index], False, graph=step)
                chain_step.run_step(chain, source, block_sides[index], params, guard, step.random,
                                    last_block and j == len(steps) - 1, keep)
        self._call = None
        out = chain_step.stream(chain)
        chain.finish_forward()
        return out


class _Chained:
    """A block's planned steps run one after the other: the whole block as one step (inference forms and
    schemes that take whole blocks)."""

    def __init__(self, steps: list):
        self.steps = steps
        self.random = any(step.random for step in steps)

    def __call__(self, block: nn.Module, stream: torch.Tensor, sides: list[torch.Tensor]) -> torch.Tensor:
        for step in self.steps:
            stream = step(block, stream, sides)
        return stream


class BDIAChain(nn.Module):
    """The chain node of the rewritten graph: ``forward(x0, *side_inputs)`` runs a planned chain with
    the chain runtime, the same one the eager converted model runs (see ``docs/design.md``).

    The rewritten graph is the training graph of the captured call (its dropout ops, shapes and
    call pattern are the capture's); in ``.eval()`` the node runs the inference form of the same steps.
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
