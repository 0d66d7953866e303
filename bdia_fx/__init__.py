"""bdia_fx: turn a transformer's residual chains into exact reversible BDIA training chains.

The names below load their module on first use, so that importing a part of the package (e.g.
the graph passes, ``bdia_fx.passes``) does not import the rest of it (the chain runtime).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bdia_fx import legacy
from bdia_fx.lazy import lazy_names

__version__ = "0.2.1"

_EXPORTS = {
    "BDIAConfig": "bdia_fx.config",
    "ChainReport": "bdia_fx.report",
    "ConversionError": "bdia_fx.errors",
    "ExportError": "bdia_fx.errors",
    "FixedPointRangeError": "bdia_fx.errors",
    "ReversibilityError": "bdia_fx.errors",
    "ExactnessReport": "bdia_fx.exactness",
    "check_exactness": "bdia_fx.exactness",
    "convert": "bdia_fx.conversion",
    "find_chains": "bdia_fx.conversion",
    "is_converted": "bdia_fx.converted",
    "report_of": "bdia_fx.conversion",
    "OnnxCheck": "bdia_fx.export",
    "OnnxExport": "bdia_fx.export",
    "export_onnx": "bdia_fx.export",
    "verify_onnx": "bdia_fx.export",
    "is_recomputing": "bdia_fx.run.frame",
    "odeint": "bdia_fx.ode",
    "pam": "bdia_fx.pam",
    "estimate_saved_bytes": "bdia_fx.memory",
    "saved_activation_bytes": "bdia_fx.memory",
    "graph_of": "bdia_fx.reversal",
    "revert": "bdia_fx.reversal",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_names(__name__, _EXPORTS)
legacy.install()


if TYPE_CHECKING:
    from bdia_fx import pam
    from bdia_fx.config import BDIAConfig
    from bdia_fx.conversion import convert, find_chains, report_of
    from bdia_fx.converted import is_converted
    from bdia_fx.errors import ConversionError, ExportError, FixedPointRangeError, ReversibilityError
    from bdia_fx.exactness import ExactnessReport, check_exactness
    from bdia_fx.export import OnnxCheck, OnnxExport, export_onnx, verify_onnx
    from bdia_fx.memory import estimate_saved_bytes, saved_activation_bytes
    from bdia_fx.ode import odeint
    from bdia_fx.report import ChainReport
    from bdia_fx.reversal import graph_of, revert
    from bdia_fx.run.frame import is_recomputing
