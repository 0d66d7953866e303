"""The one exception family of bdia_fx."""

from __future__ import annotations

__all__ = ["ConversionError", "ExportError", "FixedPointRangeError", "ReversibilityError"]


class ConversionError(RuntimeError):
    """bdia_fx refused or failed to convert or run a model.

    The message names the module and/or graph node concerned and the reason.
    ``module`` and ``node`` hold those names for programmatic use.
    """

    def __init__(self, reason: str, module: str | None = None, node: str | None = None):
        self.reason = reason
        self.module = module
        self.node = node
        where = []
        if module is not None:
            where.append(f"module '{module or '<root>'}'")
        if node is not None:
            where.append(f"node '{node}'")
        prefix = f"[{', '.join(where)}] " if where else ""
        super().__init__(prefix + reason)


class ReversibilityError(ConversionError):
    """The backward recompute of a block did not reproduce its forward bit-for-bit."""


class FixedPointRangeError(ConversionError):
    """A chain value left the range in which its fixed-point code is exact."""


class ExportError(RuntimeError):
    """An ONNX export could not be written, or the written file disagrees with PyTorch."""
