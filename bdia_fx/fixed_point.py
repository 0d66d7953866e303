"""Fixed-point codes, exact Q[γx] with one side bit, and the BDIA update and its inverse.

Pure tensor math, no graph code. Codes are int32 tensors: ``code(x) = round(x · 2^l)``.
A code is exact as a float of the stream's dtype only while ``|code| < 2^(mantissa+1)``
(2^24 for float32); :func:`exact_code_limit` gives that bound and :func:`to_codes` enforces it.
"""

from __future__ import annotations

import functools
import math

import torch

from bdia_fx.errors import FixedPointRangeError

_INT32_LIMIT = 2**31 - 1


@functools.lru_cache(maxsize=None)
def exact_code_limit(dtype: torch.dtype) -> int:
    """Largest |code| whose float value in ``dtype`` is exact and which fits in int32."""
    mantissa = round(-math.log2(torch.finfo(dtype).eps)) + 1
    return min(2**mantissa, _INT32_LIMIT)


def to_codes(x: torch.Tensor, frac_bits: int, where: str = "") -> torch.Tensor:
    """``round(x · 2^l)`` as int32; raise :class:`FixedPointRangeError` outside the exact range."""
    return _rounded_codes(x.mul(2.0**frac_bits), x.dtype, frac_bits, where)


def _rounded_codes(scaled: torch.Tensor, dtype: torch.dtype, frac_bits: int, where: str) -> torch.Tensor:
    """Round ``scaled`` (a fresh tensor: x · 2^l) in place, range-check it, and convert it to int32 codes."""
    scaled.round_()
    _check_range(scaled, dtype, frac_bits, where)
    return scaled.to(torch.int32)


def check_codes(codes: torch.Tensor, dtype: torch.dtype, frac_bits: int, where: str = "") -> None:
    """Raise :class:`FixedPointRangeError` if integer ``codes`` are not exact in ``dtype``."""
    _check_range(codes, dtype, frac_bits, where)


def _check_range(codes: torch.Tensor, dtype: torch.dtype, frac_bits: int, where: str) -> None:
    limit = exact_code_limit(dtype)
    if not codes.numel():
        return
    low, high = (v.item() for v in torch.aminmax(codes))  # one pass, no |codes| temporary
    if not (high < limit and low > -limit):  # also catches NaN and inf
        value = max(abs(low), abs(high)) / 2.0**frac_bits
        raise FixedPointRangeError(
            f"fixed-point overflow: |x| reached {value:.6g}, beyond the exact range |x| < "
            f"2^{limit.bit_length() - 1 - frac_bits} = {limit / 2.0**frac_bits:.6g} of {dtype} codes at "
            f"frac_bits={frac_bits}; lower BDIAConfig.frac_bits or rescale the stream",
            module=where or None,
        )


def from_codes(codes: torch.Tensor, frac_bits: int, dtype: torch.dtype) -> torch.Tensor:
    """The float values ``code · 2^-l`` (exact for codes within :func:`exact_code_limit`)."""
    if dtype == torch.get_default_dtype():  # int tensor × float scalar: one pass, in the default dtype
        return codes.mul(2.0**-frac_bits)
    return codes.to(dtype).mul_(2.0**-frac_bits)


def quantize(x: torch.Tensor, frac_bits: int) -> torch.Tensor:
    """Q[x] = round(x · 2^l) / 2^l in x's dtype (no range check: the γ = 0 / export form)."""
    scale = 2.0**frac_bits
    return torch.round(x * scale) / scale


def half_term(codes: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Codes of Q[γx] for γ = sign/2: ``γ (a − s)`` with ``s = a mod 2``, i.e. ``sign · (a >> 1)``
    (the arithmetic shift floors, so ``(a − s) >> 1 == a >> 1`` exactly)."""
    return (codes >> 1).mul_(sign)


def bdia_forward(a: torch.Tensor, b: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """x_{k+1} codes from x_{k-1} codes ``a`` and the update codes ``b``: ``γ(a − s) + b``."""
    return half_term(a, sign).add_(b)


def bdia_inverse(c: torch.Tensor, b: torch.Tensor, sign: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """x_{k-1} codes from x_{k+1} codes ``c``, update codes ``b`` and side bits: ``(c − b)/γ + s``."""
    a = c - b  # one new tensor, the rest in place (backward's working set is the peak)
    a.mul_(2 * sign)
    return a.add_(bits)


def update_codes(f: torch.Tensor, x: torch.Tensor, coef_f: torch.Tensor, coef_x: torch.Tensor, frac_bits: int,
                 where: str = "") -> torch.Tensor:
    """Codes of Q[v] for v = (1−γ)x + (1+γ)h(x) = (1+γ)f − 2γx, from the block output f = x + h(x),
    without materialising v: ``coef_f = (1+γ)·2^l`` and ``coef_x = −2γ·2^l`` carry the scale
    (2^l is a power of two and −2γx is exact, so the result equals ``to_codes((1+γ)f − 2γx)``
    bit for bit)."""
    return _rounded_codes(torch.mul(f, coef_f).addcmul_(x, coef_x), f.dtype, frac_bits, where)


_BIT_WEIGHTS = (1, 2, 4, 8, 16, 32, 64, 128)


def pack_side_bits(codes: torch.Tensor) -> torch.Tensor:
    """The side bits ``s = code mod 2`` (non-negative, the low bit) packed 8 per byte, uint8
    little-endian bit order (integer-to-uint8 conversion keeps the low byte, two's complement)."""
    bits = codes.reshape(-1).to(torch.uint8).bitwise_and_(1)
    pad = (-bits.numel()) % 8
    if pad:
        bits = torch.cat([bits, bits.new_zeros(pad)])
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=bits.device)
    return bits.view(-1, 8).mul_(weights).sum(dim=1, dtype=torch.uint8)


def unpack_side_bits(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`pack_side_bits`: a uint8 0/1 tensor of ``shape``."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(1) >> shifts).bitwise_and_(1)
    numel = 1
    for size in shape:
        numel *= size
    return bits.reshape(-1)[:numel].view(shape)


def checksum(codes: torch.Tensor) -> torch.Tensor:
    """A cheap order-sensitive int64 fingerprint of a code tensor (two sums, wrap-around)."""
    flat = codes.reshape(-1).to(torch.int64)
    weights = torch.arange(1, flat.numel() + 1, dtype=torch.int64, device=flat.device) % 8191
    return torch.stack([flat.sum(), (flat * weights).sum()])
