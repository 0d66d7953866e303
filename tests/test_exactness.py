"""check_exactness: bit-for-bit comparison of rebuilt block inputs with the forward's, on integer codes."""

import pytest
import torch

import bdia_fx
from bdia_fx import BDIAConfig

from models import PythonRandomBlock, Stack, TinyGPT, gpt2


def test_every_rebuilt_input_is_bit_exact_with_dropout(device):
    torch.manual_seed(0)
    model = TinyGPT(layers=12, dropout=0.2).to(device)
    ids = torch.randint(0, 50, (3, 10), device=device)
    report = bdia_fx.check_exactness(bdia_fx.convert(model, (ids,)), (ids,))
    assert report.exact and len(report.blocks) == 12  # the state (x_{k-1}, x_k) before each block, k = 11 … 0
    assert [b.block for b in report.blocks] == [f"blocks.{k}" for k in range(12)]
    assert all(b.elements == 2 * 3 * 10 * 32 and b.max_code_error == 0 for b in report.blocks)
    assert "bit-exact" in str(report)


def test_a_non_deterministic_block_shows_up_as_code_errors():
    """The checksum check raises at the end of the backward; the report still shows every rebuilt input."""
    x = torch.randn(4, 8)
    conv = bdia_fx.convert(Stack([PythonRandomBlock() for _ in range(4)]), (x,))
    report = bdia_fx.check_exactness(conv, (x.requires_grad_(),))
    assert not report.exact and len(report.blocks) == 4
    assert report.blocks[-1].mismatched > 0 and "NOT exact" in str(report)


def test_hf_model_with_a_loss_function_and_wrong_mode():
    ids = torch.randint(0, 64, (2, 8))
    model = gpt2(3)
    conv = bdia_fx.convert(model, (ids,), {"use_cache": False})
    conv.eval()
    report = bdia_fx.check_exactness(conv, (ids,), {"labels": ids, "use_cache": False}, loss_fn=lambda out: out.loss)
    assert report.exact and not conv.training  # the mode is restored
    stored = bdia_fx.convert(model, (ids,), {"use_cache": False}, BDIAConfig(mode="stored"))
    with pytest.raises(ValueError, match="mode='reversible'"):
        bdia_fx.check_exactness(stored, (ids,), {"use_cache": False})
