"""The chain runtime against independent references: stored autograd, and the training forward in plain autograd."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

import bdia_fx
from bdia_fx import BDIAConfig
from bdia_fx.converted import observing, state_of
from bdia_fx.run.frame import ChainObserver

from cases import TRAINING_CASES as CASES
from cases import FramesSeen, assert_close, grads, mean_square_loss
from models import HelperResidualStack, ParentLoopViT, SharedModuleStack, TinyGPT, encoder, gpt2
from references import L, Q, bdia_chain


@pytest.mark.parametrize("case", list(CASES))
def test_reversible_gradients_equal_stored_reference(case, device):
    make, make_args, kwargs = CASES[case]
    torch.manual_seed(0)
    model = make().to(device)
    args = tuple(a.to(device) for a in make_args())
    x_grad = args[0].is_floating_point()
    if x_grad:
        args = (args[0].requires_grad_(),)
    extra = args[:1] if x_grad else ()
    rev = bdia_fx.convert(model, args, kwargs, BDIAConfig(mode="reversible", verify=True))
    ref = bdia_fx.convert(model, args, kwargs, BDIAConfig(mode="stored"))
    loss_r, g_rev = grads(rev, args, kwargs, 7, mean_square_loss, extra)
    loss_s, g_ref = grads(ref, args, kwargs, 7, mean_square_loss, extra)
    assert torch.equal(loss_r, loss_s)
    assert any(g.abs().sum() > 0 for g in g_rev)
    assert_close(g_rev, g_ref)


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
    ref = bdia_chain(list(model.layers), x, gamma)
    assert torch.equal(out, ref)
    params = list(model.parameters())
    got = torch.autograd.grad(out.pow(2).mean(), [x, *params])
    want = torch.autograd.grad(ref.pow(2).mean(), [x, *params])
    assert_close(got, want)


def test_gamma_is_drawn_per_sample_on_the_batch_dim():
    torch.manual_seed(3)
    model = encoder(3, batch_first=False)
    x = torch.randn(5, 16, 32)
    conv = bdia_fx.convert(model, (x,))
    runtime = state_of(conv).runtimes["layers"]
    assert runtime.batch_dim == 1
    conv.train()
    call = conv(x).grad_fn.spec.call  # the chain call, on the last update's autograd node
    signs = [call.sign(k) for k in (1, 2)]
    assert all(s.shape == (1, 16, 1) and s.dtype == torch.int8 for s in signs)
    assert set(torch.cat(signs).unique().tolist()) == {-1, 1}
    assert not torch.equal(signs[0], signs[1])
    assert torch.equal(call.sign(1), signs[0])  # drawn again (in backward) from the chain's seed: the same


class _FirstStepCodes(ChainObserver):
    def state_codes(self, call, n, codes, rebuilt):
        if n == 1 and not rebuilt:
            self.codes = codes[call.scheme.stream_part(0)].clone()


@pytest.mark.parametrize("gammas", [(0.5,), (-0.5,), (-0.5, 0.5)])
def test_the_first_block_is_the_plain_block_up_to_q_whatever_gamma(gammas):
    """Block 0 is BDIA's Euler step x_1 = Q[x_0 + h_0(x_0)]: no γ enters it, so a difference from
    plain training starts at block 1 (the accuracy study's "first block" check)."""
    torch.manual_seed(5)
    model = encoder(3, dropout=0.0).train()
    x = torch.randn(4, 6, 32)
    conv = bdia_fx.convert(model, (x,), config=BDIAConfig(gammas=gammas)).train()
    with observing(conv, _FirstStepCodes()) as seen:
        conv(x).pow(2).mean().backward()
    plain = model.layers[0](Q.apply(x))
    assert torch.equal(seen.codes, torch.round(plain * 2**L).to(torch.int32))


def test_inputs_beyond_the_exact_range_raise_a_clear_error():
    model = encoder(3)
    x = torch.randn(2, 4, 32)
    conv = bdia_fx.convert(model, (x,))
    conv.train()
    with pytest.raises(bdia_fx.FixedPointRangeError, match=r"layers\.0.*entering the chain.*exact range"):
        conv(x * 1e7)


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
        want = Q.apply(x)
        for layer in model.layers:
            want = Q.apply(layer(want))
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
    _, want = grads(ref, (ids,), {}, 3, mean_square_loss)
    rev.train()
    torch.manual_seed(3)
    got_middle = torch.autograd.grad(mean_square_loss(rev(ids)), middle)
    ref.train()
    torch.manual_seed(3)
    want_middle = torch.autograd.grad(mean_square_loss(ref(ids)), middle)
    assert_close(got_middle, want_middle)
    for _ in range(2):
        torch.manual_seed(3)
        mean_square_loss(rev(ids)).backward()
    assert_close([p.grad for p in model.parameters()], [2 * g for g in want])


def test_retained_graph_backward_twice_rebuilds_again_and_doubles_the_gradients():
    """The walk's start (x_K, x_{K-1} codes) and the side bits are saved tensors of the graph: a
    retained graph can run backward again (with dropout replayed), and without retain_graph the
    second backward is torch's own clear error."""
    torch.manual_seed(0)
    model = TinyGPT(layers=4, dropout=0.1)
    ids = torch.randint(0, 50, (2, 6))
    rev = bdia_fx.convert(model, (ids,), config=BDIAConfig(verify=True)).train()
    ref = bdia_fx.convert(model, (ids,), config=BDIAConfig(mode="stored"))
    _, want = grads(ref, (ids,), {}, 5, mean_square_loss)
    torch.manual_seed(5)
    loss = mean_square_loss(rev(ids))
    loss.backward(retain_graph=True)
    loss.backward()
    assert_close([p.grad for p in model.parameters()], [2 * g for g in want])
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
    loss_r, g_rev = grads(rev, args, kwargs, 7, mean_square_loss)
    loss_s, g_ref = grads(ref, args, kwargs, 7, mean_square_loss)
    assert torch.equal(loss_r, loss_s)
    assert_close(g_rev, g_ref)
    (runtime,) = state_of(rev).runtimes.values()
    per_block = 1 if "parallel" in case else 2  # attention and MLP; a parallel-residual block is one step
    with observing(rev, FramesSeen()) as seen:
        rev(*args, **kwargs)
    paths = seen.frames[0].steps
    assert len(paths) == per_block * len(runtime.blocks)
    assert paths[-1] == f"{runtime.block_paths[-1]} (sublayer {per_block - 1})"


def _spec_sublayer_chain(layers, x, gamma):
    """The training forward with every residual add a step: x + sa(norm1 x), then y + ff(norm2 y), per layer."""
    steps = []
    for layer in layers:
        steps += [lambda v, lyr=layer: v + lyr._sa_block(lyr.norm1(v), None, None),
                  lambda v, lyr=layer: v + lyr._ff_block(lyr.norm2(v))]
    return bdia_chain(steps, x, gamma)


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
    assert_close(torch.autograd.grad(out.pow(2).mean(), [x, *params]),
                  torch.autograd.grad(ref.pow(2).mean(), [x, *params]))


def test_sublayer_backward_rebuilds_every_step_input_bit_exactly():
    torch.manual_seed(2)
    model = TinyGPT(layers=6, dropout=0.2)
    ids = torch.randint(0, 50, (3, 8))
    conv = bdia_fx.convert(model, (ids,), config=BDIAConfig(granularity="sublayer"))
    report = bdia_fx.check_exactness(conv, (ids,))
    assert report.exact and len(report.blocks) == 2 * 6  # the state before every step
    assert report.blocks[0].block == "blocks.0 (sublayer 0)"


def test_autocast_recompute_matches_stored_and_rebuilds_exactly(device):
    """Checkpoint re-enters the forward's autocast state for the recompute: bf16 block math, float32 stream."""
    torch.manual_seed(4)
    model = TinyGPT(layers=4, dropout=0.1).to(device)
    ids = torch.randint(0, 50, (2, 8), device=device)
    rev = bdia_fx.convert(model, (ids,), config=BDIAConfig(verify=True))
    ref = bdia_fx.convert(model, (ids,), config=BDIAConfig(mode="stored"))
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss_r, g_rev = grads(rev, (ids,), {}, 9, mean_square_loss)
        loss_s, g_ref = grads(ref, (ids,), {}, 9, mean_square_loss)
        report = bdia_fx.check_exactness(rev, (ids,))
    assert torch.equal(loss_r, loss_s) and report.exact
    assert_close(g_rev, g_ref)


def test_float64_stream_uses_the_wider_exact_range():
    torch.manual_seed(5)
    model = encoder(3, dropout=0.1).double()
    x = (1e6 * torch.randn(2, 5, 32, dtype=torch.float64)).requires_grad_()  # beyond float32's exact codes
    rev = bdia_fx.convert(model, (x,), config=BDIAConfig(frac_bits=4))
    ref = bdia_fx.convert(model, (x,), config=BDIAConfig(frac_bits=4, mode="stored"))
    loss_r, g_rev = grads(rev, (x,), {}, 3, mean_square_loss, (x,))
    loss_s, g_ref = grads(ref, (x,), {}, 3, mean_square_loss, (x,))
    assert rev.train()(x).dtype == torch.float64 and torch.equal(loss_r, loss_s)
    assert_close(g_rev, g_ref)


def test_sublayer_plans_follow_new_shapes_and_call_patterns():
    """A new input shape or call pattern gets its own block export; gradients stay equal to stored."""
    torch.manual_seed(6)
    model = gpt2(2)
    ids = torch.randint(0, 64, (2, 8))
    rev = bdia_fx.convert(model, (ids,), {"use_cache": False}, BDIAConfig(granularity="sublayer", verify=True))
    ref = bdia_fx.convert(model, (ids,), {"use_cache": False}, BDIAConfig(granularity="sublayer", mode="stored"))
    calls = [((torch.randint(0, 64, (2, 8)),), {"use_cache": False}),
             ((torch.randint(0, 64, (3, 5)),), {"use_cache": False}),
             ((torch.randint(0, 64, (3, 5)),), {"use_cache": False,
                                                "attention_mask": torch.ones(3, 5, dtype=torch.long)})]
    for args, kwargs in calls:
        _, g_rev = grads(rev, args, kwargs, 2, mean_square_loss)
        _, g_ref = grads(ref, args, kwargs, 2, mean_square_loss)
        assert_close(g_rev, g_ref)
    (runtime,) = state_of(rev).runtimes.values()
    assert len(runtime._plans) >= 2 * 2  # two blocks, at least two shapes each


def _halve_in_place(module, args, out):
    out.mul_(0.5)


def _halve_input_in_place(module, args):
    args[0].mul_(0.5)


def _halve(module, args, out):
    return out * 0.5


@pytest.mark.parametrize("mode", ["reversible", "stored"])
def test_hooks_that_change_the_stream_between_blocks_are_refused_naming_them(mode):
    """The plain model runs such hooks; a chain keeps its own exact copy of the stream, which a hook
    between blocks cannot reach, so it refuses (naming the hook and its module) instead of dropping it."""
    torch.manual_seed(0)
    model = TinyGPT(layers=4)
    ids = torch.randint(0, 50, (2, 8))
    conv = bdia_fx.convert(model, (ids,), config=BDIAConfig(mode=mode)).train()
    cases = [(conv.blocks[1].register_forward_hook, _halve_in_place,
              r"modified in place \(forward hook _halve_in_place on 'blocks\.1'\)"),
             (conv.blocks[2].register_forward_pre_hook, _halve_input_in_place,
              r"modified in place \(forward pre-hook _halve_input_in_place on 'blocks\.2'\)"),
             (conv.blocks[1].register_forward_hook, _halve,
              r"not block 1's output.*forward hook _halve on 'blocks\.1'")]
    for register, hook, reason in cases:
        handle = register(hook)
        model.train()(ids)  # the plain model runs with it
        with pytest.raises(bdia_fx.ConversionError, match=r"\[module 'blocks\.2'\] .*" + reason):
            conv(ids)
        handle.remove()
    conv.blocks[3].register_forward_hook(_halve_in_place)  # after the last block: an ordinary op on the output
    rev_out = conv(ids)
    rev_out.sum().backward()


@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no-grad"])
def test_a_parent_loop_that_changes_the_stream_between_branches_is_refused(grad):
    """A branch chain steps from its own exact stream, so the parent's sum must be exactly
    branch + stream: another op in the loop, or a hook editing a branch's output, is refused
    (checked on the autograd graph; by value in a no-grad training call)."""
    torch.manual_seed(0)
    model = ParentLoopViT(depth=2)
    rows = torch.randn(2, 8, 8)
    conv = bdia_fx.convert(model, (rows,)).train()
    with torch.set_grad_enabled(grad):
        conv(rows)  # as captured: accepted
        conv.scale_skip = 0.5  # the loop now scales the skip: x = h(x) + 0.5 x
        with pytest.raises(bdia_fx.ConversionError,
                           match=r"\[module 'layers\.0\.1'\] .*not the parent's residual add of 'layers\.0\.0'"):
            conv(rows)
        conv.scale_skip = 1.0
        handle = conv.layers[0][1].register_forward_hook(_halve_in_place)
        with pytest.raises(bdia_fx.ConversionError, match=r"\[module 'layers\.1\.0'\] .*not the parent's residual"):
            conv(rows)
        handle.remove()
        conv(rows)


def test_a_hook_inside_a_block_is_part_of_the_block_and_replayed_exactly():
    torch.manual_seed(0)
    model = TinyGPT(layers=4, dropout=0.1)
    ids = torch.randint(0, 50, (2, 8))
    results = []
    for mode in ("reversible", "stored"):
        conv = bdia_fx.convert(model, (ids,), config=BDIAConfig(mode=mode))
        conv.blocks[1].mlp.register_forward_hook(_halve_in_place)  # activation steering inside the block
        results.append(grads(conv, (ids,), {}, 3)[1])
    assert_close(*results)


@pytest.mark.parametrize("make, shapes", [
    (lambda: encoder(2, dropout=0.1), [(2, 5, 32), (3, 7, 32), (3, 5, 32)]),
    (lambda: TinyGPT(layers=2, dropout=0.1), [(2, 8), (3, 8), (3, 6)]),
])
def test_sublayer_plans_are_keyed_on_the_stream_shape_too(make, shapes):
    """A new (batch, seq) with no mask, or a new batch size whose mask shape stays, gets its own plan."""
    torch.manual_seed(0)
    model = make()
    example = torch.randn(*shapes[0]) if len(shapes[0]) == 3 else torch.randint(0, 50, shapes[0])
    rev = bdia_fx.convert(model, (example,), config=BDIAConfig(granularity="sublayer"))
    ref = bdia_fx.convert(model, (example,), config=BDIAConfig(granularity="sublayer", mode="stored"))
    for shape in shapes:
        x = torch.randn(*shape) if len(shape) == 3 else torch.randint(0, 50, shape)
        assert_close(grads(rev, (x,), {}, 1)[1], grads(ref, (x,), {}, 1)[1])


def test_a_bfloat16_gpt2_with_realistic_activations_trains_with_stored_gradients():
    """The chain's codes are int32 whatever the model's dtype: a bfloat16 GPT-2 whose stream reaches
    |x| ≈ 100 (bfloat16 itself holds integers exactly only up to 256) trains 30 steps without a range
    error, every step's gradients equal to stored mode's on the same weights."""
    torch.manual_seed(0)
    model = gpt2(3, dropout=0.1).to(torch.bfloat16)
    with torch.no_grad():
        model.transformer.wte.weight.mul_(4000.0)
    ids = torch.randint(0, 64, (4, 16))
    rev = bdia_fx.convert(model, (ids,), {"use_cache": False})
    ref = bdia_fx.convert(model, (ids,), {"use_cache": False}, BDIAConfig(mode="stored"))
    seen = []
    rev.transformer.h[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    for step in range(30):
        batch = torch.randint(0, 64, (4, 16))
        _, got = grads(rev, (batch,), {"labels": batch, "use_cache": False}, step, lambda out: out.loss)
        _, want = grads(ref, (batch,), {"labels": batch, "use_cache": False}, step, lambda out: out.loss)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
        for p, g in zip(params, got):
            p.grad = g
        optimizer.step()
    largest = max(float(x.abs().max()) for x in seen if not isinstance(x, FakeTensor))  # captures see fake ones
    assert largest > 100 and all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_a_layer_called_part_by_part_checks_that_its_branch_gets_the_pre_norms_output():
    """x = residual(branch(norm(x)), x): the branch steps from the stream the pre-norm was given; a hook
    replacing the norm's output (the branch would read another value) is refused naming the branch."""
    torch.manual_seed(0)
    model = HelperResidualStack()
    x = torch.randn(2, 5, 16)
    conv = bdia_fx.convert(model, (x,)).train()
    conv(x).sum().backward()
    handle = conv.layers[1][0][0].register_forward_hook(lambda module, args, out: out * 1.0)
    with pytest.raises(bdia_fx.ConversionError, match=r"\[module 'layers\.1\.1'\] 'layers\.1\.1' got a value that "
                                                      r"is not its pre module's output of the stream"):
        conv(x)
    handle.remove()
    handle = conv.layers[1][0][0].register_forward_hook(lambda module, args, out: out.mul_(3.0))
    with pytest.raises(bdia_fx.ConversionError, match=r"\[module 'layers\.1\.1'\] .*its output was modified in "
                                                      r"place after its forward"):
        conv(x)  # an in-place edit the step's replay of the norm would not make
    handle.remove()
    conv(x)
    with torch.no_grad():  # eval: the γ = 0 chain of the same steps, the original's or quantized to 2^-9
        want = model.eval()(x)
        assert torch.equal(bdia_fx.revert(conv).eval()(x), want)
        quantized = bdia_fx.revert(conv, quantize=True).eval()(x)
        assert torch.equal(conv.eval()(x), quantized) and not torch.equal(quantized, want)
        torch.testing.assert_close(quantized, want, rtol=0, atol=1e-2)


def test_a_layer_called_part_by_part_runs_eagerly_under_compile_with_eager_gradients():
    torch.manual_seed(0)
    model = HelperResidualStack()
    x = torch.randn(2, 5, 16)
    conv = bdia_fx.convert(model, (x,))
    _, want = grads(conv, (x,), {}, seed=3)
    compiled = torch.compile(conv, backend="eager")
    _, got = grads(compiled, (x,), {}, seed=3)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert "pre-norm beside the branch" in state_of(conv).runtimes["layers"].compile_blocker()


def test_parameters_a_block_reads_from_outside_it_get_the_stored_runs_gradients():
    torch.manual_seed(0)
    model = SharedModuleStack()
    x = torch.randn(2, 5, 16)
    conv = bdia_fx.convert(model, (x,))
    assert [b.outside for b in bdia_fx.report_of(conv).chains[0].blocks] == [("shared.bias", "shared.weight")] * 3
    stored = bdia_fx.convert(model, (x,), config=BDIAConfig(mode="stored"))
    _, got = grads(conv, (x,), {}, seed=2)
    _, want = grads(stored, (x,), {}, seed=2)
    assert got[0].abs().sum() > 0 and all(torch.equal(g, w) for g, w in zip(got, want))  # shared.weight first
    with pytest.raises(bdia_fx.ConversionError, match=r"cannot give 'shared\.bias'.*train the converted model"):
        bdia_fx.graph_of(conv)(x).sum().backward()
