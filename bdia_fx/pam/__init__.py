"""PAM: models whose multiplications run as piecewise-affine multiplication (seed 004; docs/pam.md).

The front door of the PAM system: :func:`convert` makes the PAM copy of a model, :func:`report_of`
and :func:`graph_of` show what its pass did. It does not import BDIA's front door; a PAM model
converts with :func:`bdia_fx.convert` like any other. The parts: :mod:`~bdia_fx.pam.arithmetic`
(the bit-level PAM formulas), :mod:`~bdia_fx.pam.ops` (the operators with autograd, and the one table
of the functions they replace), :mod:`~bdia_fx.pam.model` (the eager PAM model) and the pass
:mod:`bdia_fx.passes.pam` (what a captured graph replaces and why).
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any

from bdia_fx.lazy import lazy_names

_EXPORTS = {
    "PAMConfig": "bdia_fx.pam.model",
    "convert": "bdia_fx.pam.model",
    "graph_of": "bdia_fx.pam.model",
    "is_pam": "bdia_fx.pam.model",
    "report_of": "bdia_fx.pam.model",
    "PAMReport": "bdia_fx.passes.pam",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_names(__name__, _EXPORTS)


class _Package(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("bdia_fx.pam is a package since bdia_fx 0.2: call bdia_fx.pam.convert(model, ...) "
                        "(and bdia_fx.pam.report_of / bdia_fx.pam.graph_of for pam_report_of / pam_graph_of)")


sys.modules[__name__].__class__ = _Package

if TYPE_CHECKING:
    from bdia_fx.pam.model import PAMConfig, convert, graph_of, is_pam, report_of
    from bdia_fx.passes.pam import PAMReport
