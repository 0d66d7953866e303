"""The PAM arithmetic against the float64 formula of the piecewise-affine product (tests/references.py)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bdia_fx.pam.arithmetic import (
    pa_exp2,
    pa_exp2_slope,
    pa_log2,
    pa_log2_slope,
    pam_div,
    pam_div_slopes,
    pam_matmul,
    pam_mul,
    pam_mul_slopes,
)

from references import paexp2, palog2, pam_reference

SPECIALS = [0.0, -0.0, 1.0, -1.0, 1.5, -1.75, 2.0**-126, -(2.0**-126), 1e-40, -1e-45, 2.0**127, 3e38, -3e38,
            float("inf"), float("-inf"), float("nan"), 1e-20, 1e20]


def operands(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Operand pairs: a third random bit patterns (every class: normals of all scales, subnormals,
    ±0 rarely, inf, NaN), a third Gaussians of varied scale, a third specials against everything."""
    g = torch.Generator().manual_seed(seed)
    third = count // 3

    def bits() -> torch.Tensor:
        return torch.randint(-(2**31), 2**31, (third,), generator=g, dtype=torch.int64).int().view(torch.float32)

    def gaussian() -> torch.Tensor:
        return torch.randn(third, generator=g) * torch.exp2(torch.randint(-30, 30, (third,), generator=g).float())

    specials = torch.tensor(SPECIALS)[torch.randint(len(SPECIALS), (third,), generator=g)]
    a = torch.cat([bits(), gaussian(), specials, gaussian()[: count - 3 * third]])
    b = torch.cat([bits(), gaussian(), torch.cat([bits()[: third // 2], gaussian()[: third - third // 2]]),
                   gaussian()[: count - 3 * third]])
    swap = torch.rand(count, generator=g) < 0.5  # specials on either side
    return torch.where(swap, b, a), torch.where(swap, a, b)


def same_bits(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Elementwise: the same float32 bit pattern, or both NaN."""
    return (x.view(torch.int32) == y.view(torch.int32)) | (x.isnan() & y.isnan())


@pytest.mark.parametrize("op, divide", [(pam_mul, False), (pam_div, True)])
def test_equals_the_float64_formula_on_200k_pairs(op, divide):
    a, b = operands(200_000, seed=4)
    assert a.isnan().any() and a.isinf().any() and (a == 0).any() and ((a != 0) & (a.abs() < 2.0**-126)).any()
    got, want = op(a, b), pam_reference(a, b, divide=divide)
    bad = ~same_bits(got, want)
    assert not bad.any(), f"{int(bad.sum())} mismatches: {a[bad][:3]}, {b[bad][:3]}: {got[bad][:3]} vs {want[bad][:3]}"


@settings(max_examples=300, deadline=None)
@given(st.floats(width=32), st.floats(width=32))
def test_scalar_pam_equals_the_formula_on_hypothesis_edge_cases(a, b):
    """Hypothesis favours the edges: ±0, subnormals, the largest finite values, ±inf, NaN."""
    a, b = torch.tensor([a], dtype=torch.float32), torch.tensor([b], dtype=torch.float32)
    assert same_bits(pam_mul(a, b), pam_reference(a, b)).all()
    assert same_bits(pam_div(a, b), pam_reference(a, b, divide=True)).all()
    assert same_bits(pam_mul(a, b), pam_mul(b, a)).all()  # commutative: the bit sum is


def test_bit_pattern_addition_of_the_paper_on_normal_operands():
    """Where the product is a normal number PAM is the paper's one integer addition A + B − 0x3F800000."""
    a, b = operands(30_000, seed=5)
    out = pam_mul(a, b)
    normal = out.isfinite() & (out.abs() >= 2.0**-126) & a.isfinite() & b.isfinite()
    raw = (a.view(torch.int32).long() + b.view(torch.int32).long() - 0x3F800000) % 2**32
    assert normal.sum() > 10_000
    assert torch.equal(out.view(torch.int32).long()[normal] % 2**32, raw[normal])


def test_specials_as_stated():
    inf, nan = float("inf"), float("nan")
    a = torch.tensor([0.0, -0.0, 1e-40, 0.0, inf, -inf, nan, 3e38, 1e-30, 2.0, 1.5])
    b = torch.tensor([5.0, 5.0, 5.0, inf, 2.0, -2.0, 1.0, 3e38, 1e-30, 3.0, 1.5])
    out = pam_mul(a, b)
    assert out[:3].tolist() == [0.0, 0.0, 0.0] and out[1].view(torch.int32) < 0  # -0 · 5 = -0
    assert out[3].isnan() and out[4] == inf and out[5] == inf and out[6].isnan()
    assert out[7] == inf and out[8] == 0.0  # overflow, flush to zero
    assert out[9] == 6.0  # exact when a mantissa is 0
    assert out[10] == 2.0  # m_a = m_b = ½: the worst case, 2 instead of 2.25 (−11 %)
    q = pam_div(torch.tensor([1.0, 0.0, inf, 3.0, 6.0]), torch.tensor([0.0, 0.0, inf, inf, 2.0]))
    assert q[0] == inf and q[1].isnan() and q[2].isnan() and q[3] == 0.0 and q[4] == 3.0


def test_never_larger_in_magnitude_than_the_product():
    a, b = torch.randn(50_000, generator=torch.Generator().manual_seed(0)).split(25_000)
    ratio = pam_mul(a, b).double() / (a.double() * b.double())
    assert ratio.max() <= 1.0 and ratio.min() >= 1 / 1.125 - 1e-9


def test_matmul_equals_the_scalar_definition_summed_in_order():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(2, 5, 7, 13, generator=g)
    b = torch.randn(5, 13, 6, generator=g)
    a[0, 1, 2, 3] = 0.0
    for chunk in (1, 2 * 5 * 7 * 6 * 3, 10**9):  # one k, three k, all of K per chunk
        out = pam_matmul(a, b, chunk_elements=chunk)
        want = torch.zeros(2, 5, 7, 6)
        for k in range(13):  # ((0 + P_0) + P_1) + …, each P_k from the float64 formula
            want = want + pam_reference(a[..., :, k, None], b[..., k, None, :])
        assert torch.equal(out.view(torch.int32), want.view(torch.int32))


def test_matmul_refuses_bad_shapes_and_dtypes():
    with pytest.raises(ValueError, match="inner dimensions"):
        pam_matmul(torch.ones(2, 3), torch.ones(2, 3))
    with pytest.raises(TypeError, match="float32"):
        pam_matmul(torch.ones(2, 3, dtype=torch.float64), torch.ones(3, 2, dtype=torch.float64))


def finite_difference(f, a: torch.Tensor, b: torch.Tensor, wrt: int) -> torch.Tensor:
    """Central difference of the float64 piecewise-affine function, step 2^-26 relative: inside one
    affine piece it is the slope up to float64 rounding."""
    a64, b64 = a.double(), b.double()
    x = a64 if wrt == 0 else b64
    h = x.abs() * 2.0**-26

    def value(shift):
        return f(a64 + shift, b64) if wrt == 0 else f(a64, b64 + shift)
    return (value(h) - value(-h)) / (2 * h)


def paf(divide: bool):
    def f(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        level = palog2(a) - palog2(b) if divide else palog2(a) + palog2(b)
        return torch.sign(a) * torch.sign(b) * paexp2(level)
    return f


def away_from_kinks(a: torch.Tensor, b: torch.Tensor, divide: bool) -> torch.Tensor:
    """Points where the piecewise-affine function is differentiable with margin for the FD step:
    mantissas not within 2^-20 of 0, and m_a ± m_b not within 2^-20 of an integer."""
    ma, mb = (palog2(t.double()) % 1 for t in (a, b))
    s = (ma - mb if divide else ma + mb) % 1
    margin = 2.0**-20
    return ((ma > margin) & (ma < 1 - margin) & (mb > margin) & (mb < 1 - margin) & (s > margin) & (s < 1 - margin))


@pytest.mark.parametrize("slopes, divide", [(pam_mul_slopes, False), (pam_div_slopes, True)])
def test_exact_slopes_equal_finite_differences(slopes, divide):
    g = torch.Generator().manual_seed(2)
    a = torch.randn(20_000, generator=g) * 10
    b = torch.randn(20_000, generator=g) * 10
    keep = away_from_kinks(a, b, divide)
    a, b = a[keep], b[keep]
    da, db = slopes(a, b)
    for wrt, slope in ((0, da), (1, db)):
        fd = finite_difference(paf(divide), a, b, wrt)
        assert torch.allclose(slope.double(), fd, rtol=1e-6, atol=0), (wrt, (slope.double() - fd).abs().max())
        assert torch.equal(torch.frexp(slope.abs())[0], torch.full_like(slope, 0.5))  # powers of two


def test_slopes_at_zero_and_specials():
    da, db = pam_mul_slopes(torch.tensor([0.0, 3.0, 1e-30]), torch.tensor([-6.0, 0.0, 1e-30]))
    assert da.tolist() == [-4.0, 0.0, 0.0] and db.tolist() == [0.0, 2.0, 0.0]  # 2^e_b at a = 0; flushed: 0
    da, db = pam_div_slopes(torch.tensor([0.0, 1.0, 1.0]), torch.tensor([3.0, 0.0, float("inf")]))
    assert da[0] == 0.25 and db[0] == 0.0  # slope at a = 1: 2^⌊−palog2 3⌋ = 2^⌊−1.5⌋ = ¼
    assert da[1].isnan() and db[1].isnan() and da[2] == 0.0 and db[2] == 0.0


def test_bit_trick_exp2_and_log2_equal_the_float64_formulas():
    g = torch.Generator().manual_seed(6)
    y = torch.cat([torch.randn(50_000, generator=g) * 40, torch.tensor([0.0, -126.0, 127.999, 128.0, -127.5])])
    want = paexp2(torch.round(y.double() * 2**23) / 2**23)  # the level the bit pattern holds
    want = torch.where(want < 2.0**-126, 0.0, want).float()
    assert torch.equal(pa_exp2(y), want)
    x = torch.randn(50_000, generator=g) * torch.exp2(torch.randint(-100, 100, (50_000,), generator=g).float())
    assert torch.equal(pa_log2(x), palog2(x.double()).float())
    assert pa_log2(torch.tensor([0.0])).item() == float("-inf") and pa_exp2(torch.tensor([float("nan")])).isnan()


def test_exp2_and_log2_slopes_equal_finite_differences():
    g = torch.Generator().manual_seed(7)
    y = torch.randn(5_000, generator=g) * 10
    y = y[((y % 1) > 1e-3) & ((y % 1) < 1 - 1e-3)]
    h = 2.0**-20
    fd = (paexp2(y.double() + h) - paexp2(y.double() - h)) / (2 * h)
    assert torch.allclose(pa_exp2_slope(y).double(), fd, rtol=1e-9, atol=0)
    x = torch.randn(5_000, generator=g) * 10
    m = palog2(x.double()) % 1
    x = x[(m > 1e-3) & (m < 1 - 1e-3)]
    h = x.double().abs() * 2.0**-26
    fd = (palog2(x.double() + h) - palog2(x.double() - h)) / (2 * h)
    assert torch.allclose(pa_log2_slope(x).double(), fd, rtol=1e-6, atol=0)
