"""Structural copies of module trees and the block proxies the chain runtime works through."""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import logging
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["CHECKPOINT_FORMS", "CompileBoundary", "boundary_suspended", "capture_twin", "infer_batch_dim",
           "install_boundary", "install_inference_proxy", "install_pre_proxy", "install_proxy", "is_inference_proxy",
           "model_modes_suspended", "original_class", "pre_call_of", "proxy_class", "remove_boundary",
           "remove_proxy", "shallow_clone"]

logger = logging.getLogger(__name__)

_HOOK_DICTS = (
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
    "_backward_pre_hooks", "_state_dict_hooks", "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)


def shallow_clone(module: nn.Module, memo: dict[int, nn.Module] | None = None,
                  shared_tables: bool = False) -> nn.Module:
    """A new module tree with the same classes, attributes, parameters and buffers (shared objects).

    Every module object is new, so swapping classes, modes or hooks on the copy leaves the
    original untouched, while ``Parameter`` and buffer objects are the very same (tied weights
    stay tied, an optimizer over either trains both). A module managed by a composable API (FSDP2's
    ``fully_shard``) keeps *sharing* its parameter and buffer tables with the original, since FSDP
    swaps sharded and unsharded tensors in them, and its copy is registered with the same state.
    """
    memo = {} if memo is None else memo
    if id(module) in memo:
        return memo[id(module)]
    composable = _composable_state(module)
    shared_tables = shared_tables or composable is not None
    clone = object.__new__(type(module))  # not copy.copy: FSDPModule.__new__ would rebuild the original class
    clone.__dict__.update(module.__dict__)
    forward = module.__dict__.get("forward")
    if hasattr(forward, "bound_to"):  # a forward bdia_fx installed (CompileBoundary, UnwrappedForward): the clone's
        clone.__dict__["forward"] = forward.bound_to(clone)
    memo[id(module)] = clone
    if not shared_tables:
        clone._parameters = dict(module._parameters)
        clone._buffers = dict(module._buffers)
    clone._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    for name in _HOOK_DICTS:
        if name in module.__dict__:
            clone.__dict__[name] = copy.copy(module.__dict__[name])
    clone._modules = {name: (shallow_clone(child, memo, shared_tables) if child is not None else None)
                      for name, child in module._modules.items()}
    if composable is not None:
        from torch.distributed._composable_state import _insert_module_state

        _insert_module_state(clone, composable)
    return clone


def _composable_state(module: nn.Module) -> Any:
    """The state of the composable API (FSDP2 ``fully_shard``, ``replicate``) managing ``module``, if any."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed._composable_state import _get_module_state

    return _get_module_state(module)


def capture_twin(model: nn.Module) -> nn.Module | None:
    """For a model with DTensor parameters (FSDP2-sharded), which ``torch.export`` cannot capture: a
    structural copy with every parameter and buffer a meta tensor of its full shape and without the
    composable API's hooks, for graph analysis only. None for any other model."""
    from torch.distributed.tensor import DTensor

    if not torch.distributed.is_available() or not any(isinstance(t, DTensor) for t in model.parameters()):
        return None
    from torch.distributed._composable_state import _State

    twin = shallow_clone(model)
    for module in twin.modules():
        for table in ("_parameters", "_buffers"):
            setattr(module, table, {name: None if t is None else _meta_like(t)
                                    for name, t in getattr(module, table).items()})
        for name in _HOOK_DICTS:
            hooks = module.__dict__.get(name)
            if hooks:
                for key in [k for k, hook in hooks.items() if isinstance(getattr(hook, "__self__", None), _State)]:
                    del hooks[key]
    return twin


def _meta_like(t: torch.Tensor) -> torch.Tensor:
    meta = torch.empty(t.shape, dtype=t.dtype, device="meta")
    return nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta


_PROXY_CLASSES: dict[tuple[type, str], type] = {}


def _chain_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    with model_modes_suspended():
        return self._bdia_runtime.run_block(self._bdia_index, self, args, kwargs)


@contextlib.contextmanager
def model_modes_suspended() -> Iterator[None]:
    """Run the body outside the ``TorchFunctionMode``s that belong to the model's own code (those with
    ``model_scoped = True``, as ``bdia_fx.pam``'s): the chain runtime's fixed-point arithmetic must be
    the same in forward and in backward, where no such mode is active; the blocks push theirs again."""
    suspended = []
    while torch._C._len_torch_function_stack() and getattr(_top_function_mode(), "model_scoped", False):
        suspended.append(torch._C._pop_torch_function_stack())
    try:
        yield
    finally:
        for mode in reversed(suspended):
            torch._C._push_on_torch_function_stack(mode)


def _top_function_mode() -> Any:
    return torch._C._get_function_stack_at(torch._C._len_torch_function_stack() - 1)


_PRE_CALLS: dict[int, tuple[weakref.ref, weakref.ref, weakref.ref]] = {}  # id(output) -> (output, input, module)


def _pre_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """A module the stream passes through before a branch (h(x) = branch(pre(x)), x-transformers' pre-norm):
    it runs as it is, and its output remembers the stream it came from (weakly) for the branch's call."""
    out = original_class(self).forward(self, *args, **kwargs)
    if isinstance(out, torch.Tensor) and not torch.compiler.is_dynamo_compiling():  # torch.export records too
        alone = len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor)
        key = id(out)
        _PRE_CALLS[key] = (weakref.ref(out, lambda _, key=key: _PRE_CALLS.pop(key, None)),
                           weakref.ref(args[0]) if alone else None, weakref.ref(self), out._version)
    return out


