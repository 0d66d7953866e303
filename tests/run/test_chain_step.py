"""The update on codes (bdia_fx.run.chain_step), checked against its formulas on integers, and the stepping
interface from outside the package: a scheme family bdia_fx does not ship, trained and reverted exactly."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bdia_fx
from bdia_fx import BDIAConfig
from bdia_fx import fixed_point as fp
from bdia_fx.run.chain_step import apply_update, round_increment, undo_update
from bdia_fx.schemes import BDIA, ChainScheme, Shear

from cases import assert_close, grads
from models import ResidualMLP, Stack, TinyGPT

codes_strategy = st.lists(st.integers(-2**27, 2**27), min_size=1, max_size=40)


class _Output:
    """A block map that returns a fixed output (the update's arithmetic alone)."""

    def __init__(self, f: torch.Tensor):
        self.f = f

    def output(self, z: torch.Tensor) -> torch.Tensor:
        return self.f

    def increment(self, z: torch.Tensor) -> torch.Tensor:
        return self.f - z


@settings(max_examples=100, deadline=None)
@given(codes=codes_strategy, f_seed=st.integers(0, 2**31), sign=st.sampled_from([-1, 1]))
def test_bdia_update_codes_are_q_of_v_with_one_rounding(codes, f_seed, sign):
    """The codes of Q[v], v = (1+γ)f − 2γx, are round(y) − 2γ·code(x) for the float32 product
    y = (1+γ)·2^l·f, with no float rounding of the x term (checked in float64, where it is exact)."""
    x_codes = torch.tensor(codes, dtype=torch.int32)
    f = torch.randn(x_codes.shape, generator=torch.Generator().manual_seed(f_seed)) * 100
    signs = torch.full_like(x_codes, sign, dtype=torch.int8)
    (u,) = BDIA.chain_updates(1, _Output(f), signs)
    parts = [None, fp.from_codes(x_codes, 9, torch.float32)]
    b, _ = round_increment(u.increment(parts), u, [torch.zeros_like(x_codes), x_codes], 9, torch.int32)
    y = f * 2**9 * (1 + sign / 2)
    assert torch.equal(b.double(), torch.round(y).double() - sign * x_codes.double())


def test_bdia_halving_update_inverts_bit_for_bit_with_its_side_bits():
    generator = torch.Generator().manual_seed(0)
    for shape, frac_bits in [((3, 5), 9), ((2, 4, 7), 12), ((1, 9), 4)]:
        below = torch.randint(-2**20, 2**20, shape, generator=generator, dtype=torch.int32)
        x = torch.randint(-2**20, 2**20, shape, generator=generator, dtype=torch.int32)
        sign = (torch.randint(2, (shape[0],) + (1,) * (len(shape) - 1), generator=generator) * 2 - 1).to(torch.int8)
        f = torch.randn(shape, generator=generator) * 50
        (u,) = BDIA.chain_updates(1, _Output(f), sign)
        assert u.target == 0 and u.halving and u.exact[0] == 1
        b, _ = round_increment(u.increment([None, fp.from_codes(x, frac_bits, torch.float32)]), u, [below, x],
                               frac_bits, torch.int32)
        above, bits = apply_update(u, below, b)
        assert bits.dtype == torch.uint8 and bits.numel() == -(-below.numel() // 8)  # one bit per element
        assert torch.equal(undo_update(u, above, b, bits), below)
        wrong = Shear(u.target, u.increment, sign=-sign, halving=True, exact=u.exact)
        assert not torch.equal(undo_update(wrong, above, b, bits), below)
    assert BDIA.side_bits == 1 and BDIA.stream_part(0) == 1 and BDIA.stream_part(1) == 0


class _Midpoint(ChainScheme):
    """A scheme family bdia_fx does not ship: state (z, u); per block, u ← −u + Q[2 h(z)], z ← z + Q[u/2]
    (a midpoint rule with a reflected velocity: shears only, so exact with no side bits)."""

    name = "midpoint"
    parts = ("z", "u")

    def chain_updates(self, n, block, sign):
        return [Shear(1, lambda p: 2 * block.increment(p[0]), sign=-1), Shear(0, lambda p: 0.5 * p[1])]

    def infer_start(self, x, frac_bits, quantize):
        return [x, torch.zeros_like(x)]

    def infer_step(self, n, state, block, frac_bits, quantize, dtype):
        z, u = state
        u = -u + 2 * block.increment(z)
        return [z + 0.5 * u, u]

    def infer_stream(self, state, frac_bits, dtype):
        return state[0]


def test_a_scheme_family_from_outside_the_package_trains_and_reverts_exactly():
    torch.manual_seed(0)
    model = TinyGPT(layers=3, dropout=0.1)  # dropout: the recompute replays it
    ids = torch.randint(0, 50, (2, 7))
    rev = bdia_fx.convert(model, (ids,), config=BDIAConfig(scheme=_Midpoint()))
    ref = bdia_fx.convert(model, (ids,), config=BDIAConfig(scheme=_Midpoint(), mode="stored"))
    loss_r, got = grads(rev, (ids,), {}, 3, lambda out: out.pow(2).mean())
    loss_s, want = grads(ref, (ids,), {}, 3, lambda out: out.pow(2).mean())
    assert torch.equal(loss_r, loss_s)
    assert_close(got, want)
    report = bdia_fx.check_exactness(rev, (ids,), loss_fn=lambda out: out.pow(2).mean())
    assert report.exact and len(report.blocks) == 3
    model = TinyGPT(layers=3).eval()  # no dropout: the reverted graph is the captured training graph
    conv = bdia_fx.convert(model, (ids,), config=BDIAConfig(scheme=_Midpoint())).eval()
    reverted = bdia_fx.revert(conv).eval()
    with torch.no_grad():  # the reverted model runs the scheme's inference form, as eval does
        assert torch.equal(reverted(ids), conv(ids))
        assert not torch.equal(reverted(ids), model(ids))
        assert torch.equal(bdia_fx.graph_of(reverted)(ids), reverted(ids))  # the reverse pass traced it


def test_a_carrier_nobody_hands_down_is_refused_naming_the_block():
    """A parent that stops before the chain's last block: the top executed step gets no rebuilt state."""
    x = torch.randn(3, 8, requires_grad=True)
    conv = bdia_fx.convert(Stack([ResidualMLP() for _ in range(4)]), (x,))
    first_two = conv.layers[1](conv.layers[0](x))
    with pytest.raises(bdia_fx.ReversibilityError, match=r"layers\.1.*before the chain's last block"):
        first_two.sum().backward()


class _ReadsMemoryTwice(ResidualMLP):
    """A cross-attention-like block: the memory (a side input every block reads) enters through two maps."""

    def __init__(self, d: int = 16):
        super().__init__(d)
        self.k, self.v = torch.nn.Linear(d, d), torch.nn.Linear(d, d)

    def forward(self, x, memory):
        return x + self.lin(self.ln(x)) * torch.tanh(self.k(memory)) + self.v(memory)


class _MemoryStack(torch.nn.Module):
    def __init__(self, layers: int = 4):
        super().__init__()
        self.memory = torch.nn.Linear(16, 16)  # the memory is computed, so its gradient flows on
        self.layers = torch.nn.ModuleList(_ReadsMemoryTwice() for _ in range(layers))

    def forward(self, x, source):
        memory = self.memory(source)
        for layer in self.layers:
            x = layer(x, memory)
        return x


@pytest.mark.parametrize("seed", range(6))
def test_a_side_input_read_twice_by_every_block_gets_the_stored_runs_gradient_bit_for_bit(seed):
    """Each step's uses of a side input are summed first, then the steps (the stored reference groups its sums
    so too): an encoder feeding a decoder's cross-attention gets the same gradient in both modes."""
    torch.manual_seed(seed)
    model = _MemoryStack()
    args = (torch.randn(3, 5, 16), torch.randn(3, 5, 16))
    converted = bdia_fx.convert(model, args)
    stored = bdia_fx.convert(model, args, config=BDIAConfig(mode="stored"))
    _, got = grads(converted, args, {}, seed=1)
    _, want = grads(stored, args, {}, seed=1)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


class _SparseMixing(torch.nn.Module):
    def __init__(self, d: int = 8):
        super().__init__()
        self.lin = torch.nn.Linear(d, d)

    def forward(self, x, adjacency):
        return x + torch.stack([torch.sparse.mm(adjacency, self.lin(row)) for row in x.unbind(0)])


class _GraphStack(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(_SparseMixing() for _ in range(3))

    def forward(self, x, adjacency):
        for layer in self.layers:
            x = layer(x, adjacency)
        return x


def test_a_sparse_side_input_trains_in_both_modes_with_equal_gradients():
    """The stored reference aliases strided side inputs only (a sparse adjacency has no view)."""
    torch.manual_seed(0)
    model = _GraphStack()
    args = (torch.randn(2, 5, 8), torch.eye(5).to_sparse())
    _, got = grads(bdia_fx.convert(model, args), args, {}, seed=1)
    _, want = grads(bdia_fx.convert(model, args, config=BDIAConfig(mode="stored")), args, {}, seed=1)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


_KEEP_PATTERNS = {"top-half": lambda k, n: k >= n // 2, "alternating": lambda k, n: k % 2 == 1,
                  "all": lambda k, n: True}


def _keep(model, pattern: str) -> None:
    from bdia_fx.converted import runtimes_of

    for runtime in runtimes_of(model):
        n = len(runtime.blocks)
        runtime.keeps = [_KEEP_PATTERNS[pattern](k, n) for k in range(n)]


@pytest.mark.parametrize("case", ["tiny-gpt-dropout", "hf-gpt2", "hf-llama-rotary", "hf-t5-both-stacks-after-block-0",
                                  "parent-loop-h-plus-x", "layer-parts-x-transformers-style"])
@pytest.mark.parametrize("pattern", sorted(_KEEP_PATTERNS))
def test_kept_blocks_in_a_reversible_chain_give_the_stored_runs_gradients_bit_for_bit(case, pattern):
    """A memory plan's kept steps (KeptUpdate: activations kept, the carrier passed down) beside reversible ones:
    the gradients of every parameter and of the input equal those of mode='stored' exactly."""
    from cases import TRAINING_CASES

    build, make, kwargs = TRAINING_CASES[case]
    torch.manual_seed(0)
    model, args = build(), make()
    planned = bdia_fx.convert(model, args, kwargs)
    stored = bdia_fx.convert(model, args, kwargs, BDIAConfig(mode="stored"))
    _keep(planned, pattern)
    for seed in (1, 2):
        got_loss, got = grads(planned, args, kwargs, seed)
        want_loss, want = grads(stored, args, kwargs, seed)
        assert torch.equal(got_loss, want_loss)
        assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_kept_sublayer_steps_and_a_shear_scheme_give_the_stored_runs_gradients_bit_for_bit():
    torch.manual_seed(0)
    model, ids = TinyGPT(layers=4, dropout=0.1), torch.randint(0, 50, (3, 9))
    for config in (BDIAConfig(granularity="sublayer"), BDIAConfig(scheme="alf")):
        planned = bdia_fx.convert(model, (ids,), config=config)
        stored = bdia_fx.convert(model, (ids,), config=BDIAConfig(**{**vars(config), "mode": "stored"}))
        _keep(planned, "alternating")
        _, got = grads(planned, (ids,), {}, 3)
        _, want = grads(stored, (ids,), {}, 3)
        assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_a_kept_blocks_parameter_edited_before_backward_raises_as_plain_pytorch_does():
    """A kept block's activations are autograd's saved tensors: an in-place edit of its weight between forward
    and backward is refused by their version counters, as in the plain model."""
    torch.manual_seed(0)
    model, ids = TinyGPT(layers=3), torch.randint(0, 50, (2, 5))
    planned = bdia_fx.convert(model, (ids,))
    _keep(planned, "all")
    loss = planned(ids).square().mean()
    with torch.no_grad():
        next(planned.blocks[1].parameters()).add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
