"""Piecewise-affine multiplication (PAM) on float32 bit patterns: the arithmetic, nothing else.

Kosson & Jaggi 2023 (docs/pam.md, "The arithmetic"). For a float32 x with bit pattern X read as an
integer, |x| = 2^e (1 + m) and ``X & 0x7FFFFFFF = (e + 127)·2^23 + m·2^23``, so

    L(x) = (X & 0x7FFFFFFF) − 0x3F800000 = 2^23 · palog2|x|,   palog2|x| = e + m

is the piecewise-affine base-2 logarithm in fixed point, and the bit pattern L + 0x3F800000 read
back as a float is paexp2(L / 2^23) = 2^⌊y⌋ (1 + y − ⌊y⌋). Hence

    PAM(a, b)    = sgn(a) sgn(b) · paexp2(palog2|a| + palog2|b|)   bits: A + B − 0x3F800000
    PAMdiv(a, b) = sgn(a) sgn(b) · paexp2(palog2|a| − palog2|b|)   bits: A − B + 0x3F800000

Special operands and results (what our kernels do; the paper's only define finite normal ones):

- Subnormal operands are read as zero (denormals-are-zero), and so is a result below the smallest
  normal 2^-126 (flush to zero, like the paper's kernels): a signed zero, sign sgn(a)·sgn(b).
- A zero operand gives what IEEE gives: ±0 for PAM(0, b) and PAMdiv(0, b), ±inf for PAMdiv(a, 0),
  NaN for 0·inf, 0/0 and inf/inf. An infinite operand gives ±inf (±0 for PAMdiv(a, inf)).
- A result at or above 2^128 is ±inf (overflow). A NaN operand gives NaN (0x7FC00000).

The sign bit is combined separately (XOR), which is what the paper's single integer addition does
whenever the result is a normal number. The integer arithmetic runs in int64, so nothing wraps.

Derivatives (the exact rule): inside each affine piece, ∂PAM/∂a = sgn(b) · 2^(e_P − e_a) with e_P
the exponent of the result, ∂PAMdiv/∂a = sgn(b) · 2^(e_Q − e_a) and ∂PAMdiv/∂b = −sgn(a) · 2^(e_Q − e_b):
powers of two (:func:`pam_mul_slopes`, :func:`pam_div_slopes`).
"""

from __future__ import annotations

import torch

__all__ = ["BIAS", "DEFAULT_CHUNK_ELEMENTS", "pa_exp2", "pa_exp2_slope", "pa_log2", "pa_log2_slope", "pam_div",
           "pam_div_slopes", "pam_matmul", "pam_matmul_backward", "pam_mul", "pam_mul_slopes"]

BIAS = 0x3F800000            # the bit pattern of 1.0: 127 · 2^23
_MIN_NORMAL = 0x00800000     # the bit pattern of 2^-126
_INF = 0x7F800000
_NAN = 0x7FC00000
_SIGN = -(2**31)             # 0x80000000 as an int32
_BIG = 2**40                 # |L| of a zero or infinite operand: far outside every finite sum

DEFAULT_CHUNK_ELEMENTS = 2**21  # products one chunk of pam_matmul forms (16 MiB per int64 temporary)


def _check(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.dtype != torch.float32:
            raise TypeError(f"PAM is defined on float32 bit patterns, got a {t.dtype} tensor")


def _encode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L, sign, is_zero, is_inf) of a float32 tensor; L = 2^23 · palog2|x| as int64, with zero
    (and subnormal) operands at −2^40 and infinite ones at +2^40; a NaN reads as infinite here,
    callers mark it with :func:`_is_nan`."""
    bits = x.view(torch.int32)
    magnitude = (bits & 0x7FFFFFFF).long()
    zero = magnitude < _MIN_NORMAL
    inf = magnitude >= _INF
    level = torch.where(zero, -_BIG, torch.where(inf, _BIG, magnitude - BIAS))
    return level, bits & _SIGN, zero, inf


def _is_nan(x: torch.Tensor) -> torch.Tensor:
    return (x.view(torch.int32) & 0x7FFFFFFF) > _INF


def _decode(biased: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """The float32 of bit pattern ``biased`` = level + 0x3F800000 (magnitude paexp2(level / 2^23)), flushed to
    0 below 2^-126 and inf from 2^128."""
    magnitude = biased.clamp(max=_INF)
    magnitude = torch.where(magnitude < _MIN_NORMAL, 0, magnitude)
    return (magnitude.int() | sign).view(torch.float32)


def pam_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PAM(a, b), elementwise with broadcasting (float32; specials in the module docstring)."""
    return _combine(a, b, divide=False)


