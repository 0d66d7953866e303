"""Capture a module as an ATen graph with module paths, via ``torch.export(strict=False)``.

``torch.fx.symbolic_trace`` fails on transformers-5 models; non-strict export works on every
family measured (docs/design.md, "One plan, two front doors") and records each node's module path in
``node.meta["nn_module_stack"]``. The passes analyse and plan from the captured program.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from bdia_fx.errors import ConversionError

__all__ = ["capture", "training_mode"]


@contextlib.contextmanager
def training_mode(model: nn.Module, training: bool = True) -> Iterator[nn.Module]:
    """Put every submodule in train (or eval) mode, restoring each module's own flag after."""
    flags = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield model
    finally:
        for module, flag in flags:
            module.training = flag


def capture(model: nn.Module, args: tuple = (), kwargs: dict[str, Any] | None = None) -> torch.export.ExportedProgram:
    """Export ``model(*args, **kwargs)`` in training mode (dropout and other random ops visible)."""
    if not args and not kwargs:
        raise ConversionError(
            "no example inputs: pass example_inputs / example_kwargs so the model can be captured",
            module="",
        )
    try:
        with training_mode(model, True):  # the model's own warnings show, as in any call of it
            return torch.export.export(model, tuple(args), dict(kwargs or {}), strict=False)
    except ConversionError:
        raise
    except Exception as exc:  # torch.export raises many types; re-raise as one family
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConversionError(
            f"torch.export(strict=False) could not capture {type(model).__name__} for this call: "
            f"{type(exc).__name__}: {first_line}",
            module="",
        ) from exc
