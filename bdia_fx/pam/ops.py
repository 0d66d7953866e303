"""The PAM arithmetic as PyTorch operators with autograd: ``torch.ops.bdia_pam.{mul, div, matmul}``.

Registered with ``torch.library.custom_op`` so that a captured graph (``torch.export``) holds each as
one node, and so that :func:`bdia_fx.convert` of a PAM model plans, runs and recomputes them like any
other operation (the recompute replays them bit for bit: they are deterministic integer arithmetic).
``exp2``/``log2`` are the bit-trick paexp2/palog2 (their derivative, a power of two, for both rules).
The products take ``rule``: ``"approx"`` (the paper's backward, gradients by PAM of the gradient:
dA = PAM(dY, B), dA = PAM-matmul(dY, Bᵀ)) or ``"exact"`` (the derivative of the piecewise-affine
function, :mod:`bdia_fx.pam.arithmetic`). Operands must be float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from bdia_fx.pam import arithmetic

__all__ = ["ALL_OPS", "KNOWN_OPS", "OPS", "PAMOp", "RULES", "div", "exp2", "log2", "matmul", "mul", "pa_exp",
           "pa_gelu", "pa_layer_norm", "pa_rsqrt", "pa_sigmoid", "pa_silu", "pa_softmax_", "pa_tanh", "pam_addmm",
           "pam_div", "pam_div_", "pam_linear", "pam_matmul", "pam_mul", "pam_mul_",
           "pam_scaled_dot_product_attention"]

RULES = ("approx", "exact")


def _check_rule(rule: str) -> None:
    if rule not in RULES:
        raise ValueError(f"PAM backward rule must be one of {RULES}, got {rule!r}")


@torch.library.custom_op("bdia_pam::mul", mutates_args=())
def mul(a: torch.Tensor, b: torch.Tensor, rule: str) -> torch.Tensor:
    """PAM(a, b), elementwise with broadcasting."""
    _check_rule(rule)
    return arithmetic.pam_mul(a, b)


@torch.library.custom_op("bdia_pam::div", mutates_args=())
def div(a: torch.Tensor, b: torch.Tensor, rule: str) -> torch.Tensor:
    """PAMdiv(a, b), elementwise with broadcasting."""
    _check_rule(rule)
    return arithmetic.pam_div(a, b)


@torch.library.custom_op("bdia_pam::matmul", mutates_args=())
def matmul(a: torch.Tensor, b: torch.Tensor, rule: str) -> torch.Tensor:
    """Σ_k PAM(a[..., m, k], b[..., k, n]) for a (..., M, K), b (..., K, N) (:func:`arithmetic.pam_matmul`)."""
    _check_rule(rule)
    return arithmetic.pam_matmul(a, b)


@mul.register_fake
@div.register_fake
def _elementwise_fake(a: torch.Tensor, b: torch.Tensor, rule: str) -> torch.Tensor:
    return a.new_empty(torch.broadcast_shapes(a.shape, b.shape))


@matmul.register_fake
def _matmul_fake(a: torch.Tensor, b: torch.Tensor, rule: str) -> torch.Tensor:
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    return a.new_empty((*batch, a.shape[-2], b.shape[-1]))


@torch.library.custom_op("bdia_pam::exp2", mutates_args=())
def exp2(y: torch.Tensor) -> torch.Tensor:
    """paexp2(y) = 2^⌊y⌋ (1 + y − ⌊y⌋) by the bit trick (:func:`arithmetic.pa_exp2`)."""
    return arithmetic.pa_exp2(y)


@torch.library.custom_op("bdia_pam::log2", mutates_args=())
def log2(x: torch.Tensor) -> torch.Tensor:
    """palog2|x| = e + m read off the bit pattern (:func:`arithmetic.pa_log2`)."""
    return arithmetic.pa_log2(x)


@exp2.register_fake
@log2.register_fake
def _unary_fake(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def _save_input(ctx, inputs: tuple, output: torch.Tensor) -> None:
    ctx.save_for_backward(inputs[0])


def _exp2_backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # both rules: the derivative is a power of two
    return arithmetic.pam_mul(grad, arithmetic.pa_exp2_slope(ctx.saved_tensors[0]))


def _log2_backward(ctx, grad: torch.Tensor) -> torch.Tensor:
    return arithmetic.pam_mul(grad, arithmetic.pa_log2_slope(ctx.saved_tensors[0]))


exp2.register_autograd(_exp2_backward, setup_context=_save_input)
log2.register_autograd(_log2_backward, setup_context=_save_input)


def _save_operands(ctx, inputs: tuple, output: torch.Tensor) -> None:
    a, b, rule = inputs
    ctx.rule = rule
    ctx.save_for_backward(a, b)


def _save_operands_and_quotient(ctx, inputs: tuple, output: torch.Tensor) -> None:
    a, b, rule = inputs
    ctx.rule = rule
    ctx.save_for_backward(a, b, output)


def _mul_backward(ctx, grad: torch.Tensor) -> tuple:
    a, b = ctx.saved_tensors
    if ctx.rule == "exact":
        slope_a, slope_b = arithmetic.pam_mul_slopes(a, b)
        grad_a, grad_b = arithmetic.pam_mul(grad, slope_a), arithmetic.pam_mul(grad, slope_b)
    else:
        grad_a, grad_b = arithmetic.pam_mul(grad, b), arithmetic.pam_mul(grad, a)
    return grad_a.sum_to_size(a.shape), grad_b.sum_to_size(b.shape), None


def _div_backward(ctx, grad: torch.Tensor) -> tuple:
    a, b, quotient = ctx.saved_tensors
    if ctx.rule == "exact":
        slope_a, slope_b = arithmetic.pam_div_slopes(a, b)
        grad_a, grad_b = arithmetic.pam_mul(grad, slope_a), arithmetic.pam_mul(grad, slope_b)
    else:  # d(a/b) = da/b − (a/b)/b db
        grad_a, grad_b = arithmetic.pam_div(grad, b), -arithmetic.pam_div(arithmetic.pam_mul(grad, quotient), b)
    return grad_a.sum_to_size(a.shape), grad_b.sum_to_size(b.shape), None


def _matmul_backward(ctx, grad: torch.Tensor) -> tuple:
    a, b = ctx.saved_tensors
    return (*arithmetic.pam_matmul_backward(a, b, grad.contiguous(), exact=ctx.rule == "exact"), None)


mul.register_autograd(_mul_backward, setup_context=_save_operands)
div.register_autograd(_div_backward, setup_context=_save_operands_and_quotient)
matmul.register_autograd(_matmul_backward, setup_context=_save_operands)


# The PAM versions of PyTorch's multiplying functions, with their signatures (ATen's and torch's agree
# on these): what both the graph pass and the eager model call. ``rule`` is keyword-only.

def _tensor(x: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """``x`` as a float32 tensor (a Python number becomes a 0-dim tensor on ``like``'s device)."""
    if isinstance(x, torch.Tensor):
        return x if x.dtype == torch.float32 else x.float()
    return torch.full((), float(x), dtype=torch.float32, device=like.device)


def pam_mul(input: torch.Tensor | float, other: torch.Tensor | float, *, rule: str) -> torch.Tensor:
    like = input if isinstance(input, torch.Tensor) else other
    return mul(_tensor(input, like), _tensor(other, like), rule)


def pam_div(input: torch.Tensor | float, other: torch.Tensor | float, *, rule: str) -> torch.Tensor:
    like = input if isinstance(input, torch.Tensor) else other
    return div(_tensor(input, like), _tensor(other, like), rule)


def pam_mul_(input: torch.Tensor, other: torch.Tensor | float, *, rule: str) -> torch.Tensor:
    """In place: ``input`` takes the values of PAM(input, other)."""
    return input.copy_(pam_mul(input, other, rule=rule))


def pam_div_(input: torch.Tensor, other: torch.Tensor | float, *, rule: str) -> torch.Tensor:
    return input.copy_(pam_div(input, other, rule=rule))


def pam_matmul(input: torch.Tensor, other: torch.Tensor, *, rule: str) -> torch.Tensor:
    """``torch.matmul`` semantics (a 1-D operand is a row resp. column vector, dropped after)."""
    a = input.unsqueeze(0) if input.dim() == 1 else input
    b = other.unsqueeze(-1) if other.dim() == 1 else other
    out = matmul(_tensor(a, a), _tensor(b, a), rule)
    if other.dim() == 1:
        out = out.squeeze(-1)
    return out.squeeze(-2) if input.dim() == 1 else out


def pam_linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
               rule: str) -> torch.Tensor:
    out = pam_matmul(input, weight.t(), rule=rule)
    return out if bias is None else out + bias


