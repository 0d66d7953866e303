"""bdia_fx: turn a transformer's residual chains into exact reversible BDIA training chains."""

from bdia_fx.config import BDIAConfig
from bdia_fx.convert import convert, find_chains
from bdia_fx.errors import ConversionError, FixedPointRangeError, ReversibilityError
from bdia_fx.report import ChainReport

__all__ = [
    "BDIAConfig", "ChainReport", "ConversionError", "FixedPointRangeError", "ReversibilityError",
    "convert", "find_chains",
]
__version__ = "0.1.0"
