"""Transformer chains integrated with a shear scheme (``BDIAConfig(scheme=...)``, bdia_fx.scheme_chain).

References: the same discrete forward with every activation stored (``mode="stored"``) for
gradients; the scheme's float step written out by hand for the inference form; onnxruntime for
exports; the original model, which the scheme's inference form must *differ* from.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

import bdia_fx
from bdia_fx import BDIAConfig
from bdia_fx.errors import ReversibilityError
from bdia_fx.memory import saved_activation_bytes

from cases import assert_close, grads, logits
from models import ParentLoopViT, PythonRandomBlock, ResidualMLP, Stack, TinyGPT, gpt2

SCHEMES = ["alf", "alf4", "reversible_bosh3"]
CASES = {
    "tiny-gpt-dropout": (lambda: TinyGPT(layers=3, dropout=0.1), lambda: (torch.randint(0, 50, (3, 9)),), {}),
    "hf-gpt2-side-inputs": (lambda: gpt2(2), lambda: (torch.randint(0, 64, (2, 8)),), {"use_cache": False}),
    "parent-loop-branches": (lambda: ParentLoopViT(), lambda: (torch.randn(3, 8, 8),), {}),
}


def _convert(build, args, kwargs, **config):
    torch.manual_seed(0)
    model = build()
    example = () if args is None else (args, kwargs)  # None: converted lazily, at the first call
    return model, bdia_fx.convert(model, *example, config=BDIAConfig(**config))


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("case", CASES)
def test_reversible_gradients_equal_the_stored_run(case, scheme):
    build, make_args, kwargs = CASES[case]
    args = make_args()
    results = {}
    for mode in ("stored", "reversible"):
        _, conv = _convert(build, args, kwargs, scheme=scheme, mode=mode)
        results[mode] = grads(conv, args, kwargs, seed=3)
    (loss_s, g_s), (loss_r, g_r) = results["stored"], results["reversible"]
    assert torch.equal(loss_s, loss_r)  # the same forward numbers exactly
    assert_close(g_r, g_s)


class _ScaledBlock(ResidualMLP):
    def forward(self, x, scale):
        return x + self.lin(self.ln(x)) * scale


class _SharedScale(Stack):
    """Every block reads a side input computed from block 0's parameter (a T5-style shared value)."""

    def forward(self, x, scale=None):
        scale = torch.sigmoid(self.layers[0].lin.bias).view(1, 1, -1) if scale is None else scale
        for layer in self.layers:
            x = layer(x, scale)
        return x


def test_a_side_input_computed_from_a_parameter_gets_its_gradient_once():
    x = torch.randn(2, 4, 8)
    results = {}
    for mode in ("stored", "reversible"):
        torch.manual_seed(0)
        conv = bdia_fx.convert(_SharedScale([_ScaledBlock() for _ in range(3)]), (x,),
                               config=BDIAConfig(scheme="alf", mode=mode))
        results[mode] = grads(conv, (x,), {}, seed=1)
    assert torch.equal(results["stored"][0], results["reversible"][0])
    assert_close(results["reversible"][1], results["stored"][1])