def pam_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PAMdiv(a, b), elementwise with broadcasting (float32; specials in the module docstring)."""
    return _combine(a, b, divide=True)


def _combine(a: torch.Tensor, b: torch.Tensor, divide: bool) -> torch.Tensor:
    _check(a, b)
    la, sa, za, ia = _encode(a)
    lb, sb, zb, ib = _encode(b)
    out = _decode(la - (lb - BIAS) if divide else la + (lb + BIAS), sa ^ sb)  # the only full-size work
    na, nb = _is_nan(a), _is_nan(b)
    # NaN results: a NaN operand, 0·inf (product), 0/0 and inf/inf (quotient); checked at operand size first
    pairs = ((za, zb), (ia, ib)) if divide else ((za, ib), (ia, zb))
    if bool(na.any()) or bool(nb.any()) or any(bool(x.any()) and bool(y.any()) for x, y in pairs):
        nan = na | nb | (pairs[0][0] & pairs[0][1]) | (pairs[1][0] & pairs[1][1])
        out = torch.where(nan, torch.tensor(_NAN, dtype=torch.int32).view(torch.float32), out)
    return out


def _exponent(x: torch.Tensor) -> torch.Tensor:
    """The unbiased exponent field of a float32 tensor (int32)."""
    return ((x.view(torch.int32) >> 23) & 0xFF) - 127


def _power_of_two(exponent: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """±2^exponent as float32 (0 below 2^-126, inf from 2^128)."""
    return _decode((exponent.long() << 23) + BIAS, sign)


def _slope(result: torch.Tensor, operand: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """sign · 2^(e_result − e_operand) where the result is a normal number, 0 where it was flushed to
    zero, NaN where it is infinite or NaN (the operand must be normal)."""
    slope = _power_of_two(_exponent(result) - _exponent(operand), sign)
    magnitude = result.view(torch.int32) & 0x7FFFFFFF
    slope = torch.where(magnitude < _MIN_NORMAL, 0.0, slope)
    return torch.where(magnitude >= _INF, torch.nan, slope)


_ONE = 1.0  # a zero operand's slope is taken at any power of two (the limit inside every octave)


def pam_mul_slopes(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(∂PAM/∂a, ∂PAM/∂b), elementwise (broadcast shape): the exact derivatives of the piecewise-affine
    product, sgn(b)·2^(e_P − e_a) and sgn(a)·2^(e_P − e_b), powers of two.

    At a zero (or subnormal) operand a the slope in a is the one every power of two has, the limit
    inside each octave: sgn(b)·2^(e of PAM(1, b)) = sgn(b)·2^e_b; the slope in b is 0 there (PAM(0, b)
    is 0 for all b). Where the result underflowed to 0 both slopes are 0; where it is infinite or
    NaN they are NaN.
    """
    _check(a, b)
    a, b = torch.broadcast_tensors(a, b)
    a_zero, b_zero = _encode(a)[2], _encode(b)[2]
    one = torch.ones((), dtype=torch.float32)
    a_at = torch.where(a_zero, one, a)  # the point whose slope a zero operand takes
    b_at = torch.where(b_zero, one, b)
    sa, sb = a.view(torch.int32) & _SIGN, b.view(torch.int32) & _SIGN
    da = _slope(pam_mul(a_at, b), a_at, sb)
    db = _slope(pam_mul(a, b_at), b_at, sa)
    return torch.where(b_zero, 0.0, da), torch.where(a_zero, 0.0, db)


