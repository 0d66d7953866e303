"""Fixed-point codes, exact Q[γx] with one side bit, the BDIA update, its inverse and its gradients.

Pure tensor math, no graph code (the design notes are in ``docs/design.md``). The chain state is
int32 codes, ``code(x) = round(x · 2^l)``, whatever the stream's dtype: the update
x_{k+1} = Q[γx_{k-1}] + Q[v_k] runs on integers, and the only floating-point step is rounding
the block's output, so a bfloat16 model has the same exact range as a float32 one. Codes stay
below :data:`CODE_LIMIT` so that no integer step can overflow int32.

Range checks do not read values on the host: :func:`to_codes` and :func:`update_codes` return the
[min, max] of what they rounded as a small device tensor, and :func:`range_problem` judges such a
pair once it has been read (the chain reads all of a call's pairs at once).
"""

from __future__ import annotations

import math

import torch

__all__ = ["CODE_LIMIT", "WIDE_CODE_LIMIT", "bdia_forward", "bdia_inverse", "checksum", "codes_unchecked",
           "compute_dtype", "draw_seed", "exact_range", "from_codes", "gamma_signs", "half_term", "pack_side_bits",
           "quantize", "quantize_ste", "range_problem", "to_codes", "unpack_side_bits", "value_range"]

CODE_LIMIT = 2**29
"""|code| bound for the stream's codes and for the rounded block term round((1+γ)·2^l·f): with
both below it, the update codes b = round(y) − 2γ·code(x_k) stay below 2^30, and γ(a − s) + b and
the inverse's 2γ(c − b) + s stay inside int32."""

WIDE_CODE_LIMIT = 2**60
"""|code| bound for int64 codes (the ODE schemes' state and rounded increments, ``bdia_fx.schemes``):
a part plus one rounded increment, each below it, stays below 2^61, inside int64."""


def exact_range(frac_bits: int) -> float:
    """The largest |x| the chain holds exactly: 2^(29 − l)."""
    return CODE_LIMIT / 2.0**frac_bits


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The float type codes are rounded in: float32, or the stream's dtype when it is wider."""
    return torch.promote_types(dtype, torch.float32)


def value_range(t: torch.Tensor) -> torch.Tensor:
    """``[min, max]`` of ``t`` as a 2-element device tensor (NaN or ±inf propagate into it)."""
    if not t.numel():
        return torch.zeros(2, dtype=t.dtype, device=t.device)
    return torch.stack(torch.aminmax(t))


def _round(scaled: torch.Tensor, code_dtype: torch.dtype = torch.int32) -> tuple[torch.Tensor, torch.Tensor]:
    """Round ``scaled`` (a fresh float tensor) in place; its integer codes and its value range."""
    scaled.round_()
    return scaled.to(code_dtype), value_range(scaled)


def to_codes(x: torch.Tensor, frac_bits: int,
             code_dtype: torch.dtype = torch.int32) -> tuple[torch.Tensor, torch.Tensor]:
    """``round(x · 2^l)`` as integer codes (int32, or int64 for the ODE schemes), and the range of
    the rounded values (judge it with :func:`range_problem`, or against :data:`WIDE_CODE_LIMIT`)."""
    return _round(x.to(compute_dtype(x.dtype)).mul(2.0**frac_bits), code_dtype)


