"""One chain call's frame: deferred checks read once per direction, unreplayed randomness, non-finite
streams, calls without autograd, the meta device, higher-order gradients and ``is_recomputing``."""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import bdia_fx
from bdia_fx import BDIAConfig, ConversionError, FixedPointRangeError, ReversibilityError

from cases import assert_close, grads, mean_square_loss
from models import PythonRandomBlock, ResidualMLP, Stack, TinyGPT, encoder
from references import bdia_chain


class _NumpyRandomBlock(ResidualMLP):
    def forward(self, x):
        return x + self.lin(self.ln(x)) * float(1.0 + 0.1 * np.random.rand())


class _PrivateGeneratorBlock(ResidualMLP):
    def __init__(self):
        super().__init__()
        self.generator = torch.Generator().manual_seed(0)

    def forward(self, x):
        return x + self.lin(self.ln(x)) * (1.0 + 0.1 * torch.rand((), generator=self.generator))


UNREPLAYED = {"python-random": PythonRandomBlock, "numpy": _NumpyRandomBlock,
              "private-generator": _PrivateGeneratorBlock}


@pytest.mark.parametrize("kind", UNREPLAYED)
def test_randomness_checkpoint_does_not_replay_is_caught_by_default(kind):
    """torch.utils.checkpoint replays torch's global generators only; the default per-step checksum
    names the block whose recompute differs (stored mode keeps its activations and is exact)."""
    model = Stack([UNREPLAYED[kind]() for _ in range(4)])
    x = torch.randn(4, 8, requires_grad=True)
    stored = bdia_fx.convert(model, (x,), config=BDIAConfig(mode="stored")).train()
    stored(x).sum().backward()
    rev = bdia_fx.convert(model, (x,)).train()
    loss = rev(x).sum()
    with pytest.raises(ReversibilityError, match=r"\[module 'layers\.3'\] backward recompute .* not deterministic"):
        loss.backward()


def test_the_checksum_is_an_explicit_opt_out():
    """verify=False gives up exactly what the README says: the unreplayed randomness goes through
    backward without an error, and the gradients it gives are not the stored ones."""
    model = Stack([PythonRandomBlock() for _ in range(3)])
    x = torch.randn(4, 8)
    results = {}
    for name, config in (("stored", BDIAConfig(mode="stored", gammas=(0.5,))),
                         ("unverified", BDIAConfig(verify=False, gammas=(0.5,)))):
        conv = bdia_fx.convert(model, (x,), config=config)
        random.seed(0)  # both forwards draw the same numbers; only the unverified recompute draws others
        results[name] = grads(conv, (x,), {}, seed=0)
    assert torch.equal(results["stored"][0], results["unverified"][0])
    assert not all(torch.allclose(a, b, rtol=1e-4, atol=1e-6)
                   for a, b in zip(results["stored"][1], results["unverified"][1]))


def test_an_edit_through_data_that_changes_a_block_output_is_caught_by_the_checksum():
    """``.data`` edits bump no version counter (plain autograd misses them too); the default checksum of
    the step's update codes names the block whose recompute they changed."""
    model = Stack([ResidualMLP() for _ in range(3)])
    x = torch.randn(4, 8)
    conv = bdia_fx.convert(model, (x,)).train()
    loss = conv(x).pow(2).mean()
    conv.layers[1].lin.weight.data.mul_(1.5)
    with pytest.raises(ReversibilityError, match=r"\[module 'layers\.1'\] backward recompute .*\.data"):
        loss.backward()


class _NaNAfter(ResidualMLP):
    """Its branch turns non-finite once a flag is set (e.g. an overflow inside the block)."""

    poisoned = False

    def forward(self, x):
        out = self.lin(self.ln(x))
        return x + (out * float("inf") if self.poisoned else out)