def pre_call_of(value: torch.Tensor) -> tuple[torch.Tensor, nn.Module] | str | None:
    """The stream and the pre module (see :func:`install_pre_proxy`) whose call returned ``value``, if one did;
    why it cannot stand for that call, if it cannot (a string)."""
    found = _PRE_CALLS.get(id(value))
    if found is None or found[0]() is not value:
        return None
    _, stream, module, version = found
    if stream is None:
        return "the pre module was called with more than the stream"
    if value._version != version:
        return "its output was modified in place after its forward (by a forward hook or the parent)"
    stream, module = stream(), module()
    return (stream, module) if stream is not None and module is not None else None


def install_pre_proxy(module: nn.Module) -> None:
    """Make ``module`` remember, for each call, the stream it was given (:func:`pre_call_of`)."""
    module.__class__ = proxy_class(original_class(module), "pre")


def _inference_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    return self._bdia_form.run_block(self._bdia_index, self, original_class(self), args, kwargs, self._bdia_path,
                                     self._bdia_slots, self._bdia_branch)


CHECKPOINT_FORMS = {  # kind -> (early stop, reentrant)
    "checkpoint": (True, False),             # torch's recommended form: the recompute stops early
    "checkpoint-full": (False, False),       # every block recomputed whole, as BDIA must
    "checkpoint-reentrant": (True, True),    # the classic form (also a whole recompute)
}


def _checkpointed(early_stop: bool, reentrant: bool):
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        from torch.utils import checkpoint

        original = original_class(self).forward
        if reentrant:  # takes no keyword arguments: bind them
            return checkpoint.checkpoint(functools.partial(original, self, **kwargs), *args, use_reentrant=True)
        with checkpoint.set_checkpoint_early_stop(early_stop):
            return checkpoint.checkpoint(original, self, *args, use_reentrant=False, **kwargs)
    return forward


_FORWARDS = {"bdia": _chain_forward, "inference": _inference_forward, "pre": _pre_forward,
             **{kind: _checkpointed(*form) for kind, form in CHECKPOINT_FORMS.items()}}


def _reduce_proxy(self: nn.Module, protocol: int) -> tuple:
    """Pickle a proxy as (original class, kind) and its state: the class is made again on loading."""
    return _new_proxy, (type(self)._bdia_original_class, type(self)._bdia_kind), self.__dict__.copy()


def _new_proxy(cls: type, kind: str) -> nn.Module:
    return object.__new__(proxy_class(cls, kind))


def proxy_class(cls: type, kind: str = "bdia") -> type:
    """A subclass of ``cls`` whose ``forward`` is the ``kind`` one.

    ``"bdia"`` hands the call to the block's chain runtime; ``"inference"`` runs step k of a chain's
    inference form (:class:`bdia_fx.run.runtime.InferenceForm`: the quantized γ = 0 step of BDIA, a shear
    scheme's own step), as a reverted model does where it is not the original block; ``"pre"`` runs the
    original forward and remembers its stream for the branch it feeds (:func:`pre_call_of`); ``"checkpoint"``
    (and the other :data:`CHECKPOINT_FORMS`) runs the original forward under ``torch.utils.checkpoint``
    (the baselines of comparisons).
    Proxies pickle (``torch.save``, ``copy.deepcopy``) as their original class plus the kind.
    """
    if (cls, kind) not in _PROXY_CLASSES:
        _PROXY_CLASSES[cls, kind] = type(cls.__name__, (cls,), {
            "forward": _FORWARDS[kind],
            "__reduce_ex__": _reduce_proxy,
            "_bdia_original_class": cls,
            "_bdia_kind": kind,
            "__module__": cls.__module__,
            "__qualname__": f"{cls.__qualname__}[{kind}]",
        })
    return _PROXY_CLASSES[cls, kind]


