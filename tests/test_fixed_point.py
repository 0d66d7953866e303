"""Exactness of the fixed-point math, checked on integer codes."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bdia_fx import fixed_point as fp
from bdia_fx.errors import FixedPointRangeError

codes_strategy = st.lists(st.integers(-(2**23) + 1, 2**23 - 1), min_size=1, max_size=64)


@settings(max_examples=200, deadline=None)
@given(a=codes_strategy, b_seed=st.integers(0, 2**31), sign=st.sampled_from([-1, 1]))
def test_bdia_inverse_recovers_previous_codes_exactly(a, b_seed, sign):
    a = torch.tensor(a, dtype=torch.int32)
    gen = torch.Generator().manual_seed(b_seed)
    b = torch.randint(-(2**22), 2**22, a.shape, generator=gen, dtype=torch.int32)
    s = torch.full_like(a, sign)
    c = fp.bdia_forward(a, b, s)
    bits = fp.unpack_side_bits(fp.pack_side_bits(a), a.shape)
    assert torch.equal(fp.bdia_inverse(c, b, s, bits), a)


@settings(max_examples=100, deadline=None)
@given(a=codes_strategy)
def test_half_term_is_floor_for_plus_and_minus_floor_for_minus(a):
    a64 = torch.tensor(a, dtype=torch.int64)
    a32 = a64.to(torch.int32)
    assert torch.equal(fp.half_term(a32, torch.ones_like(a32)).long(), torch.div(a64, 2, rounding_mode="floor"))
    assert torch.equal(fp.half_term(a32, -torch.ones_like(a32)).long(), -torch.div(a64, 2, rounding_mode="floor"))


def test_side_bits_are_non_negative_remainders():
    a = torch.tensor([-3, -2, -1, 0, 1, 2, 3], dtype=torch.int32)
    assert fp.unpack_side_bits(fp.pack_side_bits(a), a.shape).tolist() == [1, 0, 1, 0, 1, 0, 1]


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 100), seed=st.integers(0, 1000))
def test_side_bits_round_trip_in_one_bit_per_element(n, seed):
    codes = torch.randint(-(2**23), 2**23, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.int32)
    packed = fp.pack_side_bits(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 7) // 8
    assert torch.equal(fp.unpack_side_bits(packed, codes.shape).long(), torch.remainder(codes.long(), 2))


def test_codes_match_quantize_and_round_trip():
    x = torch.randn(1000) * 10
    codes = fp.to_codes(x, 9)
    assert torch.equal(fp.from_codes(codes, 9, torch.float32), fp.quantize(x, 9))


@pytest.mark.parametrize("value", [1e6, float("inf"), float("nan")])
def test_values_beyond_exact_float32_range_raise(value):
    with pytest.raises(FixedPointRangeError, match="exact range"):
        fp.to_codes(torch.tensor([0.0, value]), 9, "blocks.3")


def test_exact_limit_follows_the_dtype():
    assert fp.exact_code_limit(torch.float32) == 2**24
    assert fp.exact_code_limit(torch.bfloat16) == 2**8
    assert fp.exact_code_limit(torch.float64) == 2**31 - 1
