"""The chain runtime against independent references: stored autograd, SPEC §2 in plain autograd."""

from __future__ import annotations

import pytest
import torch

import bdia_fx
from bdia_fx import BDIAConfig
from bdia_fx.convert import state_of

from models import TinyGPT, encoder, gpt2, gptj, llama, neox, opt, vit

L = 9


def _grads(model, args, kwargs, seed, loss_of, extra=()):
    model.train()
    torch.manual_seed(seed)
    loss = loss_of(model(*args, **kwargs))
    params = [p for p in model.parameters() if p.requires_grad]
    return loss.detach(), torch.autograd.grad(loss, [*params, *extra])


def _assert_close(got, want):
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def _loss_sum(out):
    return (out.logits if hasattr(out, "logits") else out).pow(2).mean()


CASES = {
    "encoder-batch-first": (lambda: encoder(4, batch_first=True, dropout=0.1), lambda: (torch.randn(3, 7, 32),), {}),
    "encoder-seq-first": (lambda: encoder(4, batch_first=False, dropout=0.1), lambda: (torch.randn(7, 3, 32),), {}),
    "tiny-gpt-dropout": (lambda: TinyGPT(layers=5, dropout=0.1), lambda: (torch.randint(0, 50, (3, 9)),), {}),
    "hf-gpt2": (lambda: gpt2(3), lambda: (torch.randint(0, 64, (2, 8)),), {"use_cache": False}),
    "hf-vit": (lambda: vit(3), lambda: (torch.randn(2, 1, 16, 16),), {}),
    "hf-llama-rotary": (lambda: llama(3), lambda: (torch.randint(0, 64, (2, 8)),), {"use_cache": False}),
    "hf-neox-parallel-residual": (lambda: neox(3), lambda: (torch.randint(0, 64, (2, 8)),), {"use_cache": False}),
    "hf-opt-reshaped-residual": (lambda: opt(3), lambda: (torch.randint(2, 64, (2, 8)),), {"use_cache": False}),
    "hf-gptj-parallel-returns-weights": (lambda: gptj(3), lambda: (torch.randint(0, 64, (2, 8)),), {"use_cache": False}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_reversible_gradients_equal_stored_reference(case):
    make, make_args, kwargs = CASES[case]
    torch.manual_seed(0)
    model = make()
    args = make_args()
    x_grad = args[0].is_floating_point()
    if x_grad:
        args = (args[0].requires_grad_(),)
    extra = args[:1] if x_grad else ()
    rev = bdia_fx.convert(model, args, kwargs, BDIAConfig(mode="reversible", verify=True))
    ref = bdia_fx.convert(model, args, kwargs, BDIAConfig(mode="stored"))
    loss_r, g_rev = _grads(rev, args, kwargs, 7, _loss_sum, extra)
    loss_s, g_ref = _grads(ref, args, kwargs, 7, _loss_sum, extra)
    assert torch.equal(loss_r, loss_s)
    assert any(g.abs().sum() > 0 for g in g_rev)
    _assert_close(g_rev, g_ref)


class _Q(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v):
        return torch.round(v * 2**L) / 2**L

    @staticmethod
    def backward(ctx, g):
        return g


class _HalfQ(torch.autograd.Function):
    """Q[γ x] for x on the grid, γ = ±½: floor(a/2) resp. −floor(a/2) codes, gradient γ."""

    @staticmethod
    def forward(ctx, x, gamma):
        ctx.gamma = gamma
        a = torch.round(x * 2**L)
        return torch.floor(a / 2) * (1 if gamma > 0 else -1) / 2**L

    @staticmethod
    def backward(ctx, g):
        return g * ctx.gamma, None


def _spec_chain(layers, x, gamma):
    """SPEC §2 training forward written out with plain autograd (γ fixed for every sample)."""
    prev = _Q.apply(x)
    cur = _Q.apply(layers[0](prev))
    for layer in layers[1:]:
        update = (1 + gamma) * layer(cur) - 2 * gamma * cur
        prev, cur = cur, _HalfQ.apply(prev, gamma) + _Q.apply(update)
    return cur


@pytest.mark.parametrize("gamma", [0.5, -0.5])
@pytest.mark.parametrize("mode", ["reversible", "stored"])
def test_fixed_gamma_equals_spec_reference_in_plain_autograd(gamma, mode):
    torch.manual_seed(1)
    model = encoder(5, dropout=0.0)
    x = torch.randn(2, 6, 32, requires_grad=True)
    conv = bdia_fx.convert(model, (x,), config=BDIAConfig(gammas=(gamma,), mode=mode))
    conv.train()
    model.train()
    out = conv(x)
    ref = _spec_chain(list(model.layers), x, gamma)
    assert torch.equal(out, ref)
    params = list(model.parameters())
    got = torch.autograd.grad(out.pow(2).mean(), [x, *params])
    want = torch.autograd.grad(ref.pow(2).mean(), [x, *params])
    _assert_close(got, want)


def test_backward_rebuilds_every_stream_value_bit_exactly_with_dropout():
    torch.manual_seed(2)
    model = TinyGPT(layers=12, dropout=0.2)
    ids = torch.randint(0, 50, (4, 10))
    conv = bdia_fx.convert(model, (ids,))
    runtime = state_of(conv).runtimes["blocks"]
    assert all(runtime.random_blocks)
    runtime.code_trace = {"forward": [], "backward": []}
    conv.train()
    conv(ids).sum().backward()
    forward, backward = runtime.code_trace["forward"], runtime.code_trace["backward"]
    assert len(forward) == 13 and len(backward) == 11  # x_0 … x_12 ; rebuilt x_10 … x_0
    for k, rebuilt in zip(range(10, -1, -1), backward):
        assert rebuilt.dtype == torch.int32
        assert torch.equal(rebuilt, forward[k]), f"x_{k} not rebuilt exactly"


def test_gamma_is_drawn_per_sample_on_the_batch_dim():
    torch.manual_seed(3)
    model = encoder(3, batch_first=False)
    x = torch.randn(5, 16, 32)
    conv = bdia_fx.convert(model, (x,))
    runtime = state_of(conv).runtimes["layers"]
    assert runtime.batch_dim == 1
    conv.train()
    gammas = conv(x).grad_fn.chain.gammas  # the chain call, on the last stream update's autograd node
    signs = [gammas.sign(k) for k in (1, 2)]
    assert all(s.shape == (1, 16, 1) and s.dtype == torch.int8 for s in signs)
    assert set(torch.cat(signs).unique().tolist()) == {-1, 1}
    assert not torch.equal(signs[0], signs[1])
    gammas.release(1)
    assert torch.equal(gammas.sign(1), signs[0])  # drawn again (in backward) from the chain's seed: the same


class _NoisyBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.calls = 0

    def forward(self, x):
        self.calls += 1  # a block whose recompute differs from its forward
        return x + self.lin(x) * (1.0 + 1e-3 * self.calls)


class _Stack(torch.nn.Module):
    def __init__(self, n=3):
        super().__init__()
        self.layers = torch.nn.ModuleList(_NoisyBlock() for _ in range(n))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_verify_names_a_non_deterministic_block():
    model = _Stack()
    x = torch.randn(4, 8)
    conv = bdia_fx.convert(model, (x,), config=BDIAConfig(verify=True))
    conv.train()
    out = conv(x.requires_grad_())
    with pytest.raises(bdia_fx.ReversibilityError, match=r"layers\.2.*not deterministic"):
        out.sum().backward()


def test_inputs_beyond_the_exact_range_raise_a_clear_error():
    model = encoder(3)
    x = torch.randn(2, 4, 32)
    conv = bdia_fx.convert(model, (x,))
    conv.train()
    with pytest.raises(bdia_fx.FixedPointRangeError, match=r"layers\.0.*exact range"):
        conv(x * 1e6)


def test_eval_without_quantization_is_the_original_model_bit_for_bit():
    torch.manual_seed(4)
    model = gpt2(3)
    ids = torch.randint(0, 64, (2, 8))
    conv = bdia_fx.convert(model, (ids,), {"use_cache": False}, BDIAConfig(quantize_eval=False))
    conv.eval()
    model.eval()
    with torch.no_grad():
        assert torch.equal(conv(ids).logits, model(ids).logits)


def test_eval_with_quantization_is_the_gamma_zero_chain():
    torch.manual_seed(5)
    model = encoder(4)
    x = torch.randn(2, 6, 32)
    conv = bdia_fx.convert(model, (x,))
    conv.eval()
    model.eval()
    with torch.no_grad():
        got = conv(x)
        want = _Q.apply(x)
        for layer in model.layers:
            want = _Q.apply(layer(want))
        assert torch.equal(got, want)
        assert (got - model(x)).abs().max() < 4 * 2.0**-L * len(model.layers)


def test_backward_accumulates_into_grad_and_partial_grads_match_stored():
    """Each block's parameter gradients leave the chain as that block is reversed: .backward()
    accumulates them into existing .grad, and asking autograd.grad for one middle block only
    runs the chain down to that block — both equal to the stored reference."""
    torch.manual_seed(0)
    model = TinyGPT(layers=5, dropout=0.1)
    ids = torch.randint(0, 50, (3, 9))
    rev = bdia_fx.convert(model, (ids,), config=BDIAConfig(verify=True))
    ref = bdia_fx.convert(model, (ids,), config=BDIAConfig(mode="stored"))
    middle = list(model.blocks[2].parameters())
    _, want = _grads(ref, (ids,), {}, 3, _loss_sum)
    rev.train()
    torch.manual_seed(3)
    got_middle = torch.autograd.grad(_loss_sum(rev(ids)), middle)
    ref.train()
    torch.manual_seed(3)
    want_middle = torch.autograd.grad(_loss_sum(ref(ids)), middle)
    _assert_close(got_middle, want_middle)
    for _ in range(2):
        torch.manual_seed(3)
        _loss_sum(rev(ids)).backward()
    _assert_close([p.grad for p in model.parameters()], [2 * g for g in want])


def test_retained_graph_backward_twice_rebuilds_again_and_doubles_the_gradients():
    """The walk's start (x_K, x_{K-1} codes) and the side bits are saved tensors of the graph: a
    retained graph can run backward again (with dropout replayed), and without retain_graph the
    second backward is torch's own clear error."""
    torch.manual_seed(0)
    model = TinyGPT(layers=4, dropout=0.1)
    ids = torch.randint(0, 50, (2, 6))
    rev = bdia_fx.convert(model, (ids,), config=BDIAConfig(verify=True)).train()
    ref = bdia_fx.convert(model, (ids,), config=BDIAConfig(mode="stored"))
    _, want = _grads(ref, (ids,), {}, 5, _loss_sum)
    torch.manual_seed(5)
    loss = _loss_sum(rev(ids))
    loss.backward(retain_graph=True)
    loss.backward()
    _assert_close([p.grad for p in model.parameters()], [2 * g for g in want])
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()


SUBLAYER_CASES = ["encoder-batch-first", "tiny-gpt-dropout", "hf-gpt2", "hf-llama-rotary", "hf-neox-parallel-residual",
                  "hf-opt-reshaped-residual", "hf-gptj-parallel-returns-weights"]


@pytest.mark.parametrize("case", SUBLAYER_CASES)
def test_sublayer_granularity_gradients_equal_stored_reference(case):
    make, make_args, kwargs = CASES[case]
    torch.manual_seed(0)
    model = make()
    args = make_args()
    rev = bdia_fx.convert(model, args, kwargs, BDIAConfig(granularity="sublayer", verify=True))
    ref = bdia_fx.convert(model, args, kwargs, BDIAConfig(granularity="sublayer", mode="stored"))
    loss_r, g_rev = _grads(rev, args, kwargs, 7, _loss_sum)
    loss_s, g_ref = _grads(ref, args, kwargs, 7, _loss_sum)
    assert torch.equal(loss_r, loss_s)
    _assert_close(g_rev, g_ref)
    (runtime,) = state_of(rev).runtimes.values()
    per_block = 1 if "parallel" in case else 2  # attention and MLP; a parallel-residual block is one step
    assert len(runtime.step_paths) == per_block * len(runtime.blocks)
    assert runtime.step_paths[-1] == f"{runtime.block_paths[-1]} (sublayer {per_block - 1})"


def _spec_sublayer_chain(layers, x, gamma):
    """SPEC §2 with every residual add a step: x + sa(norm1 x), then y + ff(norm2 y), per layer."""
    steps = []
    for layer in layers:
        steps += [lambda v, l=layer: v + l._sa_block(l.norm1(v), None, None),
                  lambda v, l=layer: v + l._ff_block(l.norm2(v))]
    return _spec_chain(steps, x, gamma)


@pytest.mark.parametrize("gamma", [0.5, -0.5])
def test_sublayer_fixed_gamma_equals_spec_reference_in_plain_autograd(gamma):
    torch.manual_seed(1)
    model = encoder(3, dropout=0.0)
    x = torch.randn(2, 6, 32, requires_grad=True)
    conv = bdia_fx.convert(model, (x,), config=BDIAConfig(gammas=(gamma,), granularity="sublayer")).train()
    model.train()
    out = conv(x)
    ref = _spec_sublayer_chain(list(model.layers), x, gamma)
    assert torch.equal(out, ref)
    params = list(model.parameters())
    _assert_close(torch.autograd.grad(out.pow(2).mean(), [x, *params]),
                  torch.autograd.grad(ref.pow(2).mean(), [x, *params]))


def test_sublayer_backward_rebuilds_every_step_input_bit_exactly():
    torch.manual_seed(2)
    model = TinyGPT(layers=6, dropout=0.2)
    ids = torch.randint(0, 50, (3, 8))
    conv = bdia_fx.convert(model, (ids,), config=BDIAConfig(granularity="sublayer"))
    report = bdia_fx.check_exactness(conv, (ids,))
    assert report.exact and len(report.blocks) == 2 * 6 - 1
    assert report.blocks[0].block == "blocks.0 (sublayer 0)"


def test_cpu_autocast_recompute_matches_stored_and_rebuilds_exactly():
    """Checkpoint re-enters the forward's autocast state for the recompute: bf16 block math, float32 stream."""
    torch.manual_seed(4)
    model = TinyGPT(layers=4, dropout=0.1)
    ids = torch.randint(0, 50, (2, 8))
    rev = bdia_fx.convert(model, (ids,), config=BDIAConfig(verify=True))
    ref = bdia_fx.convert(model, (ids,), config=BDIAConfig(mode="stored"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_r, g_rev = _grads(rev, (ids,), {}, 9, _loss_sum)
        loss_s, g_ref = _grads(ref, (ids,), {}, 9, _loss_sum)
        report = bdia_fx.check_exactness(rev, (ids,))
    assert torch.equal(loss_r, loss_s) and report.exact
    _assert_close(g_rev, g_ref)


def test_float64_stream_uses_the_wider_exact_range():
    torch.manual_seed(5)
    model = encoder(3, dropout=0.1).double()
    x = (1e6 * torch.randn(2, 5, 32, dtype=torch.float64)).requires_grad_()  # beyond float32's exact codes
    rev = bdia_fx.convert(model, (x,), config=BDIAConfig(frac_bits=4))
    ref = bdia_fx.convert(model, (x,), config=BDIAConfig(frac_bits=4, mode="stored"))
    loss_r, g_rev = _grads(rev, (x,), {}, 3, _loss_sum, (x,))
    loss_s, g_ref = _grads(ref, (x,), {}, 3, _loss_sum, (x,))
    assert rev.train()(x).dtype == torch.float64 and torch.equal(loss_r, loss_s)
    _assert_close(g_rev, g_ref)


def test_sublayer_plans_follow_new_shapes_and_call_patterns():
    """A new input shape or call pattern gets its own block export; gradients stay equal to stored."""
    torch.manual_seed(6)
    model = gpt2(2)
    ids = torch.randint(0, 64, (2, 8))
    rev = bdia_fx.convert(model, (ids,), {"use_cache": False}, BDIAConfig(granularity="sublayer", verify=True))
    ref = bdia_fx.convert(model, (ids,), {"use_cache": False}, BDIAConfig(granularity="sublayer", mode="stored"))
    calls = [((torch.randint(0, 64, (2, 8)),), {"use_cache": False}),
             ((torch.randint(0, 64, (3, 5)),), {"use_cache": False}),
             ((torch.randint(0, 64, (3, 5)),), {"use_cache": False, "attention_mask": torch.ones(3, 5, dtype=torch.long)})]
    for args, kwargs in calls:
        _, g_rev = _grads(rev, args, kwargs, 2, _loss_sum)
        _, g_ref = _grads(ref, args, kwargs, 2, _loss_sum)
        _assert_close(g_rev, g_ref)
    (runtime,) = state_of(rev).runtimes.values()
    assert len(runtime._plans) >= 2 * 2  # two blocks, at least two shapes each
