"""The conversion contract: same interface, shared weights, untouched original, clear refusals."""

from __future__ import annotations

import copy
import logging
import re
import subprocess
import sys

import pytest
import torch
from torch import nn

import bdia_fx
from bdia_fx import BDIAConfig, ConversionError

from cases import assert_close, grads
from models import MoEStack, PreAndPostLN, PreLNBlock, ResidualMLP, Stack, TinyGPT, bert, encoder, gpt2


def _snapshot(model):
    return ([type(m) for m in model.modules()], [m.training for m in model.modules()],
            {k: v.clone() for k, v in model.state_dict().items()})


def _assert_untouched(model, snap):
    classes, flags, state = _snapshot(model)
    assert classes == snap[0] and flags == snap[1]
    assert state.keys() == snap[2].keys() and all(torch.equal(state[k], snap[2][k]) for k in state)


def test_converted_model_keeps_class_keys_and_shares_parameters():
    model = gpt2(3)
    ids = torch.randint(0, 64, (2, 8))
    snap = _snapshot(model)
    conv = bdia_fx.convert(model, (ids,), {"use_cache": False})
    assert type(conv) is type(model)
    assert conv.state_dict().keys() == model.state_dict().keys()
    assert all(a is b for a, b in zip(conv.parameters(), model.parameters()))
    assert conv.lm_head.weight is conv.transformer.wte.weight
    _assert_untouched(model, snap)


def test_trains_with_an_optimizer_across_shapes_and_call_patterns():
    torch.manual_seed(0)
    model = gpt2(3)
    conv = bdia_fx.convert(model, (torch.randint(0, 64, (2, 8)),), {"use_cache": False})
    opt = torch.optim.AdamW(conv.parameters(), lr=1e-3)
    conv.train()
    for batch, length in [(2, 8), (3, 12), (1, 5)]:
        ids = torch.randint(0, 64, (batch, length))
        for kwargs in ({"labels": ids}, {"labels": ids, "attention_mask": torch.ones_like(ids)}):
            out = conv(ids, use_cache=False, **kwargs)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            assert out.logits.shape == (batch, length, 64)
    conv.eval()
    with torch.no_grad():
        assert conv(torch.randint(0, 64, (4, 6))).logits.shape == (4, 6, 64)


def test_a_plain_checkpoint_loads_into_the_converted_model():
    model, other = gpt2(3), gpt2(3)
    conv = bdia_fx.convert(model, (torch.randint(0, 64, (2, 8)),), {"use_cache": False})
    conv.load_state_dict(other.state_dict(), strict=True)
    assert torch.equal(model.transformer.h[0].attn.c_attn.weight, other.transformer.h[0].attn.c_attn.weight)


def test_several_chains_with_a_cross_attention_side_input():
    torch.manual_seed(1)
    layer_kw = dict(d_model=32, nhead=4, dim_feedforward=64, dropout=0.1, batch_first=True, norm_first=True)
    model = nn.Transformer(num_encoder_layers=3, num_decoder_layers=3, **layer_kw)
    src, tgt = torch.randn(2, 7, 32, requires_grad=True), torch.randn(2, 5, 32)
    report = bdia_fx.find_chains(model, (src, tgt))
    assert [c.container for c in report.chains] == ["encoder.layers", "decoder.layers"]
    assert report.chains[1].side_inputs, "decoder blocks read the encoder memory"
    grads = {}
    for mode in ("reversible", "stored"):
        conv = bdia_fx.convert(model, (src, tgt), config=BDIAConfig(mode=mode))
        conv.train()
        torch.manual_seed(3)
        out = conv(src, tgt)
        grads[mode] = torch.autograd.grad(out.pow(2).mean(), [src, *model.parameters()])
    for a, b in zip(grads["reversible"], grads["stored"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _assert_refused(model, args, kwargs=None, match="", config=None):
    snap = _snapshot(model)
    with pytest.raises(ConversionError, match=match):
        bdia_fx.convert(model, args, kwargs, config)
    _assert_untouched(model, snap)


def test_refuses_post_ln_transformer_encoder():
    _assert_refused(encoder(3, norm_first=False), (torch.randn(2, 5, 32),), match=r"layers\.0.*post-LN")


def test_refuses_post_ln_bert():
    _assert_refused(bert(2), (torch.randint(0, 64, (2, 6)),), match=r"encoder\.layer\.0.*post-LN")


def test_refuses_fewer_than_two_blocks():
    _assert_refused(TinyGPT(layers=1), (torch.randint(0, 50, (2, 6)),), match="fewer than 2 blocks")


class _InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln, self.lin = nn.LayerNorm(8), nn.Linear(8, 8)

    def forward(self, x):
        x += self.lin(self.ln(x))
        return x


def test_refuses_in_place_ops_on_the_stream():
    model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(_InPlace(), _InPlace(), _InPlace()))
    _assert_refused(model, (torch.randn(2, 8),), match=r"1\.0.*in-place op aten\.add_")


def test_refuses_output_hidden_states_at_convert_and_call_time():
    model = gpt2(3)
    ids = torch.randint(0, 64, (2, 8))
    _assert_refused(model, (ids,), {"use_cache": False, "output_hidden_states": True}, match="output_hidden_states")
    conv = bdia_fx.convert(model, (ids,), {"use_cache": False})
    conv.train()
    with pytest.raises(ConversionError, match="output_hidden_states"):
        conv(ids, use_cache=False, output_hidden_states=True)
    conv.eval()
    with torch.no_grad():  # eval is the γ = 0 chain: every intermediate value exists
        assert len(conv(ids, output_hidden_states=True).hidden_states) == 4




def test_refuses_non_modules_and_double_conversion():
    with pytest.raises(TypeError, match="expected an nn.Module"):
        bdia_fx.convert(lambda x: x)
    model = encoder(2)
    conv = bdia_fx.convert(model, (torch.randn(2, 3, 32),))
    with pytest.raises(ConversionError, match="already converted"):
        bdia_fx.convert(conv)


def test_config_rejects_gammas_that_break_exactness():
    with pytest.raises(ValueError, match="gammas"):
        BDIAConfig(gammas=(0.25,))


def test_lazy_conversion_finds_chains_at_the_first_call():
    model = encoder(3)
    conv = bdia_fx.convert(model)
    conv.train()
    x = torch.randn(2, 5, 32, requires_grad=True)
    conv(x).sum().backward()
    assert x.grad is not None


def test_the_same_block_object_repeated_is_refused_for_the_true_reason():
    shared = ResidualMLP()
    _assert_refused(Stack([shared] * 4), (torch.randn(2, 8),), match=r"one module object used 4 times \(shared weights")


class _Other(ResidualMLP):
    """A residual block of a second class."""


def test_alternating_block_classes_form_one_chain():
    torch.manual_seed(0)
    model = Stack([ResidualMLP(), _Other(), ResidualMLP(), _Other()])
    x = torch.randn(4, 8, requires_grad=True)
    rev = bdia_fx.convert(model, (x,))
    ref = bdia_fx.convert(model, (x,), config=BDIAConfig(mode="stored"))
    assert [c.block_paths for c in bdia_fx.find_chains(model, (x,)).chains] == [tuple(f"layers.{i}" for i in range(4))]
    _, g_rev = grads(rev, (x,), {}, 1, extra=(x,))
    _, g_ref = grads(ref, (x,), {}, 1, extra=(x,))
    assert_close(g_rev, g_ref)


class _MutatesSide(ResidualMLP):
    def forward(self, x, mask):
        mask.add_(0.0)
        return x + self.lin(self.ln(x)) * mask


class _MutatesSideStack(Stack):
    def forward(self, x):
        mask = torch.ones_like(x)
        for layer in self.layers:
            x = layer(x, mask)
        return x


def test_a_block_mutating_a_side_input_is_refused_for_the_true_reason():
    _assert_refused(_MutatesSideStack([_MutatesSide() for _ in range(3)]), (torch.randn(2, 8),),
                    match=r"layers\.0.*modifies its input 'ones_like' in place \(aten\.add_")


def test_example_inputs_may_be_one_tensor_and_anything_else_is_a_type_error():
    model = Stack([ResidualMLP() for _ in range(3)])
    x = torch.randn(2, 8)
    assert bdia_fx.find_chains(model, x).chains
    bdia_fx.convert(model, x).train()(x)
    with pytest.raises(TypeError, match="example_inputs must be a tuple"):
        bdia_fx.convert(model, {"x": x})


def test_numbered_children_that_are_not_residual_blocks_are_left_alone():
    class WithHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = Stack([ResidualMLP() for _ in range(3)])
            self.head = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))

        def forward(self, x):
            return self.head(self.body(x))

    report = bdia_fx.find_chains(WithHead(), (torch.randn(2, 8),))
    assert [c.container for c in report.chains] == ["body.layers"]
    reasons = dict(report.ignored)
    assert reasons["head"].startswith("its numbered children are not residual blocks ('head.0': block output is "
                                      "aten.linear.default")  # why the first child is none