def codes_unchecked(x: torch.Tensor, frac_bits: int, code_dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """The codes of :func:`to_codes` without the range (inference forms, where nothing would read it;
    plain ops an ONNX export can carry)."""
    return x.to(compute_dtype(x.dtype)).mul(2.0**frac_bits).round().to(code_dtype)


def range_problem(low: float, high: float, frac_bits: int, dtype: torch.dtype | None = None,
                  limit: int = CODE_LIMIT) -> str | None:
    """Why codes with this [min, max] cannot be held exactly, or None when they can. With ``dtype``
    (the stream's), the values must also be finite in it: blocks read them in that dtype. ``limit``:
    :data:`CODE_LIMIT` (int32 codes) or :data:`WIDE_CODE_LIMIT` (int64)."""
    if math.isnan(low) or math.isnan(high) or math.isinf(low) or math.isinf(high):
        kind = "NaN" if math.isnan(low) or math.isnan(high) else "inf"
        return (f"the stream became non-finite ({kind}) at this block: its output holds {kind} values (an "
                "overflow inside the block, e.g. in reduced precision, or a diverging run); this is not a "
                "fixed-point range problem, and frac_bits does not change it")
    value = max(abs(low), abs(high)) / 2.0**frac_bits
    if dtype is not None and dtype.is_floating_point and value > torch.finfo(dtype).max:
        return (f"the stream reached |x| = {value:.6g}, beyond the largest {dtype} value {torch.finfo(dtype).max:.6g} "
                "that the blocks read it in; rescale the stream or train in a wider dtype")
    if max(abs(low), abs(high)) < limit:
        return None
    bits = 32 if limit == CODE_LIMIT else 64
    return (f"fixed-point overflow: |x| reached {value:.6g}, beyond the exact range |x| < "
            f"2^{round(math.log2(limit)) - frac_bits} = {limit / 2.0**frac_bits:.6g} of the chain's int{bits} codes at "
            f"frac_bits={frac_bits}; lower BDIAConfig.frac_bits or rescale the stream")


def from_codes(codes: torch.Tensor, frac_bits: int, dtype: torch.dtype) -> torch.Tensor:
    """The values ``code · 2^-l`` in ``dtype`` (rounded to ``dtype``'s precision where it is narrower)."""
    if dtype == torch.get_default_dtype():  # int tensor × float scalar: one pass, in the default dtype
        return codes.mul(2.0**-frac_bits)
    return codes.to(compute_dtype(dtype)).mul_(2.0**-frac_bits).to(dtype)


def quantize(x: torch.Tensor, frac_bits: int) -> torch.Tensor:
    """Q[x] = round(x · 2^l) / 2^l in x's dtype (no range check: the γ = 0 / export form)."""
    scale = 2.0**frac_bits
    return torch.round(x * scale) / scale


def quantize_ste(x: torch.Tensor, frac_bits: int) -> torch.Tensor:
    """Q[x] with the straight-through gradient (the training graph's quantization node):
    ``x + (Q[x] − x).detach()``, which is Q[x] exactly (Q[x] − x is exact: the two are within half a
    code, so within a factor of two of each other or Q[x] = 0)."""
    return x + (quantize(x, frac_bits) - x).detach()


# ---------------------------------------------------------------- γ signs, the halving update
_MASK32 = 0xFFFFFFFF
_MIX = 0x45D9F3B


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash of int64 tensors holding values in [0, 2^32) (two multiply–xorshift
    rounds; every product stays below 2^59, so nothing wraps, in eager or compiled code)."""
    x = ((x >> 16) ^ x) * _MIX & _MASK32
    x = ((x >> 16) ^ x) * _MIX & _MASK32
    return (x >> 16) ^ x


def draw_seed(like: torch.Tensor) -> torch.Tensor:
    """A 62-bit seed as a 0-d int64 tensor on ``like``'s device, from torch's generator of that device
    (``torch.manual_seed`` reproduces it; no host read)."""
    device = like.device
    return torch.randint(0, 2**62, (), dtype=torch.int64, device=device)


def gamma_signs(seed: torch.Tensor, steps: range, batch: int, rank: int = 0) -> torch.Tensor:
    """The signs (±1, int8) of chain ``steps`` for each of ``batch`` samples, shaped (steps, batch): a
    pure function of the 0-d int64 ``seed``, the step and the process ``rank``, the same in forward and
    backward, in eager and compiled code, on any device, with nothing kept but the seed. Each sign is
    one bit of a 32-bit integer hash of (seed, step, rank, sample); drawing several steps at once gives
    each step the signs it gets alone."""
    step = torch.arange(steps.start, steps.stop, dtype=torch.int64, device=seed.device).unsqueeze(1)
    salt = (step * 0x9E3779B1 + rank * 0x85EBCA77) & _MASK32  # tensors: inductor mistypes an int64 arange
    # xor-ed with a symbolic Python int (recompiles make such ints dynamic)
    index = torch.arange(batch, dtype=torch.int64, device=seed.device)
    h = _mix32(index ^ salt)
    h = _mix32(h ^ (seed & _MASK32))
    h = _mix32(h ^ ((seed >> 32) & _MASK32))
    return ((h >> 15) & 1).to(torch.int8) * 2 - 1


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


# ---------------------------------------------------------------- side bits and checksums
_PACK = 0x0102040810204080
"""Σ 2^(56−7i): times 8 bytes b_i ∈ {0, 1} read as one int64, it puts b_i at bit 56 + i and every other
product term at its own bit position (8i − 7k = 8i' − 7k' has no other solution in 0..7), so no carry
reaches the top byte: ``(v · _PACK) >> 56`` packs 8 bits in one multiply (the product wraps in int64)."""
_SPREAD = 0x0002040810204081
"""Σ 2^(7i): times a 7-bit value p, copies p at bit offsets 7i without overlap, so bit 8i is p's bit i."""
_LOW_BITS = 0x0101010101010101


def pack_side_bits(codes: torch.Tensor) -> torch.Tensor:
    """The side bits ``s = code mod 2`` (non-negative, the low bit) packed 8 per byte, uint8, bit i of
    byte j from element 8j + i (integer-to-uint8 conversion keeps the low byte, two's complement).
    Eight bits are packed by one int64 multiply (:data:`_PACK`, wrapping in int64 as torch's integer
    arithmetic does on CPU and CUDA), not a reduction over bytes. The 8 bytes are read as one int64
    in little-endian order (every platform torch ships wheels for); the layout above assumes it."""
    bits = codes.reshape(-1).to(torch.uint8, copy=True).bitwise_and_(1)  # a copy: never the caller's bytes
    pad = (-bits.numel()) % 8
    if pad:
        bits = torch.cat([bits, bits.new_zeros(pad)])
    return bits.view(torch.int64).mul_(_PACK).bitwise_right_shift_(56).to(torch.uint8)


def unpack_side_bits(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`pack_side_bits`: a uint8 0/1 tensor of ``shape`` (bits 0–6 of each byte spread
    by one multiply, :data:`_SPREAD`; bit 7 shifted to the last byte)."""
    p = packed.to(torch.int64)
    spread = (p & 127).mul_(_SPREAD).bitwise_and_(_LOW_BITS).bitwise_or_((p >> 7) << 56)
    return spread.view(torch.uint8)[:math.prod(shape)].view(shape)


def checksum(codes: torch.Tensor) -> torch.Tensor:
    """A cheap int64 fingerprint of a code tensor on its device: the sums of the codes and of their
    squares (c² wraps in int32), each summed as int64 words made of two neighbouring codes (one pass,
    no conversion copy; int64 codes are summed as they are).

    A single changed code changes the first sum (its word changes by a non-zero amount below 2^64);
    two changes that cancel in it almost always change the second. A permutation that moves codes
    only between positions of the same parity (even with even, odd with odd) keeps both. No host read.
    """
    flat = codes.reshape(-1)
    if torch.compiler.is_compiling():  # compiled code sums int64 conversions (fused, no copy)
        wide = flat.to(torch.int64)
        return torch.stack([wide.sum(), (flat * flat).to(torch.int64).sum()])
    if flat.dtype == torch.int64:  # the codes of shear schemes: their own words
        return torch.stack([flat.sum(), (flat * flat).sum()])
    return torch.stack([_wide_sum(flat), _wide_sum(flat * flat)])


def _wide_sum(flat: torch.Tensor) -> torch.Tensor:
    """Σ of an int32 vector read as int64 pairs (a zero appended to an odd length) mod 2^64: a function
    of the values alone, whatever the storage offset (a copy only where a pair would be misaligned)."""
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    elif flat.storage_offset() % 2:
        flat = flat.clone()
    return flat.view(torch.int64).sum()
