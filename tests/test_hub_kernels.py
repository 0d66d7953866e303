"""bdia_fx.hub_kernels: forwards the kernels package wraps are found, bypassed only under compile and only
while not kernelized, follow every copy of the converted model, and are gone after revert."""

from __future__ import annotations

import copy
import io
import types

import pytest
import torch

import bdia_fx
from bdia_fx.hub_kernels import UnwrappedForward, kernel_wrapped, kernelized
from bdia_fx.module_tree import shallow_clone

from models import gpt2, llama


@pytest.fixture(scope="module")
def converted():
    torch.manual_seed(0)
    model = llama(2)
    if not kernel_wrapped(model.model.layers[0].self_attn):
        pytest.skip("this transformers version does not wrap Llama's forwards with the kernels package")
    ids = torch.randint(0, 64, (2, 8))
    return model, bdia_fx.convert(model, (ids,), {"use_cache": False}), ids


def test_only_forwards_of_the_kernels_package_are_found():
    assert not kernel_wrapped(gpt2(1).transformer.h[0].attn)
    assert not kernel_wrapped(torch.nn.Linear(2, 2))


def test_the_blocks_wrapped_forwards_get_one_and_the_users_model_none(converted):
    model, conv, _ = converted
    for original, copied in zip(model.model.layers, conv.model.layers):
        forward = vars(copied.self_attn).get("forward")
        assert isinstance(forward, UnwrappedForward) and forward.module is copied.self_attn
        assert "forward" not in vars(original.self_attn)


@pytest.mark.parametrize("how", ["shallow_clone", "deepcopy", "pickle"])
def test_every_copy_calls_its_own_module(converted, how):
    _, conv, ids = converted
    if how == "shallow_clone":
        copied = shallow_clone(conv)
    elif how == "deepcopy":
        copied = copy.deepcopy(conv)
    else:
        buffer = io.BytesIO()
        torch.save(conv, buffer)
        buffer.seek(0)
        copied = torch.load(buffer, weights_only=False)
    attention = copied.model.layers[0].self_attn
    assert vars(attention)["forward"].module is attention
    if how == "shallow_clone":
        return  # revert's first step: the structure only
    with torch.no_grad():
        assert torch.equal(copied.eval()(ids, use_cache=False).logits, conv.eval()(ids, use_cache=False).logits)


def _kernelize(attention):
    """What kernels.kernelize does to one of the module's kernel functions: another forward chosen for it."""
    func = next(iter(attention._kernel_funcs.values()))
    func.forward = types.MethodType(lambda self, *a, **k: type(self).forward(self, *a, **k), func)
    return func


def test_kernelized_means_another_forward_chosen_for_a_kernel_function(converted):
    _, conv, _ = converted
    attention = conv.model.layers[0].self_attn
    assert not kernelized(attention)
    func = _kernelize(attention)
    try:
        assert kernelized(attention)
    finally:
        del func.forward
    assert not kernelized(attention)
    assert kernelized(torch.nn.Linear(2, 2))  # a module without the wrapper's table is never bypassed


def test_the_wrapped_function_runs_only_under_compile_and_while_not_kernelized(converted, monkeypatch):
    _, conv, _ = converted
    attention = conv.model.layers[0].self_attn
    seen = []

    def wrapper(self, *args, **kwargs):
        seen.append("wrapper")

    wrapper.__wrapped__ = lambda self, *args, **kwargs: seen.append("wrapped")
    monkeypatch.setattr(type(attention), "forward", wrapper)
    forward = vars(attention)["forward"]
    forward()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    forward()
    func = _kernelize(attention)
    try:
        forward()
    finally:
        del func.forward
    assert seen == ["wrapper", "wrapped", "wrapper"]