@pytest.mark.parametrize("granularity", ["block", "sublayer"])
def test_a_converted_model_pickles_and_trains_on_after_loading(tmp_path, granularity):
    """torch.save / torch.load and copy.deepcopy: the proxies pickle as their original class, the
    loaded model captures its call pattern again at its first call and its gradients are unchanged."""
    torch.manual_seed(0)
    model = TinyGPT(layers=3, dropout=0.1)
    ids = torch.randint(0, 50, (2, 8))
    conv = bdia_fx.convert(model, (ids,), config=BDIAConfig(granularity=granularity))
    _, want = grads(conv, (ids,), {}, 2)
    torch.save(conv, tmp_path / "conv.pt")
    for loaded in (torch.load(tmp_path / "conv.pt", weights_only=False), copy.deepcopy(conv)):
        assert type(loaded.blocks[0]).__qualname__ == "PreLNBlock[bdia]" and loaded.blocks[0] is not conv.blocks[0]
        _, got = grads(loaded, (ids,), {}, 2)
        assert_close(got, want)
        assert bdia_fx.check_exactness(loaded, (ids,)).exact
        reverted = bdia_fx.revert(loaded)
        assert type(reverted.blocks[0]) is PreLNBlock


def test_captures_are_logged_at_info(caplog):
    ids = torch.randint(0, 64, (2, 8))
    with caplog.at_level(logging.INFO, logger="bdia_fx"):
        conv = bdia_fx.convert(gpt2(3), (ids,), {"use_cache": False}, BDIAConfig(granularity="sublayer")).train()
        conv(ids, use_cache=False)  # the same call pattern: no new capture
        conv(torch.randint(0, 64, (3, 5)), labels=torch.randint(0, 64, (3, 5)), use_cache=False)  # a new one
    captures = [r.getMessage() for r in caplog.records if "captured the training call" in r.getMessage()]
    assert len(captures) == 2
    assert re.search(r"GPT2LMHeadModel: captured the training call \(Tensor\[2, 8\] int64, use_cache=False\) in "
                     r"\d+\.\d\d s: chain 'transformer\.h' of 3 blocks", captures[0])
    assert "labels=Tensor[3, 5] int64" in captures[1]
    assert any(re.search(r"transformer\.h\.0: exported for its sublayer steps, stream \(Tensor\[3, 5, 32\] float32\)",
                         r.getMessage()) for r in caplog.records)


