"""Independent references: the BDIA training forward of docs/design.md written out in plain autograd."""

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