def pam_div_slopes(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(∂PAMdiv/∂a, ∂PAMdiv/∂b), elementwise: sgn(b)·2^(e_Q − e_a) and −sgn(a)·2^(e_Q − e_b).

    At a zero numerator the slope in a is the one at a = 1 (every power of two has it); the slope in
    b is 0 there (the quotient is 0 for all b). An infinite or NaN quotient (a zero divisor among
    others) gives NaN slopes; a quotient flushed to 0 (an infinite divisor among others) slopes 0.
    """
    _check(a, b)
    a, b = torch.broadcast_tensors(a, b)
    a_zero = _encode(a)[2]
    one = torch.ones((), dtype=torch.float32)
    a_at = torch.where(a_zero, one, a)
    sa, sb = a.view(torch.int32) & _SIGN, b.view(torch.int32) & _SIGN
    da = _slope(pam_div(a_at, b), a_at, sb)
    return da, _slope(pam_div(a, b), b, sa ^ _SIGN)


def _chunk(rows: int, cols: int, depth: int, batch: int, elements: int) -> int:
    """How many k of the contraction one chunk takes so that batch·rows·k·cols ≤ ``elements``."""
    return max(1, min(depth, elements // max(1, batch * rows * cols)))


def pam_matmul(a: torch.Tensor, b: torch.Tensor, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> torch.Tensor:
    """Y = Σ_k PAM(a[..., m, k], b[..., k, n]) for a (..., M, K) and b (..., K, N) (batch dims broadcast).

    The sum runs in a fixed order, k = 0, 1, …, K−1 from an accumulator of +0.0, in float32:
    ``Y = (((0 + P_0) + P_1) + …) + P_{K−1}``, so the result is defined bit for bit (the tests
    compare it with the scalar definition summed in that order).

    Memory: the (..., M, K, N) tensor of products is never formed. The contraction is cut into
    chunks of c values of k with batch·M·c·N ≤ ``chunk_elements``; one chunk holds about five
    int64/int32 temporaries of batch·M·c·N elements (≈ 40 · chunk_elements bytes, 80 MiB by
    default) next to the output.
    """
    _check(a, b)
    if a.dim() < 2 or b.dim() < 2:
        raise ValueError(f"pam_matmul takes (..., M, K) @ (..., K, N), got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(f"pam_matmul: inner dimensions differ, {tuple(a.shape)} @ {tuple(b.shape)}")
    batch_shape = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    (m, k), n = a.shape[-2:], b.shape[-1]
    out = torch.zeros((*batch_shape, m, n), dtype=torch.float32, device=a.device)
    a_t = a.transpose(-1, -2)  # (..., K, M): chunks along k are leading slices
    c = _chunk(m, n, k, batch_shape.numel(), chunk_elements)
    for start in range(0, k, c):
        products = pam_mul(a_t[..., start:start + c, :, None], b[..., start:start + c, None, :])  # (..., c, M, N)
        for j in range(products.shape[-3]):
            out += products[..., j, :, :]
    return out


def pam_matmul_backward(a: torch.Tensor, b: torch.Tensor, grad: torch.Tensor, exact: bool,
                        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of Y = pam_matmul(a, b) for dY = ``grad``, reduced to the shapes of ``a`` and ``b``.

    ``exact=False``: the paper's approximate rule, dA = pam_matmul(dY, Bᵀ), dB = pam_matmul(Aᵀ, dY).
    ``exact=True``: the derivative of the piecewise-affine function itself,
    dA[m, k] = Σ_n PAM(dY[m, n], ∂PAM(A[m, k], B[k, n])/∂A) and dB likewise — every term a product with a
    power of two (exact in PAM), summed by ``torch.sum``. It needs the slope of every (m, k, n)
    product, formed chunk by chunk along k as in :func:`pam_matmul` (same memory bound).
    """
    if not exact:
        grad_a = pam_matmul(grad, b.transpose(-1, -2), chunk_elements)
        grad_b = pam_matmul(a.transpose(-1, -2), grad, chunk_elements)
        return grad_a.sum_to_size(a.shape), grad_b.sum_to_size(b.shape)
    batch_shape = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    (m, k), n = a.shape[-2:], b.shape[-1]
    a_t = a.transpose(-1, -2)
    grad_rows = grad[..., None, :, :]  # (..., 1, M, N)
    c = _chunk(m, n, k, batch_shape.numel(), chunk_elements)
    parts_a, parts_b = [], []
    for start in range(0, k, c):
        slope_a, slope_b = pam_mul_slopes(a_t[..., start:start + c, :, None], b[..., start:start + c, None, :])
        parts_a.append(pam_mul(grad_rows, slope_a).sum(-1))  # (..., c, M)
        parts_b.append(pam_mul(grad_rows, slope_b).sum(-2))  # (..., c, N)
    grad_a = torch.cat(parts_a, -2).transpose(-1, -2)
    return grad_a.sum_to_size(a.shape), torch.cat(parts_b, -2).sum_to_size(b.shape)


def pa_exp2(y: torch.Tensor) -> torch.Tensor:
    """paexp2(y) = 2^⌊y⌋ (1 + y − ⌊y⌋) by the bit trick: the integer round(y·2^23) + 0x3F800000 read as a
    float32 (y·2^23 is an exponent shift; round half to even). Below 2^-126 it is 0, from 2^128 inf;
    NaN gives NaN."""
    _check(y)
    level = torch.round(y * 2.0**23).clamp(-(2.0**40), 2.0**40).long()  # ±inf clamp to far out
    out = _decode(level + BIAS, torch.zeros((), dtype=torch.int32, device=y.device))
    return torch.where(y.isnan(), y, out)


def pa_log2(x: torch.Tensor) -> torch.Tensor:
    """palog2|x| = e + m for |x| = 2^e (1 + m), read off the bit pattern ((X & 0x7FFFFFFF) − 0x3F800000)·2^-23,
    rounded to float32. Zero (and subnormal) operands give −inf, infinite ones inf, NaN NaN."""
    _check(x)
    level, _, zero, inf = _encode(x)
    out = level.float() * 2.0**-23  # an exponent shift
    out = torch.where(zero, -torch.inf, torch.where(inf, torch.inf, out))
    return torch.where(x.isnan(), x, out)


def pa_exp2_slope(y: torch.Tensor) -> torch.Tensor:
    """d paexp2(y)/dy = 2^⌊y⌋ (a power of two; 0 where the result underflows, NaN where it is not finite)."""
    return _slope(pa_exp2(y), torch.ones((), dtype=torch.float32), torch.zeros((), dtype=torch.int32))


def pa_log2_slope(x: torch.Tensor) -> torch.Tensor:
    """d palog2|x|/dx = sgn(x)·2^−e_x (a power of two; NaN at zero, subnormal, infinite and NaN x)."""
    _check(x)
    _, sign, zero, inf = _encode(x)
    slope = _power_of_two(-_exponent(x), sign)
    return torch.where(zero | inf | x.isnan(), torch.nan, slope)
