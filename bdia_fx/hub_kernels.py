"""Forwards wrapped by the ``kernels`` package (Hugging Face hub kernels), made traceable in a recompute.

Note: [hub kernel forwards]. transformers 5 decorates some classes (Llama's attention:
``use_kernelized_func(apply_rotary_pos_emb)``) with a ``kernels`` wrapper of their ``forward``
(``functools.wraps``: only the code's file tells). The wrapper routes the module's kernel functions
through a context variable for the call; under ``torch.compile`` that variable is a global, whose write
dynamo refuses inside an autograd backward, where the reversible chain recomputes its blocks. Until
``kernels.kernelize`` picks a hub kernel for one of the module's functions, the wrapper calls exactly
the function it wraps, with the module's functions as they are. So a block's wrapped submodule gets an
instance ``forward`` (:class:`UnwrappedForward`, the class kept) that under compile calls the wrapped
function while the module is not kernelized, and otherwise (eagerly too) the wrapper itself; a training
chain with a kernelized module stays behind its compile boundary
(:meth:`bdia_fx.run.runtime.ChainRuntime.compile_blocker`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["UnwrappedForward", "kernel_wrapped", "kernelized", "named_kernel_wrapped", "remove_unwrapped",
           "unwrap_kernel_forwards"]


def kernel_wrapped(module: nn.Module) -> bool:
    """Whether ``module``'s class forward is defined in the ``kernels`` package (and wraps another)."""
    kernels = sys.modules.get("kernels")
    if getattr(kernels, "__file__", None) is None:
        return False
    forward = type(module).forward
    filename = getattr(getattr(forward, "__code__", None), "co_filename", "")
    return filename.startswith(os.path.dirname(kernels.__file__) + os.sep) and hasattr(forward, "__wrapped__")


def kernelized(module: nn.Module) -> bool:
    """Whether ``kernels.kernelize`` chose another forward for one of ``module``'s kernel functions (the
    wrapper then calls that one, which the wrapped function does not)."""
    funcs = getattr(module, "_kernel_funcs", None)
    if not isinstance(funcs, dict):
        return True  # not the wrapper this module knows: never bypassed
    return any(f.forward.__func__ is not type(f).forward for f in funcs.values())


class UnwrappedForward:
    """A kernel-wrapped module's ``forward`` (Note: [hub kernel forwards]): the wrapped function under
    ``torch.compile`` while the module is not kernelized, else (and eagerly) the wrapper. An instance attribute;
    it pickles."""

    def __init__(self, module: nn.Module):
        self.module = module

    def bound_to(self, module: nn.Module) -> UnwrappedForward:
        """The same forward for a structural copy of the module (:func:`bdia_fx.module_tree.shallow_clone`)."""
        return UnwrappedForward(module)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        forward = type(self.module).forward
        if torch.compiler.is_compiling() and not kernelized(self.module):
            forward = forward.__wrapped__
        return forward(self.module, *args, **kwargs)


def named_kernel_wrapped(paths: Sequence[str], blocks: Sequence[nn.Module]) -> list[tuple[str, nn.Module]]:
    """The kernel-wrapped submodules of ``blocks`` (whose module paths are ``paths``), with their paths."""
    return [(f"{path}.{name}" if name else path, module) for path, block in zip(paths, blocks)
            for name, module in block.named_modules() if kernel_wrapped(module)]


def unwrap_kernel_forwards(modules: Iterable[nn.Module]) -> None:
    """Give each of these kernel-wrapped ``modules`` an :class:`UnwrappedForward`."""
    for module in modules:
        if not isinstance(module.__dict__.get("forward"), UnwrappedForward):
            module.__dict__["forward"] = UnwrappedForward(module)


def remove_unwrapped(modules: Iterable[nn.Module]) -> None:
    """Take the :class:`UnwrappedForward` off these ``modules`` (each as the user wrote it)."""
    for module in modules:
        if isinstance(module.__dict__.get("forward"), UnwrappedForward):
            del module.__dict__["forward"]
