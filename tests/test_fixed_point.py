"""Exactness of the fixed-point math, checked on integer codes."""

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bdia_fx import fixed_point as fp

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


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 100), seed=st.integers(0, 1000))
def test_side_bits_pack_bit_i_of_byte_j_from_element_8j_plus_i(n, seed):
    """The one-multiply packing against a bit-by-bit reference written in Python."""
    codes = torch.randint(-(2**29), 2**29, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.int32)
    bits = [c % 2 for c in codes.tolist()] + [0] * ((-n) % 8)
    expected = [sum(bits[8 * j + i] << i for i in range(8)) for j in range(len(bits) // 8)]
    assert fp.pack_side_bits(codes).tolist() == expected


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64])
def test_side_bit_packing_leaves_its_input_alone_whatever_the_integer_dtype(dtype):
    codes = torch.tensor([1, 0, 1, 1, 0, 0, 0, 1, 1], dtype=dtype)
    before = codes.clone()
    packed = fp.pack_side_bits(codes[1:])  # a view at an odd offset
    assert torch.equal(codes, before)
    assert packed.tolist() == fp.pack_side_bits(before[1:].to(torch.int32)).tolist() == [0b11000110]


@pytest.mark.parametrize("n", [1, 7, 64, 1001])
def test_checksum_sees_every_single_code_change(n, device):
    codes = torch.randint(-(2**29), 2**29, (n,), generator=torch.Generator().manual_seed(n), dtype=torch.int32)
    codes = codes.to(device)
    reference = fp.checksum(codes)
    for views in (codes, torch.cat([codes.new_zeros(1), codes])[1:]):  # aligned and odd storage offset
        assert torch.equal(fp.checksum(views), reference)
    for position in {0, n // 2, n - 1}:
        for delta in (1, -1, 2**16, -(2**30)):
            changed = codes.clone()
            changed[position] += delta
            assert not torch.equal(fp.checksum(changed), reference), (position, delta)


def test_codes_match_quantize_and_round_trip():
    x = torch.randn(1000) * 10
    codes, stats = fp.to_codes(x, 9)
    assert codes.dtype == torch.int32
    assert torch.equal(fp.from_codes(codes, 9, torch.float32), fp.quantize(x, 9))
    assert stats.tolist() == [codes.min().item(), codes.max().item()]


@pytest.mark.parametrize("value, reason", [(1e7, "fixed-point overflow.*exact range"),
                                           (float("inf"), "non-finite \\(inf\\)"),
                                           (float("-inf"), "non-finite \\(inf\\)"),
                                           (float("nan"), "non-finite \\(NaN\\)")])
def test_range_problems_say_what_went_wrong(value, reason):
    _, stats = fp.to_codes(torch.tensor([0.0, value]), 9)
    assert re.search(reason, fp.range_problem(*stats.tolist(), 9))
    assert fp.range_problem(*fp.to_codes(torch.tensor([-1e6, 1e6]), 9)[1].tolist(), 9) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_the_exact_range_does_not_depend_on_the_stream_dtype(dtype):
    """Codes are int32 whatever the stream's dtype; a value of a narrow dtype is rounded on its way
    into a block, deterministically, so the chain stays exact."""
    x = torch.tensor([300.0, -123.5, 0.25]).to(dtype)
    codes, stats = fp.to_codes(x, 9)
    assert fp.range_problem(*stats.tolist(), 9) is None
    assert torch.equal(codes, torch.tensor([300 * 512, -123.5 * 512, 128], dtype=torch.int32))
    assert torch.equal(fp.from_codes(codes, 9, dtype), x)
    assert fp.exact_range(9) == 2.0**20


def test_gamma_signs_are_a_pure_function_of_seed_step_and_rank_and_fair():
    seed = torch.tensor(123456789012345, dtype=torch.int64)
    (signs,) = fp.gamma_signs(seed, range(3, 4), 10_000)
    assert signs.dtype == torch.int8 and set(signs.unique().tolist()) == {-1, 1}
    assert abs(float(signs.float().mean())) < 0.03  # about half each way
    assert torch.equal(fp.gamma_signs(seed, range(3, 4), 10_000)[0], signs)  # drawn again in backward: the same
    for other in (fp.gamma_signs(seed, range(4, 5), 10_000)[0], fp.gamma_signs(seed + 1, range(3, 4), 10_000)[0],
                  fp.gamma_signs(seed, range(3, 4), 10_000, rank=1)[0]):
        agree = float((other == signs).float().mean())
        assert 0.47 < agree < 0.53  # another step, seed or rank: independent signs


def test_gamma_signs_of_many_steps_at_once_are_each_steps_own():
    seed = torch.tensor(-987654321, dtype=torch.int64)
    table = fp.gamma_signs(seed, range(0, 40), 33, rank=3)
    assert table.shape == (40, 33)
    for step in (0, 1, 17, 39):
        assert torch.equal(table[step], fp.gamma_signs(seed, range(step, step + 1), 33, rank=3)[0])
