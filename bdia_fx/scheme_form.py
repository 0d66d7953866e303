"""The inference form of a chain integrated with a shear scheme (``BDIAConfig(scheme=...)``).

Block k of a chain is the vector field of step k, ``f_k(t, z) = h_k(z)``, integrated with step size 1
from t = k (see :mod:`bdia_fx.scheme_chain` for training). Pure forward code with no autograd
machinery, so that the reverse pass (:mod:`bdia_fx.passes.revert`) can trace it onto a graph.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from bdia_fx import fixed_point as fp
from bdia_fx.errors import ConversionError
from bdia_fx.schemes import Field, Scheme, Shear, float_shears, read, shear_codes

BlockMap = Callable[[torch.Tensor], torch.Tensor]
"""One block as a map of the stream: its output (a residual block's x + h(x), a branch's h(x))."""


def chain_shears(scheme: Scheme, field: Field, k: int) -> list[Shear]:
    """The shears of chain step k (step size 1 from t = k); step 0 starts with the scheme's start shears."""
    return (scheme.start(field, 0.0) if k == 0 else []) + scheme.step(field, float(k), 1.0)


def block_field(block_map: BlockMap, branch: bool) -> Field:
    """The vector field of one block: h(z) = output − z (a branch module's output is h(z) already)."""
    if branch:
        return lambda t, z: block_map(z)
    return lambda t, z: block_map(z) - z


class SchemeForm:
    """The inference form of a scheme chain, block call by block call: the parts beyond the stream
    live here from block 0's call to the last block's (the parent hands over only the stream)."""

    def __init__(self, container: str, scheme: Scheme, frac_bits: int, quantize: bool, blocks: int):
        self.container, self.scheme, self.frac_bits, self.quantize = container, scheme, frac_bits, quantize
        self.blocks = blocks
        self._parts: list[torch.Tensor] | None = None  # codes (quantize) or values, while a call runs
        self._out: torch.Tensor | None = None
        self._next = 0  # the block due next

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_parts": None, "_out": None, "_next": 0}

    def step(self, k: int, x: torch.Tensor, block_map: BlockMap, branch: bool, where: str) -> torch.Tensor:
        """Block k's call: the new stream z_{k+1} from z_k = ``x`` (a branch gets z_{k+1} − x back)."""
        if k == 0:
            parts = [x] + [torch.zeros_like(x) for _ in self.scheme.parts[1:]]
            if self.quantize:
                parts = [fp.codes_unchecked(p, self.frac_bits) for p in parts]
        else:
            if self._parts is None or self._next != k or not self._handed_over(x, branch):
                raise ConversionError(
                    f"block {k} of scheme chain '{self.container}' did not get block {k - 1}'s output: a scheme "
                    "chain carries state between its blocks, so they must run in order, each once per call, with "
                    "nothing changing the stream in between", module=where)
            parts = self._parts
        field = block_field(block_map, branch)
        if self.quantize:
            dtype = x.dtype
            for shear in chain_shears(self.scheme, field, k):
                parts = shear_codes(shear, parts, self.frac_bits, dtype)
            z = read(parts[0], self.frac_bits, dtype)
        else:
            parts = float_shears(chain_shears(self.scheme, field, k), parts)
            z = parts[0]
        returned = z - x if branch else z
        self._parts, self._out, self._next = (None, None, 0) if k == self.blocks - 1 else \
            (parts, (returned, x) if branch else z, k + 1)
        return returned

    def _handed_over(self, x: torch.Tensor, branch: bool) -> bool:
        """The stream block k got is block k−1's output: the object itself, or for a branch module the
        parent's add of what it returned and its input (by value; not checked while being compiled or
        exported, where values are symbolic)."""
        if not branch:
            return x is self._out
        if torch.compiler.is_compiling():
            return True
        returned, passed = self._out
        return x.shape == passed.shape and torch.equal(x, returned + passed)
