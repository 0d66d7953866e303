"""Capture a module as an ATen graph with module paths, via ``torch.export(strict=False)``.

``torch.fx.symbolic_trace`` fails on transformers-5 models; non-strict export works on every
family measured (docs/design.md, "One plan, two front doors") and records each node's module path in
``node.meta["nn_module_stack"]``. The passes analyse and plan from the captured program.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

from bdia_fx.errors import ConversionError

__all__ = ["capture", "training_mode"]

logger = logging.getLogger(__name__)


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
    """Export ``model(*args, **kwargs)`` in training mode (dropout and other random ops visible).

    A forward that branches on tensor values (``if mask.any():``) cannot be exported soundly; it is
    captured with ``torch.export.draft_export``, which takes the branch this example takes and asserts it
    in the graph, and each such place is logged. The chains are found on that branch; a converted model
    runs its own code (every branch) when it trains, each chain call checked, and a graph run as such
    (``graph_of``, PAM) raises on another branch.
    """
    if not args and not kwargs:
        raise ConversionError(
            "no example inputs: pass example_inputs / example_kwargs so the model can be captured",
            module="",
        )
    kwargs = dict(kwargs or {})
    try:
        with training_mode(model, True), _quiet(_SHAPES_LOGGER), _without_partial_graph():  # the model's own
            return torch.export.export(model, tuple(args), kwargs, strict=False)
    except ConversionError:
        raise
    except GuardOnDataDependentSymNode:
        pass  # captured below, on the example's branches
    except Exception as exc:  # torch.export raises many types; re-raise as one family
        raise _capture_error(model, exc) from exc
    try:
        with training_mode(model, True), _quiet(_SHAPES_LOGGER, _DRAFT_LOGGER):
            program = torch.export.draft_export(model, tuple(args), kwargs)
    except Exception as exc:
        raise _capture_error(model, exc) from exc
    _log_specialized(model, program)
    return program


_SHAPES_LOGGER = "torch.fx.experimental.symbolic_shapes"
_DRAFT_LOGGER = "torch.export._draft_export"
_SOUND_ENOUGH = {"DATA_DEPENDENT_ERROR", "GUARD_ADDED"}  # branches and shape guards of this example


def _capture_error(model: nn.Module, exc: Exception) -> ConversionError:
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ConversionError(f"torch.export(strict=False) could not capture {type(model).__name__} for this call: "
                           f"{type(exc).__name__}: {first_line}", module="")


def _log_specialized(model: nn.Module, program: torch.export.ExportedProgram) -> None:
    """Log each place where the capture took the example's branch; refuse other draft-export failures."""
    report = getattr(program, "_report", None)
    failures = list(getattr(report, "failures", ()))
    interned = getattr(torch._logging.structured, "INTERN_TABLE", {})  # a file seen in an earlier capture
    files = {**{index: name for name, index in interned.items()}, **getattr(report, "str_to_filename", {})}
    other = [f for f in failures if f.failure_type.name not in _SOUND_ENOUGH]
    if other:
        raise ConversionError(f"torch.export could not capture {type(model).__name__} for this call: "
                              f"{other[0].failure_type.name.lower().replace('_', ' ')}: {other[0].data}", module="")
    for failure in failures:
        if failure.failure_type.name != "DATA_DEPENDENT_ERROR":
            continue
        frame = (failure.data.get("user_stack") or [{}])[-1]
        where = f"{files.get(frame.get('filename'), '?')}:{frame.get('line', '?')}"
        logger.warning("%s: the forward branches on tensor values at %s (`%s`); its chains were found on the branch "
                       "this example takes (%s is %s). The model runs its own code when it trains, each chain call "
                       "checked", type(model).__name__, where, frame.get("loc", "?"), failure.data.get("expr"),
                       failure.data.get("result"))


@contextlib.contextmanager
def _without_partial_graph() -> Iterator[None]:
    """What the capture writes to stderr (the model's own warnings), less the partial graph that torch.export
    prints when it fails: the error raised for it says what failed."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stderr(buffer):
            yield
    except BaseException as exc:
        graph = getattr(exc, "partial_fx_graph", None)
        sys.stderr.write(buffer.getvalue().replace(str(graph), "") if graph is not None else buffer.getvalue())
        raise
    sys.stderr.write(buffer.getvalue())


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Silence torch's internal warnings (graph dumps of a failed try) while capturing."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)