def test_under_autocast_gradients_equal_stored_to_bfloat16_rounding():
    """The forward numbers are the same; the stored run sums block 0's two uses of an autocast weight
    cast in bfloat16 where the walk down sums them in float32, so gradients agree to bf16 rounding."""
    x = torch.randn(3, 8, 8)
    results = {}
    for mode in ("stored", "reversible"):
        torch.manual_seed(0)
        conv = bdia_fx.convert(ParentLoopViT(), (x,), config=BDIAConfig(scheme="alf", mode=mode)).train()
        torch.manual_seed(3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = conv(x).float().pow(2).mean()
        results[mode] = loss.detach(), torch.autograd.grad(loss, list(conv.parameters()))
    assert torch.equal(results["stored"][0], results["reversible"][0])
    for got, want in zip(results["reversible"][1], results["stored"][1]):
        assert (got - want).abs().max() <= 2e-2 * want.abs().max() + 1e-6


def test_after_backward_the_graph_keeps_no_side_input_alive():
    x = torch.randn(2, 4, 8, requires_grad=True)
    conv = bdia_fx.convert(_SharedScale([_ScaledBlock() for _ in range(3)]), (x,), config=BDIAConfig(scheme="alf"))
    scale = torch.rand(1, 1, 8, requires_grad=True) * 2
    loss = conv(x, scale).sum()
    loss.backward()
    kept = weakref.ref(scale)
    del scale
    gc.collect()
    assert kept() is None and loss.grad_fn is not None


def _alf_by_hand(blocks, x):
    """The asynchronous leapfrog over residual blocks h_k(z) = block(z) − z, step 1, v_0 = h_0(z_0)."""
    h = [lambda z, b=b: b(z) - z for b in blocks]
    z, v = x, h[0](x)
    for k in range(len(blocks)):
        s = z + 0.5 * v
        v = 2 * h[k](s) - v
        z = s + 0.5 * v
    return z


def test_the_inference_form_is_the_scheme_step_not_the_original_model():
    torch.manual_seed(0)
    blocks = [ResidualMLP() for _ in range(4)]
    model = Stack(blocks)
    x = torch.randn(2, 5, 8)
    conv = bdia_fx.convert(model, (x,), config=BDIAConfig(scheme="alf", quantize_eval=False)).eval()
    with torch.no_grad():
        expected = _alf_by_hand(list(model.layers), x)
        assert torch.allclose(conv(x), expected, atol=1e-6)
        assert (conv(x) - model(x)).abs().max() > 1e-2  # the scheme changed the model
        reverted = bdia_fx.revert(conv).eval()
        assert torch.equal(reverted(x), conv(x))


@pytest.mark.parametrize("scheme", ["alf", "alf4"])  # alf4: three field evaluations per block, composed
def test_revert_graph_and_onnx_emit_the_scheme_form(tmp_path, scheme):
    torch.manual_seed(0)
    model = TinyGPT(layers=2, dropout=0.0)
    ids = torch.randint(0, 50, (2, 7))
    conv = bdia_fx.convert(model, (ids,), config=BDIAConfig(scheme=scheme, quantize_eval=False))
    train_out = conv(ids)  # captures the graph; dropout 0: the training forward is the quantized form
    assert torch.equal(bdia_fx.graph_of(conv)(ids), train_out)
    conv.eval()
    reverted = bdia_fx.revert(conv).eval()
    with torch.no_grad():
        eager = conv(ids)
        assert torch.equal(reverted(ids), eager)
        assert torch.equal(bdia_fx.graph_of(reverted)(ids), eager)
        quantized = bdia_fx.revert(conv, quantize=True).eval()
        assert torch.equal(quantized(ids), train_out.detach())  # codes: the training forward's numbers
        assert (eager - model.eval()(ids)).abs().max() > 1e-2
    for quantize in (False, True):
        export = bdia_fx.export_onnx(conv, tmp_path / f"m{quantize}.onnx", (ids,), quantize=quantize)
        assert export.check.mismatched == 0


def test_memory_does_not_grow_with_depth():
    """Saved bytes of a reversible scheme chain: the top codes of both parts, independent of K, and a
    16-byte checksum per block (the leapfrog runs each block once per step); the stored run grows by
    a block's activations per block."""
    def saved(layers, mode):
        torch.manual_seed(0)
        x = torch.randn(4, 16, 8)
        conv = bdia_fx.convert(Stack([ResidualMLP() for _ in range(layers)]), (x,),
                               config=BDIAConfig(scheme="alf", mode=mode))
        return saved_activation_bytes(conv, lambda: conv(x.requires_grad_()).pow(2).mean())

    reversible = [saved(k, "reversible") for k in (2, 8)]
    stored = [saved(k, "stored") for k in (2, 8)]
    assert reversible[1] - reversible[0] == 6 * 16, reversible
    assert stored[1] - stored[0] > 6 * 4 * 16 * 8 * 4, stored


def test_a_parameter_edited_between_forward_and_backward_is_named():
    _, conv = _convert(lambda: TinyGPT(layers=3), None, None, scheme="alf")
    ids = torch.randint(0, 50, (2, 6))
    loss = conv(ids).pow(2).mean()
    with torch.no_grad():
        conv.blocks[1].mlp[0].weight.add_(1e-3)
    with pytest.raises(ReversibilityError, match=r"blocks\.1.*modified in place"):
        loss.backward()


def test_randomness_checkpoint_does_not_replay_is_caught_naming_the_block():
    torch.manual_seed(0)
    model = Stack([ResidualMLP(), PythonRandomBlock(), ResidualMLP()])
    x = torch.randn(2, 3, 8, requires_grad=True)
    conv = bdia_fx.convert(model, (x,), config=BDIAConfig(scheme="alf"))
    loss = conv(x).pow(2).mean()
    with pytest.raises(ReversibilityError, match=r"layers\.1.*differs from its forward"):
        loss.backward()


def test_retained_graph_runs_backward_twice():
    _, conv = _convert(lambda: TinyGPT(layers=2, dropout=0.1), None, None, scheme="alf")
    ids = torch.randint(0, 50, (2, 6))
    loss = conv(ids).pow(2).mean()
    loss.backward(retain_graph=True)
    first = {n: p.grad.clone() for n, p in conv.named_parameters()}
    loss.backward()
    for n, p in conv.named_parameters():
        torch.testing.assert_close(p.grad, 2 * first[n], msg=n)


def test_non_finite_block_output_raises_naming_the_block():
    class Exploding(ResidualMLP):
        def forward(self, x):
            return x + self.lin(self.ln(x)) * float("inf")

    x = torch.randn(2, 3, 8)
    conv = bdia_fx.convert(Stack([ResidualMLP(), Exploding()]), (x,), config=BDIAConfig(scheme="alf"))
    with pytest.raises(bdia_fx.FixedPointRangeError, match=r"layers\.1.*non-finite"):
        conv(x)


def test_bad_configurations_are_refused_before_anything_changes():
    with pytest.raises(ValueError, match="scheme must be"):
        BDIAConfig(scheme="rk4")
    with pytest.raises(ValueError, match="granularity must be 'block'"):
        BDIAConfig(scheme="alf", granularity="sublayer")


def test_blocks_out_of_order_in_eval_are_refused():
    class Skipping(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(ResidualMLP() for _ in range(3))

        def forward(self, x, skip=False):
            for i, layer in enumerate(self.layers):
                if not (skip and i == 1):
                    x = layer(x)
            return x

    x = torch.randn(2, 3, 8)
    conv = bdia_fx.convert(Skipping(), (x,), config=BDIAConfig(scheme="alf")).eval()
    with pytest.raises(bdia_fx.ConversionError, match="did not get block 1's output"):
        conv(x, skip=True)


@pytest.mark.parametrize("training", [True, False])
def test_a_parent_loop_that_changes_the_stream_is_refused_in_training_and_eval(training):
    x = torch.randn(3, 8, 8)
    conv = bdia_fx.convert(ParentLoopViT(), (x,), config=BDIAConfig(scheme="alf")).train(training)
    conv.scale_skip = 0.5  # the parent now adds 0.5·x: not the chain's stream any more
    with pytest.raises(bdia_fx.ConversionError, match="block 1"):
        conv(x)


def test_loss_of_a_trained_scheme_chain_falls():
    """A smoke check that the scheme's training graph learns: 30 AdamW steps on a fixed batch."""
    _, conv = _convert(lambda: TinyGPT(layers=3, dropout=0.0), None, None, scheme="alf")
    ids = torch.randint(0, 50, (4, 12))
    optimizer = torch.optim.AdamW(conv.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = nn.functional.cross_entropy(logits(conv(ids[:, :-1])).flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses

