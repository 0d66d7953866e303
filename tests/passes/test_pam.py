"""The PAM pass on captured graphs: the report (replaced, left with reasons, products), refusals, the rewrite."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bdia_fx.errors import ConversionError
from bdia_fx.pam.ops import ALL_OPS, pam_linear
from bdia_fx.passes.capture import capture
from bdia_fx.passes.pam import PAM_META_KEY, analyse_pam, rewrite_pam


class Mixed(nn.Module):
    """A linear, a plain a * b, an integer product, a division, a bmm, a GELU and a layer norm."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.norm = nn.LayerNorm(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)                                   # (2, 3, 6)
        scale = torch.arange(3, device=x.device) * 2      # integer arithmetic
        h = h * x / (scale[None, :, None] + 1)
        return self.norm(torch.nn.functional.gelu(torch.bmm(h, h.transpose(1, 2))))


def captured(model: nn.Module, *args: torch.Tensor):
    return capture(model, args).module()


def test_report_lists_replaced_and_left_nodes_with_reasons():
    report = analyse_pam(captured(Mixed(), torch.randn(2, 3, 6)), ALL_OPS, "approx", "Mixed")
    assert sorted(n.kind for n in report.replaced) == ["div", "linear", "matmul", "mul"]
    by_target = {n.target: n for n in report.left}
    assert "integer arithmetic" in by_target["mul"].reason
    assert all("needs 'nonlinear' in ops" in by_target[t].reason for t in ("gelu", "layer_norm"))
    linear = next(n for n in report.replaced if n.kind == "linear")
    assert linear.module == "lin" and linear.products == 2 * 3 * 6 * 6
    bmm = next(n for n in report.replaced if n.kind == "matmul")
    assert bmm.products == 2 * 3 * 3 * 6
    assert report.forward_products() == 2 * 3 * 6 * 6 + 2 * 3 * 3 * 6 + 2 * 36
    text = str(report)
    assert "replaced 4 nodes" in text and "gelu" in text and "integer arithmetic" in text


def test_ops_selects_what_is_replaced():
    report = analyse_pam(captured(Mixed(), torch.randn(2, 3, 6)), ("linear",), "exact")
    assert [n.kind for n in report.replaced] == ["linear"]
    assert {n.target: n.reason for n in report.left}["bmm"] == "'matmul' is not in ops"


def test_a_selected_multiplication_in_float64_is_refused_naming_the_node():
    model = Mixed().double()
    with pytest.raises(ConversionError, match=r"\[module 'lin', node 'linear'\].*float64.*float32"):
        analyse_pam(captured(model, torch.randn(2, 3, 6, dtype=torch.float64)), ALL_OPS, "approx")
    report = analyse_pam(captured(model, torch.randn(2, 3, 6, dtype=torch.float64)), ("attention",), "approx")
    assert not report.replaced  # not selected: left, not refused


def test_rewrite_marks_and_replaces_exactly_the_replaced_nodes_and_runs():
    torch.manual_seed(0)
    model, x = Mixed(), torch.randn(2, 3, 6)
    graph_module = captured(model, x)
    report = analyse_pam(graph_module, ALL_OPS, "approx")
    rewritten = rewrite_pam(graph_module, report)
    marked = {n.name: n.meta[PAM_META_KEY] for n in rewritten.graph.nodes if PAM_META_KEY in n.meta}
    assert marked == {n.node: n.target for n in report.replaced}
    linear = next(n for n in rewritten.graph.nodes if n.name == "linear")
    assert linear.target is pam_linear and linear.kwargs["rule"] == "approx"
    assert all(PAM_META_KEY not in n.meta for n in graph_module.graph.nodes)  # the capture is not changed
    out = rewritten(x)
    assert out.shape == model(x).shape and not torch.equal(out, graph_module(x))
    assert torch.equal(rewritten.get_parameter("lin.weight"), model.lin.weight)  # the model's parameters
