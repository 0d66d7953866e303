"""The PAM arithmetic as PyTorch operators with autograd: ``torch.ops.bdia_pam.{mul, div, matmul}``.

Registered with ``torch.library.custom_op`` so that a captured graph (``torch.export``) holds each as
one node, and so that :func:`bdia_fx.convert` of a PAM model plans, runs and recomputes them like any
other operation (the recompute replays them bit for bit: they are deterministic integer arithmetic).
Every operator takes ``rule``: ``"approx"`` (the paper's backward, gradients by PAM of the gradient:
dA = PAM(dY, B), dA = PAM-matmul(dY, Bᵀ)) or ``"exact"`` (the derivative of the piecewise-affine
function, :mod:`bdia_fx.pam_math`). Operands must be float32.
"""

from __future__ import annotations

import math

import torch

from bdia_fx import pam_math

RULES = ("approx", "exact")


def _check_rule(rule: str) -> None:
    if rule not in RULES:
        raise ValueError(f"PAM backward rule must be one of {RULES}, got {rule!r}")


@torch.library.custom_op("bdia_pam::mul", mutates_args=())
def mul(a: torch.Tensor, b: torch.Tensor, rule: str) -> torch.Tensor:
    """PAM(a, b), elementwise with broadcasting."""
    _check_rule(rule)
    return pam_math.pam_mul(a, b)


@torch.library.custom_op("bdia_pam::div", mutates_args=())
def div(a: torch.Tensor, b: torch.Tensor, rule: str) -> torch.Tensor:
    """PAMdiv(a, b), elementwise with broadcasting."""
    _check_rule(rule)
    return pam_math.pam_div(a, b)


@torch.library.custom_op("bdia_pam::matmul", mutates_args=())
def matmul(a: torch.Tensor, b: torch.Tensor, rule: str) -> torch.Tensor:
    """Σ_k PAM(a[..., m, k], b[..., k, n]) for a (..., M, K), b (..., K, N) (:func:`pam_math.pam_matmul`)."""
    _check_rule(rule)
    return pam_math.pam_matmul(a, b)


@mul.register_fake
@div.register_fake
def _elementwise_fake(a: torch.Tensor, b: torch.Tensor, rule: str) -> torch.Tensor:
    return a.new_empty(torch.broadcast_shapes(a.shape, b.shape))


@matmul.register_fake
def _matmul_fake(a: torch.Tensor, b: torch.Tensor, rule: str) -> torch.Tensor:
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    return a.new_empty((*batch, a.shape[-2], b.shape[-1]))


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
        slope_a, slope_b = pam_math.pam_mul_slopes(a, b)
        grad_a, grad_b = pam_math.pam_mul(grad, slope_a), pam_math.pam_mul(grad, slope_b)
    else:
        grad_a, grad_b = pam_math.pam_mul(grad, b), pam_math.pam_mul(grad, a)
    return grad_a.sum_to_size(a.shape), grad_b.sum_to_size(b.shape), None


def _div_backward(ctx, grad: torch.Tensor) -> tuple:
    a, b, quotient = ctx.saved_tensors
    if ctx.rule == "exact":
        slope_a, slope_b = pam_math.pam_div_slopes(a, b)
        grad_a, grad_b = pam_math.pam_mul(grad, slope_a), pam_math.pam_mul(grad, slope_b)
    else:  # d(a/b) = da/b − (a/b)/b db
        grad_a, grad_b = pam_math.pam_div(grad, b), -pam_math.pam_div(pam_math.pam_mul(grad, quotient), b)
    return grad_a.sum_to_size(a.shape), grad_b.sum_to_size(b.shape), None


def _matmul_backward(ctx, grad: torch.Tensor) -> tuple:
    a, b = ctx.saved_tensors
    return (*pam_math.pam_matmul_backward(a, b, grad.contiguous(), exact=ctx.rule == "exact"), None)


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
                                     enable_gqa: bool = False, *, rule: str) -> torch.Tensor:
    """softmax(PAM(QKᵀ)·scale + mask) ⊛ V with both products and the scaling as PAM; the softmax (and
    dropout's 1/(1−p)) stay float."""
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
    weights = torch.softmax(scores, -1)
    if dropout_p > 0:
        weights = torch.nn.functional.dropout(weights, dropout_p)
    return pam_matmul(weights, value, rule=rule)


IMPLEMENTATIONS = {  # function name -> its PAM version
    "linear": pam_linear, "matmul": pam_matmul, "mm": pam_matmul, "bmm": pam_matmul,
    "addmm": pam_addmm, "baddbmm": pam_addmm, "scaled_dot_product_attention": pam_scaled_dot_product_attention,
    "mul": pam_mul, "div": pam_div, "mul_": pam_mul_, "div_": pam_div_,
}
KINDS = {  # function name -> the ``ops`` name that selects it
    "linear": "linear", "matmul": "matmul", "mm": "matmul", "bmm": "matmul", "addmm": "matmul",
    "baddbmm": "matmul", "scaled_dot_product_attention": "attention", "mul": "mul", "div": "div",
    "mul_": "mul", "div_": "div",
}
