"""What users saved with bdia_fx 0.1 (tests/data/bdia_fx_0_1, written by make_0_1_fixtures.py with
commit 7536aa5): ``state_dict`` and ``save_pretrained`` files load, with the outputs 0.1 computed; a
model pickled whole fails naming the version to use."""

from __future__ import annotations

import pathlib

import pytest
import torch

import bdia_fx

from models import TinyGPT

DATA = pathlib.Path(__file__).parent / "data" / "bdia_fx_0_1"


def test_a_0_1_state_dict_loads_into_a_model_converted_now_with_the_same_outputs():
    saved = torch.load(DATA / "tinygpt_state_dict.pt")
    conv = bdia_fx.convert(TinyGPT(vocab=50, d=16, heads=2, layers=2, max_len=16), (saved["ids"],))
    conv.load_state_dict(saved["state_dict"])
    conv.eval()
    plain = TinyGPT(vocab=50, d=16, heads=2, layers=2, max_len=16)
    plain.load_state_dict(saved["state_dict"])
    with torch.no_grad():
        assert torch.equal(conv(saved["ids"]), saved["converted_eval"])  # fixed point: the same on every CPU
        reverted = bdia_fx.revert(conv)(saved["ids"])
        assert torch.equal(reverted, plain.eval()(saved["ids"]))
    _assert_as_saved(reverted, saved["reverted_eval"])


def _assert_as_saved(got: torch.Tensor, saved: torch.Tensor) -> None:
    """A float output equal to 0.1's up to the last bits another CPU's kernels round differently (the
    fixtures' machine and this one need not share an instruction set)."""
    torch.testing.assert_close(got, saved, rtol=1e-5, atol=1e-6)


def test_a_0_1_save_pretrained_directory_loads_with_the_same_outputs():
    transformers = pytest.importorskip("transformers")
    model = transformers.GPT2LMHeadModel.from_pretrained(DATA / "gpt2_converted_save_pretrained")
    saved = torch.load(DATA / "gpt2_outputs.pt")
    model.eval()
    with torch.no_grad():
        plain = model(saved["ids"], use_cache=False).logits
        conv = bdia_fx.convert(model, (saved["ids"],))
        reverted = bdia_fx.revert(conv)(saved["ids"], use_cache=False).logits
    _assert_as_saved(reverted, saved["reverted_eval"])
    torch.testing.assert_close(plain, saved["reverted_eval"], rtol=0, atol=1e-4)  # γ = 0, quantized to 2^-frac_bits


@pytest.mark.parametrize("name, module", [("tinygpt_converted_whole.pt", "bdia_fx.runtime"),
                                          ("tinygpt_pam_whole.pt", "bdia_fx.pam_model")])
def test_a_model_pickled_whole_by_0_1_fails_naming_the_version_and_the_way_over(name, module):
    with pytest.raises(ModuleNotFoundError) as info:
        torch.load(DATA / name, weights_only=False)
    message = str(info.value)
    assert f"'{module}': a module of bdia_fx 0.1, moved in 0.2" in message
    assert "loads only with the bdia_fx 0.1" in message and "model.state_dict()" in message


def test_the_earlier_layout_names_only_modules_that_exist_nowhere_now():
    from bdia_fx.legacy import MOVED_IN_0_2

    for old in MOVED_IN_0_2:
        with pytest.raises(ModuleNotFoundError, match="moved in 0.2"):
            __import__(old)
    with pytest.raises(ModuleNotFoundError) as info:
        __import__("bdia_fx.no_such_module")
    assert "0.1" not in str(info.value)


def test_calling_the_pam_package_says_what_to_call_now():
    with pytest.raises(TypeError, match=r"bdia_fx\.pam\.convert\(model"):
        bdia_fx.pam(TinyGPT())