def _scaled(x: torch.Tensor, factor: float, rule: str) -> torch.Tensor:
    return x if factor == 1 else pam_mul(x, factor, rule=rule)


def pam_addmm(input: torch.Tensor, mat1: torch.Tensor, mat2: torch.Tensor, *, beta: float = 1, alpha: float = 1,
              rule: str) -> torch.Tensor:
    """beta·input + alpha·(mat1 @ mat2) (``addmm`` and ``baddbmm``); beta = 0 ignores ``input``."""
    out = _scaled(pam_matmul(mat1, mat2, rule=rule), alpha, rule)
    return out if beta == 0 else _scaled(input, beta, rule) + out


def pam_scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                     attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                                     is_causal: bool = False, scale: float | None = None,
                                     enable_gqa: bool = False, *, rule: str, pa_softmax: bool = False) -> torch.Tensor:
    """softmax(PAM(QKᵀ)·scale + mask) ⊛ V with both products and the scaling as PAM; the softmax is float
    (piecewise-affine with ``pa_softmax``); dropout's 1/(1−p) stays float."""
    length, source = query.shape[-2], key.shape[-2]
    if enable_gqa:
        repeat = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
    scale = scale if scale is not None else 1 / math.sqrt(query.shape[-1])
    scores = pam_mul(pam_matmul(query, key.transpose(-2, -1), rule=rule), scale, rule=rule)
    if is_causal:
        causal = torch.ones(length, source, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        scores = (scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool
                  else scores + attn_mask)
    weights = pa_softmax_(scores, -1, rule=rule) if pa_softmax else torch.softmax(scores, -1)
    if dropout_p > 0:
        weights = torch.nn.functional.dropout(weights, dropout_p)
    return pam_matmul(weights, value, rule=rule)


# Piecewise-affine nonlinearities (ops "nonlinear"): built from PAM products and quotients and the
# bit-trick paexp2/palog2; scalings by powers of two (2^23, ½, 2) are exact in PAM.
_LOG2_E, _LN_2 = 1 / math.log(2), math.log(2)


def pa_exp(input: torch.Tensor, *, rule: str) -> torch.Tensor:
    """exp(x) = 2^(x·log2 e) ≈ paexp2(PAM(x, log2 e))."""
    return exp2(pam_mul(input, _LOG2_E, rule=rule))


def pa_softmax_(input: torch.Tensor, dim: int, *_: object, rule: str, **__: object) -> torch.Tensor:
    """softmax with the piecewise-affine exp and PAM division (extra dtype arguments of torch's and
    ATen's softmax are accepted and must leave it float32)."""
    e = pa_exp(input - input.amax(dim, keepdim=True).detach(), rule=rule)
    return pam_div(e, e.sum(dim, keepdim=True), rule=rule)


def pa_rsqrt(input: torch.Tensor, *, rule: str) -> torch.Tensor:
    """1/√x = paexp2(−palog2(x)/2) (the bit-trick inverse square root without its Newton step)."""
    return exp2(pam_mul(log2(input), -0.5, rule=rule))


def pa_layer_norm(input: torch.Tensor, normalized_shape: list[int], weight: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None, eps: float = 1e-5, *_: object, rule: str) -> torch.Tensor:
    """Layer norm with PAM means (a PAM division by the count), PAM squares and the piecewise-affine rsqrt."""
    dims = tuple(range(-len(normalized_shape), 0))
    count = math.prod(normalized_shape)
    centred = input - pam_div(input.sum(dims, keepdim=True), count, rule=rule)
    variance = pam_div(pam_mul(centred, centred, rule=rule).sum(dims, keepdim=True), count, rule=rule)
    out = pam_mul(centred, pa_rsqrt(variance + eps, rule=rule), rule=rule)
    out = out if weight is None else pam_mul(out, weight, rule=rule)
    return out if bias is None else out + bias


def pa_sigmoid(input: torch.Tensor, *, rule: str) -> torch.Tensor:
    """σ(x) = 1 ⊘ (1 + paexp(−x))."""
    return pam_div(1.0, 1 + pa_exp(-input, rule=rule), rule=rule)


def pa_tanh(input: torch.Tensor, *, rule: str) -> torch.Tensor:
    """tanh(x) = 2σ(2x) − 1."""
    return pam_mul(pa_sigmoid(pam_mul(input, 2.0, rule=rule), rule=rule), 2.0, rule=rule) - 1


def pa_gelu(input: torch.Tensor, approximate: str = "none", *, rule: str) -> torch.Tensor:
    """GELU by its sigmoid approximation x·σ(1.702x), made piecewise-affine (for either ``approximate``)."""
    return pam_mul(input, pa_sigmoid(pam_mul(input, 1.702, rule=rule), rule=rule), rule=rule)


def pa_silu(input: torch.Tensor, inplace: bool = False, *, rule: str) -> torch.Tensor:
    """x·σ(x)."""
    return pam_mul(input, pa_sigmoid(input, rule=rule), rule=rule)


@dataclass(frozen=True)
class PAMOp:
    """One multiplying function, as the PAM system knows it: the ``ops`` name that selects it, its PAM
    version, and the captured ATen ops it stands for."""

    kind: str
    implementation: Callable[..., torch.Tensor]
    aten: tuple[Any, ...]


_aten = torch.ops.aten
OPS = {  # function name (as the eager PAM model sees it) -> its one row
    "linear": PAMOp("linear", pam_linear, (_aten.linear.default,)),
    "matmul": PAMOp("matmul", pam_matmul, (_aten.matmul.default,)),
    "mm": PAMOp("matmul", pam_matmul, (_aten.mm.default,)),
    "bmm": PAMOp("matmul", pam_matmul, (_aten.bmm.default,)),
    "addmm": PAMOp("matmul", pam_addmm, (_aten.addmm.default,)),
    "baddbmm": PAMOp("matmul", pam_addmm, (_aten.baddbmm.default,)),
    "scaled_dot_product_attention": PAMOp("attention", pam_scaled_dot_product_attention,
                                          (_aten.scaled_dot_product_attention.default,)),
    "mul": PAMOp("mul", pam_mul, (_aten.mul.Tensor, _aten.mul.Scalar)),
    "div": PAMOp("div", pam_div, (_aten.div.Tensor, _aten.div.Scalar)),
    "mul_": PAMOp("mul", pam_mul_, (_aten.mul_.Tensor, _aten.mul_.Scalar)),
    "div_": PAMOp("div", pam_div_, (_aten.div_.Tensor, _aten.div_.Scalar)),
    "softmax": PAMOp("nonlinear", pa_softmax_, (_aten.softmax.int, _aten._softmax.default)),
    "exp": PAMOp("nonlinear", pa_exp, (_aten.exp.default,)),
    "rsqrt": PAMOp("nonlinear", pa_rsqrt, (_aten.rsqrt.default,)),
    "layer_norm": PAMOp("nonlinear", pa_layer_norm, (_aten.layer_norm.default,)),
    "sigmoid": PAMOp("nonlinear", pa_sigmoid, (_aten.sigmoid.default,)),
    "tanh": PAMOp("nonlinear", pa_tanh, (_aten.tanh.default,)),
    "gelu": PAMOp("nonlinear", pa_gelu, (_aten.gelu.default,)),
    "silu": PAMOp("nonlinear", pa_silu, (_aten.silu.default,)),
}
ALL_OPS = ("linear", "matmul", "attention", "mul", "div")   # the default: every multiplication supported
KNOWN_OPS = (*ALL_OPS, "nonlinear")  # "nonlinear": softmax, exp, rsqrt, layer norm, sigmoid, tanh, GELU, SiLU