def install_proxy(block: nn.Module, runtime: Any, index: int) -> None:
    """Route ``block``'s calls to ``runtime`` (state_dict keys and parameters are unchanged)."""
    block.__class__ = proxy_class(original_class(block))
    block._bdia_runtime = runtime
    block._bdia_index = index


class CompileBoundary:
    """The ``forward`` of the module whose code calls a chain's blocks, as ``torch.compile`` sees it.

    Traced where every chain it calls can be (:meth:`bdia_fx.run.runtime.ChainRuntime.compile_blocker`):
    the chain's steps are then part of the compiled graphs. Otherwise the module runs eagerly behind
    this boundary (one graph break, however deep the chain; γ as in eager), with one log line saying
    why. Installed as an instance attribute, so the module keeps its class; it pickles.
    """

    def __init__(self, module: nn.Module, runtimes: list | None = None):
        self.module = module
        self.runtimes = list(runtimes or [])
        self.logged = False

    def __getstate__(self) -> dict:
        return {**self.__dict__, "logged": False}

    def bound_to(self, module: nn.Module) -> CompileBoundary:
        """The same boundary for a structural copy of the module (:func:`shallow_clone`)."""
        return CompileBoundary(module, self.runtimes)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling() and any(r.compile_blocker() for r in self.runtimes):
            return self._eager(*args, **kwargs)
        return type(self.module).forward(self.module, *args, **kwargs)

    @torch.compiler.disable
    def _eager(self, *args: Any, **kwargs: Any) -> Any:
        reasons = [f"'{r.container}': {r.compile_blocker()}" for r in self.runtimes if r.compile_blocker()]
        if reasons and not self.logged:
            self.logged = True
            logger.info("under torch.compile, chain %s runs eagerly behind a graph break", "; ".join(reasons))
        return type(self.module).forward(self.module, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(type(self.module).forward.__get__(self.module))


def install_boundary(module: nn.Module, runtime: Any) -> None:
    """Make ``module``'s forward a :class:`CompileBoundary` for the chain ``runtime`` (more chains may share it)."""
    boundary = module.__dict__.get("forward")
    if not isinstance(boundary, CompileBoundary):
        boundary = module.__dict__["forward"] = CompileBoundary(module)
    if runtime not in boundary.runtimes:
        boundary.runtimes.append(runtime)


def remove_boundary(module: nn.Module) -> None:
    if isinstance(module.__dict__.get("forward"), CompileBoundary):
        del module.__dict__["forward"]


@contextlib.contextmanager
def boundary_suspended(module: nn.Module) -> Iterator[None]:
    """``module`` without its :class:`CompileBoundary` while the body runs (``torch.export`` of a
    module reads its ``forward`` as a function)."""
    boundary = (module.__dict__.pop("forward", None)
                if isinstance(module.__dict__.get("forward"), CompileBoundary) else None)
    try:
        yield
    finally:
        if boundary is not None:
            module.__dict__["forward"] = boundary


def install_inference_proxy(block: nn.Module, index: int, form: Any, path: str, slots: Any, branch: bool) -> None:
    """Make ``block`` step k = ``index`` of the chain inference ``form`` (shared by the chain's blocks;
    ``slots``: where its stream is; ``branch``: the block computes h(x) only and the parent adds the stream)."""
    _install(block, "inference", index=index, form=form, path=path, slots=slots, branch=branch)


def _install(block: nn.Module, kind: str, **attributes: Any) -> None:
    """Make ``block`` a ``kind`` proxy holding ``attributes`` as ``_bdia_<name>``."""
    block.__class__ = proxy_class(original_class(block), kind)
    for name, value in attributes.items():
        block.__dict__[f"_bdia_{name}"] = value


def remove_proxy(block: nn.Module) -> None:
    """Undo :func:`install_proxy` / :func:`install_inference_proxy`."""
    block.__class__ = original_class(block)
    for name in ("_bdia_runtime", "_bdia_index", "_bdia_path", "_bdia_slots", "_bdia_branch", "_bdia_form"):
        block.__dict__.pop(name, None)


def is_inference_proxy(module: nn.Module) -> bool:
    """Whether ``module`` runs as a step of an inference form (see :func:`install_inference_proxy`)."""
    return type(module) is _PROXY_CLASSES.get((original_class(module), "inference"))


def original_class(block: nn.Module) -> type:
    return getattr(type(block), "_bdia_original_class", type(block))


def infer_batch_dim(blocks: list[nn.Module]) -> int:
    """1 if any block (or its submodules) says ``batch_first=False``, else 0."""
    for block in blocks:
        for module in block.modules():
            if getattr(module, "batch_first", True) is False:
                return 1
    return 0
