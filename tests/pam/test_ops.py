"""The PAM operators' autograd rules and PyTorch-signature functions, against independent references."""

from __future__ import annotations

import pytest
import torch

from bdia_fx.pam import ops as pam_ops

from references import paexp2, palog2, pam_reference


def ordered_matmul_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_k PAM(a[:, k], b[k, :]) from the float64 formula, summed k = 0, 1, … in float32 from +0."""
    out = torch.zeros(a.shape[0], b.shape[1])
    for k in range(a.shape[1]):
        out = out + pam_reference(a[:, k, None], b[None, k, :])
    return out


def paf_matmul64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The piecewise-affine matrix product in float64, without any float32 rounding."""
    sign = torch.sign(a)[:, :, None] * torch.sign(b)[None, :, :]
    return (sign * paexp2(palog2(a)[:, :, None] + palog2(b)[None, :, :])).sum(1)


def test_approximate_rule_is_pam_of_the_gradient():
    g = torch.Generator().manual_seed(0)
    a, b, dy = torch.randn(4, 6, generator=g), torch.randn(6, 5, generator=g), torch.randn(4, 5, generator=g)
    a.requires_grad_(), b.requires_grad_()
    grad_a, grad_b = torch.autograd.grad(pam_ops.matmul(a, b, "approx"), (a, b), dy)
    assert torch.equal(grad_a, ordered_matmul_reference(dy, b.detach().T))
    assert torch.equal(grad_b, ordered_matmul_reference(a.detach().T, dy))
    x, y = torch.randn(7, generator=g, requires_grad=True), torch.randn(7, generator=g, requires_grad=True)
    grad_x, grad_y = torch.autograd.grad(pam_ops.mul(x, y, "approx"), (x, y), dy[0, :1].expand(7))
    assert torch.equal(grad_x, pam_reference(dy[0, :1].expand(7), y.detach()))
    assert torch.equal(grad_y, pam_reference(dy[0, :1].expand(7), x.detach()))


def test_exact_matmul_rule_equals_finite_differences_of_the_piecewise_affine_product():
    g = torch.Generator().manual_seed(1)
    a, b, dy = torch.randn(3, 4, generator=g), torch.randn(4, 5, generator=g), torch.randn(3, 5, generator=g)
    grads = torch.autograd.grad(pam_ops.matmul(a.requires_grad_(), b.requires_grad_(), "exact"), (a, b), dy)
    for which, grad in enumerate(grads):
        x = (a, b)[which].detach().double()
        fd = torch.zeros_like(x)
        for index in range(x.numel()):
            h = torch.zeros_like(x).view(-1)
            h[index] = x.view(-1)[index].abs() * 2.0**-26
            h = h.view_as(x)
            args = [a.detach().double(), b.detach().double()]
            plus, minus = list(args), list(args)
            plus[which], minus[which] = x + h, x - h
            fd.view(-1)[index] = ((paf_matmul64(*plus) - paf_matmul64(*minus)) * dy.double()).sum() / (2 * h.sum())
        torch.testing.assert_close(grad.double(), fd, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("op, divide", [(pam_ops.mul, False), (pam_ops.div, True)])
def test_exact_elementwise_rule_equals_finite_differences(op, divide):
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(500, generator=g) * 4, torch.randn(500, generator=g) * 4
    weight = torch.randn(500, generator=g)
    grads = torch.autograd.grad(op(a.requires_grad_(), b.requires_grad_(), "exact"), (a, b), weight)

    def f(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.sign(x) * torch.sign(y) * paexp2(palog2(x) - palog2(y) if divide else palog2(x) + palog2(y))
    a64, b64 = a.detach().double(), b.detach().double()
    for which, grad in enumerate(grads):
        h = (a64, b64)[which].abs() * 2.0**-26
        plus = f(a64 + h, b64) if which == 0 else f(a64, b64 + h)
        minus = f(a64 - h, b64) if which == 0 else f(a64, b64 - h)
        torch.testing.assert_close(grad.double(), weight.double() * (plus - minus) / (2 * h), rtol=1e-5, atol=0)


def test_broadcast_gradients_reduce_to_the_operand_shape():
    x = torch.randn(3, 4, requires_grad=True)
    s = torch.tensor(0.5, requires_grad=True)
    for rule in pam_ops.RULES:
        grad_x, grad_s = torch.autograd.grad(pam_ops.div(x, s, rule).sum(), (x, s))
        assert grad_x.shape == x.shape and grad_s.shape == () and torch.equal(grad_x, torch.full((3, 4), 2.0))
    with pytest.raises(ValueError, match="backward rule"):
        pam_ops.mul(x, s, "float")


def test_attention_is_pam_products_around_a_float_softmax():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 5, 4, generator=g) for _ in range(3))
    out = pam_ops.pam_scaled_dot_product_attention(q, k, v, is_causal=True, rule="approx")
    for head in range(2):
        scores = pam_reference(ordered_matmul_reference(q[0, head], k[0, head].T), torch.tensor(0.5))
        scores = scores.masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf"))
        want = ordered_matmul_reference(torch.softmax(scores, -1), v[0, head])
        assert torch.equal(out[0, head], want)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert (out - ref).abs().max() < 0.2 * ref.abs().max()  # close to the float attention, not equal


def test_matmul_linear_and_addmm_signatures():
    g = torch.Generator().manual_seed(4)
    x, w, bias = torch.randn(2, 3, 4, generator=g), torch.randn(5, 4, generator=g), torch.randn(5, generator=g)
    got = pam_ops.pam_linear(x, w, bias, rule="approx")
    want = torch.stack([ordered_matmul_reference(x[i], w.T) for i in range(2)]) + bias
    assert torch.equal(got, want)
    vector = torch.randn(4, generator=g)
    assert torch.equal(pam_ops.pam_matmul(vector, w.T, rule="approx"), ordered_matmul_reference(vector[None], w.T)[0])
    m1, m2 = x[0], w.T
    got = pam_ops.pam_addmm(bias, m1, m2, beta=1, alpha=2, rule="approx")
    assert torch.equal(got, bias + 2 * ordered_matmul_reference(m1, m2))  # ×2 is exact in PAM


def test_piecewise_affine_nonlinearities_are_close_to_the_float_ones_and_differentiable():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, 16, generator=g) * 2
    F = torch.nn.functional
    cases = [(pam_ops.pa_softmax_(x, -1, rule="approx"), x.softmax(-1), 0.06),
             (pam_ops.pa_layer_norm(x, [16], rule="approx"), F.layer_norm(x, [16]), 0.25),
             (pam_ops.pa_gelu(x, rule="approx"), F.gelu(x), 0.15),
             (pam_ops.pa_silu(x, rule="approx"), F.silu(x), 0.15),
             (pam_ops.pa_tanh(x, rule="approx"), x.tanh(), 0.15),
             (pam_ops.pa_exp(x.clamp(-2, 2), rule="approx") / x.clamp(-2, 2).exp(), torch.ones_like(x), 0.35),
             (pam_ops.pa_rsqrt(x.abs() + 0.1, rule="approx") * (x.abs() + 0.1).sqrt(), torch.ones_like(x), 0.15)]
    for got, want, bound in cases:
        error = (got - want).abs().max()
        assert 0 < error <= bound, (got, want, error)  # piecewise-affine: close, never the float function
    weights = pam_ops.pa_softmax_(x, -1, rule="approx")
    assert ((weights.sum(-1) - 1).abs() < 0.13).all()
    leaf = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(pam_ops.pa_layer_norm(leaf, [16], rule="approx").square().sum(), leaf)
    assert grad.isfinite().all() and grad.abs().sum() > 0
