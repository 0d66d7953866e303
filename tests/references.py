"""Independent references: the BDIA training forward of docs/design.md written out in plain autograd, and
the piecewise-affine product of docs/pam.md as its float64 formula (no bit patterns)."""

from __future__ import annotations

import torch

L = 9


class Q(torch.autograd.Function):
    """Q[v] = round(v·2^l)/2^l with the straight-through gradient."""

    @staticmethod
    def forward(ctx, v):
        return torch.round(v * 2**L) / 2**L

    @staticmethod
    def backward(ctx, g):
        return g


class HalfQ(torch.autograd.Function):
    """Q[γ x] for x on the grid, γ = ±½: floor(a/2) resp. −floor(a/2) codes, gradient γ."""

    @staticmethod
    def forward(ctx, x, gamma):
        ctx.gamma = gamma
        a = torch.round(x * 2**L)
        return torch.floor(a / 2) * (1 if gamma > 0 else -1) / 2**L

    @staticmethod
    def backward(ctx, g):
        return g * ctx.gamma, None


def bdia_chain(steps, x, gamma):
    """x_0 = Q[x], x_1 = Q[f_0(x_0)], x_{k+1} = Q[γx_{k-1}] + Q[(1+γ)f_k(x_k)] − 2γx_k (γ fixed for every
    sample): Q[v] for v = (1+γ)f − 2γx is Q[(1+γ)f] − 2γx, since 2γx = ±x lies on the grid."""
    prev = Q.apply(x)
    cur = Q.apply(steps[0](prev))
    for step in steps[1:]:
        update = Q.apply((1 + gamma) * step(cur)) - 2 * gamma * cur
        prev, cur = cur, HalfQ.apply(prev, gamma) + update
    return cur


def palog2(x: torch.Tensor) -> torch.Tensor:
    """e + m for |x| = 2^e (1 + m), x float64 and normal (Kosson & Jaggi's piecewise-affine log2)."""
    mantissa, exponent = torch.frexp(x.abs())  # |x| = mantissa · 2^exponent, mantissa in [½, 1)
    return (exponent - 1).double() + (2 * mantissa - 1)


def paexp2(y: torch.Tensor) -> torch.Tensor:
    """2^⌊y⌋ (1 + y − ⌊y⌋), float64."""
    floor = torch.floor(y)
    return torch.ldexp(1 + (y - floor), floor)


def pam_reference(a: torch.Tensor, b: torch.Tensor, divide: bool = False) -> torch.Tensor:
    """PAM(a, b) (or PAMdiv) of float32 tensors from the float64 formula sgn·paexp2(palog2|a| ± palog2|b|).

    Subnormal operands read as 0; zero, infinite and NaN operands give what the IEEE float64 product
    (quotient) of the operands gives; a result below 2^-126 is ±0, one at or above 2^128 ±inf.
    """
    a64, b64 = (torch.where(t.abs() < 2.0**-126, 0.0 * t, t).double() for t in (a, b))
    ieee = a64 / b64 if divide else a64 * b64
    normal = torch.isfinite(ieee) & (ieee != 0)
    safe_a, safe_b = (torch.where(normal, t, 1.0) for t in (a64, b64))
    level = palog2(safe_a) - palog2(safe_b) if divide else palog2(safe_a) + palog2(safe_b)
    value = torch.sign(ieee) * paexp2(level)
    value = torch.where(value.abs() < 2.0**-126, 0.0 * torch.sign(ieee), value)
    value = torch.where(value.abs() >= 2.0**128, torch.sign(ieee) * torch.inf, value)
    return torch.where(normal, value, ieee).float()