@pytest.mark.parametrize("mode", ["reversible", "stored"])
def test_a_non_finite_stream_is_named_as_such_at_the_block_where_it_appears(mode):
    model = Stack([_NaNAfter() for _ in range(4)])
    x = torch.randn(4, 8)
    conv = bdia_fx.convert(model, (x,), config=BDIAConfig(mode=mode)).train()
    conv.layers[2].poisoned = True
    with pytest.raises(FixedPointRangeError,
                       match=r"\[module 'layers\.2'\] .*non-finite \((inf|NaN)\).*not a fixed-point"):
        conv(x)
    x[0, 0] = float("nan")
    with pytest.raises(FixedPointRangeError, match=r"layers\.0.*entering the chain.*non-finite \(NaN\)"):
        conv(x)


def test_overflow_is_named_at_the_block_and_the_range_does_not_depend_on_the_dtype():
    torch.manual_seed(0)
    model = encoder(3).to(torch.bfloat16)
    x = (300 * torch.randn(2, 4, 32)).to(torch.bfloat16)  # beyond bfloat16's own exact integers
    conv = bdia_fx.convert(model, (x,)).train()
    conv(x).float().sum().backward()
    with pytest.raises(FixedPointRangeError, match=r"layers\.0.*fixed-point overflow.*2\^20 = 1\.04858e\+06"):
        conv(x * 1e4)


def _count_host_reads(monkeypatch):
    counts = {"n": 0}
    for name in ("item", "tolist", "cpu", "__bool__"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, **kwargs):
            counts["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    return counts


def test_a_training_step_reads_the_device_once_per_chain_and_direction(monkeypatch, device):
    """Range and checksum results stay on the device; the host reads them at the end of the chain's
    forward and at the end of its backward (two chains: four reads), however deep the chains are. On
    CUDA, torch's sync debug mode also counts implicit synchronisations: none beyond those reads."""
    torch.manual_seed(0)
    src, tgt = torch.randn(2, 7, 32, device=device), torch.randn(2, 5, 32, device=device)
    layer_kw = dict(d_model=32, nhead=4, dim_feedforward=64, dropout=0.1, batch_first=True, norm_first=True)
    for layers in (2, 6):
        model = nn.Transformer(num_encoder_layers=layers, num_decoder_layers=layers, **layer_kw).to(device)
        conv = bdia_fx.convert(model, (src, tgt)).train()
        conv(src, tgt).sum().backward()  # warm-up
        counts = _count_host_reads(monkeypatch)
        with warnings.catch_warnings(record=True) as synced:
            warnings.simplefilter("always")
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("warn")
            try:
                conv(src, tgt).sum().backward()
            finally:
                if device.type == "cuda":
                    torch.cuda.set_sync_debug_mode("default")
        monkeypatch.undo()
        assert counts["n"] == 4
        assert sum("synchronizing" in str(w.message) for w in synced) <= 4


@pytest.mark.parametrize("no_autograd", [torch.no_grad, torch.inference_mode])
def test_a_training_forward_without_autograd_runs_like_the_plain_model(no_autograd):
    """Under no_grad or inference_mode no backward can follow: the BDIA forward runs without
    checkpointing or guards (the plain model runs there too), and equals the autograd forward."""
    torch.manual_seed(0)
    model = TinyGPT(layers=4, dropout=0.1)
    ids = torch.randint(0, 50, (2, 8))
    conv = bdia_fx.convert(model, (ids,)).train()
    torch.manual_seed(1)
    want = conv(ids).detach()
    with no_autograd():
        torch.manual_seed(1)
        got = conv(ids)
        model.train()(ids)
    assert torch.equal(got, want) and not got.requires_grad


def test_a_model_on_the_meta_device_propagates_shapes_through_training_steps():
    with torch.device("meta"):
        model = TinyGPT(layers=3, dropout=0.1)
    ids = torch.randint(0, 50, (2, 8), device="meta")
    conv = bdia_fx.convert(model, (ids,)).train()
    out = conv(ids)
    assert out.device.type == "meta" and out.shape == model(ids).shape
    out.sum().backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in conv.blocks.parameters())


