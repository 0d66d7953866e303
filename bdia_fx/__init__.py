"""bdia_fx: turn a transformer's residual chains into exact reversible BDIA training chains."""

from bdia_fx.config import BDIAConfig
from bdia_fx.convert import convert, find_chains
from bdia_fx.exactness import ExactnessReport, check_exactness
from bdia_fx.export import OnnxCheck, OnnxExport, export_onnx, verify_onnx
from bdia_fx.errors import ConversionError, ExportError, FixedPointRangeError, ReversibilityError
from bdia_fx.frame import is_recomputing
from bdia_fx.report import ChainReport
from bdia_fx.revert import graph_of, revert

__all__ = [
    "BDIAConfig", "ChainReport", "ConversionError", "ExactnessReport", "ExportError", "FixedPointRangeError",
    "OnnxCheck", "OnnxExport", "ReversibilityError",
    "check_exactness", "convert", "export_onnx", "find_chains", "graph_of", "is_recomputing", "revert", "verify_onnx",
]
__version__ = "0.1.0"
