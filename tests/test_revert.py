"""revert(): the γ = 0 model, checkpoint round trips in both directions, bad input."""

from __future__ import annotations

import pickle

import pytest
import torch

import bdia_fx
from bdia_fx import BDIAConfig, ConversionError
from bdia_fx.converted import state_of

from cases import SIZED_CASES as CASES
from cases import logits, train_a_few_steps
from models import TinyGPT, gpt2, swin


@pytest.mark.parametrize("name", CASES)
def test_reverted_model_equals_original_and_converted_eval(name):
    build, make_inputs, kwargs = CASES[name]
    torch.manual_seed(0)
    model = build()
    conv = bdia_fx.convert(model, make_inputs(2, 8), kwargs, BDIAConfig(quantize_eval=False))
    train_a_few_steps(conv, make_inputs, kwargs)
    plain, plain_q = bdia_fx.revert(conv), bdia_fx.revert(conv, quantize=True)
    conv_q = bdia_fx.convert(model, make_inputs(2, 8), kwargs)  # quantize_eval=True, same weights
    for m in (model, conv, conv_q, plain, plain_q):
        m.eval()
    assert type(plain) is type(model)
    assert plain.state_dict().keys() == model.state_dict().keys()
    assert all(a is b for a, b in zip(plain.parameters(), model.parameters()))
    with torch.no_grad():
        for batch, length in [(2, 8), (3, 5)]:
            inputs = make_inputs(batch, length)
            reference = logits(model(*inputs, **kwargs))
            assert torch.equal(logits(plain(*inputs, **kwargs)), reference)
            assert torch.equal(logits(conv(*inputs, **kwargs)), reference)
            assert torch.equal(logits(plain_q(*inputs, **kwargs)), logits(conv_q(*inputs, **kwargs)))


def test_reverted_model_is_an_ordinary_module():
    model = TinyGPT()
    ids = torch.randint(0, 50, (2, 8))
    conv = bdia_fx.convert(model, (ids,))
    reverted = bdia_fx.revert(conv)
    assert all(type(a) is type(b) for a, b in zip(reverted.modules(), model.modules()))
    assert not reverted._forward_pre_hooks
    copy = pickle.loads(pickle.dumps(reverted))
    reverted.eval(), copy.eval()
    assert torch.equal(copy(ids), reverted(ids))
    with pytest.raises(ConversionError, match="not converted"):
        bdia_fx.revert(reverted)


def test_revert_leaves_the_converted_model_working():
    model = gpt2(3)
    ids = torch.randint(0, 64, (2, 8))
    conv = bdia_fx.convert(model, (ids,), {"use_cache": False})
    bdia_fx.revert(conv, quantize=True)
    conv.train()
    conv(ids, labels=ids, use_cache=False).loss.backward()
    assert all(p.grad is not None for p in conv.parameters())
    assert conv.transformer.h[0]._bdia_runtime is state_of(conv).runtimes["transformer.h"]


def test_trained_checkpoint_loads_into_a_fresh_original_model():
    torch.manual_seed(0)
    build, make_inputs, kwargs = CASES["tiny-gpt"]
    conv = bdia_fx.convert(build(), make_inputs(2, 8), kwargs)
    train_a_few_steps(conv, make_inputs, kwargs)
    fresh = build()
    fresh.load_state_dict(bdia_fx.revert(conv).state_dict(), strict=True)
    ids = make_inputs(3, 7)
    fresh.eval(), conv.eval()
    assert torch.equal(fresh(*ids), bdia_fx.revert(conv).eval()(*ids))


def test_hf_save_pretrained_round_trip(tmp_path):
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    model = gpt2(3)
    ids = torch.randint(0, 64, (2, 8))
    conv = bdia_fx.convert(model, (ids,), {"use_cache": False})
    train_a_few_steps(conv, lambda b, t: (torch.randint(0, 64, (b, t)),), {"use_cache": False})
    reverted = bdia_fx.revert(conv).eval()
    reverted.save_pretrained(tmp_path)
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids, use_cache=False).logits, reverted(ids, use_cache=False).logits)
    # ... and the saved checkpoint converts again and keeps training
    again = bdia_fx.convert(loaded, (ids,), {"use_cache": False})
    again.train()
    again(ids, labels=ids, use_cache=False).loss.backward()


def test_plain_checkpoint_loads_into_converted_model_then_reverts_unchanged():
    source, target = TinyGPT(), TinyGPT()
    ids = torch.randint(0, 50, (2, 8))
    conv = bdia_fx.convert(target, (ids,))
    conv.load_state_dict(source.state_dict(), strict=True)
    source.eval()
    assert torch.equal(bdia_fx.revert(conv).eval()(ids), source(ids))


def test_bad_input_is_refused():
    with pytest.raises(ConversionError, match="was not converted"):
        bdia_fx.revert(TinyGPT())
    original = TinyGPT()
    lazy = bdia_fx.convert(original)
    with pytest.raises(ConversionError, match="has not been called yet"):
        bdia_fx.revert(lazy, quantize=True)
    ids = torch.randint(0, 50, (2, 8))
    unplanned = bdia_fx.revert(lazy).eval()  # nothing was rewritten yet: the original model
    assert bdia_fx.graph_of(unplanned) is None
    assert torch.equal(unplanned(ids), original.eval()(ids))


def test_a_model_of_stages_reverts_to_the_original_at_every_stage_and_exports(tmp_path):
    """Swin: one chain per stage; reverted = original, converted eval = reverted quantized, and both
    export to one ONNX file with a dynamic batch that onnxruntime runs at another batch size too
    (eager attention: torch.onnx 2.13 fails on HF Swin's SDPA path, plain model included)."""
    torch.manual_seed(0)
    model = swin((2, 2), attention="eager")
    images = torch.randn(2, 3, 32, 32)
    conv = bdia_fx.convert(model, (images,))
    assert len(state_of(conv).runtimes) == 2
    train_a_few_steps(conv, lambda b, t: (torch.randn(b, 3, 32, 32),), {})
    plain, quantized = bdia_fx.revert(conv), bdia_fx.revert(conv, quantize=True)
    for m in (model, conv, plain, quantized):
        m.eval()
    with torch.no_grad():
        assert torch.equal(plain(images).logits, model(images).logits)
        assert torch.equal(quantized(images).logits, conv(images).logits)
        assert not torch.equal(quantized(images).logits, model(images).logits)
    for quantize, reference in ((False, plain), (True, quantized)):
        export = bdia_fx.export_onnx(conv, tmp_path / f"swin{quantize}.onnx", (images,), quantize=quantize)
        assert export.check.mismatched == 0
        other = torch.randn(3, 3, 32, 32)
        assert bdia_fx.verify_onnx(export.path, reference, (other,)).mismatched == 0