def test_higher_order_gradients_raise_in_reversible_mode_and_are_exact_in_stored_mode():
    torch.manual_seed(0)
    model = Stack([ResidualMLP() for _ in range(4)]).double()  # float64: the two sum in other orders
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    rev = bdia_fx.convert(model, (x,)).train()
    with pytest.raises(ConversionError, match="does not support higher-order gradients.*mode='stored'"):
        torch.autograd.grad(rev(x).pow(2).sum(), x, create_graph=True)
    stored = bdia_fx.convert(model, (x,), config=BDIAConfig(mode="stored", gammas=(0.5,))).train()
    params = list(model.parameters())
    results = []
    for forward in (stored, lambda v: bdia_chain(list(model.layers), v, 0.5)):  # the reference in plain autograd
        (g,) = torch.autograd.grad(forward(x).pow(2).sum(), x, create_graph=True)
        results.append(torch.autograd.grad(g.pow(2).sum(), [x, *params]))  # a gradient penalty
    assert_close(*results)


def test_is_recomputing_tells_hooks_the_backward_recompute_from_the_forward():
    torch.manual_seed(0)
    model = TinyGPT(layers=3, dropout=0.1)
    ids = torch.randint(0, 50, (2, 8))
    conv = bdia_fx.convert(model, (ids,)).train()
    calls = {"forward": 0, "recompute": 0}

    def count(module, args, out):
        calls["recompute" if bdia_fx.is_recomputing() else "forward"] += 1

    conv.blocks[1].mlp.register_forward_hook(count)
    for _ in range(2):
        mean_square_loss(conv(ids)).backward()
    assert calls == {"forward": 2, "recompute": 2} and not bdia_fx.is_recomputing()
    _, want = grads(bdia_fx.convert(model, (ids,), config=BDIAConfig(mode="stored")), (ids,), {}, 4)
    _, got = grads(conv, (ids,), {}, 4)
    assert_close(got, want)


def test_autograd_grad_of_a_middle_block_still_reads_the_backward_checks():
    """A backward that stops inside the chain runs the engine callback all the same."""
    model = Stack([PythonRandomBlock() for _ in range(5)])
    x = torch.randn(4, 8)
    rev = bdia_fx.convert(model, (x,)).train()
    with pytest.raises(ReversibilityError, match=r"layers\.4"):
        torch.autograd.grad(rev(x).sum(), list(rev.layers[2].parameters()))


class _EarlyExit(Stack):
    """Runs only the first ``depth`` blocks (layer dropping, early exits)."""

    depth = 4

    def forward(self, x):
        for layer in self.layers[: self.depth]:
            x = layer(x)
        return x


def test_a_parent_that_stops_before_the_last_block_gets_the_reason_in_backward():
    model = _EarlyExit([ResidualMLP() for _ in range(4)])
    x = torch.randn(4, 8, requires_grad=True)
    rev = bdia_fx.convert(model, (x,)).train()
    stored = bdia_fx.convert(model, (x,), config=BDIAConfig(mode="stored")).train()
    model.depth = rev.depth = stored.depth = 3
    stored(x).sum().backward()
    loss = rev(x).sum()
    with pytest.raises(ReversibilityError, match=r"layers\.2.*ended after this step, before the chain's last block"):
        loss.backward()


class _Negate(nn.Module):
    """f(x) = x + (−2x) = −x: with γ = ½ the chain's own update makes x_2 = 3·x_0."""

    def forward(self, x):
        return x + (-2.0) * x


def test_a_float16_stream_beyond_the_largest_float16_is_refused_where_it_happens():
    """The codes hold |x| up to 2^20, but blocks read the stream in float16: the chain's update
    leaving float16's range is named at the step that made it, before the next block turns it into inf."""
    conv = bdia_fx.convert(Stack([_Negate() for _ in range(2)]), (torch.ones(2, 4, dtype=torch.float16),),
                           config=BDIAConfig(gammas=(0.5,))).train()
    assert conv(torch.full((2, 4), 2e4, dtype=torch.float16)).isfinite().all()
    with pytest.raises(FixedPointRangeError, match=r"\[module 'layers\.1'\] the stream reached \|x\| = 90000, beyond "
                                                   r"the largest torch\.float16 value 65504"):
        conv(torch.full((2, 4), 3e4, dtype=torch.float16))
