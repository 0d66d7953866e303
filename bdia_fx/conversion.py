"""``convert`` / ``find_chains``: capture, find chains, and install the BDIA chain runtime.

Design (docs/design.md, "How it works, in short"): the converted model is a structural copy of the user's
model (same classes, same Parameter objects) whose parent modules keep running eagerly, so
``.train()``/``.eval()``, any batch size or sequence length and any call pattern work. The graph
is captured with ``torch.export`` for analysis: chains are found and checked on the captured
graph once per training call pattern (argument names, tensor ranks, non-tensor values), cached.
Each chain's blocks become proxies that hand their calls to one :class:`ChainRuntime`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_map

from bdia_fx import budget as budgets
from bdia_fx import hf
from bdia_fx.calls import (
    StreamSlots,
    call_pattern,
    describe_call,
    example_args,
    recording_block_calls,
    stream_slots,
)
from bdia_fx.config import BDIAConfig
from bdia_fx.converted import ConvertedState, attach_state, is_converted, state_of
from bdia_fx.errors import ConversionError
from bdia_fx.hub_kernels import unwrap_kernel_forwards
from bdia_fx.module_tree import (
    boundary_suspended,
    capture_twin,
    infer_batch_dim,
    install_boundary,
    install_pre_proxy,
    install_proxy,
    original_class,
    shallow_clone,
)
from bdia_fx.passes.capture import capture
from bdia_fx.passes.chains import find_chains_in_graph
from bdia_fx.passes.plan import plan_block_call, plan_model
from bdia_fx.passes.rewrite import rewrite_chains
from bdia_fx.passes.sublayers import check_sublayers
from bdia_fx.report import ChainReport
from bdia_fx.run.runtime import BDIAChain, ChainRuntime, capture_mode, capturing

__all__ = ["captured_graph", "convert", "find_chains", "report_of"]

logger = logging.getLogger(__name__)


def find_chains(model: nn.Module, example_inputs: tuple | torch.Tensor = (),
                example_kwargs: dict | None = None) -> ChainReport:
    """Capture ``model(*example_inputs, **example_kwargs)`` and report its residual chains.

    Nothing is changed on ``model`` (the capture runs on a structural copy in training mode).
    """
    _check_module(model)
    clone = shallow_clone(model)
    kwargs = dict(example_kwargs or {})
    if hf.takes_use_cache(model):  # captured as a training call: no cache (bdia_fx.hf)
        kwargs = hf.without_cache(model, kwargs, warned={"use_cache"})
    with capture_mode():
        ep = capture(clone, example_args(example_inputs), kwargs)
    return find_chains_in_graph(ep, clone)


def convert(model: nn.Module, example_inputs: tuple | torch.Tensor = (), example_kwargs: dict | None = None,
            config: BDIAConfig | None = None, *, strict: bool = True, memory_budget: int | float | str | None = None,
            loss_fn: Callable[[Any], torch.Tensor] | None = None) -> nn.Module:
    """Return a BDIA-training version of ``model`` sharing its parameters.

    The result has ``model``'s class, call signature, outputs and ``state_dict()`` keys. In
    ``.train()`` every residual chain runs as a reversible BDIA chain (random γ ∈ ``config.gammas``
    per sample per block); in ``.eval()`` as the γ = 0 chain (the original model, quantized when
    ``config.quantize_eval``). With example inputs the chains are found and checked now; without,
    at the first call. ``example_inputs`` is a tuple of positional arguments (a single tensor is
    taken as one). Raises :class:`ConversionError` naming the module/node and the reason, before
    anything is changed; ``model`` itself is never modified. With ``strict=False`` a refused chain
    (a post-LN stack beside a pre-LN one, a block with a tap) is kept running as it is and every
    other chain is converted; :func:`report_of` lists both, the refused ones with the reason.

    ``memory_budget`` (bytes as an int or a string such as ``"6GiB"``, or a float in (0, 1]: a fraction of the
    plain model's peak) asks for the fastest plan whose training step on the example inputs peaks at most that
    far above the parameters, their gradients and the inputs: some blocks keep their activations, the others
    are reversible (:mod:`bdia_fx.budget`; the plan is in :func:`report_of`). The probe steps take the loss
    ``loss_fn(output)`` (default: the output's first floating-point tensor squared and averaged; a Hugging Face
    model given ``labels`` returns its loss there first). Gradients are the same in every plan.
    """
    _check_module(model)
    if is_converted(model):
        raise ConversionError(f"{type(model).__name__} is already converted; convert the original model", module="")
    config = config if config is not None else BDIAConfig()
    if not isinstance(config, BDIAConfig):
        raise TypeError(f"config must be a BDIAConfig, got {type(config).__name__}")
    example_inputs = example_args(example_inputs)
    budget = _checked_budget(memory_budget, config, bool(example_inputs or example_kwargs))
    clone = shallow_clone(model)
    state = ConvertedState(config, takes_use_cache=hf.takes_use_cache(model), strict=strict)
    attach_state(clone, state)
    if example_inputs or example_kwargs:
        call = _training_call(clone, state, example_inputs, dict(example_kwargs or {}))
        _plan(clone, state, *call)
        if budget is not None:
            _plan_memory(model, clone, state, *call, budget, loss_fn)
    state.hook_id = clone.register_forward_pre_hook(_before_call, with_kwargs=True).id
    return clone


def _checked_budget(memory_budget: Any, config: BDIAConfig, has_example: bool) -> int | float | None:
    """The parsed budget (ValueError for a bad one), checked against the rest of the call, before anything is made."""
    if memory_budget is None:
        return None
    budget = budgets.parse_budget(memory_budget)
    if not has_example:
        raise ValueError("memory_budget needs example inputs: the plan is made from probe steps on them")
    if config.mode != "reversible":
        raise ValueError(f"memory_budget plans which blocks are reversible; BDIAConfig(mode={config.mode!r}) keeps "
                         "every block's activations already")
    return budget


def _plan_memory(model: nn.Module, clone: nn.Module, state: ConvertedState, args: tuple, kwargs: dict,
                 budget: int | float, loss_fn: Callable[[Any], torch.Tensor] | None) -> None:
    """Probe, plan and apply the memory plan (:mod:`bdia_fx.budget`); shown in the report."""
    prober = budgets.Prober(model, clone, state, args, kwargs, loss_fn)
    paths = {(name, i): path for name, runtime in state.runtimes.items()
             for i, path in enumerate(runtime.block_paths)}
    plan = budgets.plan_memory(prober.probes(), budget, paths, describe_call(args, kwargs),
                               lambda kept: prober.measure(kept, steps=2).peak)
    budgets.apply_plan(state, plan)
    state.report.memory_plan = plan


def _check_module(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")


def _training_call(model: nn.Module, state: ConvertedState, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A training call's arguments under the Hugging Face conventions (:mod:`bdia_fx.hf`)."""
    if state.takes_use_cache:
        kwargs = hf.without_cache(model, kwargs, state.warned)
    return args, kwargs


def _before_call(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """The converted model's root forward pre-hook: training calls follow the HF conventions, and a
    new training call pattern is captured and checked before it runs (eval calls are never captured:
    before the first training call a lazily converted model evaluates as the original). Traced by
    ``torch.compile`` once the model has been planned (the HF conventions are plain Python on the
    call's arguments); planning itself runs eagerly (:func:`_checked_call`)."""
    if capturing() or not module.training:
        return None
    state = state_of(module)
    if torch.compiler.is_compiling():
        args, kwargs = _training_call(module, state, args, kwargs)
        if call_pattern(args, kwargs) in state.patterns:  # decided while tracing: no graph break
            return args, kwargs
    return _checked_call(module, state, args, kwargs)


@torch.compiler.disable  # captures run eagerly under torch.compile
def _checked_call(module: nn.Module, state: ConvertedState, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    args, kwargs = _training_call(module, state, args, kwargs)
    if call_pattern(args, kwargs) not in state.patterns:
        _plan(module, state, args, kwargs)
    _turn_off_hf_checkpointing(state)  # gradient_checkpointing_enable() may have run after convert
    return args, kwargs


def _turn_off_hf_checkpointing(state: ConvertedState) -> None:
    hf.turn_off_gradient_checkpointing([(path, block) for runtime in state.runtimes.values()
                                        for path, block in zip(runtime.block_paths, runtime.blocks)], state.warned)


def _plan(model: nn.Module, state: ConvertedState, args: tuple, kwargs: dict) -> None:
    """Capture this call pattern, check its chains, and install runtimes on first use."""
    start = time.perf_counter()
    twin = capture_twin(model)  # FSDP2-sharded parameters: capture a meta twin
    captured_model = twin if twin is not None else model
    if twin is not None:
        args, kwargs = tree_map(lambda v: v.to("meta") if isinstance(v, torch.Tensor) else v, (args, kwargs))
    with capture_mode(), boundary_suspended(captured_model), recording_block_calls(captured_model) as calls:
        ep = capture(captured_model, args, kwargs)
    report = find_chains_in_graph(ep, model, state.config.residual_only)
    logger.info("%s: captured the training call %s in %.2f s: %s", type(model).__name__, describe_call(args, kwargs),
                time.perf_counter() - start, ", ".join(f"chain '{c.container}' of {len(c.blocks)} blocks"
                                                       for c in report.chains) or "no chain")
    _refuse_if_unconvertible(report, state.strict)
    if report.rejections and "refused chains" not in state.warned:
        state.warned.add("refused chains")
        logger.warning("%s: strict=False: %s kept as they are (not reversible): %s", type(model).__name__,
                       len(report.rejections), "; ".join(f"'{r.container}': {r.reason}" for r in report.rejections))
    if state.config.granularity == "sublayer":
        report = _with_step_ends(report, check_sublayers(ep, report))  # refuses blocks not cut at their adds
    # A branch chain's modules receive the parent's sum, never what the previous one returned: their
    # stream is their first float argument, and each call is checked to be the parent's add (runtime).
    slots = {chain.container: ([StreamSlots() for _ in chain.blocks] if chain.branch
                               else stream_slots(chain.block_paths, calls)) for chain in report.chains}
    if not state.runtimes:
        modules = dict(model.named_modules())
        for chain in report.chains:
            blocks = [modules[p] for p in chain.block_paths]
            batch_dim = state.config.batch_dim if state.config.batch_dim is not None else infer_batch_dim(blocks)
            pres = [modules[b.pre] if b.pre else None for b in chain.blocks]
            runtime = ChainRuntime(
                chain.container, chain.block_paths, blocks, [original_class(b) for b in blocks],
                state.config, batch_dim, [b.random for b in chain.blocks], slots[chain.container],
                _plan_sublayers if state.config.granularity == "sublayer" else None, chain.branch,
                pres, [(b.owner or b.path, modules[b.owner or b.path]) for b in chain.blocks],
                [_outside_state(model, modules[b.owner or b.path], b.outside) for b in chain.blocks],
            )
            for index, block in enumerate(blocks):
                install_proxy(block, runtime, index)
            for pre in filter(None, pres):
                install_pre_proxy(pre)
            install_boundary(modules[chain.container.rpartition(".")[0]], runtime)  # the module looping over the blocks
            unwrap_kernel_forwards(module for _, module in runtime.kernel_wrapped)
            state.runtimes[chain.container] = runtime
    else:
        found = {c.container: c.block_paths for c in report.chains}
        known = {name: r.block_paths for name, r in state.runtimes.items()}
        if found != known:
            raise ConversionError(
                f"this call pattern has chains {found}, but the model was converted with {known}; "
                "convert again for this kind of call", module="")
        for chain in report.chains:
            runtime = state.runtimes[chain.container]
            runtime.random_blocks = [a or b.random for a, b in zip(runtime.random_blocks, chain.blocks)]
            for known, new in zip(runtime.slots, slots[chain.container]):
                known.merge(new)
    if state.plan is None:
        state.report = report
        state.plan = plan_model(ep.module(), report, state.config.granularity)
        chains = {chain.container: BDIAChain(state.runtimes[chain.container], chain) for chain in state.plan.chains}
        state.graph = rewrite_chains(state.plan, chains, state.config.frac_bits)
    _turn_off_hf_checkpointing(state)
    state.patterns.add(call_pattern(args, kwargs))


def _outside_state(model: nn.Module, owner: nn.Module, names: tuple[str, ...]) -> list[tuple[str, nn.Module, str]]:
    """(name, module, attribute) of each parameter or buffer a step reads from outside its ``owner`` (the
    captured names may reach the step's own state by another path: those are the owner's)."""
    own = {id(t) for t in (*owner.parameters(), *owner.buffers())}
    found = []
    for name in names:
        path, _, attribute = name.rpartition(".")
        module = model.get_submodule(path)
        if id(getattr(module, attribute)) not in own:
            found.append((name, module, attribute))
    return found


def _with_step_ends(report: ChainReport, ends: dict[str, list[list[str]]]) -> ChainReport:
    """``report`` with each block's sublayer steps (the residual add ending each) filled in."""
    chains = [dataclasses.replace(chain, blocks=tuple(dataclasses.replace(block, step_ends=tuple(block_ends))
                                                      for block, block_ends in zip(chain.blocks,
                                                                                   ends[chain.container])))
              for chain in report.chains]
    return dataclasses.replace(report, chains=chains)


def report_of(model: nn.Module) -> ChainReport | None:
    """The chain report of a converted model: its chains, blocks, side inputs (and, with
    ``granularity="sublayer"``, each block's steps); None before a lazily converted model's first
    training call. :class:`ConversionError` if ``model`` was not converted."""
    return state_of(model).report


def captured_graph(model: nn.Module) -> fx.Graph | None:
    """The graph captured from a converted model (block nodes marked by the chain pass), for reading."""
    plan = state_of(model).plan
    return plan.graph_module.graph if plan is not None else None


def _plan_sublayers(block: nn.Module, original: type, leaves: list, spec: Any, stream_index: int,
                    slots: StreamSlots, where: str) -> tuple:
    """The sublayer pass on one block call (runs the block's original forward under capture)."""
    start = time.perf_counter()
    with capture_mode():
        plan = plan_block_call(block, original, leaves, spec, stream_index, slots.output_slot, where)
    logger.info("%s: exported for its sublayer steps, stream %s, in %.2f s", where,
                describe_call((leaves[stream_index],), {}), time.perf_counter() - start)
    return plan


def _refuse_if_unconvertible(report: ChainReport, strict: bool) -> None:
    if report.rejections and (strict or not report.chains):
        first = report.rejections[0]
        more = (f" (and {len(report.rejections) - 1} more; see bdia_fx.find_chains)"
                if len(report.rejections) > 1 else "")
        hint = "; convert(..., strict=False) converts the other chains and keeps this one" if report.chains else ""
        raise ConversionError(first.reason + more + hint, module=first.module, node=first.node)
    if not report.chains:
        ignored = "; ".join(f"'{n}': {why}" for n, why in report.ignored) or "no module with numbered child blocks"
        raise ConversionError(f"no residual block chain found in {report.model} ({ignored})", module="")