def test_by_default_only_warnings_are_printed_once():
    """No logging set up (a plain script): the capture info stays silent, the use_cache warning shows once."""
    script = ("import torch, bdia_fx\n"
              "from transformers import GPT2Config, GPT2LMHeadModel\n"
              "model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=64, "
              "bos_token_id=0, eos_token_id=0))\n"
              "ids = torch.randint(0, 64, (2, 8))\n"
              "conv = bdia_fx.convert(model, (ids,)).train()\n"
              "for _ in range(2):\n"
              "    conv(ids, labels=ids).loss.backward()\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.count("use_cache=True is incompatible with reversible BDIA training") == 1
    assert "captured the training call" not in done.stderr + done.stdout


def test_strict_false_converts_the_chains_that_can_be_and_keeps_the_others(caplog, tmp_path):
    torch.manual_seed(0)
    model = PreAndPostLN()
    x = torch.randn(2, 5, 32, requires_grad=True)
    snap = _snapshot(model)
    with pytest.raises(ConversionError, match=r"post\.layers\.0.*post-LN.*strict=False\) converts the other chains"):
        bdia_fx.convert(model, (x,))
    _assert_untouched(model, snap)
    with caplog.at_level(logging.WARNING, logger="bdia_fx"):
        rev = bdia_fx.convert(model, (x,), config=BDIAConfig(verify=True, quantize_eval=False), strict=False)
    ref = bdia_fx.convert(model, (x,), config=BDIAConfig(mode="stored"), strict=False)
    _assert_untouched(model, snap)
    report = bdia_fx.report_of(rev)
    assert [c.container for c in report.chains] == ["pre.layers"]
    assert [(r.container, r.module) for r in report.rejections] == [("post.layers", "post.layers.0")]
    assert "refused (not converted)" in str(report) and "post-LN" in str(report)
    assert any("strict=False" in r.message and "post.layers" in r.message for r in caplog.records)
    assert_close(grads(rev, (x,), {}, 3, extra=(x,))[1], grads(ref, (x,), {}, 3, extra=(x,))[1])
    assert bdia_fx.check_exactness(rev, (x,)).exact
    model.eval(), rev.eval()
    with torch.no_grad():
        assert torch.equal(rev(x), model(x))
        assert torch.equal(bdia_fx.revert(rev)(x), model(x))
    exported = bdia_fx.export_onnx(rev, tmp_path / "m.onnx", (torch.randn(2, 5, 32),))
    assert exported.check.mismatched == 0


def test_strict_false_still_refuses_a_model_with_no_convertible_chain():
    with pytest.raises(ConversionError, match=r"layers\.0.*post-LN"):
        bdia_fx.convert(encoder(3, norm_first=False), (torch.randn(2, 5, 32),), strict=False)


@pytest.mark.parametrize("build, make_args", [
    (lambda: encoder(3, norm_first=False, dropout=0.1), lambda: (torch.randn(2, 5, 32, requires_grad=True),)),
    (lambda: bert(3), lambda: (torch.randint(0, 64, (2, 6)),)),
], ids=["post-ln-encoder", "post-ln-bert"])
def test_residual_only_false_trains_post_ln_blocks_exactly(build, make_args):
    """BDIA for any block map: reversible gradients equal stored mode, every input rebuilt bit for
    bit, and γ = 0 is the original model (quantize_eval=False)."""
    torch.manual_seed(0)
    model, args = build(), make_args()
    with pytest.raises(ConversionError, match=r"post-LN.*residual_only=False"):
        bdia_fx.convert(model, args)
    config = BDIAConfig(residual_only=False, quantize_eval=False)
    rev = bdia_fx.convert(model, args, config=config)
    ref = bdia_fx.convert(model, args, config=BDIAConfig(residual_only=False, mode="stored"))

    def loss_of(out):
        return (out.last_hidden_state if hasattr(out, "last_hidden_state") else out).pow(2).mean()

    params = [p for p in model.parameters() if p.requires_grad]  # BERT's pooler is unused: None
    for variant in (rev, ref):
        variant.train()
    torch.manual_seed(3)
    got = torch.autograd.grad(loss_of(rev(*args)), params, allow_unused=True)
    torch.manual_seed(3)
    want = torch.autograd.grad(loss_of(ref(*args)), params, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in got)
    assert_close([g for g in got if g is not None], [w for w in want if w is not None])
    assert bdia_fx.check_exactness(rev, args).exact
    model.eval(), rev.eval()
    with torch.no_grad():
        assert torch.equal(loss_of(rev(*args)), loss_of(model(*args)))


def test_is_converted_and_the_repr_says_how():
    model = Stack([ResidualMLP() for _ in range(3)])
    x = torch.randn(4, 8)
    conv = bdia_fx.convert(model, (x,), config=BDIAConfig(frac_bits=10))
    plain = bdia_fx.revert(conv)
    assert bdia_fx.is_converted(conv) and not bdia_fx.is_converted(model) and not bdia_fx.is_converted(plain)
    text = repr(conv)
    assert "bdia_fx: converted (reversible, granularity=block, frac_bits=10" in text and "layers (3 blocks)" in text
    assert "bdia_fx" not in repr(model) and "bdia_fx" not in repr(plain)


def test_a_block_that_updates_its_buffers_in_forward_is_refused_at_convert_with_the_true_cause():
    model = MoEStack()
    snap = _snapshot(model)
    with pytest.raises(ConversionError, match=r"blocks\.0.*updates its state 'blocks\.0\.moe\.load' in place in its "
                                              r"forward.*an MoE's load counts"):
        bdia_fx.convert(model, (torch.randn(2, 8, 16),))
    _assert_untouched(model, snap)  # the capture's own forward left the buffers as they were
