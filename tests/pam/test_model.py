"""bdia_fx.pam: the PAM model's contract, its routing of plain operators, and composition with convert."""

from __future__ import annotations

import inspect
import pickle

import pytest
import torch
from torch import nn

import bdia_fx
from bdia_fx import BDIAConfig, ConversionError
from bdia_fx.pam.arithmetic import pam_div, pam_matmul, pam_mul

from cases import assert_close, grads
from models import TinyGPT, gpt2


class Plain(nn.Module):
    """Multiplications written as operators: @, *, a Python-number product, /, in-place *= and /=, bmm, baddbmm."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = x @ self.w
        h = h * y
        h = 3 * h / (y + 2)
        h *= 0.5
        h /= 3.0
        return torch.baddbmm(h, h, torch.bmm(h.transpose(1, 2), y))


def test_plain_operators_run_as_pam():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 4, 4, generator=g), torch.randn(2, 4, 4, generator=g)
    model = Plain()
    out = bdia_fx.pam.convert(model, (x, y))(x, y)
    h = pam_mul(pam_matmul(x, model.w.detach()), y)
    h = pam_mul(pam_div(pam_mul(torch.tensor(3.0), h), y + 2), torch.tensor(0.5))
    h = pam_div(h, torch.tensor(3.0))
    want = h + pam_matmul(h, pam_matmul(h.transpose(1, 2), y))
    assert torch.equal(out.detach(), want)
    report = bdia_fx.pam.report_of(bdia_fx.pam.convert(model, (x, y)))
    assert sorted(n.kind for n in report.replaced) == ["div", "div", "matmul", "matmul", "matmul", "mul", "mul", "mul"]


def test_same_classes_signature_state_dict_and_parameters_and_the_model_is_untouched():
    torch.manual_seed(0)
    model = gpt2(2).eval()  # no dropout: outputs comparable
    ids = torch.randint(0, 64, (2, 8))
    before = model(ids, use_cache=False).logits
    pam_model = bdia_fx.pam.convert(model, (ids,), {"use_cache": False})
    assert isinstance(pam_model, type(model)) and type(pam_model).__name__ == type(model).__name__
    assert inspect.signature(pam_model.forward) == inspect.signature(model.forward)
    assert list(pam_model.state_dict()) == list(model.state_dict())
    assert all(p is q for p, q in zip(pam_model.parameters(), model.parameters()))
    out = pam_model(ids, use_cache=False)
    assert type(out) is type(model(ids, use_cache=False)) and not torch.equal(out.logits, before)
    assert torch.equal(model(ids, use_cache=False).logits, before)  # the original still multiplies
    assert all(type(m).__module__ != "bdia_fx" and "[pam]" not in type(m).__qualname__ for m in model.modules())


def test_eager_model_and_rewritten_graph_agree_bit_for_bit():
    """nn.MultiheadAttention's functional forward included: its products are reached one by one."""
    torch.manual_seed(1)
    model, ids = TinyGPT(layers=2), torch.randint(0, 50, (2, 12))
    pam_model = bdia_fx.pam.convert(model, (ids,))
    report = bdia_fx.pam.report_of(pam_model)
    assert {n.kind for n in report.replaced} == {"linear", "attention"}
    out = pam_model(ids)
    assert torch.equal(out, bdia_fx.pam.graph_of(pam_model)(ids))
    with torch.no_grad():  # eval without grad: nn.MultiheadAttention's native fast path is not taken
        assert torch.equal(pam_model.eval()(ids), out)
    loaded = pickle.loads(pickle.dumps(pam_model))
    assert type(loaded) is type(pam_model) and torch.equal(loaded(ids), out)


def test_refusals():
    model, ids = TinyGPT(layers=2), torch.randint(0, 50, (2, 12))
    with pytest.raises(ConversionError, match="apply pam first"):
        bdia_fx.pam.convert(bdia_fx.convert(model, (ids,)), (ids,))
    with pytest.raises(ConversionError, match="already runs PAM"):
        bdia_fx.pam.convert(bdia_fx.pam.convert(model), (ids,))
    with pytest.raises(ValueError, match="ops must be"):
        bdia_fx.pam.convert(model, (ids,), ops=("conv",))
    with pytest.raises(ConversionError, match=r"node 'linear'.*float64"):
        bdia_fx.pam.convert(nn.Sequential(nn.Linear(3, 3)).double(), (torch.randn(2, 3, dtype=torch.float64),))
    lazy = bdia_fx.pam.convert(nn.Sequential(nn.Linear(3, 3)))  # no capture: refused at run time instead
    with pytest.raises(ConversionError, match="at run time.*float64"):
        lazy.double()(torch.randn(2, 3, dtype=torch.float64))


@pytest.mark.parametrize("granularity", ["block", "sublayer"])
def test_convert_of_a_pam_model_is_exact_and_reverts_to_it(granularity):
    torch.manual_seed(2)
    model, ids = TinyGPT(layers=4, dropout=0.1), torch.randint(0, 50, (2, 12))
    pam_model = bdia_fx.pam.convert(model, (ids,))
    conv = bdia_fx.convert(pam_model, (ids,), config=BDIAConfig(granularity=granularity))
    chain = next(iter(bdia_fx.report_of(conv).chains))
    assert len(chain.blocks) == 4
    assert bdia_fx.check_exactness(conv, (ids,)).exact
    _, want = grads(bdia_fx.convert(pam_model, (ids,), config=BDIAConfig(mode="stored", granularity=granularity)),
                    (ids,), {}, 3)
    _, got = grads(conv, (ids,), {}, 3)
    assert_close(got, want)
    _, float_grads = grads(bdia_fx.convert(model, (ids,), config=BDIAConfig(mode="stored")), (ids,), {}, 3)
    assert not torch.equal(got[0], float_grads[0])  # the PAM chain, not the float one
    loaded = pickle.loads(pickle.dumps(conv))  # convert's proxies of PAM classes pickle too
    assert type(loaded.blocks[0]).__mro__[1] is type(pam_model.blocks[0])
    reverted = bdia_fx.revert(conv)
    assert type(reverted) is type(pam_model) and bdia_fx.pam.report_of(reverted) is bdia_fx.pam.report_of(pam_model)
    assert torch.equal(reverted.eval()(ids), pam_model.eval()(ids))


def test_nonlinear_option_leaves_only_dropout_in_a_gpt_and_both_doors_agree():
    torch.manual_seed(3)
    model, ids = TinyGPT(layers=2), torch.randint(0, 50, (2, 12))
    default = bdia_fx.pam.report_of(bdia_fx.pam.convert(model, (ids,)))
    assert {n.target for n in default.left} == {"layer_norm", "gelu", "dropout"}
    pam_model = bdia_fx.pam.convert(model, (ids,), ops=("linear", "matmul", "attention", "mul", "div", "nonlinear"))
    report = bdia_fx.pam.report_of(pam_model)
    assert {n.target for n in report.left} == {"dropout"}  # nn.Dropout(p=0) here: it still reports
    assert {n.target for n in report.replaced if n.kind == "nonlinear"} == {"layer_norm", "gelu"}
    out = pam_model(ids)
    assert torch.equal(out, bdia_fx.pam.graph_of(pam_model)(ids))
    assert not torch.equal(out, bdia_fx.pam.convert(model, (ids,))(ids))  # softmax, norms and GELU changed too
    conv = bdia_fx.convert(pam_model, (ids,))
    assert bdia_fx.check_exactness(conv, (ids,)).exact
